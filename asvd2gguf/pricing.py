"""What each way of writing a tensor costs, in bytes and in predicted loss, in one currency.

A block linear W (m out x n in) can be written dense at a llama.cpp type, or factored at rank r
(A (m, r), B (r, n), both factors at one type). Every option changes the weight by some dW, and
its predicted increase of the mean calibration loss is the K-FAC quadratic form that already
prices rank truncation (sensitivity.tail_curves, `fisher`):

    cost(dW) = 0.5 tr(dW^T Gg dW Gx)        Gx = X^T X / T (input Gram), Gg = G^T G / T (output gradient)

Size plans price dense options with the token-weighted input Gram sum_t |g_t|^2 x_t x_t^T /
sum_t |g_t|^2 as Gx (calibrate.token_weighted_grams): K-FAC's independence of x and g fails for
linears whose output is normalised (Gemma 3's o_proj / down_proj: large-|x| tokens have small |g|)
and over-predicts their rounding up to 250x; the weighting keeps only the independence of x from
g's direction. Factored options keep the plain Gx: their cost builds on the analysis' truncation
curve (plain K-FAC), and weighted exact costs against that curve made the interpolated penalties
negative (measured on Gemma 3: a plan of 43 F16 pairs at ranks 64-128 priced at ~0 had
calibration perplexity 339 against 84).
The quantizers' imatrix stays the plain diag(X^T X / T), as llama-imatrix computes it.

with dW = deq(quant(W)) - W for a dense option and dW = deq(quant(A)) deq(quant(B)) - W for a
factored one: the error of truncation and of quantization together, measured by quantizing
with llama.cpp's own code (ggml_lib) and dequantizing. Rank and type then compete on one scale
(nats per byte). Martens and Grosse, arXiv 1503.05671 (K-FAC); ASVD, arXiv 2312.05821 (STRS).

The runtime adds an error of its own: the CPU backend multiplies a quantized weight with its input
converted to the weight type's vec-dot type (Q8_0 for the 32-block types, Q8_1 for Q4_1/Q5_1, Q8_K
for the K-quants; ggml_lib.vec_dot_type; CUDA: 8 bits per 32 values for every quantized type,
ggml_lib.input_type under --runtime cuda), so a type also costs act_cost = 0.5 sum_j diag(W^T Gg W)_j
E[dx_j^2] with dx the input's rounding (calibrate.act_rounding_stats), added to the option's cost
by the caller. F16 converts its input to F16, as the F16 reference does: no cost. A factored
option pays its B's input rounding; A's input (B x, not measured) is left unpriced.

The importance matrix each quantization gets is llama.cpp's: the per-input-column mean of x^2,
diag(Gx) for W and B (llama-imatrix's `in_sum2 / counts`), diag(B Gx B^T) for A (its input is B x).

Exact pricing of every (rank, type) pair is a quadratic form of O(m^2 n + m n^2) per pair: on
SmolLM2 (30 x 7 linears, 13 ranks x 6 factor types for the MLP) that is too slow for 2 cores,
so factored options are priced exactly at up to `EXACT_RANKS` ranks per linear and type
(spread over the candidate ranks, the smallest and largest included) and, in between, the
quantization penalty cost(r, t) - trunc(r) is interpolated linearly in r on top of the exact
truncation curve trunc(r) (the analysis' `fisher` curve). The penalty grows about linearly
with r (each kept direction adds its own rounding noise); measured on SmolLM2 (layers 3 and
20, 3 types, 3 exact ranks of 8 and 13) the interpolated costs are within 0.7% of the exact ones.

Pure maths on tensors: the orchestration (which weights, which statistics, caching) is convert.py.
"""

from __future__ import annotations

import numpy as np
import torch

from . import ggml_lib as G
from .decompose import Factorization
from .ggml_lib import dense_bytes, pair_bytes
from .ranks import Option

# The types a plan chooses among (llama-quantize's names; each is replaced by llama-quantize's
# row-size fallback where its block does not divide the row: ggml_lib.fallback).
# Dense: the K- and IQ-quants and the 32-block types (which a model stored in them, e.g. SmolLM2's
# Q4_1 source, takes back without loss); factors and embeddings: the K-quants (fallbacks included).
DENSE_TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "iq4_xs", "iq4_nl", "q4_0", "q3_k",
               "q2_k")
FACTOR_TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k")
EMBD_TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k")
SOURCE = "source"  # the Option.qtype of a tensor kept in its source GGUF's own blocks (source_option)
FACTOR_ORDER = {t: i for i, t in enumerate(FACTOR_TYPES)}
EXACT_RANKS = 3  # factored ranks priced exactly per linear and type (see the module docstring)


def fisher_cost(dw: torch.Tensor, gx: torch.Tensor, gg: torch.Tensor) -> float:
    """0.5 tr(dW^T Gg dW Gx) (nats): the K-FAC predicted loss increase of a weight error.

    dw (m, n), gx (n, n), gg (m, m), one float dtype. Rule: sensitivity.tail_curves' `fisher`
    (the same form, there summed over truncated singular directions).
    """
    return 0.5 * float(((gg @ dw).double() * (dw @ gx).double()).sum())


def act_weights(w: torch.Tensor, gg: torch.Tensor) -> torch.Tensor:
    """diag(W^T Gg W) (n,) float64 for w (m, n), gg (m, m): per input channel, the K-FAC predicted
    loss of a unit squared error in that input (the output error is W dx)."""
    w = w.float()
    return ((gg.float() @ w) * w).sum(0).double()


def head_act_weights(e: torch.Tensor, gdiag: torch.Tensor) -> torch.Tensor:
    """diag(E^T diag(gdiag) E) (d,) float64 for the output head E (V, d) with the logit-gradient
    diagonal gdiag (V,) (embedding_cost's head role): act_weights of the head."""
    return (gdiag.double()[:, None] * e.double() ** 2).sum(0)


def token_weighting(gxw: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """diag(Gx_w) / diag(Gx) (n,) float64: per input channel how much the token weighting by |g|^2
    moves its mean x^2, applied to the input's rounding error too (its squared error scales with
    the block's |x|^2); 1 where the channel never fires."""
    a, b = torch.diagonal(gxw).double(), torch.diagonal(gx).double()
    return torch.where(b > 0, a / b.clamp_min(1e-300), torch.ones_like(b))


def act_cost(weights: torch.Tensor, err: torch.Tensor | None) -> float:
    """0.5 sum_j weights_j E[dx_j^2] (nats): the predicted loss of rounding a linear's input, for
    `weights` from act_weights and `err` the input's mean squared rounding error per channel
    (calibrate.act_rounding_stats; None for a float vec-dot type: the reference computes so too).
    K-FAC's form with the input errors independent across channels and of the gradient."""
    return 0.0 if err is None else 0.5 * float((weights * err.double()).sum())


def imatrix_dense(gx: torch.Tensor) -> np.ndarray:
    """llama.cpp's importance matrix for a linear with input Gram `gx` (n, n) = X^T X / T: its
    diagonal, the per-column mean of x^2 (tools/imatrix: in_sum2 / counts). (n,) float32."""
    return torch.diagonal(gx).float().clamp_min(0).cpu().numpy()


def imatrix_factor_a(b: torch.Tensor, gx: torch.Tensor) -> np.ndarray:
    """The importance matrix of the output factor A, whose input is B x: diag(B Gx B^T), (r,)
    float32, for b (r, n) and gx (n, n)."""
    b = b.to(gx.dtype)
    return ((b @ gx) * b).sum(1).float().clamp_min(0).cpu().numpy()


def quantized(t: torch.Tensor, qtype: str, imatrix: np.ndarray | None, lib) -> tuple[np.ndarray, torch.Tensor, str]:
    """`t` (rows, n) at llama-quantize's type for `qtype` (row-size fallback applied): (raw blocks
    (rows, row bytes) uint8, dequantized float32 (rows, n), the type written)."""
    data, deq, tt = G.round_trip(t.detach().float().cpu().numpy(), qtype, imatrix, lib)
    return data, torch.from_numpy(deq), G.name_of(tt)


def _distinct_types(rows: int, cols: int, types) -> list[tuple[str, int, object]]:
    """(name asked, bytes, written type) per type of a rows x cols tensor, once per written type:
    types that fall back to the same written type are one option (the first name keeps it)."""
    out, seen = [], set()
    for t in types:
        nbytes, tt = dense_bytes(rows, cols, t)
        if tt not in seen:
            seen.add(tt)
            out.append((t, nbytes, tt))
    return out


def price_dense(w: torch.Tensor, gx: torch.Tensor, gg: torch.Tensor, types=DENSE_TYPES, lib=None,
                im_gram: torch.Tensor | None = None) -> list[Option]:
    """The dense options of one linear: per type, bytes and the predicted loss of its rounding.

    w (m, n); gx (n, n), gg (m, m) the Grams of the cost (gx: plain or token-weighted input Gram);
    im_gram (n, n): the input Gram whose diagonal is the quantizer's imatrix, as llama-imatrix
    computes it (default gx). Types that fall back to the same written type are one option (the
    first name asked keeps it)."""
    m, n = w.shape
    w32, gx32, gg32 = w.float(), gx.float(), gg.float()
    im = imatrix_dense(gx if im_gram is None else im_gram)
    out = []
    for t, nbytes, tt in _distinct_types(m, n, types):
        _, deq, _ = quantized(w32, tt, im, lib)
        out.append(Option(0, t, (tt,), nbytes, fisher_cost(deq - w32, gx32, gg32)))
    return out


def exact_ranks(ranks: list[int], k: int = EXACT_RANKS) -> list[int]:
    """Up to `k` of `ranks` (ascending), spread evenly, the first and last included."""
    if len(ranks) <= k:
        return list(ranks)
    idx = np.unique(np.round(np.linspace(0, len(ranks) - 1, k)).astype(int))
    return [ranks[i] for i in idx]


def price_factored(w: torch.Tensor, f: Factorization, ranks: list[int], gx: torch.Tensor, gg: torch.Tensor,
                   trunc: np.ndarray, types=FACTOR_TYPES, split: str = "uv", latent: bool = False,
                   lib=None, k_exact: int = EXACT_RANKS, im_gram: torch.Tensor | None = None) -> list[Option]:
    """The factored options of one linear: every rank of `ranks` at every type of `types`.

    w (m, n) the original weight; f its factorization (ranks up to f's kept rank); gx (n, n),
    gg (m, m) the Grams of the cost (as price_dense; im_gram the imatrix's, default gx); trunc
    (p + 1,) the predicted loss of truncation alone per rank (the analysis' `fisher` curve, plain
    K-FAC: with a token-weighted gx the exact ranks carry the difference and the ranks between
    them interpolate it). Per type, the ranks are grouped by the types their factors
    are written at (a rank whose A keeps a 256-block type, r = 256 or 512, while its neighbours
    fall back is a group of its own); in each group exact_ranks(group, k_exact) are priced by
    the quadratic form of A_q B_q - W and the others interpolated (module docstring). A group
    whose written types an earlier type already produced is not priced twice (at 576-wide rows
    q6_k writes q8_0's B). latent: K/V under a latent cache (width = rank).

    The form is evaluated through the factors, 0.5 sum((Gg A_q B_q - Gg W) * (A_q (B_q Gx) - W Gx)),
    O(m^2 r + r n^2 + m r n) per option instead of O(m^2 n + m n^2), with Gg W and W Gx shared.
    """
    m, n = w.shape
    w32, gx32, gg32 = w.float(), gx.float(), gg.float()
    ggw, wgx = gg32 @ w32, w32 @ gx32
    ranks = sorted(ranks)
    im32 = gx32 if im_gram is None else im_gram.float()
    im_b = imatrix_dense(im32)
    factors: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}

    def exact(r: int, tts: tuple[str, str]) -> float:
        if r not in factors:
            a, b = (x.float() for x in f.factors(r, split))
            factors[r] = (a, b, imatrix_factor_a(b, im32))
        a, b, im_a = factors[r]
        _, qa, _ = quantized(a, tts[0], im_a, lib)
        _, qb, _ = quantized(b, tts[1], im_b, lib)
        left = (gg32 @ qa) @ qb - ggw
        right = qa @ (qb @ gx32) - wgx
        return 0.5 * float((left.double() * right.double()).sum()) - float(trunc[r])

    out, priced = [], {}
    for t in types:
        groups: dict[tuple[str, str], list[int]] = {}
        for r in ranks:
            groups.setdefault(pair_bytes(m, n, r, t)[1], []).append(r)
        for tts, group in groups.items():
            if tts in priced:  # the same written types as an earlier type: the same options
                continue
            penalty = {r: exact(r, tts) for r in exact_ranks(group, k_exact)}
            priced[tts] = penalty
            xs = np.array(sorted(penalty), dtype=float)
            ys = np.array([penalty[int(r)] for r in xs])
            for r in group:
                pen = penalty[r] if r in penalty else float(np.interp(r, xs, ys))
                out.append(Option(r, t, tts, pair_bytes(m, n, r, t)[0], max(float(trunc[r]) + pen, 0.0),
                                  r if latent else 0, r in penalty))
    return sorted(out, key=lambda o: (FACTOR_ORDER.get(o.qtype, 99), o.rank))


def embedding_cost(de: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor] | None = None,
                   inp: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """Predicted loss increase (nats) of an error dE (V, d) of the token embedding or output head,
    in the K-FAC form of each role the matrix plays:

    * head (`head` = (Gh (d, d), gdiag (V,))): logits = E h with h the final normed hidden state.
      Input Gram Gh = E[h h^T]; the output-gradient Gram E[g g^T] over the V logits (g = softmax
      - one-hot) is taken diagonal, gdiag_v = E[g_v^2]: a V x V Gram is too large, and its
      off-diagonal mass is small next to the diagonal one for a large vocabulary. Cost
      0.5 sum_v gdiag_v dE_v^T Gh dE_v.
    * input (`inp` = (freq (V,), Ge (d, d))): the embedding is a linear on one-hot tokens, whose
      input Gram is exactly diag(freq) (token frequencies of the calibration text); the output
      gradient Gram Ge = E[g g^T] of the gradient at the embedding output is taken token-
      independent (K-FAC's independence assumption). Cost 0.5 sum_v freq_v dE_v^T Ge dE_v.
    A tied matrix (SmolLM2, Gemma 3) plays both roles: the costs add (their cross term is dropped).
    """
    cost = 0.0
    if head is not None:
        gh, gdiag = head
        cost += 0.5 * float((((de @ gh.float()) * de).sum(1).double() * gdiag.double()).sum())
    if inp is not None:
        freq, ge = inp
        cost += 0.5 * float((((de @ ge.float()) * de).sum(1).double() * freq.double()).sum())
    return cost


def price_embedding(e: torch.Tensor, types=EMBD_TYPES, head: tuple[torch.Tensor, torch.Tensor] | None = None,
                    inp: tuple[torch.Tensor, torch.Tensor] | None = None, lib=None,
                    imatrix: np.ndarray | None = None) -> list[Option]:
    """Options of the token embedding or output head E (V, d): per type, bytes and the predicted
    loss of its rounding (embedding_cost, for the roles given by `head` / `inp`). `imatrix` (d,):
    the quantizer's column weights (llama.cpp: diag(Gh) for a head; none for an untied
    token_embd, which llama-imatrix never sees)."""
    v, d = e.shape
    e32 = e.float()
    out = []
    for t, nbytes, tt in _distinct_types(v, d, types):
        _, deq, _ = quantized(e32, tt, imatrix, lib)
        out.append(Option(0, t, (tt,), nbytes, embedding_cost(deq - e32, head, inp)))
    return out


def with_source(options: list[Option], kept: Option) -> list[Option]:
    """`options` plus `kept` (a source_option), less the dense options it dominates: those at the
    same written type (the same bytes) predicted no better. A tie goes to the source's blocks
    (a requantization that reproduces them exactly is the same tensor, one that does not is worse)."""
    return [o for o in options if o.rank or o.types != kept.types or o.cost < kept.cost] + [kept]


def source_option(written: str, nbytes: int, cost: float) -> Option:
    """The option of keeping a tensor in its source GGUF's own blocks (quantize.SourceBlocks):
    dense, written at the source's type `written` in `nbytes`, with the predicted loss `cost` of
    its difference from the model the prices are measured on (0 up to the dequantizers' float
    rounding: that model is the source dequantized). It competes with requantizing the same
    tensor, which the importance matrix makes lossy even at the source's own type."""
    return Option(0, SOURCE, (written,), nbytes, cost)
