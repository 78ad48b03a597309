"""Runtime benchmark of the patched llama.cpp on factored GGUF files (docs/runtime.md).

For each row (a model file plus llama.cpp options): file size, KV cache MiB at n_ctx 8192 (from
llama.cpp's own log), llama-bench pp512 / tg128 t/s at depth 0 and tg128 at depth 4096, and
llama-perplexity on wiki.test.raw (-c 512 --chunks 20). Same binary for every row, -t 2.

    python bench/bench_runtime.py --row dense=F16.gguf --row "dense q8_0=F16.gguf:-ctk q8_0 -ctv q8_0" \\
        --row "kv0.5 latent=KV.gguf" --row "kv0.5 full cache=KV.gguf:@ASVD_LATENT_KV=0"

A row is LABEL=PATH[:OPTIONS]; an option @NAME=VALUE sets an environment variable instead.
Results are appended to --jsonl as they come (a long run can be read while it goes) and
printed as a table at the end. On a shared machine whose speed drifts, --rounds N runs the
speed benchmark of all rows N times round-robin and reports each row's median, so that rows
are compared under the same conditions; the last column gives tg128 @ d4096 relative to the
first row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asvd2gguf import llamacpp  # noqa: E402


def parse_row(spec: str) -> dict:
    label, rest = spec.split("=", 1)
    path, _, opts = rest.partition(":")
    args, env = [], {}
    for tok in shlex.split(opts):
        if tok.startswith("@") and "=" in tok:
            k, v = tok[1:].split("=", 1)
            env[k] = v
        else:
            args.append(tok)
    return {"label": label, "path": Path(path), "args": args, "env": env}


def kv_mib(model: Path, args: list[str], env: dict, threads: int) -> float | None:
    """KV cache size at n_ctx 8192 as llama.cpp logs it (one-token generation)."""
    cmd = [str(llamacpp.binary("llama-completion")), "-m", str(model), "-c", "8192", "-n", "1", "-p", "Hello",
           "-no-cnv", "-t", str(threads), "--no-warmup", "-lv", "4", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                         env=dict(os.environ, **env), timeout=600)
    sizes = [float(x) for x in re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", res.stdout + res.stderr)]
    return sum(sizes) if sizes else None


def bench(model: Path, args: list[str], env: dict, threads: int, reps: int) -> dict:
    """llama-bench pp512/tg128 at depth 0 and tg128 at depth 4096 (t/s)."""
    out = {}
    base = [str(llamacpp.binary("llama-bench")), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json"]
    # llama-bench spells the cache types the same way (-ctk/-ctv) and takes -fa on|off
    for extra in (["-p", "512", "-n", "128", "-d", "0"], ["-p", "0", "-n", "128", "-d", "4096"]):
        res = subprocess.run(base + extra + args, capture_output=True, text=True, errors="replace",
                             env=dict(os.environ, **env), timeout=1800)
        if res.returncode != 0:
            out["bench_error"] = (res.stderr.strip().splitlines() or ["?"])[-1][:200]
            continue
        for r in json.loads(res.stdout):
            key = f"{'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']}@d{r['n_depth']}"
            out[key] = round(r["avg_ts"], 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", required=True, help="LABEL=PATH[:OPTIONS]")
    ap.add_argument("--text", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/wiki.test.raw")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-bench", action="store_true", help="only size, KV and perplexity")
    ap.add_argument("--skip-ppl", action="store_true", help="no perplexity (speed and memory only)")
    ap.add_argument("--rounds", type=int, default=1, help="speed runs per row, round-robin; medians reported")
    ap.add_argument("--jsonl", type=Path, default=Path("bench_runtime.jsonl"))
    a = ap.parse_args(argv)
    rows = [parse_row(s) for s in a.row]
    results = []
    for row in rows:
        t0 = time.time()
        opts = " ".join(row["args"] + [f"{k}={v}" for k, v in row["env"].items()])
        r = {"label": row["label"], "file": row["path"].name, "opts": opts,
             "size_mib": round(row["path"].stat().st_size / 2**20, 1)}
        r["kv_mib_8192"] = kv_mib(row["path"], row["args"], row["env"], a.threads)
        if not a.skip_ppl:
            p = llamacpp.perplexity(row["path"], a.text, ctx=512, chunks=a.chunks, threads=a.threads,
                                    extra=row["args"], env=row["env"])
            r["ppl"] = p["ppl"]
        r["seconds"] = round(time.time() - t0)
        results.append(r)
    speeds: list[list[dict]] = [[] for _ in rows]
    for rnd in range(0 if a.skip_bench else a.rounds):
        for i, row in enumerate(rows):
            speeds[i].append(bench(row["path"], row["args"], row["env"], a.threads, a.reps))
            print(json.dumps({"round": rnd, "label": row["label"], **speeds[i][-1]}), flush=True)
    for r, runs in zip(results, speeds):
        for key in sorted({k for run in runs for k in run if k != "bench_error"}):
            r[key] = round(statistics.median(run[key] for run in runs if key in run), 1)
        errors = [run["bench_error"] for run in runs if "bench_error" in run]
        if errors:
            r["bench_error"] = errors[0]
    for r in results:
        if "tg128@d4096" in r and "tg128@d4096" in results[0]:
            r["d4096_vs_first"] = f"{r['tg128@d4096'] / results[0]['tg128@d4096']:.2f}x"
        with open(a.jsonl, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)
    cols = ["label", "opts", "size_mib", "kv_mib_8192", "pp512@d0", "tg128@d0", "tg128@d4096", "d4096_vs_first", "ppl"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
