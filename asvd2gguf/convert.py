"""The convert pipeline: load -> calibrate -> analyse -> search -> decompose -> write.

Every expensive stage is cached on disk by what determines it (model content, calibration
tokens, method), so re-running with another --ratio or --kv only repeats the rank search and
the write.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from . import cache
from .analysis import AnalysisStore, LinearInfo
from .arch import KV_KEYS, LINEAR_KEYS, LINEARS, SPEC, get_module
from .blocks import BlockRunner, resolve_device
from .calibrate import LayerStats, collect
from .chat import calibration_tokens
from .config import DEFAULT_RATIO, ConvertConfig
from .decompose import METHODS, SCALINGS
from .errors import Fallback, UserError
from .gguf_write import FORMAT_VERSION, OUTTYPES, QUANT_FILE_TYPES, BlockTensor, clean_stale_partials, write_gguf
from .placement import main_device, materialized, remove_offload, resolve_placement
from .quantize import SIGMA_SPLITS, QuantPlan, encode, quantize_blocks
from .quantize import plan as quant_plan
from .ranks import RankPlan, plan_ranks, sweep_grid
from .sensitivity import SENSITIVITIES, interpolate, ppl_curve
from .source import Source, load_source
from .text import tokens_digest


@dataclass
class Result:
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


def validate(cfg: ConvertConfig) -> None:
    if cfg.ratio is not None and cfg.ppl_target is not None:
        raise UserError("give either --ratio or --ppl-target, not both")
    if cfg.ratio is None and cfg.ppl_target is None:
        cfg.ratio = DEFAULT_RATIO
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


def default_out(cfg: ConvertConfig, name: str) -> Path:
    tag = f"r{cfg.ratio:g}" if cfg.ratio is not None else f"ppl{cfg.ppl_target:g}"
    if cfg.kv is not None:
        tag += f"-kv{cfg.kv:g}"
    return Path(f"{name}-{cfg.method}-{tag}{'-dense' if cfg.dense else ''}.gguf")


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite")
    if out.exists() and out.is_dir():
        raise UserError(f"{out} is a directory")
    if not out.parent.exists():
        raise UserError(f"output folder does not exist: {out.parent}")


# ---------------------------------------------------------------- stages


def calibration_stats(src: Source, runner: BlockRunner, tokens, cfg, progress, need_fisher: bool) -> list[LayerStats]:
    root = cfg.cache_dir / "calib" / cache.key(src.fingerprint, tokens_digest(tokens), "v1")
    meta = root / "meta.json"
    if meta.is_file() and (json.loads(meta.read_text()).get("fisher") or not need_fisher):
        layers = [cache.load(root / f"layer_{i:03d}.pt") for i in range(src.n_layer)]
        if all(x is not None for x in layers):
            return [LayerStats.from_dict(x) for x in layers]
    calib = collect(runner, tokens, fisher=need_fisher, progress=progress)
    if not math.isfinite(calib.base_loss):
        raise UserError(f"the model's calibration loss is {calib.base_loss}: {_non_finite_weight(src)}")
    for i, st in enumerate(calib.layers):
        cache.save(st.to_dict(), root / f"layer_{i:03d}.pt")
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fisher": need_fisher, "base_loss": calib.base_loss}))
    tmp.replace(meta)
    return calib.layers


def _non_finite_weight(src: Source) -> str:
    """Names the first parameter with NaN or inf (read only after a non-finite loss: offloaded
    weights are read from disk again)."""
    from .placement import cpu_state_items

    for name, t in cpu_state_items(src.model):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name} has NaN or inf values"
    return "no weight has NaN or inf values (activations overflow float32?)"


def analyse(src: Source, runner, tokens, cfg, progress) -> AnalysisStore:
    store = AnalysisStore(
        cfg.cache_dir / "analysis"
        / cache.key(src.fingerprint, tokens_digest(tokens), cfg.method, cfg.alpha, cfg.scaling, "v3")
    )
    if store.complete(src.n_layer):
        return store
    stats = calibration_stats(src, runner, tokens, cfg, progress, need_fisher=True)
    task = progress.add_task(f"factorizing ({cfg.method})", total=src.n_layer) if progress else None
    for i, layer in enumerate(runner.layers):
        store.compute_layer(layer, i, stats[i], cfg.method, cfg.alpha, cfg.scaling, runner.block_device(i))
        if progress:
            progress.advance(task)
    return store


def ppl_sensitivity(src, runner, tokens, cfg, store: AnalysisStore, infos, progress) -> None:
    """The paper's exact sweep, cached per linear, over the first `sweep_samples` windows."""
    toks = tokens[: cfg.sweep_samples]
    root = cfg.cache_dir / "sens_ppl" / cache.key(
        src.fingerprint, tokens_digest(toks), cfg.method, cfg.alpha, cfg.scaling, cfg.rank_align, "v2"
    )
    todo = [inf for inf in infos if cache.load(root / f"{inf.name}.pt") is None]
    if todo:
        hidden = [runner.embed(toks)]
        for i in range(src.n_layer):
            hidden.append(runner.run_block(i, hidden[-1]))
        base = float(runner.loss(hidden[-1], toks).mean())
        task = progress.add_task("sensitivity sweep (exact)", total=len(todo)) if progress else None
        for inf in todo:
            pts = ppl_curve(runner, inf.layer, inf.key, store.factorization(inf.layer, inf.key), hidden[inf.layer],
                            toks, base, sweep_grid(inf, cfg.rank_align))
            cache.save({str(k): v for k, v in pts.items()}, root / f"{inf.name}.pt")
            if progress:
                progress.advance(task)
    for inf in infos:
        pts = {int(k): float(v) for k, v in cache.load(root / f"{inf.name}.pt").items()}
        inf.curves["ppl"] = interpolate(pts, inf.full_rank)


@torch.no_grad()
def calib_loss(runner: BlockRunner, store: AnalysisStore, infos, ranks: dict[tuple[int, str], int], tokens,
               blocks: list | None = None) -> float:
    """Calibration loss of the model compressed to `ranks` (rank 0: dense), or to the final `blocks`."""
    h = runner.embed(tokens)
    for i, layer in enumerate(runner.layers):
        if blocks is not None:  # factored linears, and dense ones whose written weight differs
            fac = {bt.key: (bt.a, bt.b) if bt.a is not None else (bt.weight, None)
                   for bt in blocks[i] if bt.a is not None or _replaced(layer, bt, runner.mapped)}
        else:
            fac = {k: store.factorization(i, k).factors(r) for (li, k), r in ranks.items() if li == i and r}
        if not fac:
            h = runner.run_block(i, h)
            continue
        with runner.trial(i, fac) as trial:
            h = runner.run_block(i, h, trial)
    return float(runner.loss(h, tokens).mean())


def _replaced(layer, bt: BlockTensor, mapped: bool = False) -> bool:
    """A dense block tensor that is not the layer's own weight (e.g. its dequantized copy).

    Under a device map the written weight is a CPU copy (or a fresh read of an offloaded one),
    so storage identity says nothing there and the values are compared instead.
    """
    lin = get_module(layer, SPEC[bt.key].module)
    if not mapped:
        return bt.weight.data_ptr() != lin.weight.data_ptr()
    with materialized(lin):
        return not torch.equal(bt.weight, lin.weight.detach().to(bt.weight.device))


def cached_base_loss(runner, store: AnalysisStore, infos, tokens) -> float:
    """The uncompressed model's calibration loss, kept beside the analysis (same key)."""
    path = store.root / "base_loss.json"
    if path.is_file():
        return float(json.loads(path.read_text())["loss"])
    loss = calib_loss(runner, store, infos, {}, tokens)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"loss": loss}))
    tmp.replace(path)
    return loss


# ---------------------------------------------------------------- driver


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
    t0 = time.time()
    st = _Stages(console)
    validate(cfg)
    if cfg.out is not None:
        check_out(cfg.out, cfg.force)
    placement = resolve_placement(cfg.device_map, cfg.max_memory, cfg.device)
    device = resolve_device(cfg.device) if placement is None else None
    src = load_source(cfg.model, cfg.cache_dir, placement)
    try:
        return _convert_loaded(cfg, src, device, st, progress, t0)
    finally:
        remove_offload(src.offload_dir)


def _convert_loaded(cfg: ConvertConfig, src: Source, device, st: _Stages, progress, t0: float) -> Result:
    """Everything after loading; `device` None: the model is placed by a device map (accelerate)."""
    mapped = device is None
    if mapped:
        device = main_device(src.model)
        st.done(f"loaded {src.name} ({src.arch}, {src.n_layer} layers) with device map {_map_summary(src.model)}")
    else:
        st.done(f"loaded {src.name} ({src.arch}, {src.n_layer} layers)")
    out = cfg.out or default_out(cfg, src.name)
    check_out(out, cfg.force)
    clean_stale_partials(out)
    runner = BlockRunner(src.model, device, mapped=mapped)
    tokens, calib_desc = calibration_tokens(src, cfg.calib, cfg.calib_samples, cfg.calib_seqlen, cfg.seed,
                                            cfg.cache_dir)
    st.done(f"calibration windows: {tokens.shape[0]} x {tokens.shape[1]} tokens from {calib_desc}")
    store = analyse(src, runner, tokens, cfg, progress)
    infos = [store.info(i, s.key) for i in range(src.n_layer) for s in LINEARS]
    st.done(f"statistics, {cfg.method} factorizations and sensitivity curves (cache {store.root})")
    if cfg.sensitivity == "ppl":
        ppl_sensitivity(src, runner, tokens, cfg, store, infos, progress)
        st.done("exact perplexity sensitivity sweep")

    warnings = [w for w in (calibration_warning(int(tokens.numel()), infos),) if w]
    plan = plan_ranks(infos, cfg, lambda ranks: calib_loss(runner, store, infos, ranks, tokens),
                      lambda: cached_base_loss(runner, store, infos, tokens), progress)
    st.done(f"rank allocation ({cfg.allocation}, {cfg.sensitivity})")

    blocks, plan = final_blocks(src, store, plan, cfg.dense, cfg.sigma_split)
    fallbacks = list(plan.fallbacks)
    qplan = quant_plan(cfg.quant, cfg.outtype, cfg.quant_dense, cfg.quant_embd)
    seen = blocks
    if qplan.active:
        blocks, seen, qfall = quantize_blocks(blocks, qplan, device, progress)
        fallbacks += qfall
        st.done(f"quantized block linears (factors {qplan.factors}, dense {qplan.dense})")
    loss = calib_loss(runner, store, infos, plan.ranks, tokens, None if cfg.dense and not qplan.active else seen)
    base_loss = cached_base_loss(runner, store, infos, tokens)
    st.done("calibration perplexity of the result")
    achieved, kv_ach = plan.ratio, plan.kv  # after any dense fallback
    rank_table = plan.table()
    meta = asvd_metadata(cfg, calib_desc, achieved, kv_ach, plan.latent and not cfg.dense, rank_table,
                         math.exp(loss) if math.isfinite(loss) else 0.0)
    if cfg.dense:
        meta = {k: v for k, v in meta.items() if not k.startswith("asvd.rank.")}
    c = src.model.config
    donor, extra = donor_for(src, cfg)
    write_gguf(out, donor, src.arch, src.n_layer, c.num_attention_heads, c.num_key_value_heads,
               lambda i: blocks[i], extra, meta, cfg.outtype, progress,
               nonblock_map=_embd_encoder(qplan, fallbacks, device) if qplan.active else None,
               file_type=QUANT_FILE_TYPES.get(qplan.dense if cfg.dense or not any(plan.ranks.values())
                                              else qplan.factors))
    st.done("GGUF written")
    return Result(out, achieved, kv_ach, math.exp(loss), math.exp(base_loss), rank_table, time.time() - t0, fallbacks,
                  store.root, warnings)


def calibration_warning(n_tokens: int, infos: list[LinearInfo]) -> str | None:
    """A warning when the calibration has fewer tokens than the widest linear has input channels.

    X^T X (T tokens, n channels) then has rank <= T < n: every curve computed through it is
    exactly 0 for the input directions the calibration never excited, so it cannot rank them
    (they are ordered by the weight's own error instead, see _tie_broken). None when T >= n.
    """
    widest = max(infos, key=lambda inf: inf.n)
    if n_tokens >= widest.n:
        return None
    return (f"the calibration has {n_tokens} tokens, fewer than the {widest.n} input channels of {widest.key}: "
            f"X^T X has rank <= {n_tokens}, so directions the calibration never excited are ranked by weight norm "
            f"only; give at least {widest.n} tokens (--calib-samples x --calib-seqlen), better several times more")


def _map_summary(model) -> str:
    """How many modules accelerate put on each device (hf_device_map), for the stage line."""
    counts: dict[str, int] = {}
    for dev in (getattr(model, "hf_device_map", None) or {}).values():
        counts[str(dev)] = counts.get(str(dev), 0) + 1
    return ", ".join(f"{d}: {n}" for d, n in counts.items()) or "(single device)"


def _embd_encoder(qplan: QuantPlan, fallbacks: list[Fallback], device):
    """token_embd / output at the plan's embedding type; other non-block tensors as they are."""
    def enc(name: str, arr):
        if name in ("token_embd.weight", "output.weight") and np.ndim(arr) == 2:
            return encode(torch.as_tensor(np.ascontiguousarray(arr)), qplan.embd, name, fallbacks, device)
        return arr
    return enc


def final_blocks(src: Source, store: AnalysisStore, plan: RankPlan, dense: bool,
                 split: str = "uv") -> tuple[list[list[BlockTensor]], RankPlan]:
    """The tensors to write per layer, and the plan they realise.

    A linear whose factors are not finite falls back: K/V under a latent cache to the exact
    full-width latent (A = I, B = W), any other to dense; each fallback makes a new plan.
    """
    blocks: list[list[BlockTensor]] = []
    for i, layer in enumerate(src.model.model.layers):
        row = []
        for spec in LINEARS:
            lin = get_module(layer, spec.module)
            with materialized(lin):  # offloaded: read for this linear; on a GPU: copied to the CPU
                w = lin.weight.detach().to("cpu")
            r = plan.ranks[(i, spec.key)]
            if not r:
                row.append(BlockTensor(spec.gguf, weight=w))
                continue
            a, b = store.factorization(i, spec.key).factors(r, split)
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                if plan.latent and spec.key in KV_KEYS:  # exact full-width latent: A = I, B = W
                    a, b = torch.eye(w.shape[0]), w.clone()
                    plan = plan.with_rank((i, spec.key), w.shape[0],
                                          Fallback(f"blk.{i}.{spec.gguf}", "non-finite factors",
                                                   "as the exact full-width latent"))
                else:
                    row.append(BlockTensor(spec.gguf, weight=w))
                    plan = plan.with_rank((i, spec.key), 0,
                                          Fallback(f"blk.{i}.{spec.gguf}", "non-finite factors", "dense"))
                    continue
            row.append(BlockTensor(spec.gguf, weight=a @ b) if dense else BlockTensor(spec.gguf, a=a, b=b))
        blocks.append(row)
    return blocks, plan


def asvd_metadata(cfg, calib_source: str, ratio, kv, latent, rank_table, calib_ppl) -> dict:
    """`calib_source`: what the calibration windows were made of (chat.calibration_tokens)."""
    V = gguf.GGUFValueType
    calib_desc = f"{calib_source}, {cfg.calib_samples} x {cfg.calib_seqlen} tokens, seed {cfg.seed}"
    meta = {
        "asvd.format_version": (FORMAT_VERSION, V.UINT32),
        "asvd.method": (cfg.method, V.STRING),
        "asvd.alpha": (float(cfg.alpha), V.FLOAT32),
        "asvd.scaling": (cfg.scaling, V.STRING),
        "asvd.rank_align": (cfg.rank_align, V.UINT32),
        "asvd.sensitivity": (f"{cfg.sensitivity}/{cfg.allocation}", V.STRING),
        "asvd.ratio.target": (float(cfg.ratio or 0.0), V.FLOAT32),
        "asvd.ratio.achieved": (float(ratio), V.FLOAT32),
        "asvd.ppl.target": (float(cfg.ppl_target or 0.0), V.FLOAT32),
        "asvd.ppl.calibration": (float(calib_ppl), V.FLOAT32),
        "asvd.kv.target": (float(cfg.kv or 1.0), V.FLOAT32),
        "asvd.kv.achieved": (float(kv), V.FLOAT32),
        "asvd.kv.latent": (bool(latent), V.BOOL),
        "asvd.calibration": (calib_desc, V.STRING),
        "asvd.quant": (cfg.quant, V.STRING),
        "asvd.sigma_split": (cfg.sigma_split, V.STRING),
    }
    for k in LINEAR_KEYS:
        meta[f"asvd.rank.{SPEC[k].gguf}"] = ([int(x) for x in rank_table[k]], V.ARRAY)
    return meta


def donor_for(src: Source, cfg: ConvertConfig):
    """(donor GGUF for metadata, non-block tensors or None to take the donor's)."""
    if src.gguf_path is not None:
        return src.gguf_path, None
    from .hf_donor import hf_donor

    return hf_donor(src, cfg.cache_dir)


def config_dict(cfg: ConvertConfig) -> dict:
    d = asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
