"""Issue 16.3: fewer calibration tokens than input channels (a kind): the budget is still spent,
with a warning that says how many tokens would rank every direction.

With T tokens X^T X has rank <= T; every curve computed through it (fisher, error, and the
factorizations of whiten, kfac, hybrid) is exactly 0 past that rank. Members: whiten with
1 x 64 tokens (the issue's input, hidden 256 / intermediate 512), kfac with 1 x 32, hybrid
with 1 x 64, whiten with 2 x 32.
"""

from __future__ import annotations

import numpy as np
import pytest
from clitools import run_cli

from asvd2gguf.allocate import RankCandidates, allocate
from asvd2gguf.analysis import LinearInfo
from asvd2gguf.calibrate import calibration_warning
from asvd2gguf.convert import ConvertConfig, convert
from asvd2gguf.ranks import break_even_rank, tie_broken

HIDDEN, INTER, LAYERS, ALIGN = 256, 512, 2, 32
DENSE = LAYERS * (2 * HIDDEN * HIDDEN + 2 * 128 * HIDDEN + 3 * HIDDEN * INTER)
STEP = ALIGN * (HIDDEN + INTER) / DENSE  # the largest rank-alignment step of any linear, as a ratio


def test_flat_zero_curves_past_the_gram_rank_still_fill_the_budget():
    """Fisher and error both exactly 0 from rank 64 on (64 tokens): the output error breaks no
    tie there, the weight's own error does."""
    rng = np.random.default_rng(0)
    m, n = 256, 512
    r = np.append(np.arange(32, break_even_rank(m, n) + 1, 32), 0)
    params = np.where(r == 0, m * n, r * (m + n))
    full = min(m, n)
    curve = np.maximum(0.0, 1.0 - np.arange(full + 1) / 64)

    def options(i, c):
        return RankCandidates(f"l{i}", r, params, np.zeros_like(r), np.array([c[x] if x else 0.0 for x in r]))

    old, new = [], []
    for i in range(8):
        weight = np.cumsum(rng.uniform(0.1, 1, full + 1)[::-1])[::-1]
        weight[-1] = 0
        old.append(options(i, tie_broken(curve, curve)))  # what the error tie-break alone gave
        new.append(options(i, tie_broken(curve, curve, weight)))
    budget = int(0.9 * sum(int(o.params.max()) for o in old))
    step = 32 * (m + n)
    assert allocate(old, budget, 1 << 62).params < budget - 10 * step  # the flaw
    a = allocate(new, budget, 1 << 62)
    assert budget - step < a.params <= budget


def test_calibration_warning_names_the_tokens_needed():
    infos = [LinearInfo(0, "attn_q", 256, 256, {}), LinearInfo(0, "ffn_down", 256, 512, {})]
    msg = calibration_warning(64, infos)
    assert "64 tokens" in msg and "512 input channels of ffn_down" in msg and "at least 512 tokens" in msg
    assert calibration_warning(512, infos) is None


@pytest.mark.parametrize("method,samples,seqlen", [("whiten", 1, 64), ("kfac", 1, 32), ("hybrid", 1, 64),
                                                   ("whiten", 2, 32)])
def test_small_calibration_spends_the_budget(method, samples, seqlen, tiny_models, calib_text, cache_dir, tmp_path):
    """Achieved ratio within one rank-alignment step under the target (0.59 before the fix)."""
    cfg = ConvertConfig(model=str(tiny_models["llama"]), out=tmp_path / "o.gguf", ratio=0.9, method=method,
                        calib=str(calib_text), calib_samples=samples, calib_seqlen=seqlen, cache_dir=cache_dir,
                        device="cpu")
    res = convert(cfg)
    assert 0.9 - STEP <= res.ratio <= 0.9, res.ratio
    assert len(res.warnings) == 1 and f"at least {INTER} tokens" in res.warnings[0]
    assert f"has {samples * seqlen} tokens" in res.warnings[0]


def test_issue_input_prints_the_warning(tiny_models, calib_text, cache_dir, tmp_path, capsys):
    code, out, err = run_cli(["convert", tiny_models["llama"], "--method", "whiten", "--ratio", "0.9",
                              "--calib-samples", "1", "--calib-seqlen", "64", "--calib", calib_text, "--out",
                              tmp_path / "o.gguf", "--cache-dir", cache_dir, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "warning: the calibration has 64 tokens" in " ".join(err.split())
    ratio = float(err.split("block-linear ratio ")[1].split(",")[0])
    assert 0.9 - STEP <= ratio <= 0.9
