"""The byte-budget allocator (ranks.plan_size, allocate.allocate_bytes) on synthetic priced options.

Invariants of issue 12: the budget is met; the predicted loss never rises with the budget; F16
everywhere when it fits; never worse than the best single type that fits; --types-only factors
nothing; an unreachable budget names the smallest file.
"""

from __future__ import annotations

import numpy as np
import pytest

from asvd2gguf.allocate import RankCandidates, allocate_bytes
from asvd2gguf.analysis import LinearInfo
from asvd2gguf.config import parse_size
from asvd2gguf.errors import UserError
from asvd2gguf.ggml_lib import dense_bytes, pair_bytes
from asvd2gguf.ranks import Option, plan_size

TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q4_k", "iq4_xs", "q3_k", "q2_k")
BITS = {"f16": 16, "q8_0": 8.5, "q6_k": 6.56, "q5_k": 5.5, "q4_k": 4.5, "iq4_xs": 4.25, "q3_k": 3.44, "q2_k": 2.63}
SHAPES = {"attn_q": (256, 256), "attn_k": (64, 256), "attn_v": (64, 256), "attn_output": (256, 256),
          "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512)}
FIXED = 10_000


def synthetic(n_layer: int = 2, seed: int = 0):
    """Infos, options and shapes: each linear's dense cost falls like 2^-bits times a random
    sensitivity; factored costs add a truncation term that falls with rank."""
    rng = np.random.default_rng(seed)
    infos, options, shapes = [], {}, {}
    for i in range(n_layer):
        for key, (m, n) in SHAPES.items():
            infos.append(LinearInfo(i, key, m, n, {}))
            sens = rng.lognormal(0, 1)
            opts = []
            for t in TYPES:
                nb, tt = dense_bytes(m, n, t)
                opts.append(Option(0, t, (tt,), nb, sens * 2.0 ** -(2 * BITS[t]) * rng.uniform(0.5, 1.5)))
                if t in ("f16", "q8_0", "q4_k"):
                    for r in range(32, min(m, n) + 1, 32):
                        nb, tts = pair_bytes(m, n, r, t)
                        trunc = sens * 0.05 * (1 - r / min(m, n)) ** 2
                        opts.append(Option(r, t, tts, nb, trunc + sens * 2.0 ** -(2 * BITS[t]) * r / min(m, n)))
            options[(i, key)] = opts
            shapes[(i, key)] = (m, n)
    options["token_embd"] = [Option(0, t, (tt,), nb, rng.lognormal(0, 1) * 2.0 ** -(2 * BITS[t]))
                             for t in ("f16", "q8_0", "q4_k") for nb, tt in [dense_bytes(512, 256, t)]]
    shapes["token_embd"] = (512, 256)
    return infos, options, shapes


def _uniform_bytes(options, t):
    return FIXED + sum(next(o.nbytes for o in opts if o.rank == 0 and o.qtype == t) for opts in options.values())


def _uniform_cost(options, t):
    return sum(next(o.cost for o in opts if o.rank == 0 and o.qtype == t) for opts in options.values())


def test_budget_met_and_loss_monotone_in_the_budget():
    infos, options, shapes = synthetic()
    lo, hi = _uniform_bytes(options, "q4_k") * 0.7, _uniform_bytes(options, "f16")
    prev = np.inf
    for size in np.linspace(lo, hi, 14).astype(int):
        plan = plan_size(infos, options, shapes, int(size), FIXED, None)
        assert plan.nbytes <= size
        assert plan.predicted_loss <= prev + 1e-15
        prev = plan.predicted_loss


def test_f16_everywhere_when_it_fits():
    infos, options, shapes = synthetic()
    plan = plan_size(infos, options, shapes, _uniform_bytes(options, "f16"), FIXED, None, uniform_types=TYPES)
    assert all(o.rank == 0 and o.qtype == "f16" for o in plan.choices.values())
    assert plan.nbytes == _uniform_bytes(options, "f16")


@pytest.mark.parametrize("t", ["q8_0", "q4_k"])
def test_never_worse_than_the_best_single_type_that_fits(t):
    infos, options, shapes = synthetic(seed=3)
    size = _uniform_bytes(options, t)
    plan = plan_size(infos, options, shapes, size, FIXED, None, uniform_types=TYPES)
    assert plan.nbytes <= size
    assert plan.predicted_loss <= _uniform_cost(options, t)


def test_types_only_factors_nothing():
    infos, options, shapes = synthetic()
    size = int(_uniform_bytes(options, "q4_k") * 1.1)
    plan = plan_size(infos, options, shapes, size, FIXED, None, types_only=True)
    assert not any(plan.ranks.values()) and plan.nbytes <= size
    free = plan_size(infos, options, shapes, size, FIXED, None)
    assert free.predicted_loss <= plan.predicted_loss


def test_latent_kv_width_and_bytes():
    infos, options, shapes = synthetic()
    size = _uniform_bytes(options, "q8_0")
    plan = plan_size(infos, options, shapes, size, FIXED, 0.5)
    assert plan.nbytes <= size and plan.kv <= 0.5
    assert all(plan.ranks[(i, k)] for i in range(2) for k in ("attn_k", "attn_v"))


def test_unreachable_budget_names_the_smallest_file():
    infos, options, shapes = synthetic()
    smallest = FIXED + sum(min(o.nbytes for o in opts if o.rank == 0 or o.rank < min(shapes[k]))
                           for k, opts in options.items())
    with pytest.raises(UserError, match=f"smallest possible file is .*{smallest} bytes"):
        plan_size(infos, options, shapes, smallest - 1, FIXED, None)
    assert plan_size(infos, options, shapes, smallest, FIXED, None).nbytes == smallest


def test_knapsack_is_optimal_on_a_small_case():
    rng = np.random.default_rng(1)
    opts = [RankCandidates(f"t{i}", np.arange(4), rng.integers(1, 50, 4), np.zeros(4, int), rng.random(4))
            for i in range(4)]
    import itertools

    for budget in (20, 60, 100, 150):
        best = min((sum(o.cost[j] for o, j in zip(opts, c)), c) for c in itertools.product(range(4), repeat=4)
                   if sum(o.params[j] for o, j in zip(opts, c)) <= budget) if budget >= sum(
            o.params.min() for o in opts) else None
        if best is None:
            continue
        alloc = allocate_bytes(opts, budget, 1 << 62)
        assert alloc.params <= budget
        assert alloc.cost == pytest.approx(best[0])


@pytest.mark.parametrize("text,value", [("95M", 95_000_000), ("1.2G", 1_200_000_000), ("80MiB", 80 * 2**20),
                                        ("512k", 512_000), ("123456", 123456), ("2.5 GiB", int(2.5 * 2**30)),
                                        ("95MB", 95_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-5M", "5X", "0", "1e400M", "nan"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError, match="--size"):
        parse_size(text)


def test_latent_kv_leaves_the_rest_at_their_best_when_bytes_allow():
    """The KV width price must not cost the other linears their bytes: with room for F16 everywhere,
    every linear but K/V stays dense F16."""
    infos, options, shapes = synthetic()
    plan = plan_size(infos, options, shapes, _uniform_bytes(options, "f16"), FIXED, 0.5)
    assert plan.kv <= 0.5
    for (i, key), opt in ((k, o) for k, o in plan.choices.items() if not isinstance(k, str)):
        if key not in ("attn_k", "attn_v"):
            assert (opt.rank, opt.qtype) == (0, "f16"), (i, key, opt)


def test_source_option_replaces_the_requantization_it_dominates():
    from asvd2gguf.pricing import SOURCE, source_option, with_source
    from asvd2gguf.ranks import Option

    opts = [Option(0, "q4_k", ("q4_k",), 100, 0.5), Option(0, "q8_0", ("q8_0",), 200, 0.1),
            Option(32, "q4_k", ("q4_k", "q4_k"), 50, 0.9)]
    kept = source_option("q4_k", 100, 0.0)
    out = with_source(opts, kept)
    assert [(o.qtype, o.types) for o in out] == [("q8_0", ("q8_0",)), ("q4_k", ("q4_k", "q4_k")), (SOURCE, ("q4_k",))]
    # a requantization predicted better than the source's blocks stays beside them
    assert len(with_source(opts, source_option("q4_k", 100, 0.6))) == 4


def test_token_weighting_and_activation_cost():
    import torch

    from asvd2gguf.pricing import act_cost, act_weights, token_weighting

    w = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    gg = torch.eye(2) * 2
    wt = act_weights(w, gg)  # diag(W^T Gg W) = 2 * column norms^2
    assert torch.allclose(wt, torch.tensor([2.0, 10.0], dtype=torch.float64))
    assert act_cost(wt, torch.tensor([0.1, 0.01])) == pytest.approx(0.5 * (0.2 + 0.1))
    assert act_cost(wt, None) == 0.0
    gx, gxw = torch.diag(torch.tensor([4.0, 0.0])), torch.diag(torch.tensor([1.0, 0.0]))
    assert token_weighting(gxw, gx).tolist() == [0.25, 1.0]


def test_saturation_counts_only_the_options_offered():
    """A plan with room for everything is saturated even where a full-rank pair (never offered
    without --kv) is priced below the dense F16 weight (a new user's finding on SmolLM2's attn_k:
    the warning "more than this model can use" did not show); a tight one is not."""
    infos, options, shapes = synthetic()
    m, n = shapes[(0, "attn_k")]
    full = min(m, n)
    nb, tts = pair_bytes(m, n, full, "f16")
    f16 = next(o for o in options[(0, "attn_k")] if o.rank == 0 and o.qtype == "f16")
    options[(0, "attn_k")].append(Option(full, "f16", tts, nb, f16.cost / 2))  # cheaper than dense F16
    big = plan_size(infos, options, shapes, 10 * _uniform_bytes(options, "f16"), FIXED, None)
    assert big.saturated and big.choices[(0, "attn_k")].rank == 0
    assert not plan_size(infos, options, shapes, _uniform_bytes(options, "q4_k"), FIXED, None).saturated
