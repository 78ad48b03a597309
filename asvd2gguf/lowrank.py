"""A linear layer stored as two factors, y = A (B x) + b: the torch twin of the GGUF pair."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .arch import SPEC, get_module, set_module


class LowRankLinear(nn.Module):
    """y = A (B x) + bias with A (m, r) = lr_out.weight, B (r, n) = lr_in.weight: the GGUF pair
    blk.N.<linear>.lr_out / .lr_in as a torch module (frozen)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.lr_in = nn.Linear(b.shape[1], b.shape[0], bias=False)
        self.lr_out = nn.Linear(a.shape[1], a.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.lr_in.weight.copy_(b)
            self.lr_out.weight.copy_(a)
            if bias is not None:
                self.lr_out.bias.copy_(bias)
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def rank(self) -> int:
        """r, the width of the latent B x."""
        return self.lr_in.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) -> (..., m)."""
        return self.lr_out(self.lr_in(x))


def factored_layer(layer: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                   copy_layer: bool = True):
    """The block with the given linears replaced by LowRankLinear (a shallow copy by default).

    A pair (W, None) replaces the linear's weight by W instead.

    The copy shares every untouched parameter with the original, so trying a candidate costs
    only the new factors' memory.
    """
    new = copy.copy(layer) if copy_layer else layer
    if copy_layer:
        new._modules = dict(layer._modules)
        for name in ("self_attn", "mlp"):
            sub = copy.copy(getattr(layer, name))
            sub._modules = dict(getattr(layer, name)._modules)
            new._modules[name] = sub
    for key, (a, b) in factors.items():
        path = SPEC[key].module
        old = get_module(layer, path)
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        if b is None:  # a replacement dense weight (e.g. the dequantized one)
            lin = nn.Linear(a.shape[1], a.shape[0], bias=bias is not None, dtype=old.weight.dtype,
                            device=old.weight.device)
            with torch.no_grad():
                lin.weight.copy_(a)
                if bias is not None:
                    lin.bias.copy_(bias)
            lin.requires_grad_(False)
            set_module(new, path, lin)
            continue
        set_module(new, path, LowRankLinear(a.to(old.weight.dtype), b.to(old.weight.dtype), bias))
    return new
