"""Rank allocation: given each linear's loss-vs-rank curve, meet a parameter (and KV) budget.

`lagrange` (default) minimises the summed predicted loss increase: for a price lambda per
parameter (and mu per latent-KV channel) every linear independently takes the option with the
lowest cost + lambda * params + mu * width; bisection on the prices meets the budgets, and a
greedy pass spends what the convex hull leaves unused.

`strs` is the ASVD paper's Algorithm 1: sort all (linear, option) pairs by their sensitivity,
binary-search a threshold, and give every linear its smallest option under it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError

ALLOCATIONS = ("lagrange", "strs")


@dataclass
class RankCandidates:
    """The ranks one linear may take (0 means dense) with their parameters, latent width and cost
    (built by ranks.candidates); arrays of one length."""

    name: str
    ranks: np.ndarray
    params: np.ndarray
    width: np.ndarray  # latent-KV channels this choice puts in the cache (0 if not K/V)
    cost: np.ndarray  # predicted loss increase

    def __post_init__(self):
        """Sorts the options by params; raises UserError for a non-finite cost or no options.

        Every loop below relies on finite costs (a NaN passes no comparison: a NaN gain is
        neither "no gain" nor a gain, and the greedy fill never settled), so NaN and inf never
        get past here.
        """
        cost = np.asarray(self.cost, dtype=np.float64)
        if cost.size == 0:
            raise UserError(f"no rank options for {self.name}")
        if not np.isfinite(cost).all():
            raise UserError(f"non-finite predicted loss increase for {self.name} (its sensitivity curve has NaN or "
                            "inf)")
        order = np.argsort(self.params, kind="stable")
        for f in ("ranks", "params", "width", "cost"):
            setattr(self, f, np.asarray(getattr(self, f))[order])


@dataclass
class Allocation:
    """The solver's answer: per linear an index into its RankCandidates, and the totals it spends
    (parameters, latent KV channels) and predicts (summed loss increase, nats)."""

    choice: list[int]  # index into each RankCandidates
    params: int
    width: int
    cost: float


class Unreachable(Exception):
    """The budget is below the smallest model the options allow; carries what is reachable."""

    def __init__(self, min_params: int, min_width: int):
        super().__init__(min_params, min_width)
        self.min_params = min_params
        self.min_width = min_width


def _minimum(opts) -> tuple[int, int]:
    return sum(int(o.params.min()) for o in opts), sum(int(o.width.min()) for o in opts)


def _check_reachable(opts, max_params, max_width) -> None:
    min_p, min_w = _minimum(opts)
    if min_p > max_params or min_w > max_width:
        raise Unreachable(min_p, min_w)


def _pick(opts: list[RankCandidates], lam: float, mu: float) -> list[int]:
    cost, params, width = _padded(opts)
    return np.argmin(cost + lam * params + mu * width, axis=1).tolist()


_PAD_CACHE: dict[int, tuple] = {}


def _padded(opts: list[RankCandidates]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RankCandidates as (n_linears, max_options) arrays, padding never chosen: the bisections call
    _pick thousands of times, so it must be one vectorised argmin."""
    key = id(opts)
    hit = _PAD_CACHE.get(key)
    if hit is not None and hit[0] is opts:
        return hit[1]
    k = max(len(o.cost) for o in opts)
    cost = np.full((len(opts), k), np.inf)
    params = np.zeros((len(opts), k))
    width = np.zeros((len(opts), k))
    for i, o in enumerate(opts):
        n = len(o.cost)
        cost[i, :n], params[i, :n], width[i, :n] = o.cost, o.params, o.width
    _PAD_CACHE.clear()
    _PAD_CACHE[key] = (opts, (cost, params, width))
    return cost, params, width


def _total(opts, choice):
    p = sum(int(o.params[c]) for o, c in zip(opts, choice))
    w = sum(int(o.width[c]) for o, c in zip(opts, choice))
    cost = sum(float(o.cost[c]) for o, c in zip(opts, choice))
    return p, w, cost


PRICE_DECADES = range(-12, 31)  # prices scanned: 1e-12 .. 1e30 per parameter (or per latent channel)


def _bisect_price(fn, feasible, iters: int = 60) -> float:
    """Smallest price in [0, inf) whose solution is feasible (price scanned geometrically).

    Both loops are bounded: a scan over PRICE_DECADES, then `iters` halvings. If no scanned
    price is feasible the largest is returned and the caller's feasibility check reports it.
    """
    if feasible(fn(0.0)):
        return 0.0
    hi = None
    for k in PRICE_DECADES:
        if feasible(fn(10.0 ** k)):
            hi = 10.0 ** k
            break
    if hi is None:
        return 10.0 ** PRICE_DECADES[-1]
    lo = hi / 10 if hi > 10.0 ** PRICE_DECADES[0] else 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if feasible(fn(mid)):
            hi = mid
        else:
            lo = mid
    return hi


def _greedy_fill(opts, choice, max_params, max_width):
    """Spend the budget the Lagrangian left: best loss reduction per parameter first.

    A move takes one linear to an option of strictly lower cost (gain > 0), so each linear
    moves at most len(options) - 1 times and the loop ends after at most sum(len - 1) moves.
    """
    p, w, _ = _total(opts, choice)
    for _ in range(sum(len(o.cost) - 1 for o in opts) + 1):
        best = None
        for i, (o, c) in enumerate(zip(opts, choice)):
            for c2 in range(len(o.params)):
                dp = int(o.params[c2] - o.params[c])
                dw = int(o.width[c2] - o.width[c])
                gain = float(o.cost[c] - o.cost[c2])
                if not gain > 0 or p + dp > max_params or w + dw > max_width:
                    continue
                score = gain / max(dp, 1)
                if best is None or score > best[0]:
                    best = (score, i, c2, dp, dw)
        if best is None:
            break
        _, i, c2, dp, dw = best
        choice[i] = c2
        p += dp
        w += dw
    return choice


def lagrange(opts: list[RankCandidates], max_params: int, max_width: int) -> Allocation:
    """Minimise the summed predicted loss increase subject to sum params <= max_params and
    sum width <= max_width: a price lambda per parameter and mu per latent channel (bisected so
    the budgets hold; each linear then picks independently), then a greedy fill of what the
    convex hull leaves. Raises Unreachable when even the smallest choices break a budget.
    (Our replacement for the paper's threshold search; see docs/method.md section 4.)"""
    _check_reachable(opts, max_params, max_width)

    def solve_mu(mu):
        lam = _bisect_price(lambda la: _total(opts, _pick(opts, la, mu)), lambda t: t[0] <= max_params)
        return _pick(opts, lam, mu)

    mu = _bisect_price(lambda m: _total(opts, solve_mu(m)), lambda t: t[1] <= max_width)
    choice = _greedy_fill(opts, solve_mu(mu), max_params, max_width)
    return _checked(opts, choice, max_params, max_width)


def _checked(opts, choice, max_params, max_width) -> Allocation:
    """The allocation, or Unreachable when it breaks a budget (never silently over budget)."""
    alloc = Allocation(choice, *_total(opts, choice))
    if alloc.params > max_params or alloc.width > max_width:
        raise Unreachable(*_minimum(opts))
    return alloc


def strs(opts: list[RankCandidates], max_params: int, max_width: int) -> Allocation:
    """The paper's threshold search: every linear takes its smallest option with cost <= t.

    The model shrinks as t grows, so binary-search the smallest t that fits the budgets.
    """
    _check_reachable(opts, max_params, max_width)
    thresholds = np.unique(np.concatenate([o.cost for o in opts]))

    def at(t):  # each linear's smallest option with cost <= t; its cheapest-cost option if none is
        return [int(np.flatnonzero(o.cost <= t)[0]) if (o.cost <= t).any() else int(np.argmin(o.cost))
                for o in opts]

    def fits(i):
        p, w, _ = _total(opts, at(thresholds[i]))
        return p <= max_params and w <= max_width

    lo, hi = 0, len(thresholds) - 1
    if not fits(hi):
        raise Unreachable(*_minimum(opts))
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return _checked(opts, at(thresholds[lo]), max_params, max_width)


def allocate(opts: list[RankCandidates], max_params: int, max_width: int, method: str = "lagrange") -> Allocation:
    """One choice per linear within the budgets: `max_params` parameters of the block linears,
    `max_width` latent K+V channels (use a huge number for no latent cache).

    A pure solver: it knows nothing of models, only candidates (ranks.candidates builds them,
    ranks.plan_ranks calls this). `method`: "lagrange" (default, see `lagrange`) or "strs", the
    ASVD paper's Sensitivity-based Truncation Rank Searching (arXiv 2312.05821,
    Algorithm 1). Raises Unreachable (carrying the smallest reachable params and width) when the
    budgets cannot be met, UserError for an unknown method.
    """
    if method == "lagrange":
        return lagrange(opts, max_params, max_width)
    if method == "strs":
        return strs(opts, max_params, max_width)
    raise UserError(f"unknown allocation '{method}'; use one of {', '.join(ALLOCATIONS)}")


BYTE_STEPS = 200_000  # resolution of the byte budget in allocate_bytes (steps over the options' whole span)


def _knapsack(opts: list[RankCandidates], max_params: int, quantum: int, extra: np.ndarray | None = None) -> list[int]:
    """Exact multiple-choice knapsack at a resolution of `quantum` (size units): per linear the option
    minimising the summed cost (+ `extra`, padded like _padded) with sum params <= max_params.

    Each option's size above its linear's smallest is rounded up to whole quanta and the budget
    down, so the answer never exceeds max_params; for a fixed quantum a larger budget only adds
    feasible choices, so the optimum cost never rises with the budget.
    """
    cost, params, _ = _padded(opts)
    if extra is not None:
        cost = cost + extra
    base = np.array([o.params.min() for o in opts], dtype=np.int64)
    units = np.where(np.isfinite(cost), np.ceil((params - base[:, None]) / quantum), 0).astype(np.int64)
    cap = int((max_params - int(base.sum())) // quantum)
    cap = min(cap, int(units.max(axis=1).sum()))
    f = np.zeros(cap + 1)
    arg = np.zeros((len(opts), cap + 1), dtype=np.int16)  # option indices (RankCandidates stay far below 2^15)
    for i in range(len(opts)):
        g = np.full(cap + 1, np.inf)
        gi = np.zeros(cap + 1, dtype=np.int16)
        for j in np.flatnonzero(np.isfinite(cost[i])):
            u = int(units[i, j])
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = f[:cap + 1 - u] + cost[i, j]
            better = cand < g
            g[better] = cand[better]
            gi[better] = j
        f, arg[i] = g, gi
    choice, u = [0] * len(opts), cap
    for i in reversed(range(len(opts))):
        j = int(arg[i, u])
        choice[i] = j
        u -= int(units[i, j])
    return choice


def allocate_bytes(opts: list[RankCandidates], max_bytes: int, max_width: int,
                   uniform: list[list[int]] = (), steps: int = BYTE_STEPS) -> Allocation:
    """One option per tensor within a byte budget (`params` of the candidates counts bytes here) and
    `max_width` latent K+V channels, minimising the summed predicted loss increase.

    The byte axis is solved exactly as a multiple-choice knapsack (_knapsack) at a resolution of
    1/`steps` of the options' total byte span, a quantum that depends on the options only: so
    the predicted loss is non-increasing in the budget, which the Lagrangian's convex hull plus
    greedy fill (`lagrange`) does not promise once options are as uneven as quantization types
    make them. The latent width keeps its Lagrange price mu, as in `lagrange`: bisected at
    1/10 of the resolution over the whole price range, then refined at the full resolution.
    `uniform`: whole allocations (an index per tensor, e.g. "every tensor at one type") the
    answer must not be worse than when they fit; the best fitting one replaces the knapsack's
    if it predicts less loss. Raises Unreachable when even the smallest options
    break a budget.
    """
    _check_reachable(opts, max_bytes, max_width)
    span = sum(int(o.params.max() - o.params.min()) for o in opts)
    quantum = max(1, -(-span // steps))
    _, _, width = _padded(opts)

    def solve(mu: float, q: int) -> list[int]:
        return _knapsack(opts, max_bytes, q, mu * width if mu else None)

    def fits(c: list[int]) -> bool:
        return _total(opts, c)[1] <= max_width

    choice = solve(0.0, quantum)
    if not fits(choice):
        # mu: first at a coarse resolution (cheap, over the whole price range), then refined at the
        # full one between mu/8 and 8 mu; the coarse answer alone over-rounds every option's bytes
        # by up to a coarse step and would leave megabytes unspent
        coarse = max(quantum, -(-span // (steps // 10)))
        mu = _bisect_price(lambda m: _total(opts, solve(m, coarse)), lambda t: t[1] <= max_width, iters=20)
        lo, hi = mu / 8, mu * 8
        for _ in range(6):
            if fits(solve(hi, quantum)):
                break
            lo, hi = hi, hi * 8
        for _ in range(12):
            mid = (lo + hi) / 2
            if fits(solve(mid, quantum)):
                hi = mid
            else:
                lo = mid
        choice = solve(hi, quantum)
        if not fits(choice):
            choice = solve(mu, coarse)
    best = _checked(opts, choice, max_bytes, max_width)
    for choice in uniform:
        alt = Allocation(list(choice), *_total(opts, choice))
        if alt.params <= max_bytes and alt.width <= max_width and alt.cost < best.cost:
            best = alt
    return best
