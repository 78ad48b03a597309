"""Load on llama-server: N chat requests over P slots, latent KV cache vs dense cache (docs/runtime.md).

For each row a server is started on 127.0.0.1 (-np P, -c P x --slot-ctx, -t 2; one KV stream
shared by the slots, or with --no-kv-unified one per slot), then --requests chat completions with
mixed prompt lengths (excerpts of wiki.test.raw of about 32, 128, 512 and 1024 tokens, in a fixed
shuffled order) are sent --concurrency at a time, so that new requests arrive while others
decode (continuous batching). Each request asks for --max-tokens tokens, greedy, ignore_eos
(every response has the same length). Checked: every response is HTTP 200, finish_reason
"length" and exactly --max-tokens tokens; a failure stops the run with a non-zero exit.
Printed: a table of wall time, requests/s, generated tokens/s, prompt tokens/s, the KV cache
MiB the server allocated (from its log) and the server's CPU seconds (user + system: on a
shared machine a steadier measure of the work than wall time).

    python bench/server_load.py FILE.gguf [--base ORIGINAL.gguf] [--requests 64] [--parallel 4]

Rows: "latent" (FILE as written), "dense cache" (FILE with ASVD_LATENT_KV=0: K and V cached),
and with --base the original model. The whole run is bounded by --timeout-s per row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from asvd2gguf.llama_server import llama_server  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/wiki.test.raw"
LENGTHS = (32, 128, 512, 1024)  # approximate prompt tokens (4 characters a token)


def prompts(text: str, n: int, seed: int) -> list[str]:
    """n user messages: excerpts of `text` of mixed lengths from different offsets, then a question."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        chars = LENGTHS[i % len(LENGTHS)] * 4
        start = rng.randrange(0, max(1, len(text) - chars))
        out.append(text[start:start + chars] + "\n\nSummarize the text above.")
    rng.shuffle(out)
    return out


def run_row(label: str, model: Path, env: dict, args: argparse.Namespace, msgs: list[str], log: Path) -> dict:
    # -lv 4: the KV cache size is logged
    srv_args = ["-t", str(args.threads), "-np", str(args.parallel), "-c", str(args.parallel * args.slot_ctx),
                "-kvu" if args.kv_unified else "-no-kvu", "-fa", "on", "--no-warmup", "-lv", "4"]
    deadline = time.time() + args.timeout_s

    def one(client: httpx.Client, msg: str) -> dict:
        left = deadline - time.time()
        if left <= 0:
            raise TimeoutError("row time limit reached")
        body = {"messages": [{"role": "user", "content": msg}], "temperature": 0, "max_tokens": args.max_tokens,
                "ignore_eos": True, "cache_prompt": False}
        r = client.post(f"{srv.url}/v1/chat/completions", json=body, timeout=left)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        res = r.json()
        choice = res["choices"][0]
        if choice["finish_reason"] != "length" or res["usage"]["completion_tokens"] != args.max_tokens:
            raise RuntimeError(f"incomplete response: {choice['finish_reason']}, {res['usage']}")
        return res

    with llama_server(model, srv_args, log=log, env=env) as srv, httpx.Client() as client:
        pool = ThreadPoolExecutor(args.concurrency)
        try:
            t0 = time.time()
            futures = [pool.submit(one, client, m) for m in msgs]
            results = [f.result() for f in futures]
            wall = time.time() - t0
        finally:
            # on an error or Ctrl-C: drop the queued requests; leaving the block stops the server,
            # which ends the ones in flight
            pool.shutdown(wait=False, cancel_futures=True)
        kv = srv.kv_mib()
        cpu = _cpu_seconds(srv.proc.pid)
    n_gen = sum(r["usage"]["completion_tokens"] for r in results)
    n_prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    return {"row": label, "requests": len(results), "wall_s": round(wall, 1), "req_s": round(len(results) / wall, 3),
            "gen_tok_s": round(n_gen / wall, 1), "prompt_tok_s": round(n_prompt / wall, 1),
            "prompt_tokens": n_prompt, "kv_mib": round(kv, 2), "server_cpu_s": round(cpu, 1)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc): less sensitive than wall time
    to other work on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="factored GGUF with a latent KV cache")
    ap.add_argument("--base", type=Path, help="also run this (original) model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=4, help="server slots (-np)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ap.add_argument("--slot-ctx", type=int, default=2048, help="context per slot")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=1800, help="limit for each row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", type=Path, default=WIKI)
    ap.add_argument("--logs", type=Path, default=Path("/tmp"), help="folder for the server logs")
    ap.add_argument("--jsonl", type=Path, help="append each row as JSON")
    ap.add_argument("--kv-unified", action=argparse.BooleanOptionalAction, default=True,
                    help="one KV stream shared by all slots (-kvu, default) or one per slot (-no-kvu)")
    ap.add_argument("--rows", help="comma-separated subset of latent,dense,original (default: all)")
    args = ap.parse_args(argv)
    text = args.text.read_text() if args.text.is_file() else ("The quick brown fox jumps over the lazy dog. " * 4000)
    msgs = prompts(text, args.requests, args.seed)
    rows = [("latent", args.model, {}), ("dense cache", args.model, {"ASVD_LATENT_KV": "0"})]
    if args.base:
        rows.append(("original", args.base, {}))
    rows = [r for r in rows if args.rows is None or r[0].split()[0] in args.rows.split(",")]
    out = []
    for label, model, env in rows:
        res = run_row(label, model, env, args, msgs, args.logs / f"server-load-{label.replace(' ', '_')}.log")
        out.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    print(f"\n{args.requests} requests, {args.parallel} slots ({'-kvu' if args.kv_unified else '-no-kvu'}), "
          f"{args.concurrency} in flight, prompts ~"
          f"{'/'.join(map(str, LENGTHS))} tokens, {args.max_tokens} generated each, -t {args.threads}\n")
    print("| row | KV MiB | wall s | requests/s | generated tok/s | prompt tok/s | server CPU s |")
    print("|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['row']} | {r['kv_mib']:.1f} | {r['wall_s']} | {r['req_s']:.3f} | {r['gen_tok_s']} | "
              f"{r['prompt_tok_s']} | {r['server_cpu_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
