"""The rank plan (ranks.py), the configuration's defaults, the asvd.* key table and the atomic
writes: one home each (issue 10)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from asvd2gguf import atomic, cache, gguf_keys
from asvd2gguf.allocate import allocate
from asvd2gguf.analysis import LinearInfo
from asvd2gguf.config import DEFAULT_RATIO, ConvertConfig
from asvd2gguf.convert import validate
from asvd2gguf.errors import Fallback, UserError
from asvd2gguf.ranks import Budget, RankPlan, candidates, params, plan_ranks, ranks_of

ROOT = Path(__file__).resolve().parents[1]


def _infos(n_layer: int = 2) -> list[LinearInfo]:
    """Synthetic block linears of a 256-wide model (GQA K/V 128 wide) with decreasing loss curves."""
    shapes = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
              "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512)}
    out = []
    for i in range(n_layer):
        for j, (key, (m, n)) in enumerate(shapes.items()):
            p = min(m, n)
            curve = (1.0 + i + j) * np.linspace(1, 0, p + 1) ** 2
            out.append(LinearInfo(i, key, m, n, {"fisher": curve, "error": curve, "weight": curve}))
    return out


def test_validate_returns_a_resolved_copy_and_leaves_the_config_alone():
    cfg = ConvertConfig(model="x")
    got = validate(cfg)
    assert cfg.ratio is None and got.ratio == DEFAULT_RATIO and got is not cfg
    target = validate(ConvertConfig(model="x", ppl_target=20.0))
    assert target.ratio is None and target.ppl_target == 20.0
    with pytest.raises(UserError, match="either --ratio or --ppl-target"):
        validate(ConvertConfig(model="x", ratio=0.8, ppl_target=20.0))


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ASVD2GGUF_CACHE", str(tmp_path / "c"))
    assert ConvertConfig(model="x").cache_dir == tmp_path / "c"


def test_plan_is_the_allocators_choice_and_its_accounting():
    infos = _infos()
    cfg = ConvertConfig(model="x", ratio=0.6, kv=0.5, rank_align=32)
    plan = plan_ranks(infos, cfg)
    cands, fallbacks = candidates(infos, "fisher", 32, True)
    budget = Budget.of(infos, 0.5)
    alloc = allocate(cands, int(0.6 * budget.dense_total), budget.max_width)
    assert dict(plan.ranks) == ranks_of(infos, cands, alloc.choice) and fallbacks == ()
    dense = sum(i.m * i.n for i in infos)
    assert plan.ratio == sum(params(i.m, i.n, plan.ranks[(i.layer, i.key)]) for i in infos) / dense <= 0.6
    kv_full = sum(i.m for i in infos if i.key in ("attn_k", "attn_v"))
    assert plan.kv == sum(plan.ranks[(i.layer, i.key)] for i in infos if i.key in ("attn_k", "attn_v")) / kv_full
    assert plan.kv <= 0.5 and all(plan.ranks[(layer, k)] for layer in range(2) for k in ("attn_k", "attn_v"))
    assert plan.table()["attn_q"] == [plan.ranks[(0, "attn_q")], plan.ranks[(1, "attn_q")]]


def test_plan_is_immutable_and_a_fallback_makes_a_new_one():
    plan = plan_ranks(_infos(), ConvertConfig(model="x", ratio=0.7))
    with pytest.raises(TypeError):
        plan.ranks[(0, "attn_q")] = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.fallbacks = ()
    linear = next(k for k, r in plan.ranks.items() if r)
    fb = Fallback(f"blk.{linear[0]}.{linear[1]}", "non-finite factors", "dense")
    new = plan.with_rank(linear, 0, fb)
    assert new.ranks[linear] == 0 and new.fallbacks == (fb,) and new.ratio > plan.ratio
    assert plan.ranks[linear] != 0 and plan.fallbacks == ()
    assert str(fb) == f"blk.{linear[0]}.{linear[1]}: non-finite factors; written dense"
    assert isinstance(new, RankPlan)


def test_unreachable_budgets_are_one_line_errors():
    with pytest.raises(UserError, match="--ratio 0.01 cannot be reached"):
        plan_ranks(_infos(), ConvertConfig(model="x", ratio=0.01))
    with pytest.raises(UserError, match="--kv 0.01 cannot be reached"):
        plan_ranks(_infos(), ConvertConfig(model="x", ratio=0.9, kv=0.01))


def test_every_asvd_key_is_in_the_format_document():
    doc = (ROOT / "docs" / "gguf-format.md").read_text()
    names = [v for k, v in vars(gguf_keys).items() if k.startswith("KEY_")]
    assert len(names) == 23 and all(n.startswith(gguf_keys.PREFIX) for n in names)
    documented = set(re.findall(r"`(asvd\.[a-z_.]+)`", doc))
    assert set(names) <= documented, set(names) - documented


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "sub" / "f.txt"

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_atomic(path, broken)
    assert list((tmp_path / "sub").iterdir()) == []
    atomic.write_text_atomic(path, "whole")
    assert path.read_text() == "whole" and [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_atomic_dir_keeps_a_copy_made_first_and_cleans_up(tmp_path):
    dest = tmp_path / "entry"
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with atomic.atomic_dir(dest) as tmp:  # another process was first: its copy stays
        (tmp / "a").write_text("2")
    assert (dest / "a").read_text() == "1"
    with pytest.raises(ValueError), atomic.atomic_dir(tmp_path / "other") as tmp:
        raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_cache_load_swallows_only_unreadable_entries(tmp_path, monkeypatch):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    assert cache.load(bad) is None and cache.load(tmp_path / "missing.pt") is None
    cache.save({"x": 1}, tmp_path / "ok.pt")
    assert cache.load(tmp_path / "ok.pt") == {"x": 1}

    def bug(*a, **k):
        raise KeyError("a bug, not a corrupt entry")

    monkeypatch.setattr(cache.torch, "load", bug)
    with pytest.raises(KeyError):
        cache.load(tmp_path / "ok.pt")
