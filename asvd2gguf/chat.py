"""Chat-formatted calibration: what an instruct model sees when people use it.

A chat model runs through its chat template: role markers, a system prompt, a user turn, its
own reply. ASVD (Yuan et al. 2023, arXiv 2312.05821) scales and truncates by calibration
activations, so the factorization keeps what the calibration text exercises; plain WikiText
without the template tells it nothing about chat use, and on SmolLM2-135M-Instruct a
WikiText-calibrated file at --ratio 0.95 stops answering questions (issue 11). So for a model with a chat template the
default calibration is built from conversations:

- user prompts written for this project (data/chat_prompts.json, 'calibration' part: questions,
  instructions, code, lists, several languages), in a seeded order;
- each answered by the float model itself, sampled with llama.cpp's default sampler
  (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05: what users get) from a fixed seed, at
  most MAX_NEW tokens;
- each rendered with the model's own chat template (tokenizer.chat_template; for a .gguf source
  it comes from the file's tokenizer.chat_template key) and packed into windows that start at a
  conversation's first token, as a chat does;
- mixed with plain text: one window in PLAIN_EVERY is plain (wiki.valid.tokens when present,
  else text sampled from the model), so long-form text, the other way people use the file
  (llama-completion without the template, llama-perplexity), still shapes the statistics.

`--calib FILE.jsonl` takes conversations instead, one {"messages": [...]} per line, rendered
the same way; a conversation that ends on a user turn gets the model's reply first. Generated
conversations are cached by model fingerprint, template, prompts, seed and sampler.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .atomic import write_text_atomic
from .errors import UserError
from .placement import execution_device
from .text import adds_bos, calibration_windows, default_calibration, read_text, tokenize, wiki_calibration

DATA = Path(__file__).resolve().parent / "data"
PROMPTS_FILE = DATA / "chat_prompts.json"
PLAIN_EVERY = 4  # windows i with i % PLAIN_EVERY == PLAIN_EVERY - 1 are plain text: 3/4 chat, 1/4 plain
MAX_NEW = 192  # tokens per generated reply: bounded, so a rambling reply cannot fill the calibration
GEN_BATCH = 8  # replies generated together (left-padded); fixed, so each batch's seed is too
# llama.cpp's default sampler (common/common.h): the replies people actually get from the file
SAMPLER = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
ROLES = ("system", "user", "assistant")

Conversation = list[dict]  # [{"role": ..., "content": ...}, ...]


def load_prompts(split: str) -> list[str]:
    """The project's user prompts: split 'calibration' or 'heldout' (never used for calibration)."""
    data = json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))
    if split not in ("calibration", "heldout"):
        raise ValueError(f"unknown prompt split {split!r}")
    return list(data[split])


def chat_template(tokenizer, gguf_path: Path | None = None) -> str | None:
    """The model's chat template: the tokenizer's, else the GGUF's tokenizer.chat_template key.

    transformers copies the GGUF key into the tokenizer it builds from a .gguf; the fallback
    reads the file directly for tokenizers that came without it. None when the model has none.
    """
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):  # several named templates: the default one is what chats use
        tmpl = tmpl.get("default")
    if tmpl:
        return str(tmpl)
    if gguf_path is not None and Path(gguf_path).is_file():
        from .gguf_fast import FastGGUFReader

        field = FastGGUFReader(gguf_path).fields.get("tokenizer.chat_template")
        if field is not None and field.contents():
            return str(field.contents())
    return None


def render(tokenizer, template: str, messages: Conversation, add_generation_prompt: bool = False) -> str:
    """One conversation as text, through the model's chat template (transformers' jinja renderer).

    Raises UserError when the template fails on these messages (e.g. it rejects a role order).
    """
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises TemplateError, templates raise their own exceptions
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the chat template failed on a conversation: {msg}") from None
    return text if isinstance(text, str) else str(text)


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a rendered conversation as llama.cpp gets them: special tokens parsed, one
    BOS in front when the vocabulary adds one and the template did not write it."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + list(ids)
    return torch.tensor(ids, dtype=torch.long)


def parse_conversations(path: Path) -> list[Conversation]:
    """Conversations from a JSONL file: one {"messages": [{"role", "content"}, ...]} per line.

    Blank lines are skipped. Raises UserError naming the file and line for anything else that
    is not such an object (bad JSON, no messages, an unknown role, non-string content).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"conversation file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read conversation file {path}: {getattr(e, 'strerror', None) or e}") from None
    convs = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{Path(path).name} line {no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f'{where}: expected {{"messages": [...]}} with at least one message')
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: each message needs a role ({', '.join(ROLES)}) and string content")
        if msgs[-1]["role"] == "system":
            raise UserError(f"{where}: the conversation has no user turn after its system message")
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not convs:
        raise UserError(f"conversation file has no conversations: {path}")
    return convs


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        ids += v if isinstance(v, list) else [v] if v is not None else []
    return sorted({int(i) for i in ids})


_PROBE = "q7Zx4Kv"  # reply text no template rewrites: what the template writes after it ends the turn


def turn_end_ids(tokenizer, template: str) -> list[int]:
    """The special token the template writes right after an assistant message ([] if none).

    That is the end-of-turn marker (<|im_end|>, <end_of_turn>, <|eot_id|>), where a chat reply
    ends. It need not be the vocabulary's EOS: a Gemma 3 GGUF can say EOS = <eos> while turns end
    with <end_of_turn>; llama.cpp stops at both (it marks such tokens end-of-generation,
    src/llama-vocab.cpp), so the torch generation here must too, or a reply runs on past its turn.
    Found by rendering a probe conversation; [] when the template fails on it or writes no
    special token there.
    """
    try:
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        text = render(tokenizer, template, probe)
    except UserError:
        return []
    at = text.rfind(_PROBE)
    if at < 0:
        return []
    ids = tokenizer(text[at + len(_PROBE):], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {int(i) for i, t in added.items() if getattr(t, "special", False)}
    return [int(ids[0])] if ids and ids[0] in special else []


def stop_ids(model, tokenizer, template: str) -> list[int]:
    """Tokens that end a generated reply: EOS (generation config and tokenizer) and the
    template's end-of-turn token (turn_end_ids)."""
    return sorted(set(_eos_ids(model, tokenizer)) | set(turn_end_ids(tokenizer, template)))


def stop_key(model, tokenizer, template: str) -> list:
    """Cache-key part for the stop tokens: empty when they are EOS alone (the keys, and the
    replies, of models whose turns end with EOS, as before turn_end_ids), else the extra ids."""
    extra = sorted(set(stop_ids(model, tokenizer, template)) - set(_eos_ids(model, tokenizer)))
    return [["turn-end", extra]] if extra else []


def sample_next(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of logits (B, vocab), by llama.cpp's default sampler chain: top-k,
    top-p and min-p filter the distribution, temperature then scales what is left, and one
    token is drawn (common/sampling.cpp). generator None: greedy (argmax)."""
    if generator is None:
        return logits.argmax(-1)
    top, idx = logits.float().topk(min(SAMPLER["top_k"], logits.shape[-1]), dim=-1)  # sorted, descending
    p = torch.softmax(top, dim=-1)
    before = p.cumsum(-1) - p  # mass of the better tokens: keep while it is below top_p
    keep = (before < SAMPLER["top_p"]) & (p >= SAMPLER["min_p"] * p[:, :1])
    keep[:, 0] = True
    scaled = torch.where(keep, top / SAMPLER["temperature"], torch.full_like(top, -torch.inf))
    pick = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator)
    return idx.gather(-1, pick).squeeze(-1)


def _forward(model, **kw):
    with warnings.catch_warnings():  # transformers 5 renames past_key_values; 4.x knows only that name
        warnings.simplefilter("ignore", FutureWarning)
        return model(**kw, use_cache=True)


@torch.no_grad()
def generate_replies(model, tokenizer, template: str, convs: list[Conversation], seed: int,
                     max_new: int = MAX_NEW, greedy: bool = False) -> list[Conversation]:
    """Each conversation (ending on a user turn) with the model's reply appended.

    One left-padded batch decoded with a KV cache; tokens drawn by sample_next from a CPU
    generator seeded with `seed` (greedy: argmax), so the replies depend only on the seed and
    the batch. A reply stops at EOS or the template's end-of-turn token (stop_ids) or after
    max_new tokens.
    """
    eos = torch.tensor(stop_ids(model, tokenizer, template) or [-1])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else max(int(eos[0]), 0)
    prompts = [encode(tokenizer, render(tokenizer, template, c, add_generation_prompt=True)) for c in convs]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dev = execution_device(model.get_input_embeddings())
    gen = None if greedy else torch.Generator().manual_seed(seed)
    res = _forward(model, input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev))
    out = torch.full((len(prompts), max_new), pad, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for step in range(max_new):
        nxt = sample_next(res.logits[:, -1, :].float().cpu(), gen)
        out[:, step] = torch.where(done, pad, nxt)
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        res = _forward(model, input_ids=nxt[:, None].to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                       past_key_values=res.past_key_values)
    replies = []
    for c, row in zip(convs, out.tolist()):
        cut = next((j for j, t in enumerate(row) if t in eos.tolist()), len(row))
        replies.append(c + [{"role": "assistant", "content": tokenizer.decode(row[:cut], skip_special_tokens=True)
                             .strip()}])
    return replies


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _save_json(obj, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def answered(model, tokenizer, template: str, source: Iterator[Conversation], seed: int, cache_path: Path,
             enough: Callable[[list[Conversation]], bool], greedy: bool = False) -> list[Conversation]:
    """Conversations from `source` with the model's replies, until `enough` says so or it runs out.

    Replies are generated GEN_BATCH at a time, batch b with seed `seed + b`, so the list is a
    deterministic prefix: it is cached at `cache_path` and extended (never regenerated) when a
    later call needs more. Conversations that already end on an assistant turn pass unchanged.
    """
    cached = _load_json(cache_path)
    done: list[Conversation] = cached["conversations"] if cached else []
    src = iter(source)
    for _ in range(len(done)):  # skip what the cache already holds
        if next(src, None) is None:
            return done
    while not enough(done):
        batch = [c for _, c in zip(range(GEN_BATCH), src)]
        if not batch:
            break
        todo = [c for c in batch if c[-1]["role"] != "assistant"]
        replies = iter(generate_replies(model, tokenizer, template, todo, seed + len(done) // GEN_BATCH,
                                        max_new=MAX_NEW, greedy=greedy) if todo else [])
        done += [c if c[-1]["role"] == "assistant" else next(replies) for c in batch]
        _save_json({"conversations": done}, cache_path)
    return done


def prompt_stream(prompts: list[str], seed: int) -> Iterator[Conversation]:
    """Single-turn conversations over the prompts, each pass in a new seeded order (endless)."""
    p = 0
    while True:
        order = list(prompts)
        random.Random(seed + p).shuffle(order)
        yield from ([{"role": "user", "content": q}] for q in order)
        p += 1


def pack_windows(seqs: list[torch.Tensor], n: int, seqlen: int) -> list[torch.Tensor]:
    """Up to n windows of exactly seqlen tokens, each starting at a sequence's first token.

    Sequences are laid end to end; a window closes as soon as it holds seqlen tokens (the
    sequence that overflows is cut and its rest dropped, so the next window starts a new one).
    """
    windows, cur, have = [], [], 0
    for s in seqs:
        if len(windows) == n:
            break
        cur.append(s)
        have += len(s)
        if have >= seqlen:
            windows.append(torch.cat(cur)[:seqlen])
            cur, have = [], 0
    return windows


def interleave(chat: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """Windows in the order chat, chat, chat, plain, ...: the first windows (the exact sweep's
    --sweep-samples) see the same mix as the whole set."""
    n = len(chat) + len(plain)
    ci, pi = iter(chat), iter(plain)
    rows = [next(pi) if i % PLAIN_EVERY == PLAIN_EVERY - 1 and len(plain) else next(ci) for i in range(n)]
    return torch.stack(rows)


def split_counts(n: int) -> tuple[int, int]:
    """(chat windows, plain windows) for n calibration windows: one in PLAIN_EVERY is plain."""
    return n - n // PLAIN_EVERY, n // PLAIN_EVERY


def resolve_calibration(spec: str | None, template: str | None) -> str:
    """The calibration a run uses: 'chat' by default when the model has a chat template, else
    wiki.valid.tokens (when present) or 'selfgen'; 'wiki' names wiki.valid.tokens explicitly."""
    if spec is None:
        return "chat" if template else default_calibration()
    if spec == "wiki":
        return wiki_calibration()
    return spec


def text_tokens(src, spec: str | None) -> int | None:
    """Tokens in the text file `spec` resolves to for `src` (wiki.valid.tokens included): windows
    of it cost only reading. None for chat, conversation files and selfgen, whose windows the
    model generates."""
    spec = resolve_calibration(spec, chat_template(src.tokenizer, src.gguf_path))
    if spec in ("chat", "selfgen") or spec.lower().endswith(".jsonl"):
        return None
    return len(tokenize(src.tokenizer, read_text(Path(spec))))


def calibration_tokens(src, spec: str | None, n: int, seqlen: int, seed: int,
                       cache_dir: Path) -> tuple[torch.Tensor, str]:
    """(n x seqlen calibration windows, a description for the file's metadata) for `src`.

    spec: None (default), 'chat', 'wiki', 'selfgen', a .jsonl conversation file or a text file.
    Raises UserError for a chat calibration of a model without a chat template, or when the
    conversations do not fill n windows.
    """
    template = chat_template(src.tokenizer, src.gguf_path)
    spec = resolve_calibration(spec, template)
    is_jsonl = spec.lower().endswith(".jsonl")
    if spec != "chat" and not is_jsonl:
        tokens = calibration_windows(src.tokenizer, spec, n, seqlen, seed, src.model)
        return tokens, ("selfgen" if spec == "selfgen" else Path(spec).name)
    if template is None:
        what = "--calib chat" if spec == "chat" else f"--calib {Path(spec).name}"
        raise UserError(f"{what} needs a chat template, and {src.name} has none (use a text file or selfgen)")
    tok = src.tokenizer
    tokens_of: dict[int, torch.Tensor] = {}

    def windows(convs: list[Conversation], k: int) -> list[torch.Tensor]:
        for i in range(len(tokens_of), len(convs)):
            tokens_of[i] = encode(tok, render(tok, template, convs[i]))
        return pack_windows([tokens_of[i] for i in range(len(convs))], k, seqlen)

    root = cache_dir / "chat"
    if is_jsonl:
        convs_in = parse_conversations(Path(spec))
        key = digest([src.fingerprint, template, digest(convs_in), seed, MAX_NEW, SAMPLER, "jsonl-v1",
                      *stop_key(src.model, tok, template)])
        convs = answered(src.model, tok, template, iter(convs_in), seed, root / f"{key}.json",
                         lambda c: len(windows(c, n)) == n)
        got = windows(convs, n)
        if len(got) < n:
            raise UserError(f"{Path(spec).name} fills only {len(got)} windows of {seqlen} tokens; "
                            f"give fewer --calib-samples, a shorter --calib-seqlen or more conversations")
        return torch.stack(got), f"{Path(spec).name} (conversations, {len(convs)})"
    n_chat, n_plain = split_counts(n)
    prompts = load_prompts("calibration")
    key = digest([src.fingerprint, template, digest(prompts), seed, MAX_NEW, SAMPLER, "chat-v1",
                  *stop_key(src.model, tok, template)])
    convs = answered(src.model, tok, template, prompt_stream(prompts, seed), seed, root / f"{key}.json",
                     lambda c: len(windows(c, n_chat)) == n_chat)
    chat = torch.stack(windows(convs, n_chat))
    plain_spec = default_calibration()
    if n_plain == 0:
        return chat, f"chat ({n_chat} windows of self-generated conversations)"
    plain = calibration_windows(tok, plain_spec, n_plain, seqlen, seed, src.model)
    plain_name = "selfgen" if plain_spec == "selfgen" else Path(plain_spec).name
    return interleave(chat, plain), (f"chat ({n_chat} windows of self-generated conversations, "
                                     f"{n_plain} of {plain_name})")
