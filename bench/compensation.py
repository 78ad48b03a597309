"""Does a dense low-bit weight plus a low-rank correction earn a place in size plans? (issue 12)

The error-compensation option of a block linear: W ~ W_q + A B, with W_q = deq(quant(W, t)) at a
llama.cpp type t and A (m, r), B (r, n) the rank-r factorization of the rounding error
E = W - W_q in the K-FAC metric (decompose.factorize(E, "kfac"): the same activation-aware SVD
that factors W, applied to E; LQER, arXiv 2402.02446, and QERA, arXiv 2410.06040, fit such
corrections), both factors then quantized at a factor type. Priced exactly like every other
option (pricing.fisher_cost of W_q + A_q B_q - W; bytes: W_q's plus the pair's).

For each budget (the stock llama-quantize files' sizes from a bench/size_table.py run), the
size plan's predicted loss increase is solved twice by ranks.plan_size, with and without the
compensation options beside the dense and factored ones, and the plan's use of them is
counted. Prediction only: nothing is written, so this decides whether the option is worth a
file-format flag and a runtime path before they exist.

    python bench/compensation.py --model smollm2 --sizes-from /tmp/i12/bench
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2"
PRESETS = ("Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
BASE_TYPES = ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k")  # the dense part of a compensated linear
CORR_TYPES = ("q8_0", "q4_k")  # its correction factors
CORR_RANKS = (8, 16, 32, 64)


def compensation_options(w, gx, gg, lib) -> list:
    """Priced (dense type t + rank-r correction) options of one linear w (m, n); Grams gx (n, n), gg (m, m)."""
    from asvd2gguf import pricing as P
    from asvd2gguf.decompose import factorize
    from asvd2gguf.ggml_lib import dense_bytes, pair_bytes
    from asvd2gguf.ranks import Option

    m, n = w.shape
    w32, gx32, gg32 = w.float(), gx.float(), gg.float()
    im_w = P.imatrix_dense(gx32)
    out = []
    for t in BASE_TYPES:
        nb, tt = dense_bytes(m, n, t)
        _, wq, _ = P.quantized(w32, tt, im_w, lib)
        f = factorize(w32 - wq, "kfac", gram=gx32, out_gram=gg32)
        for r in CORR_RANKS:
            if r >= min(m, n) // 4:
                continue
            a, b = (x.float() for x in f.factors(r))
            for ct in CORR_TYPES:
                pb, tts = pair_bytes(m, n, r, ct)
                _, qa, _ = P.quantized(a, tts[0], P.imatrix_factor_a(b, gx32), lib)
                _, qb, _ = P.quantized(b, tts[1], im_w, lib)
                cost = P.fisher_cost(wq + qa @ qb - w32, gx32, gg32)
                out.append(Option(r, f"{t}+{ct}", (tt, *tts), nb + pb, cost))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sizes-from", type=Path, required=True, help="a bench/size_table.py --out-dir (stock-*.gguf)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--mib", type=float, nargs="*", default=[], help="more budgets (MiB), e.g. below stock Q3_K_M")
    args = ap.parse_args()

    from rich.progress import Progress

    from asvd2gguf import convert as C
    from asvd2gguf import ggml_lib
    from asvd2gguf.arch import SPEC, get_module
    from asvd2gguf.calibrate import cached_stats
    from asvd2gguf.placement import materialized
    from asvd2gguf.ranks import plan_size

    cfg = C.validate(C.ConvertConfig(model=args.model, calib=str(WIKI / "wiki.valid.tokens"),
                                     calib_samples=args.samples, calib_seqlen=args.seqlen, seed=233,
                                     size="1G", **({"cache_dir": args.cache_dir} if args.cache_dir else {})))
    src = C.load_source(cfg.model, cfg.cache_dir, None)
    runner = C.BlockRunner(src.model, C.resolve_device(cfg.device))
    tokens, desc = C.calibration_tokens(src, cfg.calib, cfg.calib_samples, cfg.calib_seqlen, cfg.seed,
                                        cfg.cache_dir)
    lib = ggml_lib.load()
    with Progress() as progress:
        store = C.analyse(src, runner, tokens, cfg.cache_dir, cfg.method, cfg.alpha, cfg.scaling, progress)
        infos = store.infos(src.n_layer)
        stats = cached_stats(src, runner, tokens, cfg.cache_dir, progress, need_fisher=True)
        options, shapes, _, tied = C._price_options(cfg, src, runner, tokens, store, infos, stats, lib, progress)
        saved = args.sizes_from / "compensation-options.pt"  # priced once per model and calibration
        comp = torch.load(saved, weights_only=False) if saved.is_file() else {}
        task = progress.add_task("pricing compensation options", total=len(infos))
        for info in (i for i in infos if (i.layer, i.key) not in comp):
            spec = SPEC[info.key]
            lin = get_module(runner.layers[info.layer], spec.module)
            with materialized(lin):
                w = lin.weight.detach().float().cpu()
            comp[(info.layer, info.key)] = compensation_options(
                w, stats[info.layer].gram[spec.group], stats[info.layer].out_gram[info.key], lib)
            progress.advance(task)
        torch.save(comp, saved)

    donor, extra = C.donor_for(src, cfg.cache_dir)
    names = [f"blk.{info.layer}.{SPEC[info.key].gguf}" for info in infos]
    meta_bytes, fixed_data, _ = C.file_accounting(donor, extra, names, 0, cfg.outtype)
    print(f"\n{args.model}: predicted loss increase (nats, K-FAC) of the size plan at each stock file's size; "
          f"calibration {desc}, {args.samples}x{args.seqlen} seed 233")
    print("| budget | MiB | plan (dense + factored) | plan + compensation | change | linears compensated (type+rank) |")
    print("|---|---|---|---|---|---|")
    with_comp = {k: v + comp.get(k, []) for k, v in options.items()}
    budgets = [(p, (args.sizes_from / f"stock-{p}.gguf").stat().st_size) for p in PRESETS
               if (args.sizes_from / f"stock-{p}.gguf").is_file()]
    for mib in args.mib:
        budgets.append((f"{mib:g} MiB", int(mib * 2**20)))
    for preset, size in budgets:
        plain = plan_size(infos, options, shapes, size, meta_bytes + fixed_data, None, False, (), "--size")
        both = plan_size(infos, with_comp, shapes, size, meta_bytes + fixed_data, None, False, (), "--size")
        used = [o for k, o in both.choices.items() if "+" in o.qtype]
        kinds: dict[str, int] = {}
        for o in used:
            kinds[f"{o.qtype}@{o.rank}"] = kinds.get(f"{o.qtype}@{o.rank}", 0) + 1
        desc_used = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:4]) or "-"
        change = both.predicted_loss / plain.predicted_loss - 1 if plain.predicted_loss else 0.0
        print(f"| {preset} | {size / 2**20:.2f} | {plain.predicted_loss:.5f} | {both.predicted_loss:.5f} | "
              f"{100 * change:+.1f}% | {len(used)} of {len(infos)}: {desc_used} |")


if __name__ == "__main__":
    main()
