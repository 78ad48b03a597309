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
from .allocate import Allocation, Options, Unreachable, allocate
from .analysis import AnalysisStore, LinearInfo, kept_rank
from .arch import KV_KEYS, LINEAR_KEYS, LINEARS, SPEC, get_module
from .blocks import BlockRunner, resolve_device
from .calibrate import LayerStats, collect
from .chat import calibration_tokens
from .config import DEFAULT_RATIO, ConvertConfig
from .decompose import METHODS, SCALINGS
from .errors import UserError
from .gguf_write import FORMAT_VERSION, OUTTYPES, QUANT_FILE_TYPES, BlockTensor, clean_stale_partials, write_gguf
from .placement import main_device, materialized, remove_offload, resolve_placement
from .quantize import SIGMA_SPLITS, QuantPlan, encode, quantize_blocks
from .quantize import plan as quant_plan
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
    fallbacks: list[str]
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


def sweep_grid(info: LinearInfo, align: int) -> list[int]:
    """Ranks measured by the exact sweep: eight steps up to the largest useful rank."""
    top = kept_rank(info.key, info.m, info.n)
    grid = sorted({max(align, (top * j // 8) // align * align) for j in range(1, 9)} - {0})
    return [r for r in grid if r <= top]


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


def _tie_broken(curve: np.ndarray, error: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Make equal costs strictly ordered: by the output error, then by the weight's own error.

    A measured curve (the exact sweep) is flat at zero wherever truncation stays under the
    noise of the calibration loss; the allocator then sees more rank as worth nothing and
    leaves the parameter budget unspent (0.909 achieved for a 0.938 target). With fewer
    calibration tokens than input channels, every curve computed through X^T X (fisher, error,
    and the factorizations of whiten, kfac and hybrid) is exactly 0 past the Gram's rank, so
    the output error breaks no tie there (0.59 achieved for 0.9): the weight's Frobenius error
    (sensitivity.tail_curves' `weight`) still falls with rank. Tie-breaks far below any
    measured difference let the allocator fill the budget without changing other choices.
    """
    tie = error / max(float(error[0]), 1e-30)
    if weight is not None:
        tie = tie + 1e-3 * weight / max(float(weight[0]), 1e-30)
    return curve + 1e-9 * tie


def build_options(infos: list[LinearInfo], cfg: ConvertConfig, latent_kv: bool,
                  fallbacks: list[str] | None = None) -> list[Options]:
    """Each linear's rank options (params, latent width, predicted cost) for the allocator.

    A linear whose curves are not finite gets only the exact choice (dense, or the full-width
    latent for K/V under a latent cache) and is reported in `fallbacks`: no NaN reaches the
    allocator, whose loops rely on ordered costs.
    """
    opts = []
    for inf in infos:
        top = kept_rank(inf.key, inf.m, inf.n)
        kv = latent_kv and inf.key in KV_KEYS
        if not kv:
            top = min(top, inf.full_rank - 1)
        ranks = list(range(cfg.rank_align, top + 1, cfg.rank_align))
        if kv and inf.full_rank not in ranks:
            ranks.append(inf.full_rank)  # the exact latent: always available
        curve = _tie_broken(inf.curves[cfg.sensitivity], inf.curves["error"], inf.curves.get("weight"))
        if not np.isfinite(curve).all():
            ranks = [inf.full_rank] if kv else []
            if fallbacks is not None:
                fallbacks.append(f"{inf.name}: non-finite {cfg.sensitivity} sensitivity curve; written "
                                 f"{'as the exact full-width latent' if kv else 'dense'}")
        r_arr = np.array(ranks + ([] if kv else [0]), dtype=np.int64)
        params = np.where(r_arr == 0, inf.m * inf.n, r_arr * (inf.m + inf.n))
        cost = np.array([curve[r] if r and np.isfinite(curve).all() else 0.0 for r in r_arr])
        width = r_arr if kv else np.zeros_like(r_arr)
        opts.append(Options(inf.name, r_arr, params, width, cost))
    return opts


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


def ranks_of(infos, opts, alloc: Allocation) -> dict[tuple[int, str], int]:
    return {(inf.layer, inf.key): int(o.ranks[c]) for inf, o, c in zip(infos, opts, alloc.choice)}


def search_ppl_target(runner, store, infos, opts, tokens, cfg, dense_total, kv_budget, progress):
    """Smallest parameter budget whose real calibration perplexity stays under the target."""
    target = math.log(cfg.ppl_target)
    base = cached_base_loss(runner, store, infos, tokens)
    if base > target:
        raise UserError(f"--ppl-target {cfg.ppl_target:g} cannot be met: the uncompressed model's calibration "
                        f"perplexity is {math.exp(base):.3f}")
    min_p = sum(int(o.params.min()) for o in opts)
    lo, hi = min_p / dense_total, 1.0
    best = None
    task = progress.add_task("perplexity-target search", total=10) if progress else None
    for _ in range(10):
        mid = (lo + hi) / 2
        try:
            alloc = allocate(opts, int(mid * dense_total), kv_budget, cfg.allocation)
        except Unreachable:
            lo = mid
            continue
        loss = calib_loss(runner, store, infos, ranks_of(infos, opts, alloc), tokens)
        if loss <= target:
            hi, best = mid, alloc
        else:
            lo = mid
        if progress:
            progress.advance(task)
    if best is None:
        best = allocate(opts, int(hi * dense_total), kv_budget, cfg.allocation)
    return best


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
    latent = cfg.kv is not None and cfg.kv < 1
    curve_fallbacks: list[str] = []
    opts = build_options(infos, cfg, latent, curve_fallbacks)
    dense_total = sum(inf.m * inf.n for inf in infos)
    kv_full = sum(inf.m for inf in infos if inf.key in KV_KEYS)
    kv_budget = int(cfg.kv * kv_full) if latent else 1 << 62
    try:
        if cfg.ppl_target is not None:
            alloc = search_ppl_target(runner, store, infos, opts, tokens, cfg, dense_total, kv_budget, progress)
        else:
            alloc = allocate(opts, int(cfg.ratio * dense_total), kv_budget, cfg.allocation)
    except Unreachable as e:
        if e.min_width > kv_budget:
            raise UserError(f"--kv {cfg.kv:g} cannot be reached with --rank-align {cfg.rank_align}: the smallest "
                            f"latent cache is {e.min_width / kv_full:.3f} of K+V") from None
        raise UserError(f"--ratio {cfg.ratio:g} cannot be reached with --rank-align {cfg.rank_align}: the smallest "
                        f"reachable block-linear ratio is {e.min_params / dense_total:.3f}") from None
    ranks = ranks_of(infos, opts, alloc)
    st.done(f"rank allocation ({cfg.allocation}, {cfg.sensitivity})")

    blocks, fallbacks = final_blocks(src, store, ranks, latent, cfg.dense, cfg.sigma_split)
    fallbacks = curve_fallbacks + fallbacks
    qplan = quant_plan(cfg.quant, cfg.outtype, cfg.quant_dense, cfg.quant_embd)
    seen = blocks
    if qplan.active:
        blocks, seen, qfall = quantize_blocks(blocks, qplan, device, progress)
        fallbacks += qfall
        st.done(f"quantized block linears (factors {qplan.factors}, dense {qplan.dense})")
    loss = calib_loss(runner, store, infos, ranks, tokens, None if cfg.dense and not qplan.active else seen)
    base_loss = cached_base_loss(runner, store, infos, tokens)
    st.done("calibration perplexity of the result")
    kept = {(inf.layer, inf.key): (ranks[(inf.layer, inf.key)] * (inf.m + inf.n) or inf.m * inf.n,
                                   ranks[(inf.layer, inf.key)] or inf.m) for inf in infos}
    achieved = sum(p for p, _ in kept.values()) / dense_total  # after any dense fallback
    kv_ach = sum(w for (_, k), (_, w) in kept.items() if k in KV_KEYS) / kv_full if latent else 1.0
    rank_table = {k: [ranks[(i, k)] for i in range(src.n_layer)] for k in LINEAR_KEYS}
    meta = asvd_metadata(cfg, calib_desc, achieved, kv_ach, latent and not cfg.dense, rank_table,
                         math.exp(loss) if math.isfinite(loss) else 0.0)
    if cfg.dense:
        meta = {k: v for k, v in meta.items() if not k.startswith("asvd.rank.")}
    c = src.model.config
    donor, extra = donor_for(src, cfg)
    write_gguf(out, donor, src.arch, src.n_layer, c.num_attention_heads, c.num_key_value_heads,
               lambda i: blocks[i], extra, meta, cfg.outtype, progress,
               nonblock_map=_embd_encoder(qplan, fallbacks, device) if qplan.active else None,
               file_type=QUANT_FILE_TYPES.get(qplan.dense if cfg.dense or not any(ranks.values()) else qplan.factors))
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


def _embd_encoder(qplan: QuantPlan, fallbacks: list[str], device):
    """token_embd / output at the plan's embedding type; other non-block tensors as they are."""
    def enc(name: str, arr):
        if name in ("token_embd.weight", "output.weight") and np.ndim(arr) == 2:
            return encode(torch.as_tensor(np.ascontiguousarray(arr)), qplan.embd, name, fallbacks, device)
        return arr
    return enc


def final_blocks(src: Source, store: AnalysisStore, ranks, latent: bool, dense: bool, split: str = "uv"):
    """The tensors to write per layer; a linear whose factors are not finite falls back to dense."""
    blocks: list[list[BlockTensor]] = []
    fallbacks = []
    for i, layer in enumerate(src.model.model.layers):
        row = []
        for spec in LINEARS:
            lin = get_module(layer, spec.module)
            with materialized(lin):  # offloaded: read for this linear; on a GPU: copied to the CPU
                w = lin.weight.detach().to("cpu")
            r = ranks[(i, spec.key)]
            if not r:
                row.append(BlockTensor(spec.gguf, weight=w))
                continue
            a, b = store.factorization(i, spec.key).factors(r, split)
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                fallbacks.append(f"blk.{i}.{spec.gguf}")
                if latent and spec.key in KV_KEYS:  # exact full-width latent: A = I, B = W
                    a, b = torch.eye(w.shape[0]), w.clone()
                else:
                    row.append(BlockTensor(spec.gguf, weight=w))
                    ranks[(i, spec.key)] = 0
                    continue
            row.append(BlockTensor(spec.gguf, weight=a @ b) if dense else BlockTensor(spec.gguf, a=a, b=b))
        blocks.append(row)
    return blocks, fallbacks


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
