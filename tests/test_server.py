"""llama-server and llama-cli on a factored SmolLM2 file with a latent KV cache (docs/runtime.md,
"Serving").

The file is the demo's: SmolLM2-135M-Instruct, --ratio 0.9 --kv 0.5 --method hybrid, calibrated on
8 x 256 tokens of wiki.valid.tokens (conftest.smol_latent). Every server runs on 127.0.0.1 on a
free port through asvd2gguf.llama_server, which stops it when the test ends, passed or not;
requests go through httpx with bounded timeouts. Chat requests use the file's own chat template
(llama-server's default Jinja rendering of tokenizer.chat_template), greedy (temperature 0).
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from asvd2gguf import llamacpp
from asvd2gguf.llama_server import llama_server

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.llama]

TIMEOUT_S = 300  # one request, worst case on 2 busy cores
QUESTIONS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle step by step.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a bicycle stay upright when it moves?",
)
# -t 2: the machine's cores; -fa on: the fused latent attention path (patch 0005) in decoding;
COMMON = ("-t", "2", "-fa", "on", "--no-warmup", "-lv", "4")  # -lv 4: the KV cache size is logged


def chat(client: httpx.Client, url: str, messages: list[dict], max_tokens: int = 48, **extra) -> dict:
    """One greedy chat completion (with the top-1 logprob of each generated token)."""
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "seed": 1, "logprobs": True,
            "top_logprobs": 1, **extra}
    r = client.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def text(res: dict) -> str:
    return res["choices"][0]["message"]["content"]


def tokens(res: dict) -> list[str]:
    return [t["token"] for t in res["choices"][0]["logprobs"]["content"]]


def agree_up_to_a_near_tie(x: dict, y: dict, n: int = 32, margin: float = 0.05) -> bool:
    """The greedy tokens of x and of the reference y agree for their first n, or up to a position
    where y's two best candidates are within `margin` nats: a near-tie that the rounding of F16
    latents against F16 K/V may flip (the top-1 logprobs of the two caches differ by ~0.01, see
    test_latent_cache_equals_dense_cache). Needs top_logprobs >= 2 in y's request."""
    i = same_prefix(x, y, n)
    if i == min(n, len(tokens(x)), len(tokens(y))):
        return True
    top = y["choices"][0]["logprobs"]["content"][i]["top_logprobs"]
    return len(top) > 1 and top[0]["logprob"] - top[1]["logprob"] < margin


def same_prefix(x: dict, y: dict, n: int = 32) -> int:
    """How many of the first n greedy tokens of x and y agree before they first differ."""
    for i, (a, b) in enumerate(zip(tokens(x)[:n], tokens(y)[:n])):
        if a != b:
            return i
    return min(n, len(tokens(x)), len(tokens(y)))


def logprobs(res: dict) -> list[float]:
    return [t["logprob"] for t in res["choices"][0]["logprobs"]["content"]]


def user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def _answers(url: str, questions, parallel: int, **extra) -> list[dict]:
    with httpx.Client() as client, ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda q: chat(client, url, user(q), **extra), questions))


def _alone(model: Path, tmp_path: Path, env: dict | None = None, name: str = "alone", **extra) -> list[dict]:
    """The QUESTIONS one at a time on a 1-slot server (no prompt reuse between them)."""
    with llama_server(model, (*COMMON, "-np", "1", "-c", "1024"), log=tmp_path / f"{name}.log", env=env) as srv:
        return _answers(srv.url, QUESTIONS, 1, cache_prompt=False, **extra)


@pytest.fixture(scope="module")
def alone(smol_latent, module_tmp) -> list[dict]:
    return _alone(smol_latent, module_tmp("alone"), top_logprobs=2)  # 2: the near-tie rule reads them


@pytest.mark.parametrize("unified", ["-kvu", "-no-kvu"])
def test_parallel_slots_equal_one_slot(smol_latent, alone, tmp_path, unified):
    """8 requests at once over 4 slots (continuous batching: 4 decode together, the other 4 start
    as slots free up) give the 1-slot server's answers, with a unified and with a per-slot cache:
    token for token up to a near-tie of the 1-slot run (agree_up_to_a_near_tie over the whole
    answer). Not exact: measured (CI of e0e1aec, after the refit's ridge moved the factors) one
    answer split at token 36 (' in' / ' that'); a batch of several rows does not round every
    row as a single row does."""
    with llama_server(smol_latent, (*COMMON, "-np", "4", "-c", "4096", unified),
                      log=tmp_path / "np4.log") as srv:
        par = _answers(srv.url, QUESTIONS, 8, cache_prompt=False)
        assert srv.kv_mib() > 0
    for q, a, b in zip(QUESTIONS, par, alone):
        assert a["choices"][0]["finish_reason"] in ("length", "stop")
        n = max(len(tokens(a)), len(tokens(b)))
        assert agree_up_to_a_near_tie(a, b, n), (q, same_prefix(a, b, n))
        if same_prefix(a, b, n) == n:
            assert text(a) == text(b)


def test_latent_cache_equals_dense_cache(smol_latent, alone, tmp_path):
    """The same requests with ASVD_LATENT_KV=0 (the cache holds K = A_k B_k x and V instead of the
    latents): the first 32 tokens are the same up to a near-tie of the dense run (agree_up_to_a_near_tie),
    and the top-1 logprobs agree within 2e-2 where the tokens do. (Measured: 0.012 at most since
    prompts of 22-40 tokens fold V through build_attn_mha, whose K is rebuilt from F16 latents and
    rounded to F16, instead of the fused op, which keeps it in F32 and gave under 1e-2; the fused
    op now takes at most 64 query rows per KV head.)"""
    dense = _alone(smol_latent, tmp_path, env={"ASVD_LATENT_KV": "0"}, name="dense", top_logprobs=2)
    for q, a, b in zip(QUESTIONS, alone, dense):
        assert agree_up_to_a_near_tie(a, b), (q, tokens(a)[:32], tokens(b)[:32])
        n = same_prefix(a, b)
        assert all(abs(x - y) < 2e-2 for x, y in zip(logprobs(a)[:n], logprobs(b)[:n])), q


FILL = "The river runs south through farmland and forest to the sea. "


def test_context_shift_long_conversation(smol_latent, tmp_path):
    """A conversation that outgrows the slot (-c 512, --context-shift): the second user turn is
    padded until its prompt ends 24 tokens before n_ctx, so the server must drop half of the
    window (seq_rm + seq_add on the latent cache: cells move, positions change) while it
    answers. Both answers complete (120 tokens each), the server logs the shift, and the dense
    cache doing the same gives the same tokens up to 32 tokens past the shift, or up to a near-tie
    of the dense run before that (agree_up_to_a_near_tie)."""
    n_ctx, n_gen = 512, 120
    args = (*COMMON, "-np", "1", "-c", str(n_ctx), "--context-shift")

    def converse(env: dict | None, log: Path) -> tuple[list[dict], str]:
        with llama_server(smol_latent, args, log=log, env=env) as srv, httpx.Client() as client:
            messages = user(QUESTIONS[0])
            r1 = chat(client, srv.url, messages, max_tokens=n_gen, ignore_eos=True, top_logprobs=2)
            messages.append({"role": "assistant", "content": text(r1)})

            def turn(k: int) -> list[dict]:
                return messages + user(FILL * k + QUESTIONS[1])

            k = 0  # the most filler whose prompt (rendered by the server, then tokenized) still fits
            while prompt_tokens(client, srv.url, turn(k + 1)) <= n_ctx - 24:
                k += 1
            r2 = chat(client, srv.url, turn(k), max_tokens=n_gen, ignore_eos=True, top_logprobs=2)
            return [r1, r2], srv.log_text()

    lat, log = converse(None, tmp_path / "latent.log")
    assert log.count("slot context shift") == 1
    for r in lat:
        assert r["usage"]["completion_tokens"] == n_gen and r["choices"][0]["finish_reason"] == "length"
    shift_at = n_ctx - 1 - lat[1]["usage"]["prompt_tokens"]  # generated tokens before the shift
    assert 0 < shift_at < n_gen - 32
    dense, _ = converse({"ASVD_LATENT_KV": "0"}, tmp_path / "dense.log")
    assert agree_up_to_a_near_tie(lat[0], dense[0], 32), (tokens(lat[0])[:32], tokens(dense[0])[:32])
    assert agree_up_to_a_near_tie(lat[1], dense[1], shift_at + 32), same_prefix(lat[1], dense[1], shift_at + 32)


def prompt_tokens(client: httpx.Client, url: str, messages: list[dict]) -> int:
    """Tokens of the prompt the server builds for `messages` (its /apply-template, /tokenize)."""
    prompt = client.post(f"{url}/apply-template", json={"messages": messages}, timeout=TIMEOUT_S).json()["prompt"]
    toks = client.post(f"{url}/tokenize", json={"content": prompt, "add_special": False, "parse_special": True},
                       timeout=TIMEOUT_S).json()["tokens"]
    return len(toks)


def test_slot_save_restore_across_restart(smol_latent, tmp_path):
    """Turn 1 of a conversation, slot 0 saved to a file (/slots/0?action=save); then turn 2 on
    the same server, and, after a restart, slot 0 restored (/slots/0?action=restore) and the
    same turn 2: the same answer, and the restored server reused the saved turn 1 from the cache
    instead of recomputing it."""
    slots = tmp_path / "slots"
    slots.mkdir()
    args = (*COMMON, "-np", "1", "-c", "1024", "--slot-save-path", f"{slots}/")
    first = user(QUESTIONS[0])

    def second(a1: dict) -> list[dict]:
        return first + [{"role": "assistant", "content": text(a1)}, {"role": "user", "content": "Say it in one line."}]

    with llama_server(smol_latent, args, log=tmp_path / "before.log") as srv, httpx.Client() as client:
        a1 = chat(client, srv.url, first, id_slot=0, cache_prompt=True)
        r = client.post(f"{srv.url}/slots/0?action=save", json={"filename": "conv.bin"}, timeout=TIMEOUT_S)
        assert r.status_code == 200, r.text[:500]
        n_saved = r.json()["n_saved"]
        assert n_saved >= a1["usage"]["prompt_tokens"] and (slots / "conv.bin").is_file()
        a2 = chat(client, srv.url, second(a1), id_slot=0, cache_prompt=True)
    with llama_server(smol_latent, args, log=tmp_path / "after.log") as srv, httpx.Client() as client:
        r = client.post(f"{srv.url}/slots/0?action=restore", json={"filename": "conv.bin"}, timeout=TIMEOUT_S)
        assert r.status_code == 200, r.text[:500]
        assert r.json()["n_restored"] == n_saved
        b2 = chat(client, srv.url, second(a1), id_slot=0, cache_prompt=True)
    assert b2["timings"]["cache_n"] >= a1["usage"]["prompt_tokens"]  # turn 1 came from the restored slot
    assert tokens(b2) == tokens(a2) and text(b2) == text(a2)


LONG = ("The river rises in the northern hills and runs south through farmland, two market towns and a "
        "forest before it reaches the sea. ") * 6
QUESTION = "\nWhat do these notes say?"


def test_cache_prompt_and_cache_reuse(smol_latent, tmp_path):
    """cache_prompt: a second request that extends the first reuses its tokens from the slot's
    cache (timings.cache_n). --cache-reuse 16: a request whose prompt drops a middle part of the
    cached one reuses the rest by shifting it in the cache (positions moved, nothing recomputed),
    and gives the same first 32 tokens as the dense cache doing the same shift (up to a near-tie:
    with the refitted demo file one reply's 13th token was one, ' text' against ' original')."""
    args = (*COMMON, "-np", "1", "-c", "2048", "--cache-reuse", "16", "--metrics")
    a = [{"role": "user", "content": "A preface that the next request leaves out. " * 4 + "\n" + LONG + QUESTION}]
    b = [{"role": "user", "content": LONG + QUESTION}]

    def run(env: dict | None, log: Path) -> tuple[list[dict], str, str]:
        with llama_server(smol_latent, args, log=log, env=env) as srv, httpx.Client() as client:
            r1 = chat(client, srv.url, a, id_slot=0, cache_prompt=True, top_logprobs=2)
            r2 = chat(client, srv.url, a + [{"role": "assistant", "content": text(r1)},
                                             {"role": "user", "content": "Shorter, please."}],
                      id_slot=0, cache_prompt=True, top_logprobs=2)
            r3 = chat(client, srv.url, b, id_slot=0, cache_prompt=True, n_cache_reuse=16, top_logprobs=2)
            metrics = client.get(f"{srv.url}/metrics", timeout=TIMEOUT_S).text
            return [r1, r2, r3], srv.log_text(), metrics

    (r1, r2, r3), log, metrics = run(None, tmp_path / "latent.log")
    assert r2["timings"]["cache_n"] >= r1["usage"]["prompt_tokens"]  # cache_prompt: turn 1 not recomputed
    assert "reusing chunk" in log and r3["timings"]["cache_n"] > 0
    # /metrics: Prometheus counters equal the sums of the responses' usage and timings
    found = dict(re.findall(r"^llamacpp:(\w+) ([0-9.e+-]+)$", metrics, re.M))
    rs = (r1, r2, r3)
    assert float(found["tokens_predicted_total"]) == sum(r["usage"]["completion_tokens"] for r in rs)
    assert float(found["prompt_tokens_total"]) == sum(r["timings"]["prompt_n"] for r in rs)
    dense, _, _ = run({"ASVD_LATENT_KV": "0"}, tmp_path / "dense.log")
    for x, y in zip((r1, r2, r3), dense):
        assert x["timings"]["cache_n"] == y["timings"]["cache_n"]
        assert agree_up_to_a_near_tie(x, y), (tokens(x)[:32], tokens(y)[:32])


def test_llama_cli_one_shot(smol_latent, tmp_path):
    """llama-cli (one turn, -st) answers a question on the factored file with the chat template;
    its answer is the 1-slot server's for the same question and length."""
    out = tmp_path / "cli.txt"
    res = subprocess.run([str(llamacpp.binary("llama-cli")), "-m", str(smol_latent), "-p", QUESTIONS[5], "-n", "48",
                          "--temp", "0", "-st", "-t", "2", "-fa", "on", "--no-warmup", "-c", "1024", "-o", str(out)],
                         capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    answer = out.read_text().split("Assistant:\n", 1)[1].strip()
    with llama_server(smol_latent, (*COMMON, "-np", "1", "-c", "1024"), log=tmp_path / "srv.log") as srv, \
            httpx.Client() as client:
        ref = text(chat(client, srv.url, user(QUESTIONS[5])))
    assert answer and answer == ref.strip()
