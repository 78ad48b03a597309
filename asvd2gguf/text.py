"""Token windows for calibration and evaluation.

Calibration: random windows of a text file (seeded), or text sampled from the model itself
("selfgen") when no dataset is at hand. Evaluation: the first N non-overlapping windows, the
protocol every perplexity table in this project uses.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .errors import UserError
from .placement import execution_device

SHARED_CALIB = Path("..") / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def _wiki() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        p = (base / SHARED_CALIB).resolve()
        if p.is_file():
            return p
    return None


def default_calibration() -> str:
    """Plain-text calibration: wiki.valid.tokens beside the checkout when present, else text
    sampled from the model. (A model with a chat template defaults to chat.py's mix instead.)"""
    p = _wiki()
    return str(p) if p is not None else "selfgen"


def wiki_calibration() -> str:
    """`--calib wiki`: wiki.valid.tokens beside the checkout; UserError when it is not there."""
    p = _wiki()
    if p is None:
        raise UserError(f"--calib wiki: {SHARED_CALIB} not found beside the checkout or the working folder")
    return str(p)


def read_text(path: Path) -> str:
    """The file's text (UTF-8, undecodable bytes replaced); UserError when it is missing,
    unreadable or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(f"text file not found: {path}") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise UserError(f"cannot read text file {path}: {e.strerror or e}") from None
    if not text.strip():
        raise UserError(f"text file is empty: {path}")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The tokenizer's default encoding (BOS as the tokenizer adds it), as one long stream."""
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, spec: str, n_samples: int, seqlen: int, seed: int, model=None) -> torch.Tensor:
    """n_samples random windows of seqlen tokens, (n_samples, seqlen) int64, reproducible from the
    seed: of the text file `spec` or, for "selfgen", of text sampled from `model`. Raises
    UserError when the text is missing or too short for one window.

    A text window of a vocabulary that adds BOS (adds_bos) starts with BOS in place of its first
    token, as llama-imatrix and llama-perplexity cut their chunks: the statistics then come from
    the regime the model runs in. (Gemma 3 270M without BOS is another model: perplexity 339
    against 99 with it on wiki.valid windows of 256, and its first position is no attention sink.)"""
    if n_samples < 1 or seqlen < 2:
        raise UserError("calibration needs at least 1 sample of at least 2 tokens")
    if spec == "selfgen":
        if model is None:
            raise UserError("selfgen calibration needs the model")
        return selfgen_windows(model, tokenizer, n_samples, seqlen, seed)
    ids = tokenize(tokenizer, read_text(Path(spec)))
    if len(ids) < seqlen + 1:
        raise UserError(f"calibration text {spec} has {len(ids)} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (n_samples,), generator=g)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    if adds_bos(tokenizer):
        windows[:, 0] = tokenizer.bos_token_id
    return windows


def adds_bos(tokenizer, gguf_file: Path | None = None) -> bool:
    """Whether the vocabulary puts BOS in front of an encoding (llama.cpp's add_bos_token): then
    llama.cpp starts every context, perplexity chunk and imatrix chunk with it. With `gguf_file`,
    its tokenizer.ggml.add_bos_token decides (what llama.cpp reads; absent: False); else whether
    `tokenizer` adds it. The one home of this decision (calibration, ppl --llama-compat, eval --chat)."""
    if gguf_file is not None:
        from .gguf_read import field_value, open_gguf

        return bool(field_value(open_gguf(gguf_file), "tokenizer.ggml.add_bos_token", False))
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


@torch.no_grad()
def selfgen_windows(model, tokenizer, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Sample calibration text from the model (ASVD reference's data-free mode): top-k 50, T=1."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    first = torch.randint(0, vocab, (n_samples, 1), generator=g)
    if tokenizer.bos_token_id is not None:
        first[:] = tokenizer.bos_token_id
    out = first
    past = None
    x = out
    dev = execution_device(model.get_input_embeddings())  # the CPU, or where a device map put it
    for _ in range(seqlen - 1):
        res = model(input_ids=x.to(dev), past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = res.logits[:, -1, :].float().cpu()  # sampled with the CPU generator
        top, idx = logits.topk(50, dim=-1)
        probs = torch.softmax(top, dim=-1)
        pick = torch.multinomial(probs, 1, generator=g)
        x = idx.gather(-1, pick)
        out = torch.cat([out, x], dim=1)
    return out


def eval_windows(tokenizer, path: Path, ctx: int, chunks: int | None) -> torch.Tensor:
    """The first `chunks` non-overlapping ctx-token windows of the text (all that fit when None)."""
    ids = tokenize(tokenizer, read_text(path))
    n = len(ids) // ctx
    if chunks is not None:
        n = min(n, chunks)
    if n < 1:
        raise UserError(f"{path} has {len(ids)} tokens, fewer than one window of {ctx}")
    return ids[: n * ctx].view(n, ctx)


def tokens_digest(t: torch.Tensor) -> str:
    """16-hex-digit sha256 of a token tensor's bytes: part of every statistics cache key."""
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def llama_windows(
    tokenizer, path: Path, ctx: int, chunks: int | None, add_bos: bool, bos_id: int | None
) -> torch.Tensor:
    """Windows exactly as llama-perplexity cuts them: the text tokenized once (with BOS when
    the vocabulary adds one), consecutive ctx-token chunks, each chunk's first token replaced
    by BOS when the vocabulary adds one."""
    ids = tokenize(tokenizer, read_text(path))
    if add_bos and bos_id is not None and (len(ids) == 0 or int(ids[0]) != bos_id):
        ids = torch.cat([torch.tensor([bos_id]), ids])
    if not add_bos and bos_id is not None and len(ids) and int(ids[0]) == bos_id:
        ids = ids[1:]
    n = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    if n < 1:
        raise UserError(f"{path} has {len(ids)} tokens, fewer than one window of {ctx}")
    w = ids[: n * ctx].view(n, ctx).clone()
    if add_bos and bos_id is not None:
        w[:, 0] = bos_id
    return w
