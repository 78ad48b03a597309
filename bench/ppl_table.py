"""Perplexity table on SmolLM2 (or --model gemma3-270m, any MODEL) under the project protocol.

Calibration: wiki.valid.tokens, SAMPLES x SEQLEN tokens, seed 233. Evaluation: the first 40
non-overlapping 512-token windows of wiki.test.raw, mean loss over all positions (torch).
Each row runs `asvd2gguf convert` as a subprocess (wall time and peak RSS measured) and scores
the written file with `asvd2gguf ppl`'s code. Results are appended as JSON lines to --log.

    python bench/ppl_table.py --rows asvd:0.872 whiten:0.872 asvd:1.0:kv0.5
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"


def parse_row(row: str) -> dict:
    parts = row.split(":")
    d = {"method": parts[0], "ratio": float(parts[1]), "kv": None, "extra": []}
    for p in parts[2:]:
        if p.startswith("kv"):
            d["kv"] = float(p[2:])
        else:
            d["extra"] += p.split("=", 1) if "=" in p else [p]
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", required=True, help="method:ratio[:kvK][:--opt=value]")
    ap.add_argument("--model", default="smollm2", help="MODEL as convert takes it (embedded name, file, folder)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    ap.add_argument("--log", type=Path, default=Path("bench-out/ppl_table.jsonl"))
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--bos", action="store_true",
                    help="cut windows as llama-perplexity does: BOS in place of each window's first token (Gemma)")
    ap.add_argument("--reuse", action="store_true", help="score an existing output file instead of converting again")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    from asvd2gguf.gguf_read import load_gguf_model
    from asvd2gguf.perplexity import mean_loss
    from asvd2gguf.source import load_source
    from asvd2gguf.text import eval_windows, llama_windows

    cache = args.cache_dir or Path.home() / ".cache" / "asvd2gguf"
    tok = load_source(args.model, cache).tokenizer
    if args.bos:
        windows = llama_windows(tok, WIKI / "wiki.test.raw", 512, args.chunks, True, tok.bos_token_id)
    else:
        windows = eval_windows(tok, WIKI / "wiki.test.raw", 512, args.chunks)
    rows = []
    for spec in args.rows:
        r = parse_row(spec)
        name = f"{r['method']}-r{r['ratio']}" + (f"-kv{r['kv']}" if r["kv"] else "") + "".join(r["extra"])
        out = args.out_dir / f"{name.replace('--', '_')}.gguf"
        cmd = [sys.executable, "-m", "asvd2gguf.cli", "convert", args.model, "--ratio", str(r["ratio"]),
               "--method", r["method"], "--calib", str(WIKI / "wiki.valid.tokens"),
               "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen), "--seed", "233",
               "--out", str(out), "--force", "--cache-dir", str(cache), *r["extra"]]
        if r["kv"]:
            cmd += ["--kv", str(r["kv"])]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        secs = None
        if not (args.reuse and out.exists()):
            t = time.time()
            res = subprocess.run(cmd, capture_output=True, text=True)
            secs = round(time.time() - t, 1)
            if res.returncode != 0:
                print(f"{name}: convert failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        model, _, info = load_gguf_model(out, with_tokenizer=False)
        ppl = math.exp(mean_loss(model, windows))
        row = {"row": spec, "method": r["method"], "ratio_target": r["ratio"], "kv_target": r["kv"],
               "ratio": round(info.ratio(), 4), "kv": round(info.kv_ratio(), 4), "ppl": round(ppl, 3),
               "convert_s": secs, "file": str(out), "peak_rss_mib_max_so_far": round(max(rss, before) / 1024),
               "calib": f"wiki.valid.tokens {args.samples}x{args.seqlen} seed 233",
               "eval": f"wiki.test.raw {args.chunks}x512" + (" BOS per window" if args.bos else "")}
        rows.append(row)
        with open(args.log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        del model

    print("\n| row | method | ratio | kv | ppl | convert s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['method']} | {r['ratio']} | {r['kv']} | {r['ppl']} | {r['convert_s']} |")


if __name__ == "__main__":
    main()
