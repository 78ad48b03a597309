"""Activation statistics per block linear, collected block by block.

Per input group (linears reading the same input share it): mean |x| and max |x| per channel
(ASVD's scaling) and the Gram X^T X / T (whitening). With `fisher=True` a block-wise backward
pass adds, per linear, the output-gradient Gram G^T G / T: the second Kronecker factor of the
K-FAC Fisher, which turns a truncation into a predicted loss increase without re-running the
model (see sensitivity.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import cache
from .arch import LINEARS, get_module
from .atomic import write_text_atomic
from .blocks import BlockRunner
from .errors import UserError
from .text import tokens_digest

if TYPE_CHECKING:
    from .analysis import LinearInfo
    from .source import Source

GROUP_HEAD = {}
for _s in LINEARS:
    GROUP_HEAD.setdefault(_s.group, _s)


@dataclass
class LayerStats:
    """One layer's calibration statistics over T tokens: per input group (arch.LinearSpec.group)
    the mean and max |x| per channel (ASVD's scaling) and the Gram X^T X / T (whitening); per
    linear the output-gradient Gram G^T G / T (K-FAC; empty without the Fisher pass)."""

    abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> (n,)
    abs_max: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> (n,)
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> (n, n) float64, / T
    out_gram: dict[str, torch.Tensor] = field(default_factory=dict)  # linear key -> (m, m) float64, / T

    def to_dict(self) -> dict:
        """Plain dict of tensors, for the cache (torch.load with weights_only)."""
        return {"abs_mean": self.abs_mean, "abs_max": self.abs_max, "gram": self.gram, "out_gram": self.out_gram}

    @classmethod
    def from_dict(cls, d: dict) -> LayerStats:
        """Inverse of to_dict."""
        return cls(**d)


@dataclass
class Calibration:
    """What `collect` returns: the windows, the hidden states between blocks (CPU, float32),
    per-layer statistics and the model's mean calibration loss (nats)."""

    tokens: torch.Tensor  # (N, T)
    hidden: list[torch.Tensor]  # input of each block, plus the final hidden state
    layers: list[LayerStats]
    base_loss: float


class _Acc:
    def __init__(self, device):
        self.sum_abs = None
        self.max_abs = None
        self.gram = None
        self.count = 0
        self.device = device

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).to(self.device, torch.float64)
        a = x.abs()
        if self.sum_abs is None:
            self.sum_abs = a.sum(0)
            self.max_abs = a.amax(0)
            self.gram = x.T @ x
        else:
            self.sum_abs += a.sum(0)
            self.max_abs = torch.maximum(self.max_abs, a.amax(0))
            self.gram += x.T @ x
        self.count += x.shape[0]


def _run_block_observed(runner: BlockRunner, i: int, hidden: torch.Tensor, accs: dict) -> torch.Tensor:
    """Block i's output, with each input group's input passed to accs[group].add on the way."""
    layer = runner.layers[i]
    handles = [get_module(layer, spec.module).register_forward_pre_hook(lambda m, args, g=g: accs[g].add(args[0]))
               for g, spec in GROUP_HEAD.items()]
    try:
        return runner.run_block(i, hidden)
    finally:
        for h in handles:
            h.remove()


def collect(runner: BlockRunner, tokens: torch.Tensor, fisher: bool = True, progress=None) -> Calibration:
    """Statistics of `tokens` (n_windows, seqlen) int64: one forward pass block by block (per input
    group mean/max |x| and X^T X / T, accumulated in float64), and with `fisher` a block-wise
    backward pass of the summed next-token loss for each linear's output-gradient Gram G^T G / T
    (the second K-FAC factor; Martens and Grosse, arXiv 1503.05671). Returns a Calibration whose
    base_loss is the mean loss in nats (may be non-finite: the caller reports it)."""
    hidden = [runner.embed(tokens)]
    stats: list[LayerStats] = []
    n_layer = len(runner.layers)
    task = progress.add_task("calibrating", total=n_layer * (2 if fisher else 1)) if progress else None
    for i in range(n_layer):
        accs = {g: _Acc(runner.block_device(i)) for g in GROUP_HEAD}
        hidden.append(_run_block_observed(runner, i, hidden[-1], accs))
        layer_stats = LayerStats()
        for group, acc in accs.items():
            layer_stats.abs_mean[group] = (acc.sum_abs / acc.count).float().cpu()
            layer_stats.abs_max[group] = acc.max_abs.float().cpu()
            layer_stats.gram[group] = (acc.gram / acc.count).float().cpu()  # float32 halves the cache; math upcasts
        stats.append(layer_stats)
        if progress:
            progress.advance(task)
    base_loss = float(runner.loss(hidden[-1], tokens).mean())
    if fisher:
        _fisher_backward(runner, tokens, hidden, stats, progress, task)
    return Calibration(tokens, hidden, stats, base_loss)


def _fisher_backward(runner: BlockRunner, tokens, hidden, stats, progress, task,
                     weighted: list[dict] | None = None) -> None:
    """Back-propagate the summed token loss block by block, keeping one block's graph at a time.
    With `weighted` (one dict per layer, filled here): per linear the token-weighted input Gram
    sum_t |g_t|^2 x_t x_t^T / sum_t |g_t|^2, g_t the linear's output gradient at token t."""
    n_tok = tokens.shape[0] * tokens.shape[1]
    grad = torch.empty_like(hidden[-1])
    dev = runner.device_of(runner.inner.norm)
    with runner.on_device(runner.inner.norm), runner.on_device(runner.model.lm_head):
        for sl in runner._slices(tokens.shape[0]):
            h = hidden[-1][sl].to(dev).requires_grad_(True)
            with torch.enable_grad():
                logits = runner.head_logits(h).float()
                tgt = tokens[sl].to(logits.device)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt[:, 1:].flatten(), reduction="sum")
                (g,) = torch.autograd.grad(loss, h)
            grad[sl] = g.cpu()
    for i in reversed(range(len(runner.layers))):
        layer = runner.layers[i]
        acc: dict[str, torch.Tensor] = {}
        wacc: dict[str, tuple] = {}

        def out_hook(key):
            def fwd(_m, args, out):
                x = args[0].detach() if weighted is not None else None

                def bwd(g):
                    g2 = g.reshape(-1, g.shape[-1]).to(torch.float64)
                    acc[key] = acc.get(key, 0) + g2.T @ g2
                    if x is not None:
                        wt = (g2 ** 2).sum(1)
                        x2 = x.reshape(-1, x.shape[-1]).to(g2.device, torch.float64)
                        prev = wacc.get(key, (0, 0))
                        wacc[key] = (prev[0] + (x2 * wt[:, None]).T @ x2, prev[1] + float(wt.sum()))

                out.register_hook(bwd)

            return fwd

        handles = [get_module(layer, s.module).register_forward_hook(out_hook(s.key)) for s in LINEARS]
        new_grad = torch.empty_like(grad)
        inputs = runner.block_inputs(i, tokens.shape[1])
        dev = runner.block_device(i)
        try:
            with runner.on_device(layer):
                for sl in runner._slices(tokens.shape[0]):
                    h = hidden[i][sl].to(dev).requires_grad_(True)
                    with torch.enable_grad():
                        out = layer(h, **inputs)
                        (gi,) = torch.autograd.grad(out, h, grad_outputs=grad[sl].to(out.device))
                    new_grad[sl] = gi.cpu()
        finally:
            for hd in handles:
                hd.remove()
        for key, a in acc.items():
            stats[i].out_gram[key] = (a / n_tok).float().cpu()
        if weighted is not None:
            weighted[i] = {key: (a / max(wsum, 1e-300)).float().cpu() for key, (a, wsum) in wacc.items()}
        grad = new_grad
        if progress:
            progress.advance(task)


def cached_stats(src: Source, runner: BlockRunner, tokens: torch.Tensor, cache_dir: Path, progress=None,
                 need_fisher: bool = True) -> list[LayerStats]:
    """Per-layer statistics of `tokens` (n_windows x seqlen), from <cache_dir>/calib when present.

    Keyed by the model's content and the tokens; an entry without the Fisher Grams serves only
    a caller that does not need them. Raises UserError when the model's calibration loss is
    not finite (naming the first non-finite weight, if any).
    """
    root = cache_dir / "calib" / cache.key(src.fingerprint, tokens_digest(tokens), "v1")
    meta = root / "meta.json"
    if meta.is_file() and (json.loads(meta.read_text()).get("fisher") or not need_fisher):
        layers = [cache.load(root / f"layer_{i:03d}.pt") for i in range(src.n_layer)]
        if all(x is not None for x in layers):
            return [LayerStats.from_dict(x) for x in layers]
    calib = collect(runner, tokens, fisher=need_fisher, progress=progress)
    if not math.isfinite(calib.base_loss):
        raise UserError(f"the model's calibration loss is {calib.base_loss}: {_non_finite_weight(src)}")
    for i, stats in enumerate(calib.layers):
        cache.save(stats.to_dict(), root / f"layer_{i:03d}.pt")
    write_text_atomic(meta, json.dumps({"fisher": need_fisher, "base_loss": calib.base_loss}))
    return calib.layers


def token_weighted_grams(runner: BlockRunner, tokens: torch.Tensor, progress=None) -> list[dict[str, torch.Tensor]]:
    """Per layer and linear key the token-weighted input Gram sum_t |g_t|^2 x_t x_t^T / sum_t |g_t|^2
    (n, n) float32 of `tokens` (N, T), g_t the linear's output gradient of the summed loss.

    K-FAC prices a weight error dW as 0.5 tr(dW^T Gg dW Gx), taking the input x and the output
    gradient g independent. A linear whose output is normalised before it joins the residual
    (Gemma 3's o_proj and down_proj, under post-attention / post-feedforward norms) breaks that:
    its large-|x| tokens have small |g|, and K-FAC over-predicts the exact per-token form
    E[(g^T dW x)^2] up to 250x (docs/results.md). Weighting each token's x x^T by |g_t|^2 keeps
    only the independence of x and g's direction: measured on Gemma 3 270M within 0.4-1.5x of
    the exact form for q/o/down_proj in three layers (K-FAC: 0.004-1.6x)."""
    hidden = [runner.embed(tokens)]
    for i in range(len(runner.layers)):
        hidden.append(runner.run_block(i, hidden[-1]))
    n_layer = len(runner.layers)
    task = progress.add_task("token-weighted input Grams", total=n_layer) if progress else None
    weighted: list[dict] = [{} for _ in range(n_layer)]
    _fisher_backward(runner, tokens, hidden, [LayerStats() for _ in range(n_layer)], progress, task, weighted)
    return weighted


def cached_token_weighted_grams(src: Source, runner: BlockRunner, tokens: torch.Tensor, cache_dir: Path,
                                progress=None) -> list[dict[str, torch.Tensor]]:
    """token_weighted_grams, cached under <cache_dir>/calib by the model's content and the tokens."""
    root = cache_dir / "calib" / cache.key(src.fingerprint, tokens_digest(tokens), "tw-v1")
    layers = [cache.load(root / f"layer_{i:03d}.pt") for i in range(src.n_layer)]
    if all(x is not None for x in layers):
        return layers
    layers = token_weighted_grams(runner, tokens, progress)
    for i, d in enumerate(layers):
        cache.save(d, root / f"layer_{i:03d}.pt")
    return layers


def _non_finite_weight(src: Source) -> str:
    """Names the first parameter with NaN or inf (read only after a non-finite loss: offloaded
    weights are read from disk again)."""
    from .placement import cpu_state_items

    for name, t in cpu_state_items(src.model):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name} has NaN or inf values"
    return "no weight has NaN or inf values (activations overflow float32?)"


def calibration_warning(n_tokens: int, infos: list[LinearInfo]) -> str | None:
    """A warning when the calibration has fewer tokens than the widest linear has input channels.

    X^T X (T tokens, n channels) then has rank <= T < n: every curve computed through it is
    exactly 0 for the input directions the calibration never excited, so it cannot rank them
    (they are ordered by the weight's own error instead, see ranks.tie_broken). None when T >= n.
    """
    widest = max(infos, key=lambda info: info.n)
    if n_tokens >= widest.n:
        return None
    return (f"the calibration has {n_tokens} tokens, fewer than the {widest.n} input channels of {widest.key}: "
            f"X^T X has rank <= {n_tokens}, so directions the calibration never excited are ranked by weight norm "
            f"only; give at least {widest.n} tokens (--calib-samples x --calib-seqlen), better several times more")


EMBED_WINDOWS = 8  # calibration windows for the embedding statistics (a forward and backward pass each)


def embedding_stats(runner: BlockRunner, tokens: torch.Tensor, n_windows: int = EMBED_WINDOWS) -> dict:
    """Statistics that price rounding errors of the token embedding and the output head
    (pricing.price_embedding), from `tokens` (N, T):

    freq (V,): token frequencies over all N x T calibration tokens (the one-hot input Gram of the
    embedding, diagonal). From the first `n_windows` windows, with one backward pass each:
    gh (d, d): E[h h^T] of the final normed hidden states (the head's input Gram); gdiag (V,):
    E[g_v^2] of the logit gradient g = softmax - one-hot (the diagonal of the head's output-
    gradient Gram); ge (d, d): E[g g^T] of the gradient of the summed loss at the embedding
    output, per token, times the model's embedding scale (Gemma) so it is the gradient at the
    table row. All float32 on the CPU, means over tokens (K-FAC, Martens and Grosse arXiv 1503.05671).
    """
    emb = runner.inner.embed_tokens
    vocab = emb.weight.shape[0]
    freq = torch.bincount(tokens.flatten(), minlength=vocab).double()
    freq /= freq.sum()
    scale = float(getattr(emb, "embed_scale", 1.0))
    d = emb.weight.shape[1]
    gh = torch.zeros(d, d, dtype=torch.float64)
    ge = torch.zeros(d, d, dtype=torch.float64)
    gdiag = torch.zeros(vocab, dtype=torch.float64)
    n_tok = 0
    seqlen = tokens.shape[1]
    for w in range(min(n_windows, tokens.shape[0])):
        tok = tokens[w:w + 1]
        with torch.enable_grad():
            e = runner.embed(tok).detach().requires_grad_(True)
            h = e
            for i, layer in enumerate(runner.layers):
                with runner.on_device(layer):
                    h = layer(h.to(runner.block_device(i)), **runner.block_inputs(i, seqlen))
            dev = runner.device_of(runner.inner.norm)
            with runner.on_device(runner.inner.norm), runner.on_device(runner.model.lm_head):
                normed = runner.inner.norm(h.to(dev))
                z = runner.model.lm_head(normed)
                cap = getattr(runner.model.config, "final_logit_softcapping", None)
                logits = (torch.tanh(z / cap) * cap if cap else z).float()
                tgt = tok.to(logits.device)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt[:, 1:].flatten(), reduction="sum")
                gz, gemb = torch.autograd.grad(loss, (z, e))
        x = normed.detach()[0, :-1].double().cpu()
        gh += x.T @ x
        gdiag += (gz[0, :-1].double().cpu() ** 2).sum(0)
        g = gemb[0].double().cpu() * scale
        ge += g.T @ g
        n_tok += seqlen - 1
    return {"freq": freq.float(), "gh": (gh / n_tok).float(), "gdiag": (gdiag / n_tok).float(),
            "ge": (ge / n_tok).float()}


def cached_embedding_stats(src: Source, runner: BlockRunner, tokens: torch.Tensor, cache_dir: Path) -> dict:
    """embedding_stats, cached under <cache_dir>/calib by the model's content and the tokens."""
    path = cache_dir / "calib" / cache.key(src.fingerprint, tokens_digest(tokens), "embd-v1") / "embedding.pt"
    hit = cache.load(path)
    if hit is not None:
        return hit
    out = embedding_stats(runner, tokens)
    cache.save(out, path)
    return out


# ---------------------------------------------------------------- the runtime's activation rounding

class _ActAcc:
    """Per vec-dot type, the sum over tokens of the squared rounding error per input channel."""

    def __init__(self, vts, cpu):
        self.vts, self.cpu, self.sums, self.count = vts, cpu, {}, 0

    def add(self, x: torch.Tensor):
        from . import ggml_lib as G

        x = x.detach().reshape(-1, x.shape[-1]).float().cpu().numpy()
        for vt in self.vts:
            if x.shape[1] % G.block_size(vt):
                continue  # no weight type reading this input converts it to vt (its block does not fit the row)
            err = torch.from_numpy((G.as_vec_dot(x, vt, self.cpu) - x) ** 2).double().sum(0)
            name = G.name_of(vt)
            self.sums[name] = self.sums[name] + err if name in self.sums else err
        self.count += x.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        return {k: (v / self.count).float() for k, v in self.sums.items()}


def act_rounding_stats(runner: BlockRunner, tokens: torch.Tensor, vec_dot_types, cpu=None, progress=None) -> dict:
    """What the CPU backend's conversion of a matmul's input to its vec-dot type (ggml_lib.as_vec_dot:
    Q8_0, Q8_1 or Q8_K, by the weight's type) costs, measured on the calibration `tokens` (N, T):
    per layer and input group {vec-dot type name: E[(x - conv(x))^2] per input channel (n,)}, and
    the same for the output head's input (the final normed hidden state, (d,)). Float32, CPU.

    pricing.act_cost turns them into predicted loss: llama.cpp computes a quantized matmul as
    W conv(x), an input error the weight's own rounding does not show (measured on Gemma 3 270M:
    its source Q4_K_M file, whose weights are those of the reference, has KLD 0.005 against it).
    """
    hidden = runner.embed(tokens)
    layers = []
    task = progress.add_task("activation rounding", total=len(runner.layers)) if progress else None
    for i in range(len(runner.layers)):
        accs = {g: _ActAcc(vec_dot_types, cpu) for g in GROUP_HEAD}
        hidden = _run_block_observed(runner, i, hidden, accs)
        layers.append({g: acc.means() for g, acc in accs.items()})
        if progress:
            progress.advance(task)
    head = _ActAcc(vec_dot_types, cpu)
    dev = runner.device_of(runner.inner.norm)
    with torch.no_grad(), runner.on_device(runner.inner.norm):
        for sl in runner._slices(hidden.shape[0]):
            head.add(runner.inner.norm(hidden[sl].to(dev)))
    return {"layers": layers, "head": head.means()}


def cached_act_rounding_stats(src: Source, runner: BlockRunner, tokens: torch.Tensor, cache_dir: Path,
                              vec_dot_types, progress=None) -> dict:
    """act_rounding_stats, cached under <cache_dir>/calib by the model's content, the tokens, the
    llama.cpp build (its conversion code) and the vec-dot types."""
    from . import ggml_lib as G
    from . import llamacpp

    names = sorted(G.name_of(t) for t in vec_dot_types)
    path = cache_dir / "calib" / cache.key(src.fingerprint, tokens_digest(tokens), llamacpp.build_key(), names,
                                           "act-v1") / "act.pt"
    hit = cache.load(path)
    if hit is not None:
        return hit
    out = act_rounding_stats(runner, tokens, vec_dot_types, G.load_cpu(), progress)
    cache.save(out, path)
    return out
