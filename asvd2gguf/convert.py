"""The convert pipeline, as a driver: load -> calibrate -> analyse -> plan -> factor -> quantize -> write.

Each stage is one call into its module; the decisions live there:

    load       source.load_source             model, tokenizer, fingerprint (placement.py: --device-map)
    calibrate  chat.calibration_tokens        n x seqlen calibration windows and their description
    analyse    analysis.analyse               statistics (calibrate.py), factorizations (decompose.py),
                                              predicted loss curves (sensitivity.py), all cached
    plan       ranks.plan_ranks               the RankPlan: ranks per linear for --ratio / --ppl-target / --kv
    factor     factor.final_blocks            the tensors per layer (fallbacks make a new plan)
    quantize   quantize.quantize_blocks       --quant: block linears, then token_embd/output while writing
    write      gguf_write.write_gguf          the GGUF (atomic), asvd.* keys from gguf_keys

Every expensive stage is cached on disk by what determines it (model content, calibration
tokens, method), so re-running with another --ratio or --kv only repeats the plan and the write.
The options and their defaults are config.ConvertConfig.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np
import torch

from .analysis import analyse
from .blocks import BlockRunner, resolve_device
from .calibrate import calibration_warning
from .chat import calibration_tokens
from .config import ConvertConfig, parse_size
from .decompose import METHODS, SCALINGS
from .errors import Fallback, UserError
from .factor import densified, final_blocks
from .gguf_keys import asvd_metadata
from .gguf_write import OUTTYPES, QUANT_FILE_TYPES, clean_stale_partials, write_gguf
from .hf_donor import donor_for
from .perplexity import cached_base_loss, calib_loss
from .placement import main_device, map_summary, remove_offload, resolve_placement
from .quantize import SIGMA_SPLITS, NonBlockEncoder, SourceBlocks, quantize_blocks
from .quantize import plan as quant_plan
from .ranks import RankPlan, plan_ranks
from .sensitivity import SENSITIVITIES, ppl_sensitivity
from .source import Source, load_source
from .text import tokens_digest

__all__ = ["ConvertConfig", "Result", "convert", "validate"]


@dataclass
class Result:
    """What `convert` did. ratio: kept block-linear parameters / dense; kv: latent K+V width /
    full (1 without a latent cache); calib_ppl, base_calib_ppl: calibration perplexity of the
    written and of the uncompressed model; ranks: linear key -> rank per layer (0 dense);
    seconds: wall time; store_root: the analysis cache entry."""

    out: Path
    ratio: float
    kv: float
    calib_ppl: float
    base_calib_ppl: float
    ranks: dict[str, list[int]]
    seconds: float
    fallbacks: list[Fallback]
    store_root: Path
    warnings: list[str] = field(default_factory=list)
    plan: RankPlan | None = None  # the plan written (size plans: with its per-tensor choices and bytes)


def validate(cfg: ConvertConfig) -> ConvertConfig:
    """`cfg` checked, with its dependent defaults filled in (ConvertConfig.resolved), as a new
    object; `cfg` itself is not changed. Raises UserError naming the first bad option."""
    if cfg.ratio is not None and cfg.ppl_target is not None:
        raise UserError("give either --ratio or --ppl-target, not both")
    _validate_size(cfg)
    cfg = cfg.resolved()
    if cfg.ratio is not None and not (0 < cfg.ratio <= 1):
        raise UserError(f"--ratio must be in (0, 1], got {cfg.ratio}")
    if cfg.ppl_target is not None and not (cfg.ppl_target > 1):
        raise UserError(f"--ppl-target must be a perplexity above 1, got {cfg.ppl_target}")
    if cfg.kv is not None and not (0 < cfg.kv <= 1):
        raise UserError(f"--kv must be in (0, 1], got {cfg.kv}")
    if cfg.method not in METHODS:
        raise UserError(f"unknown --method '{cfg.method}'; use one of {', '.join(METHODS)}")
    if cfg.scaling not in SCALINGS:
        raise UserError(f"unknown --scaling '{cfg.scaling}'; use one of {', '.join(SCALINGS)}")
    if cfg.sensitivity not in SENSITIVITIES:
        raise UserError(f"unknown --sensitivity '{cfg.sensitivity}'; use one of {', '.join(SENSITIVITIES)}")
    if cfg.outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype '{cfg.outtype}'; use one of {', '.join(OUTTYPES)}")
    quant_plan(cfg.quant, cfg.outtype, cfg.quant_dense, cfg.quant_embd)  # raises on a bad choice
    if cfg.sigma_split not in SIGMA_SPLITS:
        raise UserError(f"unknown --sigma-split '{cfg.sigma_split}'; use one of {', '.join(SIGMA_SPLITS)}")
    if cfg.rank_align < 1:
        raise UserError("--rank-align must be at least 1")
    if cfg.refit_tokens < 0:
        raise UserError(f"--refit-tokens must be 0 (no refit) or a number of tokens, got {cfg.refit_tokens}")
    if not (0 < cfg.alpha <= 4):
        raise UserError(f"--alpha must be in (0, 4], got {cfg.alpha}")
    if cfg.calib_samples < 1 or cfg.calib_seqlen < 16:
        raise UserError("calibration needs --calib-samples >= 1 and --calib-seqlen >= 16")
    resolve_placement(cfg.device_map, cfg.max_memory, cfg.device)  # raises on a bad map or limit
    return cfg


def _validate_size(cfg: ConvertConfig) -> None:
    """The size-plan options (--size, --bpw, --types-only, --runtime) and what they exclude; UserError naming
    the first conflict or bad value."""
    sized = cfg.size is not None or cfg.bpw is not None
    if cfg.size is not None and cfg.bpw is not None:
        raise UserError("give either --size or --bpw, not both")
    if sized and (cfg.ratio is not None or cfg.ppl_target is not None):
        raise UserError(f"{'--size' if cfg.size is not None else '--bpw'} sets the budget: leave out --ratio and "
                        "--ppl-target")
    if cfg.size is not None:
        parse_size(cfg.size)
    if cfg.bpw is not None and not (0 < cfg.bpw <= 32):
        raise UserError(f"--bpw must be in (0, 32] bits per weight, got {cfg.bpw}")
    if cfg.types_only and not sized:
        raise UserError("--types-only chooses types under --size or --bpw; give one of them")
    from .ggml_lib import RUNTIMES

    if cfg.runtime is not None and cfg.runtime not in RUNTIMES:
        raise UserError(f"unknown --runtime '{cfg.runtime}'; use {' or '.join(RUNTIMES)}")
    if cfg.runtime is not None and not sized:
        raise UserError("--runtime prices a size plan's types; give --size or --bpw")
    if not sized:
        return
    if cfg.types_only and cfg.kv is not None and cfg.kv < 1:
        raise UserError("--types-only keeps every linear dense: it cannot make the latent cache --kv asks for")
    if cfg.quant != "none" or cfg.quant_dense is not None or cfg.quant_embd is not None:
        raise UserError("--size / --bpw choose a type per tensor: leave out --quant, --quant-dense and --quant-embd")
    if cfg.dense:
        raise UserError("--size / --bpw plan the file's bytes: leave out --dense")
    if cfg.sensitivity != "fisher":
        raise UserError("--size / --bpw price every option with the fisher (K-FAC) prediction: leave --sensitivity "
                        "at fisher")


def default_out(cfg: ConvertConfig, name: str) -> Path:
    """<model>-<method>-r<ratio>[-kv<kv>][-dense].gguf (ppl<target>, s<size> or bpw<bpw>[-types]
    instead of r<ratio>), in the working folder."""
    if cfg.size is not None or cfg.bpw is not None:
        tag = (f"s{cfg.size.replace(' ', '')}" if cfg.size is not None else f"bpw{cfg.bpw:g}")
        tag += "-types" if cfg.types_only else ""
        if cfg.kv is not None:
            tag += f"-kv{cfg.kv:g}"
        return Path(f"{name}-{cfg.method}-{tag}.gguf")
    tag = f"r{cfg.ratio:g}" if cfg.ratio is not None else f"ppl{cfg.ppl_target:g}"
    if cfg.kv is not None:
        tag += f"-kv{cfg.kv:g}"
    return Path(f"{name}-{cfg.method}-{tag}{'-dense' if cfg.dense else ''}.gguf")


def check_out(out: Path, force: bool) -> None:
    """UserError when `out` exists (without `force`), is a folder, or its folder is missing."""
    if out.is_dir():  # before "exists": --force cannot help here
        raise UserError(f"{out} is a directory; give a file name")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite")
    if not out.parent.exists():
        raise UserError(f"output folder does not exist: {out.parent}")


def check_distinct(out: Path, imatrix_out: Path | None) -> None:
    """UserError when --imatrix-out names the output GGUF itself (the imatrix, written last,
    would replace the model)."""
    if imatrix_out is not None and Path(imatrix_out).resolve() == Path(out).resolve():
        raise UserError(f"--imatrix-out is the output GGUF itself ({out}); give the imatrix another name")


class _Stages:
    """Prints each finished stage with its duration: long work should say what it did."""

    def __init__(self, console):
        self.console = console
        self.t = time.time()

    def done(self, what: str) -> None:
        now = time.time()
        if self.console is not None:
            self.console.print(f"[green]done[/] {what} ({now - self.t:.1f} s)", highlight=False)
        self.t = now


def convert(cfg: ConvertConfig, console=None, progress=None) -> Result:
    """Compress `cfg.model` by activation-aware low-rank factorization and write a factored GGUF.

    The method is ASVD's (arXiv 2312.05821): activation-aware factorization (or the whitened
    variants of decompose.py), ranks chosen per linear from sensitivity curves under one budget
    (the paper's Sensitivity-based Truncation Rank Searching; ranks.py), optionally a latent KV
    cache (the paper's KV cache compression: --kv).
    `console`, `progress`: a rich Console for stage lines and a Progress for bars (both optional).
    Returns a Result. Raises UserError for bad options, an existing output without --force, an
    unsupported or broken model, an unreachable budget, or a failed write (nothing is left
    behind: the file is written to a temporary name and renamed).
    """
    t0 = time.time()
    stages = _Stages(console)
    cfg = validate(cfg)
    if cfg.out is not None:
        check_out(cfg.out, cfg.force)
        check_distinct(cfg.out, cfg.imatrix_out)
    if cfg.imatrix_out is not None:
        check_out(cfg.imatrix_out, cfg.force)
    placement = resolve_placement(cfg.device_map, cfg.max_memory, cfg.device)
    device = resolve_device(cfg.device) if placement is None else None
    src = load_source(cfg.model, cfg.cache_dir, placement)  # load
    try:
        return _convert_loaded(cfg, src, device, stages, progress, t0)
    finally:
        remove_offload(src.offload_dir)


def _convert_loaded(cfg: ConvertConfig, src: Source, device: torch.device | None, stages: _Stages, progress,
                    t0: float) -> Result:
    """Everything after loading; `device` None: the model is placed by a device map (accelerate)."""
    mapped = device is None
    if mapped:
        device = main_device(src.model)
        stages.done(f"loaded {src.name} ({src.arch}, {src.n_layer} layers) with device map {map_summary(src.model)}")
    else:
        stages.done(f"loaded {src.name} ({src.arch}, {src.n_layer} layers)")
    out = cfg.out or default_out(cfg, src.name)
    check_out(out, cfg.force)
    check_distinct(out, cfg.imatrix_out)
    clean_stale_partials(out)
    runner = BlockRunner(src.model, device, mapped=mapped)

    # calibrate
    tokens, calib_desc = calibration_tokens(src, cfg.calib, cfg.calib_samples, cfg.calib_seqlen, cfg.seed,
                                            cfg.cache_dir)
    stages.done(f"calibration windows: {tokens.shape[0]} x {tokens.shape[1]} tokens from {calib_desc}")

    # analyse
    store = analyse(src, runner, tokens, cfg.cache_dir, cfg.method, cfg.alpha, cfg.scaling, progress)
    infos = store.infos(src.n_layer)
    stages.done(f"statistics, {cfg.method} factorizations and sensitivity curves (cache {store.root})")
    if cfg.sensitivity == "ppl":
        infos = ppl_sensitivity(src, runner, tokens, store, infos, cache_dir=cfg.cache_dir, method=cfg.method,
                                alpha=cfg.alpha, scaling=cfg.scaling, rank_align=cfg.rank_align,
                                sweep_samples=cfg.sweep_samples, progress=progress)
        stages.done("exact perplexity sensitivity sweep")
    warnings = [w for w in (calibration_warning(int(tokens.numel()), infos),) if w]

    if cfg.size is not None or cfg.bpw is not None:
        return _convert_sized(cfg, src, runner, tokens, calib_desc, store, infos, out, stages, progress, t0, warnings)

    # plan
    plan = plan_ranks(infos, cfg, lambda ranks: calib_loss(runner, store, ranks, tokens),
                      lambda: cached_base_loss(runner, store, tokens), progress)
    stages.done(f"rank allocation ({cfg.allocation}, {cfg.sensitivity})")

    # factor
    blocks, plan = final_blocks(src.model, store, plan, cfg.sigma_split)
    blocks, refit_desc = _refit(cfg, src, runner, tokens, calib_desc, blocks, stages, progress)
    if cfg.dense:
        blocks = densified(blocks)
    if cfg.imatrix_out is not None:
        from .calibrate import cached_stats

        _write_imatrix(cfg, src, runner, tokens, calib_desc, blocks,
                       cached_stats(src, runner, tokens, cfg.cache_dir, progress, need_fisher=False))
        stages.done(f"imatrix written to {cfg.imatrix_out}")

    # quantize
    qplan = quant_plan(cfg.quant, cfg.outtype, cfg.quant_dense, cfg.quant_embd)
    seen, quant_fallbacks = blocks, []
    if qplan.active:
        blocks, seen, quant_fallbacks = quantize_blocks(blocks, qplan, device, progress)
        stages.done(f"quantized block linears (factors {qplan.factors}, dense {qplan.dense})")

    # evaluate what is written
    loss = calib_loss(runner, store, plan.ranks, tokens, seen)
    base_loss = cached_base_loss(runner, store, tokens)
    stages.done("calibration perplexity of the result")

    # write
    meta = asvd_metadata(cfg, calib_desc, plan.ratio, plan.kv, plan.latent and not cfg.dense,
                         None if cfg.dense else plan.table(), math.exp(loss) if math.isfinite(loss) else 0.0,
                         refit_desc)
    donor, extra = donor_for(src, cfg.cache_dir)
    embd = NonBlockEncoder(qplan, device) if qplan.active else None
    factored = not cfg.dense and any(plan.ranks.values())
    hf_config = src.model.config
    write_gguf(out, donor, src.arch, src.n_layer, hf_config.num_attention_heads, hf_config.num_key_value_heads,
               lambda i: blocks[i], extra, meta, cfg.outtype, progress, nonblock_map=embd,
               file_type=QUANT_FILE_TYPES.get(qplan.factors if factored else qplan.dense))
    stages.done("GGUF written")
    fallbacks = [*plan.fallbacks, *quant_fallbacks, *(embd.fallbacks if embd else ())]
    return Result(out, plan.ratio, plan.kv, math.exp(loss), math.exp(base_loss), plan.table(), time.time() - t0,
                  fallbacks, store.root, warnings, plan)


def _refit(cfg: ConvertConfig, src: Source, runner: BlockRunner, tokens: torch.Tensor, calib_desc: str, blocks,
           stages: _Stages, progress) -> tuple[list, str]:
    """--refit-tokens: the factor pairs of `blocks` refitted on the compressed model's own inputs
    (refit.py), and what they were refitted on ("" when nothing was: --refit-tokens 0, or no
    linear is factored). A text calibration source gives ceil(refit_tokens / --calib-seqlen)
    windows, at most as many as the text holds without overlap and at least the calibration's
    count; chat, conversations and selfgen windows are generated by the model, so those refit on
    the calibration windows themselves."""
    from .calibrate import cached_stats
    from .chat import text_tokens
    from .refit import refit_blocks, refit_mode

    n_fact = sum(1 for row in blocks for bt in row if bt.a is not None)
    if cfg.refit_tokens <= 0 or not n_fact:
        return blocks, ""
    n, available = tokens.shape[0], text_tokens(src, cfg.calib)
    if available is None:
        note = "; the calibration is generated by the model: its own windows"
    else:
        wanted = math.ceil(cfg.refit_tokens / cfg.calib_seqlen)
        n = max(n, min(wanted, available // cfg.calib_seqlen))
        note = f"; the text holds {available} tokens" if n < wanted else ""
    rtokens, desc = (tokens, calib_desc) if n == tokens.shape[0] else calibration_tokens(
        src, cfg.calib, n, cfg.calib_seqlen, cfg.seed, cfg.cache_dir)
    stats = cached_stats(src, runner, tokens, cfg.cache_dir, progress, need_fisher=True)
    blocks = refit_blocks(runner, rtokens, blocks, cfg.method, stats, cfg.sigma_split, progress)
    what = f"{desc}, {rtokens.shape[0]} x {rtokens.shape[1]} tokens, seed {cfg.seed}"
    stages.done(f"refitted the {refit_mode(int(rtokens.numel()))} of {n_fact} linears on the compressed model's "
                f"inputs ({what}{note})")
    return blocks, what


# ---------------------------------------------------------------- size plans (--size / --bpw)

# general.file_type (llama_ftype) of a size plan: that of the type holding most block-linear bytes
SIZE_FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k": 12, "q4_k": 15,
                   "q5_k": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30}
GGUF_ALIGN = 32  # general.alignment gguf-py writes with: each tensor's data is padded to it


def _info_bytes(name: str, ndim: int) -> int:
    """Bytes of one tensor info in the GGUF header (name, n_dims, dims, type, offset), plus the
    worst-case alignment padding of its data."""
    return 8 + len(name.encode()) + 4 + 8 * ndim + 4 + 8 + GGUF_ALIGN - 1


def file_accounting(donor: Path, extra, linear_names: list[str], asvd_kv: int, outtype: str) -> tuple[int, int, int]:
    """(metadata bytes, fixed tensor bytes, weights of the fixed tensors) of the file the writer makes.

    metadata: the donor's header and key-value section, `asvd_kv` bytes of asvd.* keys (and the
    " (ASVD)" of general.name), and per tensor its info and worst-case alignment padding (every
    block linear counted as a factor pair, two tensors: an upper bound of at most ~100 bytes per
    dense linear); fixed tensors: the non-block tensors besides token_embd / output (norms: F32;
    any other 2-D tensor at --outtype). `linear_names`: "blk.<i>.<gguf>" of every block linear.
    Units: bytes, and elements.
    """
    from .gguf_fast import FastGGUFReader
    from .gguf_write import BLOCK_WEIGHT_SUFFIXES

    reader = FastGGUFReader(donor)
    if extra is not None:
        layout = [(name, tuple(np.shape(arr))) for name, arr in extra]
    else:
        layout = [(t.name, tuple(int(d) for d in t.shape)) for t in reader.tensors
                  if not t.name.endswith(BLOCK_WEIGHT_SUFFIXES)]
    meta = reader.kv_end + asvd_kv + len(" (ASVD)") + sum(
        _info_bytes(f"{base}.lr_out.weight", 2) + _info_bytes(f"{base}.lr_in.weight", 2) for base in linear_names)
    fixed = weights = 0
    for name, shape in layout:
        meta += _info_bytes(name, len(shape))
        if name in ("token_embd.weight", "output.weight"):
            continue
        n = int(np.prod(shape))
        weights += n
        fixed += 4 * n if len(shape) == 1 or outtype == "f32" else 2 * n
    return meta, fixed, weights


def _asvd_kv_bytes(cfg: ConvertConfig, calib_desc: str, n_layer: int, latent: bool, untied: bool) -> int:
    """Upper bound of the asvd.* key-value bytes of a size plan's file: the keys of asvd_metadata and
    size_metadata with the longest type name (6 characters) in every type slot."""
    from .arch import LINEAR_KEYS, SPEC
    from .ggml_lib import RUNTIMES
    from .gguf_keys import (
        KEY_SIZE_BPW,
        KEY_SIZE_LOSS,
        KEY_SIZE_PLANNED,
        KEY_SIZE_RUNTIME,
        KEY_SIZE_TARGET,
        KEY_SIZE_TYPES_ONLY,
        kv_bytes,
        loss_key,
        type_key,
    )

    refit = f"{calib_desc}, {10**9} x {cfg.calib_seqlen} tokens, seed {cfg.seed}"  # longer than any refit's
    meta = asvd_metadata(cfg, calib_desc, 1.0, 1.0, latent, {k: [0] * n_layer for k in LINEAR_KEYS}, 1.0, refit)
    V = gguf.GGUFValueType
    size = {KEY_SIZE_TARGET: (0, V.UINT64), KEY_SIZE_BPW: (0.0, V.FLOAT32), KEY_SIZE_PLANNED: (0, V.UINT64),
            KEY_SIZE_LOSS: (0.0, V.FLOAT32), KEY_SIZE_TYPES_ONLY: (False, V.BOOL),
            KEY_SIZE_RUNTIME: (max(RUNTIMES, key=len), V.STRING)}
    for k in LINEAR_KEYS:
        size[type_key(SPEC[k].gguf)] = (["iq4_xs"] * n_layer, V.ARRAY)
        size[loss_key(SPEC[k].gguf)] = ([0.0] * n_layer, V.ARRAY)
    for name in ("token_embd", "output")[: 2 if untied else 1]:
        size[type_key(name)] = ("iq4_xs", V.STRING)
        size[loss_key(name)] = (0.0, V.FLOAT32)
    return kv_bytes(meta) + kv_bytes(size)


def _price_options(cfg: ConvertConfig, src: Source, runner: BlockRunner, tokens, store, infos, stats, lib, progress,
                   sources: SourceBlocks):
    """Every priced Option per block linear and for token_embd (and an untied output), their shapes,
    the head's imatrix and whether the embedding is tied. Cached per linear under
    <cache_dir>/pricing, in three entries keyed by what determines them: the analysis entry and
    the llama.cpp build, plus the dense types (dense options), the factor types, exact ranks,
    rank grid and sigma split (factored options), the embedding types (embedding options).
    A tensor the source GGUF stores quantized also gets the option of keeping those blocks
    (pricing.source_option; priced on every run: one dequantization)."""
    from . import cache, llamacpp
    from . import ggml_lib as G
    from . import pricing as P
    from .arch import SPEC, get_module
    from .calibrate import cached_act_rounding_stats, cached_embedding_stats, cached_token_weighted_grams
    from .placement import materialized
    from .quantize import ggml_dequantized
    from .ranks import Option, size_ranks

    base = (store.root.name, llamacpp.build_key())
    dense_root = cfg.cache_dir / "pricing" / cache.key(*base, "dense", P.DENSE_TYPES, tokens_digest(tokens), "tw-v3")
    fact_root = cfg.cache_dir / "pricing" / cache.key(*base, "factored", P.FACTOR_TYPES, P.EXACT_RANKS,
                                                      cfg.rank_align, cfg.sigma_split, "v2")
    cpu = G.load_cpu()
    # every runtime's input types (one cache entry whichever --runtime prices)
    vts = {G.input_type(t, r, cpu) for t in G.TYPES for r in G.RUNTIMES} - {G.T.F32, G.T.F16, G.T.BF16}
    act = cached_act_rounding_stats(src, runner, tokens, cfg.cache_dir, vts, progress)
    tw = cached_token_weighted_grams(src, runner, tokens, cfg.cache_dir, progress)

    @functools.cache
    def vec_dot(written: str) -> str:
        return G.name_of(G.input_type(written, cfg.runtime, cpu))

    options, shapes = {}, {}
    todo = [info for info in infos if any(cache.load(r / f"L{info.layer:03d}.{info.key}.pt") is None
                                          for r in (dense_root, fact_root))]
    task = progress.add_task("pricing (rank, type) options", total=len(todo)) if progress and todo else None
    for info in infos:
        name = f"L{info.layer:03d}.{info.key}.pt"
        dense, fact = cache.load(dense_root / name), cache.load(fact_root / name)
        spec = SPEC[info.key]
        kept = sources.get(f"blk.{info.layer}.{spec.gguf}", (info.m, info.n))
        lin = get_module(runner.layers[info.layer], spec.module)
        with materialized(lin):
            w = lin.weight.detach().float().cpu()
        # dense options' cost: the token-weighted input Gram (pricing.py); imatrix: the plain one, as
        # llama-imatrix's. Factored options keep the plain Gram of the truncation curves they build on
        gx, gg = stats[info.layer].gram[spec.group], stats[info.layer].out_gram[info.key]
        gxw = tw[info.layer][info.key]
        if dense is None or fact is None:
            if dense is None:
                dense = [o.to_dict() for o in P.price_dense(w, gxw, gg, lib=lib, im_gram=gx)]
                cache.save(dense, dense_root / name)
            if fact is None:
                fact = [o.to_dict() for o in P.price_factored(
                    w, store.factorization(info.layer, info.key), size_ranks(info, cfg.rank_align), gx, gg,
                    info.curves["fisher"], split=cfg.sigma_split, lib=lib)]
                cache.save(fact, fact_root / name)
            if task is not None:
                progress.advance(task)
        opts = [Option.from_dict(d) for d in dense + fact]
        if kept is not None:
            cost = P.fisher_cost(ggml_dequantized(kept, lib) - w, gxw.float(), gg.float())
            opts = P.with_source(opts, P.source_option(G.name_of(kept.qtype), kept.data.numel(), cost))
        # the runtime's rounding of the input: by the type reading it (dense: W's; a pair: B's)
        plain = P.act_weights(w, gg)
        weights = {0: plain * P.token_weighting(gxw, gx), 1: plain}  # dense, factored: as their weight costs
        err = act["layers"][info.layer][spec.group]
        options[(info.layer, info.key)] = [replace(o, cost=o.cost + P.act_cost(weights[int(o.rank > 0)], err.get(
            vec_dot(o.types[-1])))) for o in opts]
        shapes[(info.layer, info.key)] = (info.m, info.n)
    emb = runner.inner.embed_tokens.weight
    head = src.model.lm_head.weight
    tied = head.data_ptr() == emb.data_ptr()
    est = cached_embedding_stats(src, runner, tokens, cfg.cache_dir)
    head_im = P.imatrix_dense(est["gh"])
    path = cfg.cache_dir / "pricing" / cache.key(*base, "embd", src.fingerprint, tokens_digest(tokens), P.EMBD_TYPES,
                                                 "v2") / "embd.pt"
    # each matrix's roles (embedding_cost): a tied token_embd is also the head; an untied one only an input
    hs, inp = (est["gh"], est["gdiag"]), (est["freq"], est["ge"])
    roles = {"token_embd": (emb, hs, inp)} if tied else {"token_embd": (emb, None, inp), "output": (head, hs, None)}
    hit = cache.load(path)
    if hit is None:
        hit = {name: [o.to_dict() for o in P.price_embedding(mat.detach().float(), head=h, inp=x, lib=lib,
                                                              imatrix=head_im if h is not None else None)]
               for name, (mat, h, x) in roles.items()}
        cache.save(hit, path)
    for name, opts in hit.items():
        options[name] = [Option.from_dict(d) for d in opts]
        mat, h, x = roles[name]
        shapes[name] = tuple(mat.shape)
        kept = sources.get(name, shapes[name])
        if kept is not None:
            de = ggml_dequantized(kept, lib) - mat.detach().float().cpu()
            options[name] = P.with_source(options[name], P.source_option(G.name_of(kept.qtype), kept.data.numel(),
                                                                          P.embedding_cost(de, h, x)))
        if h is not None:  # the head's matmul rounds its input (a lookup, the embedding's role, does not)
            weights = P.head_act_weights(mat.detach().float().cpu(), h[1])
            options[name] = [replace(o, cost=o.cost + P.act_cost(weights, act["head"].get(vec_dot(o.types[0]))))
                             for o in options[name]]
    return options, shapes, head_im, tied


def _write_imatrix(cfg: ConvertConfig, src: Source, runner: BlockRunner, tokens, calib_desc: str, blocks, stats):
    """--imatrix-out: the importance matrix of every tensor of `blocks` (float, as factored) and of
    the output head (token_embd.weight when tied: its matmul), in llama-imatrix's format."""
    from .calibrate import cached_embedding_stats
    from .imatrix import imatrix_entries, write_imatrix
    from .pricing import imatrix_dense

    est = cached_embedding_stats(src, runner, tokens, cfg.cache_dir)
    tied = src.model.lm_head.weight.data_ptr() == runner.inner.embed_tokens.weight.data_ptr()
    entries = imatrix_entries(blocks, [s.gram for s in stats], imatrix_dense(est["gh"]),
                              "token_embd.weight" if tied else "output.weight")
    write_imatrix(cfg.imatrix_out, entries, int(tokens.numel()), int(tokens.shape[1]), calib_desc, cfg.force)


def _convert_sized(cfg: ConvertConfig, src: Source, runner: BlockRunner, tokens, calib_desc: str, store, infos,
                   out: Path, stages: _Stages, progress, t0: float, warnings: list[str]) -> Result:
    """The size-plan pipeline after the analysis: price -> plan -> factor -> quantize -> write.

    Every block linear (and token_embd / output) takes the Option of ranks.plan_size under the
    whole file's byte budget (--size; --bpw: bits per weight over the original model's weights,
    tensor data only, as llama.cpp reports BPW), priced by pricing.py with llama.cpp's
    quantizers (ggml_lib) and the calibration's K-FAC statistics."""
    from . import ggml_lib
    from .arch import SPEC
    from .calibrate import cached_stats
    from .gguf_keys import size_metadata
    from .pricing import DENSE_TYPES
    from .quantize import SizedNonBlock, quantize_sized
    from .ranks import format_bytes, plan_size

    lib = ggml_lib.load()
    stats = cached_stats(src, runner, tokens, cfg.cache_dir, progress, need_fisher=True)
    hf_config = src.model.config
    sources = SourceBlocks(src.gguf_path, src.arch, hf_config.num_attention_heads, hf_config.num_key_value_heads)
    options, shapes, head_im, tied = _price_options(cfg, src, runner, tokens, store, infos, stats, lib, progress,
                                                    sources)
    stages.done("priced every (rank, type) option and the embedding types")

    donor, extra = donor_for(src, cfg.cache_dir)
    asvd_kv = _asvd_kv_bytes(cfg, calib_desc, src.n_layer, bool(cfg.kv is not None and cfg.kv < 1), not tied)
    names = [f"blk.{info.layer}.{SPEC[info.key].gguf}" for info in infos]
    meta_bytes, fixed_data, fixed_weights = file_accounting(donor, extra, names, asvd_kv, cfg.outtype)
    if cfg.size is not None:
        max_bytes, what = parse_size(cfg.size), f"--size {cfg.size}"
    else:
        n_weights = fixed_weights + sum(info.m * info.n for info in infos) + sum(
            shapes[k][0] * shapes[k][1] for k in ("token_embd", "output") if k in shapes)
        max_bytes, what = meta_bytes + int(cfg.bpw * n_weights / 8), f"--bpw {cfg.bpw:g}"
    plan = plan_size(infos, options, shapes, max_bytes, meta_bytes + fixed_data, cfg.kv, cfg.types_only,
                     DENSE_TYPES, what)
    stages.done(f"size plan: {format_bytes(plan.nbytes)} planned for {format_bytes(max_bytes)}, "
                f"{sum(1 for r in plan.ranks.values() if r)} of {len(plan.ranks)} linears factored, "
                f"predicted loss increase {plan.predicted_loss:.4f} nats (input rounding of the {cfg.runtime} backend)")
    if plan.saturated and plan.nbytes < 0.99 * max_bytes:
        warnings.append(f"{what} is more than this model can use: every tensor is at its lowest-loss option "
                        f"in {format_bytes(plan.nbytes)}")

    float_blocks, plan = final_blocks(src.model, store, plan, cfg.sigma_split)
    float_blocks, refit_desc = _refit(cfg, src, runner, tokens, calib_desc, float_blocks, stages, progress)
    blocks, seen = quantize_sized(float_blocks, plan, [s.gram for s in stats], lib, progress, sources)
    stages.done("quantized block linears with llama.cpp's quantizers")
    nonblock = SizedNonBlock(plan, head_im, tied, lib, sources)
    # under a device map the embedding may be offloaded (no values to swap): then it counts as original
    with contextlib.nullcontext() if runner.mapped else nonblock.seen(runner.inner.embed_tokens.weight,
                                                                       src.model.lm_head.weight):
        loss = calib_loss(runner, store, plan.ranks, tokens, seen)
    base_loss = cached_base_loss(runner, store, tokens)
    stages.done("calibration perplexity of the result (token_embd and output "
                f"{'as the original: device map' if runner.mapped else 'at their planned types'})")

    meta = asvd_metadata(cfg, calib_desc, plan.ratio, plan.kv, plan.latent, plan.table(),
                         math.exp(loss) if math.isfinite(loss) else 0.0, refit_desc)
    meta.update(size_metadata(cfg, plan))
    by_type: dict[str, int] = {}
    for key in plan.ranks:
        written = plan.choices[key].types[0]
        by_type[written] = by_type.get(written, 0) + plan.choices[key].nbytes
    file_type = SIZE_FILE_TYPES.get(max(by_type, key=by_type.get), 1)
    write_gguf(out, donor, src.arch, src.n_layer, hf_config.num_attention_heads, hf_config.num_key_value_heads,
               lambda i: blocks[i], extra, meta, cfg.outtype, progress,
               nonblock_map=nonblock, file_type=file_type)
    stages.done("GGUF written")
    if cfg.imatrix_out is not None:
        _write_imatrix(cfg, src, runner, tokens, calib_desc, float_blocks, stats)
        stages.done(f"imatrix written to {cfg.imatrix_out}")
    return Result(out, plan.ratio, plan.kv, math.exp(loss), math.exp(base_loss), plan.table(), time.time() - t0,
                  list(plan.fallbacks), store.root, warnings, plan)
