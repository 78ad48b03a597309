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

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .analysis import analyse
from .blocks import BlockRunner, resolve_device
from .calibrate import calibration_warning
from .chat import calibration_tokens
from .config import ConvertConfig
from .decompose import METHODS, SCALINGS
from .errors import Fallback, UserError
from .factor import final_blocks
from .gguf_keys import asvd_metadata
from .gguf_write import OUTTYPES, QUANT_FILE_TYPES, clean_stale_partials, write_gguf
from .hf_donor import donor_for
from .perplexity import cached_base_loss, calib_loss
from .placement import main_device, map_summary, remove_offload, resolve_placement
from .quantize import SIGMA_SPLITS, NonBlockEncoder, quantize_blocks
from .quantize import plan as quant_plan
from .ranks import plan_ranks
from .sensitivity import SENSITIVITIES, ppl_sensitivity
from .source import Source, load_source

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


def validate(cfg: ConvertConfig) -> ConvertConfig:
    """`cfg` checked, with its dependent defaults filled in (ConvertConfig.resolved), as a new
    object; `cfg` itself is not changed. Raises UserError naming the first bad option."""
    if cfg.ratio is not None and cfg.ppl_target is not None:
        raise UserError("give either --ratio or --ppl-target, not both")
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
    if not (0 < cfg.alpha <= 4):
        raise UserError(f"--alpha must be in (0, 4], got {cfg.alpha}")
    if cfg.calib_samples < 1 or cfg.calib_seqlen < 16:
        raise UserError("calibration needs --calib-samples >= 1 and --calib-seqlen >= 16")
    resolve_placement(cfg.device_map, cfg.max_memory, cfg.device)  # raises on a bad map or limit
    return cfg


def default_out(cfg: ConvertConfig, name: str) -> Path:
    """<model>-<method>-r<ratio>[-kv<kv>][-dense].gguf (ppl<target> instead of r<ratio>), in the
    working folder."""
    tag = f"r{cfg.ratio:g}" if cfg.ratio is not None else f"ppl{cfg.ppl_target:g}"
    if cfg.kv is not None:
        tag += f"-kv{cfg.kv:g}"
    return Path(f"{name}-{cfg.method}-{tag}{'-dense' if cfg.dense else ''}.gguf")


def check_out(out: Path, force: bool) -> None:
    """UserError when `out` exists (without `force`), is a folder, or its folder is missing."""
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite")
    if out.exists() and out.is_dir():
        raise UserError(f"{out} is a directory")
    if not out.parent.exists():
        raise UserError(f"output folder does not exist: {out.parent}")


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

    # plan
    plan = plan_ranks(infos, cfg, lambda ranks: calib_loss(runner, store, ranks, tokens),
                      lambda: cached_base_loss(runner, store, tokens), progress)
    stages.done(f"rank allocation ({cfg.allocation}, {cfg.sensitivity})")

    # factor
    blocks, plan = final_blocks(src.model, store, plan, cfg.dense, cfg.sigma_split)

    # quantize
    qplan = quant_plan(cfg.quant, cfg.outtype, cfg.quant_dense, cfg.quant_embd)
    seen, quant_fallbacks = blocks, []
    if qplan.active:
        blocks, seen, quant_fallbacks = quantize_blocks(blocks, qplan, device, progress)
        stages.done(f"quantized block linears (factors {qplan.factors}, dense {qplan.dense})")

    # evaluate what is written
    loss = calib_loss(runner, store, plan.ranks, tokens, None if cfg.dense and not qplan.active else seen)
    base_loss = cached_base_loss(runner, store, tokens)
    stages.done("calibration perplexity of the result")

    # write
    meta = asvd_metadata(cfg, calib_desc, plan.ratio, plan.kv, plan.latent and not cfg.dense,
                         None if cfg.dense else plan.table(), math.exp(loss) if math.isfinite(loss) else 0.0)
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
                  fallbacks, store.root, warnings)
