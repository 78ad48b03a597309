"""Quantized factors on SmolLM2: llama-perplexity and file size per ratio and factor type.

Protocol: calibration wiki.valid.tokens SAMPLES x SEQLEN, seed 233, `--method asvd`;
evaluation `llama-perplexity -c 512 --chunks 20 -t 2` on wiki.test.raw (patched build).
Rows: --ratio 1.0 (nothing factored: the dense model quantized the same way is the baseline),
0.95 and 0.9; columns: factors in F16, Q8_0, NF4, IQ4_NL (written by `convert --quant`), and
Q4_K_M / NF4 made by the patched llama-quantize from the F16 file. With --quant the embedding
is Q8_0 (see asvd2gguf/quantize.py); the F16 column keeps it F16.
Also: the sigma-split ablation (uv, u, v) at 0.9 with NF4, and the weight error of NF4 against
IQ4_NL (and NF4 at block 64) on the same F16 factors.

    python bench/quant_table.py --out-dir bench-out/quant      # idempotent: reuses files/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"
RATIOS = (1.0, 0.95, 0.9)
OURS = ("f16", "q8_0", "nf4", "iq4_nl")
LLQ = ("Q4_K_M", "NF4")  # via llama-quantize from the f16 file

from _common import load_results  # noqa: E402


def convert(out: Path, ratio: float, quant: str, split: str, args) -> float | None:
    if out.is_file():
        return None
    cmd = [sys.executable, "-m", "asvd2gguf.cli", "convert", "smollm2", "--ratio", str(ratio), "--method", "asvd",
           "--calib", str(WIKI / "wiki.valid.tokens"), "--calib-samples", str(args.samples),
           "--calib-seqlen", str(args.seqlen), "--seed", "233", "--out", str(out), "--sigma-split", split,
           "--outtype", "f16", *(["--quant", quant] if quant != "f16" else [])]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"convert failed for {out.name}: {res.stderr.strip().splitlines()[-1:]}")
    return time.time() - t


def tool(name: str, bin_dir: Path | None) -> Path:
    """A patched llama.cpp tool: from --bin when given (a fixed build), else the cached build."""
    from asvd2gguf import llamacpp

    return bin_dir / name if bin_dir else llamacpp.binary(name)


def llama_quantize(src: Path, out: Path, qtype: str, bin_dir: Path | None) -> str:
    if not out.is_file():
        tmp = out.with_suffix(".tmp.gguf")
        res = subprocess.run([str(tool("llama-quantize", bin_dir)), str(src), str(tmp), qtype, "2"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"llama-quantize {qtype} failed: {(res.stdout + res.stderr)[-400:]}")
        tmp.replace(out)
        (out.with_suffix(".log")).write_text(res.stdout + res.stderr)
    log = out.with_suffix(".log").read_text() if out.with_suffix(".log").is_file() else ""
    return "; ".join(sorted({ln.strip() for ln in log.splitlines() if "fallback" in ln.lower()}))[:300]


def evaluate(path: Path, results: dict, log: Path, bin_dir: Path | None) -> dict:
    from asvd2gguf import llamacpp

    if path.name in results:
        return results[path.name]
    r = llamacpp.perplexity(path, WIKI / "wiki.test.raw", ctx=512, chunks=20, threads=2, bins=bin_dir)
    row = {"file": path.name, "ppl": r["ppl"], "ppl_err": r["ppl_err"], "mib": round(path.stat().st_size / 2**20, 2)}
    results[path.name] = row
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def factor_errors(f16: Path) -> dict:
    """Relative Frobenius error of A_q B_q against A B over every factored linear of `f16`."""
    import gguf
    import numpy as np
    import torch

    from asvd2gguf import ggml_quants as Q

    t = {x.name: x for x in gguf.GGUFReader(f16).tensors}
    pairs = [n[: -len(".lr_in.weight")] for n in t if n.endswith(".lr_in.weight")]
    num = {"nf4": 0.0, "iq4_nl": 0.0, "nf4_b64": 0.0, "q8_0": 0.0}
    rms = {k: 0.0 for k in num}
    den = 0.0
    tot = 0.0
    for base in pairs:
        b = torch.from_numpy(np.asarray(t[base + ".lr_in.weight"].data, dtype=np.float32).copy())
        a = torch.from_numpy(np.asarray(t[base + ".lr_out.weight"].data, dtype=np.float32).copy())
        w = a @ b
        den += float(w.square().sum())
        tot += float(a.square().sum() + b.square().sum())
        for k in num:
            if k == "nf4_b64":  # a rank that is not a multiple of 64 cannot take block 64: keep 32 there
                qa = Q.nf4_round_trip(a, 64 if a.shape[1] % 64 == 0 else 32)
                qb = Q.nf4_round_trip(b, 64)
            else:
                qa, qb = (Q.dequantize_torch(Q.QUANTIZERS[k](x)) for x in (a, b))
            num[k] += float((qa @ qb - w).square().sum())
            rms[k] += float((qa - a).square().sum() + (qb - b).square().sum())
    return {k: {"product_rel_err": (num[k] / den) ** 0.5, "factor_rel_rmse": (rms[k] / tot) ** 0.5} for k in num}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("bench-out/quant"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--convert-only", action="store_true", help="write the files, skip llama-perplexity")
    ap.add_argument("--bin", type=Path, default=None, help="bin folder of a patched build (default: build or cache)")
    args = ap.parse_args()
    d = args.out_dir
    d.mkdir(parents=True, exist_ok=True)
    log = d / "results.jsonl"
    results = load_results(log)

    files: dict[tuple, Path] = {}
    for ratio in RATIOS:
        for q in OURS:
            files[(ratio, q, "uv")] = p = d / f"r{ratio}-{q}.gguf"
            secs = convert(p, ratio, q, "uv", args)
            if secs:
                print(f"converted {p.name} in {secs:.0f} s", flush=True)
    for split in ("u", "v"):
        files[(0.9, "nf4", split)] = p = d / f"r0.9-nf4-split{split}.gguf"
        convert(p, 0.9, "nf4", split, args)
    if args.convert_only:
        return
    notes = {}
    for ratio in RATIOS:
        for qt in LLQ:
            files[(ratio, qt, "uv")] = p = d / f"r{ratio}-llq-{qt}.gguf"
            notes[p.name] = llama_quantize(files[(ratio, "f16", "uv")], p, qt, args.bin)
    for p in files.values():
        evaluate(p, results, log, args.bin)

    cols = [*OURS, *(f"llq-{q}" for q in LLQ)]
    print("\nllama-perplexity (wiki.test.raw, -c 512 --chunks 20 -t 2) / file MiB; "
          f"calibration wiki.valid.tokens {args.samples}x{args.seqlen} seed 233, method asvd")
    print("| --ratio | " + " | ".join(c.upper() for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for ratio in RATIOS:
        cells = []
        for c in cols:
            name = f"r{ratio}-{c}.gguf"
            r = results.get(name)
            cells.append(f"{r['ppl']:.3f} / {r['mib']:.1f}" if r else "-")
        print(f"| {ratio} | " + " | ".join(cells) + " |")
    print("\nsigma-split at 0.9, NF4 factors:")
    print("| split | ppl | MiB |\n|---|---|---|")
    for split, name in (("uv", "r0.9-nf4.gguf"), ("u", "r0.9-nf4-splitu.gguf"), ("v", "r0.9-nf4-splitv.gguf")):
        r = results.get(name)
        print(f"| {split} | {r['ppl']:.3f} | {r['mib']:.1f} |" if r else f"| {split} | - | - |")
    for name, note in notes.items():
        if note:
            print(f"{name}: {note}")
    errs = factor_errors(files[(0.9, "f16", "uv")])
    print("\nweight error on the same F16 factors (--ratio 0.9): ||A_q B_q - A B|| / ||A B||, factor RMSE")
    print("| type | product rel. error | factor rel. RMSE |\n|---|---|---|")
    for k, v in errs.items():
        print(f"| {k} | {v['product_rel_err']:.4f} | {v['factor_rel_rmse']:.4f} |")


if __name__ == "__main__":
    main()
