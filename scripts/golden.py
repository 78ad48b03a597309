"""Byte-identity guard for refactorings: digests of the GGUF files the converter writes.

    python3 scripts/golden.py tiny --out tiny.json          # record
    python3 scripts/golden.py tiny --check tests/data/golden_tiny.json   # compare (exit 1 on a difference)
    python3 scripts/golden.py smollm2 --out /work/golden/smollm2.json [--quant]

`tiny` converts the random tiny llama of tests/conftest.py (Hugging Face folder, llama.cpp's
converter as metadata donor) under several settings (latent KV, plain ratio, --dense, q8_0,
strs allocation, the exact ppl sweep, a perplexity target), each with a fresh statistics cache.
`smollm2` converts SmolLM2-135M-Instruct at --ratio 0.9 --kv 0.5 (default method), calibrated on
8 x 256 tokens of wiki.valid.tokens, seed 233, refitted on 4096 tokens (the output factors only:
a CI's cost), with the shared cache; --quant adds a q8_0 file.

Per file the digest holds every GGUF key (in order: type and sha256 of its value) and every
tensor (in order: GGML type, shape, sha256 of its data), and the numbers `convert` returns
(achieved ratio, KV ratio, calibration perplexities, ranks, fallbacks). Paths under the
working folder are written as <work>, so the digest does not depend on where it ran.
Runs single-threaded (torch.set_num_threads(1)): the same bits on every run of one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"


def digest_gguf(path: Path, work: Path | None = None) -> dict:
    """Keys and tensors of a GGUF, each with a sha256 of its bytes (see the module docstring)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(path)
    keys = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        types = [t.name for t in f.types]
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            value = [_value(f, i) for i in f.data]
        else:
            value = _value(f, f.data[0]) if f.data else None
        blob = json.dumps(value, sort_keys=True, default=str)
        if work is not None:
            blob = blob.replace(str(work), "<work>")
        entry = {"types": types, "sha256": hashlib.sha256(blob.encode()).hexdigest()}
        if len(blob) <= 200:
            entry["value"] = json.loads(blob)
        keys[name] = entry
    tensors = {}
    for t in r.tensors:
        tensors[t.name] = {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                           "sha256": hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()}
    return {"keys": keys, "tensors": tensors}


def _value(f, i: int):
    part = f.parts[i]
    if f.types[-1] == __import__("gguf").GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="surrogateescape")
    vals = part.tolist()
    return vals[0] if len(vals) == 1 else vals


def _result(res) -> dict:
    return {"ratio": repr(float(res.ratio)), "kv": repr(float(res.kv)), "calib_ppl": repr(float(res.calib_ppl)),
            "base_calib_ppl": repr(float(res.base_calib_ppl)), "ranks": res.ranks,
            "fallbacks": [str(f) for f in res.fallbacks]}


TINY_CASES = {
    "latent-f32": dict(ratio=0.7, kv=0.75, outtype="f32"),
    "ratio-f16": dict(ratio=0.8),
    "dense": dict(ratio=0.8, dense=True),
    "q8_0-latent": dict(ratio=0.8, kv=0.75, quant="q8_0"),
    "strs-svd": dict(ratio=0.75, allocation="strs", method="svd", sigma_split="u"),
    "ppl-sweep-asvd": dict(ratio=0.8, kv=0.5, sensitivity="ppl", method="asvd", rank_align=16),
    "ppl-target": dict(ppl_target=1e9),
    "default-ratio": dict(),
}


def tiny(work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import random

    import conftest

    from asvd2gguf.convert import ConvertConfig, convert

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tok = conftest.build_tokenizer(_mk(work / "tok"))
    model = conftest.make_tiny("llama", work / "llama", tok)
    rng = random.Random(1)  # conftest.calib_text
    lines = [" ".join(rng.choice(conftest.WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
             for _ in range(600)]
    calib = work / "calib.txt"
    calib.write_text("\n".join(lines))
    out = {}
    for label, kw in TINY_CASES.items():
        cache = _mk(work / f"cache-{label}")
        path = work / f"{label}.gguf"
        base = dict(model=str(model), out=path, calib=str(calib), calib_samples=4, calib_seqlen=64,
                    cache_dir=cache, device="cpu")
        res = convert(ConvertConfig(**{**base, **kw}))
        out[label] = {**digest_gguf(path, work), "result": _result(res)}
    return out


def smollm2(work: Path, quant: bool, cache_dir: Path | None = None) -> dict:
    from asvd2gguf.convert import ConvertConfig, convert

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    cases = {"r0.9-kv0.5": {}}
    if quant:
        cases["r0.9-kv0.5-q8_0"] = {"quant": "q8_0"}
    for label, kw in cases.items():
        path = work / f"smollm2-{label}.gguf"
        res = convert(ConvertConfig(model="smollm2", out=path, force=True, ratio=0.9, kv=0.5,
                                    calib=str(WIKI / "wiki.valid.tokens"), calib_samples=8, calib_seqlen=256,
                                    seed=233, refit_tokens=4096, device="cpu", **kw,
                                    **({"cache_dir": cache_dir} if cache_dir else {})))
        out[label] = {**digest_gguf(path, work), "result": _result(res)}
    return out


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def compare(want: dict, got: dict) -> list[str]:
    """Every difference, one line each: missing/extra files, keys or tensors, order, values."""
    diffs = []
    for label in sorted(set(want) | set(got)):
        if label not in got or label not in want:
            diffs.append(f"{label}: only in {'recorded' if label in want else 'new'} digest")
            continue
        w, g = want[label], got[label]
        for part in ("keys", "tensors"):
            if list(w[part]) != list(g[part]):
                only_w = [k for k in w[part] if k not in g[part]]
                only_g = [k for k in g[part] if k not in w[part]]
                diffs.append(f"{label}: {part} differ in names or order (recorded only: {only_w}, new only: {only_g})")
            for k in w[part]:
                if k in g[part] and w[part][k] != g[part][k]:
                    diffs.append(f"{label}: {part[:-1]} {k}: recorded {w[part][k]}, new {g[part][k]}")
        if w["result"] != g["result"]:
            diffs.append(f"{label}: result recorded {w['result']}, new {g['result']}")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("tiny", "smollm2"))
    ap.add_argument("--out", type=Path, help="write the digest here")
    ap.add_argument("--check", type=Path, help="compare against this recorded digest; exit 1 on a difference")
    ap.add_argument("--work", type=Path, default=Path("/tmp/asvd2gguf-golden"), help="working folder (emptied)")
    ap.add_argument("--quant", action="store_true", help="smollm2: also a --quant q8_0 file")
    ap.add_argument("--cache-dir", type=Path, help="smollm2: statistics cache (default: the shared one)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    work = args.work / args.what
    got = tiny(work) if args.what == "tiny" else smollm2(work, args.quant, args.cache_dir)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(got, indent=1, sort_keys=False) + "\n")
    if args.check:
        diffs = compare(json.loads(args.check.read_text()), got)
        for d in diffs:
            print(d)
        print(f"{len(got)} files, {'identical' if not diffs else f'{len(diffs)} differences'}")
        sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
