"""The factor stage: the tensors each block linear is written as, from the rank plan.

Rank r: the analysis' factor pair A (m x r), B (r x n) with Sigma split per --sigma-split
(decompose.Factorization.factors); rank 0: the dense weight; --dense: the product A @ B as a
dense weight (densified, after the refit). Non-finite factors fall back (a new plan, see
final_blocks).
"""

from __future__ import annotations

import torch

from .analysis import AnalysisStore
from .arch import KV_KEYS, LINEARS, get_module
from .errors import Fallback
from .gguf_write import BlockTensor
from .placement import materialized
from .ranks import RankPlan


def densified(blocks: list[list[BlockTensor]]) -> list[list[BlockTensor]]:
    """--dense: every factor pair as its product A @ B (m x n), a stock-llama.cpp layout."""
    return [[BlockTensor(bt.key, weight=bt.a @ bt.b) if bt.a is not None else bt for bt in row] for row in blocks]


def final_blocks(model, store: AnalysisStore, plan: RankPlan,
                 split: str = "uv") -> tuple[list[list[BlockTensor]], RankPlan]:
    """The tensors to write per layer of `model` (a transformers causal LM), and the plan they realise
    (factor pairs; densified() turns them into --dense weights).

    A linear whose factors are not finite falls back: K/V under a latent cache to the exact
    full-width latent (A = I (m x m), B = W), any other to dense; each fallback makes a new plan
    with the rank actually written and a Fallback record.
    """
    blocks: list[list[BlockTensor]] = []
    for i, layer in enumerate(model.model.layers):
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
                name = f"blk.{i}.{spec.gguf}"
                if plan.latent and spec.key in KV_KEYS:  # exact full-width latent: A = I, B = W
                    a, b = torch.eye(w.shape[0]), w.clone()
                    plan = plan.with_rank((i, spec.key), w.shape[0],
                                          Fallback(name, "non-finite factors", "as the exact full-width latent"))
                else:
                    row.append(BlockTensor(spec.gguf, weight=w))
                    plan = plan.with_rank((i, spec.key), 0, Fallback(name, "non-finite factors", "dense"))
                    continue
            row.append(BlockTensor(spec.gguf, a=a, b=b))
        blocks.append(row)
    return blocks, plan
