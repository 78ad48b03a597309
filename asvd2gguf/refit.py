"""Refit of the factor pairs on the compressed model's own inputs (--refit-tokens).

The analysis factors a linear W (m x n) on the original model's inputs X. In the compressed
model it reads other inputs, X^: every earlier block, and the earlier linears of its own block,
are compressed too. The refit gives each factored linear, at its planned rank r, the factors
that best reproduce the original model's output from what it now reads:

    min over rank-r A B of  E || A B x^ - W x ||^2_G

with G the output metric of the method (the K-FAC output-gradient Gram for kfac, and for
k_proj/v_proj under hybrid; the identity otherwise). That is reduced-rank regression (Izenman
1975): the least-squares map M = W D^T C^-1 (C = E[x^ x^^T], D = E[x^ x^T]) truncated in the
metric of C, which is decompose.factorize with the cross Gram D (the whitened SVD of SVD-LLM,
arXiv 2403.07378 section 3.1, applied to the regression target instead of W). With X^ = X it is
the analysis' own factorization. The block-sequential order is GPTQ's (Frantar et al., arXiv
2210.17323, section 3): each block is refitted on inputs that went through the refitted blocks
before it, so it also absorbs the error that reaches it from them; within a block the linears
go in the order the forward pass reads them (q/k/v, output, gate/up, down).

Ranks, shapes and so the file's bytes are unchanged; for K/V under a latent cache B changes
with A (the cache stores whatever B x is written). No training: one pass of the original and a
few of the compressed block per block, on more tokens than the statistics need (a rank-r pair
has r (m + n) parameters to fit).
"""

from __future__ import annotations

import torch

from .arch import KV_KEYS, LINEARS, SPEC, get_module
from .blocks import BlockRunner
from .decompose import KV_METHOD, REST_METHOD, factorize, whitening_factor
from .gguf_write import BlockTensor
from .placement import materialized

# ridge on C in pair mode, relative to its mean diagonal. GPTQ dampens its Hessian by 1%; measured
# on SmolLM2 (docs/results.md "Refit", 128 x 256 refit tokens) 0.1% is better at all three settings:
# --ratio 0.9 --kv 0.5 34.412 (1%: 35.249), --ratio 0.95 29.900 (30.125), --ratio 1 --kv 0.5 32.983 (33.499)
DAMP = 0.001
# below this many refit tokens only the output factor A is refitted (B kept, ridge towards the
# analysis' A with DAMP_OUTPUT): a pair has r (m + n) parameters and overfits few tokens. Measured
# on SmolLM2 --ratio 0.9 --kv 0.5 (docs/results.md "Refit"): at 8192 tokens A alone was better
# (35.95 against 36.36 for the pair), at 32768 the pair (34.39 against 35.12)
PAIR_TOKENS = 16384
DAMP_OUTPUT = 0.1

# input groups in forward order, with the linears reading each
GROUPS: list[tuple[str, list[str]]] = []
for _s in LINEARS:
    if not GROUPS or GROUPS[-1][0] != _s.group:
        GROUPS.append((_s.group, []))
    GROUPS[-1][1].append(_s.key)
_HEAD = {g: SPEC[keys[0]].module for g, keys in GROUPS}  # the module whose input a group's statistics see


def refit_mode(n_tokens: int) -> str:
    """What a refit on `n_tokens` tokens refits: "factor pairs" from PAIR_TOKENS on, else
    "output factors" (B kept)."""
    return "factor pairs" if n_tokens >= PAIR_TOKENS else "output factors"


def refit_metric(method: str, key: str) -> str:
    """The factorization metric of linear `key`'s refit under --method: the method's own for
    whiten and kfac (hybrid: kfac for k/v, whiten for the rest), whiten for asvd and svd (their
    diagonal or no scaling has no cross-Gram form; the output error in the inputs' metric is
    what the refit minimises)."""
    m = (KV_METHOD if key in KV_KEYS else REST_METHOD).get(method, method)
    return m if m in ("whiten", "kfac") else "whiten"


def solve_output_factor(w: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
                        damp: float = DAMP, prior: torch.Tensor | None = None) -> torch.Tensor:
    """The least-squares A (m x r) for a fixed B (r x n): min ||X^ B^T A^T - X W^T||^2 + lambda ||A - P||^2.

    w: the original weight (m x n); c = X^^T X^ and d = X^^T X (n x n, any common scale); prior P
    (m x r, default 0); lambda = damp * mean diag(B C B^T). float64 inside, float32 out. Raises
    torch.linalg.LinAlgError only if B C B^T + lambda I is singular (B or C all zero, damp 0).
    """
    w, b, c, d = (t.to(torch.float64) for t in (w, b, c, d))
    g = b @ c @ b.T  # (r, r)
    lam = damp * float(g.diagonal().mean().clamp_min(1e-30))
    g.diagonal().add_(lam)
    rhs = b @ d @ w.T  # (r, m) = B X^^T X W^T
    if prior is not None:
        rhs += lam * prior.to(torch.float64).T
    return torch.linalg.solve(g, rhs).T.float()


def ridge(c: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """C + damp * mean diag(C) * I. The compressed inputs can span less than n (attn_output reads a
    low-rank V's span), and a direction they never take must not get unbounded weight in B."""
    return c + damp * float(c.diagonal().mean().clamp_min(1e-30)) * torch.eye(c.shape[0], dtype=c.dtype,
                                                                                 device=c.device)


def refit_pair(w: torch.Tensor, c: torch.Tensor, d: torch.Tensor, rank: int, metric: str = "whiten",
               out_gram: torch.Tensor | None = None, split: str = "uv",
               x_factor=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` pair A (m x r), B (r x n) of the ridge reduced-rank regression of W's original
    outputs on the compressed inputs: decompose.factorize(W, metric, gram=ridge(C), cross=D).

    w: (m x n); c = E[x^ x^^T], d = E[x^ x^T] (n x n); metric: whiten or kfac (with out_gram,
    m x m); x_factor: whitening_factor(ridge(c)) when already computed (a group shares it).
    """
    ridged = ridge(c.to(torch.float64))
    f = factorize(w, metric, gram=ridged, cross=d, x_factor=x_factor or whitening_factor(ridged),
                  out_gram=out_gram if metric == "kfac" else None)
    return f.factors(rank, split)


class _Grams:
    """C = X^^T X^ and D = X^^T X of one input group, float64 on the CPU, and the token count."""

    def __init__(self):
        self.c = self.d = None
        self.count = 0

    def add(self, xh: torch.Tensor, x: torch.Tensor) -> None:
        xh = xh.reshape(-1, xh.shape[-1]).to(torch.float64)
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        c, d = xh.T @ xh, xh.T @ x
        self.c, self.d = (c, d) if self.c is None else (self.c + c, self.d + d)
        self.count += xh.shape[0]


def _capture(layer, group: str, into: list[torch.Tensor]):
    """Forward pre-hook on the module reading `group`'s input: appends each input (CPU float32)."""
    return get_module(layer, _HEAD[group]).register_forward_pre_hook(
        lambda m, args: into.append(args[0].detach().float().cpu()))


def _replacements(row: list[BlockTensor]) -> dict:
    """runner.trial's replacements for a block: every factor pair."""
    return {bt.key: (bt.a, bt.b) for bt in row if bt.a is not None}


@torch.no_grad()
def refit_blocks(runner: BlockRunner, tokens: torch.Tensor, blocks: list[list[BlockTensor]], method: str,
                 stats, split: str = "uv", progress=None) -> list[list[BlockTensor]]:
    """`blocks` (factor.final_blocks: float factor pairs, or dense weights) with every factor pair
    refitted at its rank (see the module docstring; with fewer than PAIR_TOKENS tokens only A);
    dense linears are kept. tokens: the refit windows (n x seqlen) int64; method: --method
    (refit_metric); stats: calibrate.LayerStats per layer (the K-FAC output Grams); split:
    --sigma-split.

    Returns new lists (the input is not changed). A linear whose refit is not finite keeps its
    factors. Per block: one pass of the original block, one of the compressed block per input
    group it refits, and one to carry the compressed hidden states on.
    """
    pair = refit_mode(tokens.numel()) == "factor pairs"
    h = runner.embed(tokens)
    hh = h.clone()
    out: list[list[BlockTensor]] = []
    task = progress.add_task("refitting factors", total=len(blocks)) if progress else None
    for i, row in enumerate(blocks):
        row = [BlockTensor(bt.key, weight=bt.weight, a=bt.a, b=bt.b) for bt in row]
        by_key = {bt.key: bt for bt in row}
        layer = runner.layers[i]
        groups = [(g, keys) for g, keys in GROUPS if any(by_key[k].a is not None for k in keys)]
        orig: dict[str, list[torch.Tensor]] = {g: [] for g, _ in groups}
        handles = [_capture(layer, g, orig[g]) for g in orig]
        try:
            h_next = runner.run_block(i, h)  # the original block: its inputs, and the next block's
        finally:
            for hd in handles:
                hd.remove()
        for group, keys in groups:
            seen: list[torch.Tensor] = []
            with runner.trial(i, _replacements(row)) as trial:
                hd = _capture(trial, group, seen)
                try:
                    runner.run_block(i, hh, trial)
                finally:
                    hd.remove()
            grams = _Grams()
            for xh, x in zip(seen, orig[group]):
                grams.add(xh, x)
            c, d = grams.c / grams.count, grams.d / grams.count
            # ridge: the compressed inputs can span less than n (attn_output after a low-rank V),
            # and directions they never take must not get (unbounded) weight in B
            x_factor = whitening_factor(ridge(c)) if pair else None
            for key in keys:
                _refit_one(by_key[key], get_module(layer, SPEC[key].module), c, d, x_factor,
                           refit_metric(method, key), stats[i].out_gram.get(key), split)
        with runner.trial(i, _replacements(row)) as trial:
            hh = runner.run_block(i, hh, trial)
        h = h_next
        out.append(row)
        if progress:
            progress.advance(task)
    return out


def _refit_one(bt: BlockTensor, lin, c, d, x_factor, metric: str, out_gram, split: str) -> None:
    """Refit one factored linear in place: its pair at its rank (refit_pair), or without `x_factor`
    the output factor only; dense linears are left as they are. A result that is not finite is
    dropped."""
    if bt.a is None:
        return
    with materialized(lin):
        w = lin.weight.detach().float().cpu()
    if x_factor is None:  # few tokens: the output factor only
        a, b = solve_output_factor(w, bt.b.float(), c, d, DAMP_OUTPUT, prior=bt.a.float()), bt.b
    else:
        a, b = refit_pair(w, c, d, bt.a.shape[1], metric, out_gram, split, x_factor)
    if bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        bt.a, bt.b = a.to(bt.a.dtype), b.to(bt.b.dtype)
