"""Torch-side perplexity: exp of the mean next-token loss over every position of each window."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def perplexity(model, windows: torch.Tensor, **kw) -> float:
    return math.exp(mean_loss(model, windows, **kw))
