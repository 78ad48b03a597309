"""Torch-side losses: of a whole model over evaluation windows (mean_loss, perplexity), and of
the model being compressed, block by block over the calibration windows (calib_loss)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .arch import SPEC, get_module
from .atomic import write_text_atomic
from .placement import materialized

if TYPE_CHECKING:
    from .analysis import AnalysisStore
    from .blocks import BlockRunner
    from .gguf_write import BlockTensor


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch: int = 4, device: torch.device | None = None, progress=None,
              first: int = 0) -> float:
    """Mean next-token loss; with `first` > 0 only predictions from position `first` on count
    (llama-perplexity scores the second half of each window, first = ctx // 2)."""
    device = device or torch.device("cpu")
    model.to(device)
    total, count = 0.0, 0
    task = progress.add_task("perplexity", total=windows.shape[0]) if progress else None
    for s in range(0, windows.shape[0], batch):
        x = windows[s : s + batch].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, first:-1].flatten(0, 1), x[:, first + 1:].flatten(), reduction="sum")
        total += float(loss)
        count += x[:, first + 1:].numel()
        if progress:
            progress.advance(task, x.shape[0])
    return total / count


def torch_perplexity(model, windows: torch.Tensor, **kw) -> float:
    """exp(mean_loss(model, windows, **kw)): perplexity of a transformers model on `windows`
    (n x ctx token ids). llama.cpp's, of a GGUF, is llamacpp.perplexity."""
    return math.exp(mean_loss(model, windows, **kw))


@torch.no_grad()
def calib_loss(runner: BlockRunner, store: AnalysisStore, ranks: Mapping[tuple[int, str], int], tokens: torch.Tensor,
               blocks: list[list[BlockTensor]] | None = None) -> float:
    """Mean next-token loss (nats) on `tokens` (n_windows x seqlen) of the model compressed to
    `ranks` ((layer, key) -> rank, 0 or absent: dense) from the analysis' factors, or, when
    `blocks` is given, to those final per-layer tensors (after fallbacks and quantization)."""
    h = runner.embed(tokens)
    for i, layer in enumerate(runner.layers):
        if blocks is not None:  # factored linears, and dense ones whose written weight differs
            factors = {bt.key: (bt.a, bt.b) if bt.a is not None else (bt.weight, None)
                       for bt in blocks[i] if bt.a is not None or _replaced(layer, bt, runner.mapped)}
        else:
            factors = {k: store.factorization(i, k).factors(r) for (li, k), r in ranks.items() if li == i and r}
        if not factors:
            h = runner.run_block(i, h)
            continue
        with runner.trial(i, factors) as trial:
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


def cached_base_loss(runner: BlockRunner, store: AnalysisStore, tokens: torch.Tensor) -> float:
    """The uncompressed model's calibration loss (nats), kept beside the analysis (same key)."""
    path = store.root / "base_loss.json"
    if path.is_file():
        return float(json.loads(path.read_text())["loss"])
    loss = calib_loss(runner, store, {}, tokens)
    write_text_atomic(path, json.dumps({"loss": loss}))
    return loss
