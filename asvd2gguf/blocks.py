"""Run a decoder stack one block at a time (GPTQ style).

Only one block needs to sit on the compute device; hidden states between blocks live on the
CPU. This is what keeps calibration of a model larger than the GPU possible, and it lets the
sensitivity search re-run only the blocks downstream of a change.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


def resolve_device(name: str) -> torch.device:
    from .errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to torch")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda")
    return torch.device(name)


class BlockRunner:
    def __init__(self, model, device: torch.device, micro_batch: int = 4):
        self.model = model
        self.inner = model.model
        self.layers = model.model.layers
        self.device = device
        self.micro_batch = micro_batch
        self._pe: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def on_device(self, module):
        """Move one module to the compute device for the duration of a step."""
        if self.device.type == "cpu":
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    def position_embeddings(self, seqlen: int):
        if seqlen not in self._pe:
            with self.on_device(self.inner.rotary_emb) as rot:
                dummy = torch.zeros(1, seqlen, 1, device=self.device)
                pos = torch.arange(seqlen, device=self.device)[None]
                self._pe[seqlen] = tuple(t for t in rot(dummy, pos))
        return self._pe[seqlen]

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(tokens).float()

    def _slices(self, n: int):
        for s in range(0, n, self.micro_batch):
            yield slice(s, min(n, s + self.micro_batch))

    @torch.no_grad()
    def run_block(self, i: int, hidden: torch.Tensor, layer=None) -> torch.Tensor:
        """Hidden states after block i; `layer` overrides the model's block (a truncated copy)."""
        layer = self.layers[i] if layer is None else layer
        pe = self.position_embeddings(hidden.shape[1])
        out = torch.empty_like(hidden)
        with self.on_device(layer):
            for sl in self._slices(hidden.shape[0]):
                h = hidden[sl].to(self.device)
                out[sl] = layer(h, attention_mask=None, position_embeddings=pe).to("cpu")
        return out

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.inner.norm(h))

    @torch.no_grad()
    def loss(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-sample mean next-token loss from final hidden states."""
        losses = []
        with self.on_device(self.inner.norm), self.on_device(self.model.lm_head):
            for sl in self._slices(hidden.shape[0]):
                logits = self.head_logits(hidden[sl].to(self.device)).float()
                tgt = tokens[sl].to(self.device)
                lo = F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt[:, 1:].flatten(), reduction="none")
                losses.append(lo.view(logits.shape[0], -1).mean(1).cpu())
        return torch.cat(losses)

    def forward_from(
        self, start: int, hidden: torch.Tensor, tokens: torch.Tensor, replace: dict | None = None
    ) -> float:
        """Mean loss when running blocks start..end on `hidden` (the input of block `start`)."""
        replace = replace or {}
        for i in range(start, len(self.layers)):
            hidden = self.run_block(i, hidden, replace.get(i))
        return float(self.loss(hidden, tokens).mean())
