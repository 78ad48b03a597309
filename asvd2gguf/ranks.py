"""The rank plan: which rank each block linear gets. The one home of that decision (issue 10).

    candidates()  each linear's rank candidates: aligned ranks up to the break-even rank (the
                  full width for K/V under a latent cache), their parameter count r (m + n),
                  latent width and predicted loss increase (its sensitivity curve)
    Budget        --ratio of the block linears' dense parameters, --kv of the K+V width
    plan_ranks()  solves candidates x budget with the pure solver in allocate.py (or searches
                  the smallest budget under --ppl-target) and returns a RankPlan
    RankPlan      immutable: ranks per linear, achieved ratio and KV ratio, typed fallbacks.
                  A fallback found later (non-finite factors) makes a new plan (`with_rank`).

Torch-free: the losses the perplexity-target search needs come in as a function.
The rule is the ASVD paper's (arXiv 2312.05821, "Sensitivity-based Truncation Rank Searching",
STRS): per-linear sensitivity of the loss to its rank, one global budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from .allocate import RankCandidates, Unreachable, allocate, allocate_bytes
from .arch import KV_KEYS, LINEAR_KEYS
from .errors import Fallback, UserError
from .ggml_lib import dense_bytes, pair_bytes

if TYPE_CHECKING:
    from .analysis import LinearInfo
    from .config import ConvertConfig

Linear = tuple[int, str]  # (layer index, linear key such as "attn_k")
NONBLOCK = ("token_embd", "output")  # the other tensors a size plan types (GGUF base names)


@dataclass(frozen=True)
class Option:
    """One way to write one tensor under a byte budget (pricing.py prices them). rank: 0 dense,
    else the factor pair's rank. qtype: the type asked for (a ggml_lib.TYPES name); types: the
    types written after llama-quantize's row-size fallbacks, one for a dense tensor, (A's, B's)
    for a pair. nbytes: tensor data bytes. cost: predicted loss increase (nats). width: latent
    K+V channels it puts in the cache (its rank for K/V under a latent cache, else 0). exact:
    priced by the quadratic form itself (False: interpolated between priced ranks)."""

    rank: int
    qtype: str
    types: tuple[str, ...]
    nbytes: int
    cost: float
    width: int = 0
    exact: bool = True

    def to_dict(self) -> dict:
        """Plain values (for the cache and the metadata)."""
        return {"rank": self.rank, "qtype": self.qtype, "types": list(self.types), "nbytes": self.nbytes,
                "cost": self.cost, "width": self.width, "exact": self.exact}

    @classmethod
    def from_dict(cls, d: dict) -> Option:
        """Inverse of to_dict."""
        return cls(int(d["rank"]), str(d["qtype"]), tuple(d["types"]), int(d["nbytes"]), float(d["cost"]),
                   int(d["width"]), bool(d["exact"]))
NO_LIMIT = 1 << 62  # the KV width budget when no latent cache is asked for


def params(m: int, n: int, r: int) -> int:
    """Parameters of an m x n linear kept at rank r: r (m + n) for the factor pair, m n dense (r = 0)."""
    return r * (m + n) if r else m * n


def break_even_rank(m: int, n: int) -> int:
    """Largest rank at which the factor pair (r (m + n) parameters) is still smaller than m x n."""
    return (m * n - 1) // (m + n)


def kept_rank(key: str, m: int, n: int) -> int:
    """Rank up to which factors are worth keeping: break-even, or the full width min(m, n) for K/V
    (their latent width is bought for the cache, not for parameters)."""
    return min(m, n) if key in KV_KEYS else min(min(m, n), break_even_rank(m, n))


def sweep_grid(info: LinearInfo, align: int) -> list[int]:
    """Ranks measured by the exact sweep (--sensitivity ppl): eight steps up to kept_rank, multiples
    of `align`."""
    top = kept_rank(info.key, info.m, info.n)
    grid = sorted({max(align, (top * j // 8) // align * align) for j in range(1, 9)} - {0})
    return [r for r in grid if r <= top]


def tie_broken(curve: np.ndarray, error: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Make equal costs strictly ordered: by the output error, then by the weight's own error.

    A measured curve (the exact sweep) is flat at zero wherever truncation stays under the
    noise of the calibration loss; the allocator then sees more rank as worth nothing and
    leaves the parameter budget unspent (0.909 achieved for a 0.938 target). With fewer
    calibration tokens than input channels, every curve computed through X^T X (fisher, error,
    and the factorizations of whiten, kfac and hybrid) is exactly 0 past the Gram's rank, so
    the output error breaks no tie there (0.59 achieved for 0.9): the weight's Frobenius error
    (sensitivity.tail_curves' `weight`) still falls with rank. Tie-breaks far below any
    measured difference let the allocator fill the budget without changing other choices.
    All three arrays: loss increase per rank 0..p (nats); returns the same shape.
    """
    tie = error / max(float(error[0]), 1e-30)
    if weight is not None:
        tie = tie + 1e-3 * weight / max(float(weight[0]), 1e-30)
    return curve + 1e-9 * tie


def candidates(infos: list[LinearInfo], sensitivity: str, rank_align: int,
               latent_kv: bool) -> tuple[list[RankCandidates], tuple[Fallback, ...]]:
    """Each linear's rank candidates for the allocator, and the linears that fell back.

    Ranks are the multiples of `rank_align` up to kept_rank (below the full rank: a full-rank
    pair is larger than the dense weight), plus 0 (dense); K/V under a latent cache have no
    dense choice but always the exact full-width latent. Costs are the `sensitivity` curve,
    tie-broken. A linear whose curve is not finite gets only the exact choice (dense, or the
    full-width latent) and a Fallback: no NaN reaches the allocator, whose loops rely on
    ordered costs.
    """
    out, fallbacks = [], []
    for info in infos:
        top = kept_rank(info.key, info.m, info.n)
        kv = latent_kv and info.key in KV_KEYS
        if not kv:
            top = min(top, info.full_rank - 1)
        ranks = list(range(rank_align, top + 1, rank_align))
        if kv and info.full_rank not in ranks:
            ranks.append(info.full_rank)  # the exact latent: always available
        curve = tie_broken(info.curves[sensitivity], info.curves["error"], info.curves.get("weight"))
        finite = bool(np.isfinite(curve).all())
        if not finite:
            ranks = [info.full_rank] if kv else []
            fallbacks.append(Fallback(info.name, f"non-finite {sensitivity} sensitivity curve",
                                      "as the exact full-width latent" if kv else "dense"))
        rank_arr = np.array(ranks + ([] if kv else [0]), dtype=np.int64)
        param_arr = np.array([params(info.m, info.n, int(r)) for r in rank_arr], dtype=np.int64)
        cost = np.array([curve[r] if r and finite else 0.0 for r in rank_arr])
        width = rank_arr if kv else np.zeros_like(rank_arr)
        out.append(RankCandidates(info.name, rank_arr, param_arr, width, cost))
    return out, tuple(fallbacks)


@dataclass(frozen=True)
class Budget:
    """What the plan may spend: parameters of the block linears and latent K+V channels."""

    dense_total: int  # parameters of all block linears, dense
    kv_full: int  # K+V output channels summed over layers (the full cache width)
    latent: bool  # a latent KV cache is asked for (--kv < 1)
    max_width: int  # latent channels allowed (NO_LIMIT without a latent cache)

    @classmethod
    def of(cls, infos: list[LinearInfo], kv: float | None) -> Budget:
        """The budget of `infos` for --kv `kv` (None or 1: no latent cache)."""
        latent = kv is not None and kv < 1
        kv_full = sum(info.m for info in infos if info.key in KV_KEYS)
        return cls(sum(params(info.m, info.n, 0) for info in infos), kv_full, latent,
                   int(kv * kv_full) if latent else NO_LIMIT)

    def params_for(self, ratio: float) -> int:
        """Parameter budget for a block-linear ratio in (0, 1]."""
        return int(ratio * self.dense_total)


@dataclass(frozen=True)
class RankPlan:
    """Ranks per linear (0: dense) and what they achieve; immutable (see `with_rank`).

    ratio: kept parameters of the block linears / their dense count (after any fallback).
    kv: latent K+V width / full K+V width (a dense K/V counts its full width); 1 without a
    latent cache.
    """

    ranks: Mapping[Linear, int]
    shapes: Mapping[Linear, tuple[int, int]]  # (m, n) = (n_out, n_in)
    budget: Budget
    fallbacks: tuple[Fallback, ...] = ()
    # size plans (--size / --bpw) only: the Option of every block linear (by Linear) and of
    # token_embd / output (by name), and the bytes of everything else in the file
    choices: Mapping[Linear | str, Option] = field(default_factory=dict)
    fixed_bytes: int = 0
    budget_bytes: int = 0  # the byte budget of the whole file the plan was made for
    saturated: bool = False  # every tensor at the lowest-loss option it was offered: more bytes buy nothing
    n_layer: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "ranks", MappingProxyType(dict(self.ranks)))
        object.__setattr__(self, "shapes", MappingProxyType(dict(self.shapes)))
        object.__setattr__(self, "choices", MappingProxyType(dict(self.choices)))
        object.__setattr__(self, "n_layer", 1 + max((i for i, _ in self.ranks), default=-1))

    @property
    def latent(self) -> bool:
        """Whether K/V are latent (a --kv below 1 was asked for)."""
        return self.budget.latent

    @property
    def ratio(self) -> float:
        """Kept parameters of the block linears / their dense count (r (m + n), or m n when dense)."""
        kept = sum(params(*self.shapes[lin], r) for lin, r in self.ranks.items())
        return kept / self.budget.dense_total

    @property
    def kv(self) -> float:
        """Latent K+V width (sum of their ranks; a dense one counts m) / full K+V width; 1 without latents."""
        if not self.budget.latent:
            return 1.0
        width = sum(r or self.shapes[(i, k)][0] for (i, k), r in self.ranks.items() if k in KV_KEYS)
        return width / self.budget.kv_full

    def table(self) -> dict[str, list[int]]:
        """key -> rank per layer, the layout of the asvd.rank.* keys."""
        return {k: [self.ranks[(i, k)] for i in range(self.n_layer)] for k in LINEAR_KEYS}

    @property
    def sized(self) -> bool:
        """Whether this is a size plan (types chosen per tensor under a byte budget)."""
        return bool(self.choices)

    @property
    def nbytes(self) -> int:
        """Planned file size (bytes) of a size plan: the chosen tensors plus everything fixed."""
        return self.fixed_bytes + sum(o.nbytes for o in self.choices.values())

    @property
    def predicted_loss(self) -> float:
        """Summed predicted loss increase (nats) of a size plan's choices."""
        return sum(o.cost for o in self.choices.values())

    def with_rank(self, linear: Linear, rank: int, fallback: Fallback) -> RankPlan:
        """A new plan with `linear` at `rank`, recording why (a size plan keeps the linear's type;
        its bytes are recomputed, its predicted loss is unknown: nan)."""
        choices = dict(self.choices)
        if linear in choices:
            m, n = self.shapes[linear]
            old = choices[linear]
            if rank:
                nbytes, types = pair_bytes(m, n, rank, old.qtype)
            else:
                nbytes, t = dense_bytes(m, n, old.qtype)
                types = (t,)
            choices[linear] = Option(rank, old.qtype, types, nbytes, float("nan"), old.width and rank)
        return RankPlan({**self.ranks, linear: rank}, self.shapes, self.budget, self.fallbacks + (fallback,),
                        choices, self.fixed_bytes, self.budget_bytes)


def ranks_of(infos: list[LinearInfo], cands: list[RankCandidates], choice: list[int]) -> dict[Linear, int]:
    """The allocator's choice (an index per linear) as ranks per linear."""
    return {(info.layer, info.key): int(c.ranks[i]) for info, c, i in zip(infos, cands, choice)}


def plan_ranks(infos: list[LinearInfo], cfg: ConvertConfig,
               loss_of: Callable[[Mapping[Linear, int]], float] | None = None,
               base_loss: Callable[[], float] | None = None, progress=None) -> RankPlan:
    """The rank plan for `cfg` (--ratio or --ppl-target, --kv, --rank-align, --sensitivity,
    --allocation) from the analysed linears.

    --ppl-target needs `loss_of` (calibration loss in nats of the model at given ranks) and
    `base_loss` (that of the uncompressed model). Raises UserError when the budget cannot be
    reached at this --rank-align or the target is below the uncompressed model's perplexity.
    """
    budget = Budget.of(infos, cfg.kv)
    cands, fallbacks = candidates(infos, cfg.sensitivity, cfg.rank_align, budget.latent)
    try:
        if cfg.ppl_target is not None:
            choice = _search_ppl_target(infos, cands, budget, cfg, loss_of, base_loss, progress)
        else:
            choice = allocate(cands, budget.params_for(cfg.ratio), budget.max_width, cfg.allocation).choice
    except Unreachable as e:
        if e.min_width > budget.max_width:
            raise UserError(f"--kv {cfg.kv:g} cannot be reached with --rank-align {cfg.rank_align}: the smallest "
                            f"latent cache is {e.min_width / budget.kv_full:.3f} of K+V") from None
        raise UserError(f"--ratio {cfg.ratio:g} cannot be reached with --rank-align {cfg.rank_align}: the smallest "
                        f"reachable block-linear ratio is {e.min_params / budget.dense_total:.3f}") from None
    shapes = {(info.layer, info.key): (info.m, info.n) for info in infos}
    return RankPlan(ranks_of(infos, cands, choice), shapes, budget, fallbacks)


def _search_ppl_target(infos, cands, budget: Budget, cfg, loss_of, base_loss, progress) -> list[int]:
    """Smallest parameter budget whose real calibration perplexity stays under the target:
    ten bisection steps on the ratio, each an allocation and one evaluation of `loss_of`."""
    target = math.log(cfg.ppl_target)
    base = base_loss()
    if base > target:
        raise UserError(f"--ppl-target {cfg.ppl_target:g} cannot be met: the uncompressed model's calibration "
                        f"perplexity is {math.exp(base):.3f}")
    min_p = sum(int(c.params.min()) for c in cands)
    lo, hi = min_p / budget.dense_total, 1.0
    best = None
    task = progress.add_task("perplexity-target search", total=10) if progress else None
    for _ in range(10):
        mid = (lo + hi) / 2
        try:
            alloc = allocate(cands, int(mid * budget.dense_total), budget.max_width, cfg.allocation)
        except Unreachable:
            lo = mid
            continue
        loss = loss_of(ranks_of(infos, cands, alloc.choice))
        if loss <= target:
            hi, best = mid, alloc
        else:
            lo = mid
        if progress:
            progress.advance(task)
    if best is None:
        best = allocate(cands, int(hi * budget.dense_total), budget.max_width, cfg.allocation)
    return best.choice


def size_ranks(info: LinearInfo, align: int) -> list[int]:
    """The ranks a size plan may factor `info` at: the multiples of `align` up to kept_rank (below
    the full rank), and for K/V also the full width (the exact latent of a latent cache)."""
    top = kept_rank(info.key, info.m, info.n)
    ranks = list(range(align, min(top, info.full_rank - 1) + 1, align))
    if info.key in KV_KEYS and info.full_rank not in ranks:
        ranks.append(info.full_rank)
    return ranks


def _uniform(t: str, keys: list, opts: list[list[Option]], shapes: Mapping, latent: bool) -> list[int] | None:
    """The allocation "every tensor at type t" as option indices, or None if some tensor cannot take it.

    Dense at t's written type for every tensor (K/V under a latent cache: the exact full-width
    latent at t); a tensor without t (e.g. an embedding without 2-bit options) takes its smallest
    option at least as large as t would be, else its largest."""
    from .ggml_lib import fallback, name_of

    out = []
    for key, os_ in zip(keys, opts):
        m, n = shapes[key]
        if latent and not isinstance(key, str) and key[1] in KV_KEYS:
            full = min(m, n)
            want = pair_bytes(m, n, full, t)[1]
            idx = [i for i, o in enumerate(os_) if o.rank == full and o.types == want]
        else:
            want_t = name_of(fallback(t, n))
            idx = [i for i, o in enumerate(os_) if o.rank == 0 and o.types == (want_t,)]
            if not idx and isinstance(key, str):
                size = dense_bytes(m, n, t)[0]
                dense = sorted((o.nbytes, i) for i, o in enumerate(os_) if o.rank == 0)
                bigger = [i for b, i in dense if b >= size]
                idx = bigger[:1] or [dense[-1][1]]
        if not idx:
            return None
        out.append(min(idx, key=lambda i: os_[i].cost))  # e.g. the source's own blocks beside requantizing
    return out


def plan_size(infos: list[LinearInfo], options: Mapping[Linear | str, list[Option]],
              shapes: Mapping[Linear | str, tuple[int, int]], max_bytes: int, fixed_bytes: int,
              kv: float | None, types_only: bool = False, uniform_types: tuple[str, ...] = (),
              what: str = "--size") -> RankPlan:
    """The plan of a byte budget: per block linear (and token_embd / output) one priced Option.

    infos: the analysed block linears; options: their priced options (pricing.py; for every
    linear, and for each name of NONBLOCK present); shapes: (m, n) of every key of `options`;
    max_bytes: the whole file's budget; fixed_bytes: what the file holds besides these tensors
    (header, metadata, norms: convert.py accounts it); kv: --kv (K/V then only factored, at a
    latent width within budget); types_only: no factored option (pure type allocation);
    uniform_types: the single types whose uniform allocation the plan must not lose to.
    Solved by allocate.allocate_bytes (exact in the bytes, Lagrange-priced in the KV width).
    Raises UserError naming the smallest reachable file (or latent width) when the budget is
    unreachable.
    """
    budget = Budget.of(infos, kv)
    lin_keys: list[Linear | str] = [(info.layer, info.key) for info in infos]
    keys = lin_keys + [k for k in NONBLOCK if k in options]
    kept: list[list[Option]] = []
    cands = []
    for key in keys:
        opts = list(options[key])
        kv_lat = budget.latent and not isinstance(key, str) and key[1] in KV_KEYS
        full = min(shapes[key])
        if kv_lat:
            opts = [replace(o, width=o.rank) for o in opts if o.rank]
        else:
            opts = [replace(o, width=0) for o in opts if o.rank == 0 or (o.rank < full and not types_only)]
        if not opts:
            raise UserError(f"no options to write {key} with")
        kept.append(opts)
        name = key if isinstance(key, str) else f"blk.{key[0]}.{key[1]}"
        cands.append(RankCandidates(name, np.arange(len(opts)), np.array([o.nbytes for o in opts], dtype=np.int64),
                                    np.array([o.width for o in opts], dtype=np.int64),
                                    np.array([o.cost for o in opts])))
    # RankCandidates sorts its options by size: keep the Option lists in the same order
    kept = [[opts[int(i)] for i in c.ranks] for opts, c in zip(kept, cands)]
    for c in cands:
        c.ranks = np.arange(len(c.ranks))
    seeds = [u for t in uniform_types if (u := _uniform(t, keys, kept, shapes, budget.latent)) is not None]
    try:
        alloc = allocate_bytes(cands, max_bytes - fixed_bytes, budget.max_width, seeds)
    except Unreachable as e:
        if e.min_width > budget.max_width:
            raise UserError(f"--kv {kv:g} cannot be reached: the smallest latent cache is "
                            f"{e.min_width / budget.kv_full:.3f} of K+V") from None
        hint = " with --types-only (without it low-rank factors are options too)" if types_only else ""
        raise UserError(f"{what} cannot be reached: the smallest possible file is "
                        f"{format_bytes(fixed_bytes + e.min_params)}{hint}") from None
    choices = {key: opts[i] for key, opts, i in zip(keys, kept, alloc.choice)}
    ranks = {key: choices[key].rank for key in lin_keys}
    lin_shapes = {(info.layer, info.key): (info.m, info.n) for info in infos}
    saturated = all(opts[i].cost <= min(o.cost for o in opts) for opts, i in zip(kept, alloc.choice))
    return RankPlan(ranks, {**lin_shapes, **{k: shapes[k] for k in keys if isinstance(k, str)}}, budget, (),
                    choices, fixed_bytes, max_bytes, saturated)


def format_bytes(n: int) -> str:
    """A byte count for messages: MiB with two decimals and the exact count, e.g. '95.37 MiB (100000000 bytes)'."""
    return f"{n / 2**20:.2f} MiB ({n} bytes)"
