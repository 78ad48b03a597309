"""The best GGUF at a given size (issue 12): our `--size` plans against llama-quantize's presets.

Protocol: SmolLM2-135M-Instruct (or `--model gemma3-270m`); calibration wiki.valid.tokens
SAMPLES x SEQLEN, seed 233, method hybrid; evaluation `llama-perplexity -c 512 --chunks 20 -t 2` on
wiki.test.raw (patched build), KLD against the F16 dense model (`--kl-divergence-base`, then `--kl-divergence`).

* base: the F16 dense model, `convert --ratio 1 --outtype f16` (nothing factored) with
  `--imatrix-out`: the imatrix of the same calibration for every stock file. (Not `--size 1G`:
  SmolLM2's source is a Q4_1 GGUF, so Q5_1 reproduces its weights exactly and a size plan with
  room for F16 prefers the lossless Q5_1 to F16's rounding.)
* stock: `llama-quantize --imatrix <that> base.gguf out.gguf TYPE` for each preset.
* ours, at each stock file's exact byte size: `--size BYTES` (ranks and types), `--size BYTES
  --types-only` (pure type allocation) and `--size BYTES --kv 0.5`.

Per file: MiB, mean KLD, perplexity, same-top-token %, the plan's predicted loss increase and
how many linears it factors (at which ranks). Ends with the Spearman rank correlation of the
predicted loss against the measured KLD over our plans.

    python bench/size_table.py --out-dir bench-out/size                 # all presets
    python bench/size_table.py --out-dir bench-out/size --presets Q4_K_M --variants size
    python bench/size_table.py --model gemma3-270m --out-dir bench-out/size-gemma
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"
PRESETS = ("Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
VARIANTS = {"size": [], "types": ["--types-only"], "kv0.5": ["--kv", "0.5"]}

from _common import load_results  # noqa: E402


def convert(out: Path, args, *extra: str) -> None:
    """`asvd2gguf convert MODEL` with the bench's calibration and `extra` options (skipped if done)."""
    if out.is_file():
        return
    cmd = [sys.executable, "-m", "asvd2gguf.cli", "convert", args.model, "--calib", str(WIKI / "wiki.valid.tokens"),
           "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen), "--seed", "233",
           "--out", str(out), "--force", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"convert failed for {out.name}: {(res.stdout + res.stderr).strip().splitlines()[-1:]}")


def stock(base: Path, imatrix: Path, preset: str, out: Path) -> None:
    """llama-quantize --imatrix of the F16 base at `preset` (skipped if done)."""
    from asvd2gguf import llamacpp

    if out.is_file():
        return
    tmp = out.with_suffix(".tmp.gguf")
    res = subprocess.run([str(llamacpp.binary("llama-quantize")), "--imatrix", str(imatrix), str(base), str(tmp),
                          preset, "2"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"llama-quantize {preset} failed: {(res.stdout + res.stderr)[-400:]}")
    tmp.replace(out)


def plan_summary(path: Path) -> dict:
    """Predicted loss (nats) and factored linears of one of our files (empty for a stock file)."""
    from asvd2gguf.gguf_keys import KEY_SIZE_LOSS
    from asvd2gguf.gguf_read import describe_plan, field_value, open_gguf

    loss = field_value(open_gguf(path), KEY_SIZE_LOSS)
    if loss is None:
        return {}
    rows = describe_plan(path)
    ranks = sorted(r.rank for r in rows if r.rank)
    return {"predicted": float(loss), "factored": len(ranks), "ranks": ranks}


def evaluate(path: Path, base: Path, results: dict, log: Path) -> dict:
    """llama-perplexity with KLD against `base`; one JSON line per file in `log` (reused when present)."""
    from asvd2gguf import llamacpp

    if path.name in results:
        return results[path.name]
    r = llamacpp.perplexity(path, WIKI / "wiki.test.raw", ctx=512, chunks=20, threads=2, kl_base=base)
    row = {"file": path.name, "bytes": path.stat().st_size, "mib": round(path.stat().st_size / 2**20, 2),
           "kld": r["kld"], "ppl": r["ppl"], "same_top": r["same_top_p"], **plan_summary(path)}
    results[path.name] = row
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (no ties expected)."""
    import numpy as np

    rx, ry = np.argsort(np.argsort(xs)), np.argsort(np.argsort(ys))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(xs) > 2 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="a model name or path convert accepts")
    ap.add_argument("--out-dir", type=Path, default=Path("bench-out/size"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    d = args.out_dir
    d.mkdir(parents=True, exist_ok=True)
    log = d / "results.jsonl"
    results = load_results(log)

    base, imatrix = d / "f16.gguf", d / "f16.imatrix.gguf"
    convert(base, args, "--ratio", "1", "--outtype", "f16", "--imatrix-out", str(imatrix))
    refs = {}
    for preset in args.presets:  # every stock file first: they set the budgets
        refs[preset] = d / f"stock-{preset}.gguf"
        stock(base, imatrix, preset, refs[preset])
        evaluate(refs[preset], base, results, log)
    for v in args.variants:  # then variant by variant (the slower --kv rows last)
        for preset in args.presets:
            ours = d / f"ours-{preset}-{v}.gguf"
            convert(ours, args, "--size", str(refs[preset].stat().st_size), *VARIANTS[v])
            evaluate(ours, base, results, log)
    rows = [(p, "stock", results[refs[p].name]) for p in args.presets]
    rows += [(p, v, results[f"ours-{p}-{v}.gguf"]) for p in args.presets for v in args.variants]
    rows.sort(key=lambda row: args.presets.index(row[0]))

    print(f"\n{args.model}, llama-perplexity wiki.test.raw -c 512 --chunks 20 -t 2, KLD vs F16; "
          f"calibration wiki.valid.tokens {args.samples}x{args.seqlen} seed 233 (imatrix for the stock files too)")
    print("| budget | file | MiB | mean KLD | ppl | same top % | predicted loss | factored (ranks) |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, v, r in rows:
        fact = f"{r['factored']} ({min(r['ranks'])}-{max(r['ranks'])})" if r.get("factored") else (
            "0" if "factored" in r else "-")
        pred = f"{r['predicted']:.4f}" if "predicted" in r else "-"
        print(f"| {preset} | {v} | {r['mib']:.2f} | {r['kld']:.5f} | {r['ppl']:.3f} | {100 * r['same_top']:.2f} | "
              f"{pred} | {fact} |")
    ours = [r for _, v, r in rows if v != "stock" and "predicted" in r]
    if len(ours) > 2:
        print(f"\nSpearman(predicted loss, measured KLD) over {len(ours)} plans: "
              f"{spearman([r['predicted'] for r in ours], [r['kld'] for r in ours]):.3f}")


if __name__ == "__main__":
    main()
