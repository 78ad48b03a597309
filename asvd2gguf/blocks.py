"""Run a decoder stack one block at a time (GPTQ style).

Only one block needs to sit on the compute device; hidden states between blocks live on the
CPU. This is what keeps calibration of a model larger than the GPU possible, and it lets the
sensitivity search re-run only the blocks downstream of a change.

With `mapped=True` (convert --device-map) accelerate has already placed every module (GPUs,
CPU or disk, with its hooks): nothing is moved here, each block runs on the execution device
its hooks give it, and a truncated trial block is made by swapping linears inside the placed
block for the duration of one step (a copy would carry hooks bound to the original).

Each block gets what the model's own forward would give it: the RoPE tables of its layer type
(Gemma 3: local and global layers have their own bases) and, for a sliding-window layer whose
window is shorter than the sequence, transformers' own sliding-window causal mask; every other
block runs with no mask, i.e. sdpa's causal attention.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F

from .arch import SPEC, get_module, set_module
from .lowrank import factored_layer
from .placement import execution_device, materialized


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
    """Runs a transformers decoder one block at a time on hidden states kept on the CPU.

    Hidden states are float32 (n_windows, seqlen, hidden); each block runs in micro-batches of
    `micro_batch` windows on its device (the compute device, or under a device map where
    accelerate placed it) and its output comes back to the CPU. Used by calibration (statistics
    per block, as GPTQ does: Frantar et al., arXiv 2210.17323), by the exact sensitivity sweep
    (re-running only the blocks after a truncated one: ASVD, arXiv 2312.05821, STRS) and
    by the calibration loss of a compressed model (`trial` swaps in factored linears).
    Supports the decoder layouts of arch.ARCHS (llama, qwen2/3, gemma3: per-layer-type RoPE and
    sliding-window masks).
    """

    def __init__(self, model, device: torch.device, micro_batch: int = 4, mapped: bool = False):
        """`model`: a transformers causal LM (`model.model.layers`, `rotary_emb`, `norm`, `lm_head`).
        `device`: the compute device; with `mapped`, accelerate's main device (used for quantizing)."""
        self.model = model
        self.inner = model.model
        self.layers = model.model.layers
        self.device = device
        self.micro_batch = micro_batch
        self.mapped = mapped
        self._pe: dict[tuple[int, str | None], tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[int, torch.Tensor | None] = {}
        config = model.config
        types = getattr(config, "layer_types", None)  # "sliding_attention" / "full_attention" per layer
        self.layer_types: list[str | None] = list(types) if types else [None] * len(self.layers)
        # rotary modules with one table per layer type take the type (Gemma3RotaryEmbedding.forward)
        self._typed_rope = "layer_type" in inspect.signature(self.inner.rotary_emb.forward).parameters
        self.sliding_window: int | None = getattr(config, "sliding_window", None)

    def device_of(self, module) -> torch.device:
        """Where `module` computes: the compute device, or under a device map its execution device."""
        return execution_device(module) if self.mapped else self.device

    def block_device(self, i: int) -> torch.device:
        """Where block i computes (see device_of)."""
        return self.device_of(self.layers[i])

    @contextmanager
    def on_device(self, module):
        """Move one module to the compute device for the duration of a step (placed modules stay put)."""
        if self.mapped or self.device.type == "cpu":
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    def position_embeddings(self, seqlen: int, layer_type: str | None = None):
        """(cos, sin) for positions 0..seqlen-1, each (1, seqlen, head_dim), of one layer type."""
        if (seqlen, layer_type) not in self._pe:
            dev = self.device_of(self.inner.rotary_emb)
            kw = {} if layer_type is None else {"layer_type": layer_type}
            with self.on_device(self.inner.rotary_emb) as rot:
                dummy = torch.zeros(1, seqlen, 1, device=dev)
                pos = torch.arange(seqlen, device=dev)[None]
                self._pe[(seqlen, layer_type)] = tuple(t for t in rot(dummy, pos, **kw))
        return self._pe[(seqlen, layer_type)]

    def block_position_embeddings(self, i: int, seqlen: int):
        """RoPE tables of block i's layer type on its device (under a map the rotary module may sit elsewhere)."""
        pe = self.position_embeddings(seqlen, self.layer_types[i] if self._typed_rope else None)
        if not self.mapped:
            return pe
        dev = self.block_device(i)
        return tuple(t.to(dev) for t in pe)

    def sliding_mask(self, seqlen: int) -> torch.Tensor | None:
        """transformers' sliding-window causal mask, (1, 1, seqlen, seqlen) bool, or None when the
        window covers the whole sequence (key j is hidden from query i when i - j >= window)."""
        if not self.sliding_window or seqlen <= self.sliding_window:
            return None
        if seqlen not in self._masks:
            from transformers.masking_utils import create_sliding_window_causal_mask

            embeds = torch.zeros(1, seqlen, 1)
            self._masks[seqlen] = create_sliding_window_causal_mask(
                config=self.model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                position_ids=torch.arange(seqlen)[None])
        return self._masks[seqlen]

    def block_inputs(self, i: int, seqlen: int) -> dict:
        """Keyword arguments of block i's forward besides the hidden states (RoPE tables, mask)."""
        mask = self.sliding_mask(seqlen) if self.layer_types[i] == "sliding_attention" else None
        if mask is not None:
            mask = mask.to(self.block_device(i))
        return {"attention_mask": mask, "position_embeddings": self.block_position_embeddings(i, seqlen)}

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings of `tokens` (n, seqlen) int64: (n, seqlen, hidden) float32 (the model's own
        scaling included, e.g. Gemma's sqrt(hidden)), on the CPU under a device map."""
        if not self.mapped:
            return self.inner.embed_tokens(tokens).float()
        emb = self.inner.embed_tokens  # a single-device map has no hook to move the tokens
        return emb(tokens.to(self.device_of(emb))).float().cpu()

    def _slices(self, n: int):
        for s in range(0, n, self.micro_batch):
            yield slice(s, min(n, s + self.micro_batch))

    @torch.no_grad()
    def run_block(self, i: int, hidden: torch.Tensor, layer=None) -> torch.Tensor:
        """Hidden states after block i; `layer` overrides the model's block (a truncated copy)."""
        layer = self.layers[i] if layer is None else layer
        inputs = self.block_inputs(i, hidden.shape[1])
        dev = self.block_device(i)
        out = torch.empty_like(hidden)
        with self.on_device(layer):
            for sl in self._slices(hidden.shape[0]):
                h = hidden[sl].to(dev)
                out[sl] = layer(h, **inputs).to("cpu")
        return out

    @contextmanager
    def trial(self, i: int, factors: dict):
        """Block i with some linears replaced (see lowrank.factored_layer), for one step.

        Unmapped: a shallow copy sharing every untouched parameter, as before. Mapped: the
        replacements are swapped into the placed block itself, built on the replaced linear's
        execution device, and the original linears are put back on exit.
        """
        if not self.mapped:
            yield factored_layer(self.layers[i], factors)
            return
        layer = self.layers[i]
        olds = {key: get_module(layer, SPEC[key].module) for key in factors}
        try:
            with ExitStack() as stack:  # offloaded biases/weights readable while the replacements are built
                for old in olds.values():
                    stack.enter_context(materialized(old))
                for key, (a, b) in factors.items():
                    dev = execution_device(olds[key])
                    factored_layer(layer, {key: (a.to(dev), None if b is None else b.to(dev))}, copy_layer=False)
                    get_module(layer, SPEC[key].module).to(dev)
            yield layer
        finally:
            for key, old in olds.items():
                set_module(layer, SPEC[key].module, old)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states, with the model's final-logit soft-capping (Gemma) if any."""
        logits = self.model.lm_head(self.inner.norm(h))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def loss(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-window mean next-token cross-entropy (nats), (n,) on the CPU, from final hidden states
        (n, seqlen, hidden) and the windows' `tokens` (n, seqlen)."""
        losses = []
        dev = self.device_of(self.inner.norm)
        with self.on_device(self.inner.norm), self.on_device(self.model.lm_head):
            for sl in self._slices(hidden.shape[0]):
                logits = self.head_logits(hidden[sl].to(dev)).float()
                tgt = tokens[sl].to(logits.device)
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
