"""Error feedback while rounding the factors (GPTQ, Frantar et al. 2022), in rank space, expert by expert.

Rounding the factors' entries one input coordinate after the other, each rounding error is compensated by the
entries not yet rounded, so that the expert's output on its calibration tokens changes as little as possible:
with H the Hessian of the coordinate's inputs (sum over the tokens routed to the expert of w^2 u u^T, w the routing
weight) and U the upper Cholesky factor of H^-1, rounding input coordinate i with error d updates every later
coordinate j by -d U[i, j] / U[i, i]. The widths stay those the allocation chose; only the values rounded change.

Every projection in the orientation of offline.decompose, factor F_e [R, I]:
- gate, up: W_e = F_e^T V, inputs z = V x: the coordinates are the rank rows; each row is rounded with its own width
  and its group scales (along I) fitted to the row as updated by the rows before it (offline.rounding.quantize_rows);
- down: D_e^T = F_e^T V, inputs a = act(x W_g^T, x W_u^T) [I] (silu(h_g) h_u for most families; with the biases
  where a family has them): the coordinates are the columns of F_e; the group scales of every row are fitted to the
  factor before any rounding (GPTQ's static groups), then the columns
  are rounded in order with the width of their row. By default (target "layer") its inputs are those of the gate
  and up as rounded, and it is rounded toward the factor whose output on them comes closest to the expert's
  original output (corrected): the down projection compensates the gate and up's errors as well as its own.
An expert no calibration token reached has H = 0 and is rounded to nearest. A batch of experts whose busiest has at
most half as many tokens as coordinates (Qwen3-30B-A3B's with a few thousand calibration tokens) takes
offline.lowrank's path: the same rounding from each expert's tokens, without the d x d factorisations; the down
projection's target (toward the layer's output) comes from the tokens whenever they are fewer than its coordinates.

Order: GPTQ's error goes only to the coordinates rounded after it, so the coarsest go first: the rank rows by
ascending width (the dropped rows, width 0, first, the widest rows absorbing their error), ties and the down
projection's columns by descending H_ii (GPTQ's activation order).
"""

from functools import partial

import torch

from bitsmoe_vllm.activation import SILU, Activation

from .calibrate import ByExpert, Routed, by_expert, with_biases
from .coordinates import Columns, RankRows, sub_block
from .lowrank import FEW, Tokens, schur
from .lowrank import feedback as few_tokens_feedback
from .rounding import quantize_rows
from .threads import factor_threads

DAMP = 0.01  # of the mean diagonal, added to H (GPTQ's default)
BLOCK = 128  # coordinates per block of updates deferred into one matrix product
# within a block, coordinates per sub-block: a coordinate's error moves the rest of its sub-block at once, the rest of
# the block by one matrix product per sub-block (one update per coordinate over the whole block was a third of the
# export's feedback time on a Qwen3-30B-A3B-shaped layer, benchmarks/README.md)
SUB = 16
# float64 bytes of one batch of the factorisations' operands: Qwen3-30B-A3B's 128 experts' rank-space Hessians
# (2048 x 2048) factorised at once took 17 GB of temporaries and ran this 24 GB machine out of memory; each batch's
# factorisation holds about five copies of it
FACTOR_BYTES = 1 << 26
# float32 bytes of the Hessians of one batch of experts: a whole layer's (2 GB per projection for Qwen3-30B-A3B, held
# with their reordered copy and factorisations, three times that) set the quantizer's peak memory
HESSIAN_BYTES = 1 << 28
# float32 bytes of the factors of one batch of experts: the rounding holds several copies of a batch's (reordered,
# updated, rounded; float64 for the down projection's target), which for a whole projection (800 MB for Qwen3-30B-A3B)
# set the export's peak memory
FACTOR_BATCH_BYTES = 1 << 27
# the down projection's target is fitted from the tokens (lowrank.Tokens) where its busiest expert has fewer than
# I / FIT_FEW tokens, whatever path its rounding takes (hessians)
FIT_FEW = 1


def hessians(
    routed: Routed | ByExpert,
    weights: dict[str, torch.Tensor],
    bases: dict[str, torch.Tensor | None],
    projections: tuple[str, ...] = ("gate", "up", "down"),
    experts: range | None = None,
    rounded: dict[str, torch.Tensor] | None = None,
    act: Activation = SILU,
) -> dict[str, torch.Tensor]:
    """Per projection of `projections`, [E, n, n] float32: the Hessian of its rank-space inputs (gate, up: z = V x,
    n = R) or of the down projection's inputs (n = I), over each expert's routed tokens with squared routing
    weights; of the experts `experts` only ([len(experts), n, n]; expert_batches), else of all. When the batch's
    busiest expert has at most n / lowrank.FEW tokens, the Hessians as their tokens' inputs times the routing weights
    (lowrank.Tokens, [E, tokens, n]), which compensation and round_factors take as well.

    rounded: the gate and up factors [E, R, I] as rounded. The down projection's inputs u are then those of the
    rounded gate and up, "down-deviation" [E, I, I] is sum w^2 (a - u) u^T, a the original gate and up's (with
    Tokens: w (a - u) per token, [E, tokens, I]), and "down-tokens" [E] the number of tokens (round_factors' target:
    the expert's original output); the down projection's are then Tokens whenever the busiest has fewer tokens than
    I. routed: a ByExpert shares its work with other calls on the layer."""
    experts = experts or range(weights["gate"].shape[0])
    routed = by_expert(routed, weights)
    x, ids, w = routed.x, routed.ids, routed.routing
    size = {p: hessian_size(weights, bases, p) for p in projections}
    counts = torch.bincount(ids.flatten(), minlength=experts.stop)[experts.start : experts.stop]
    most = int(counts.max()) if len(counts) else 0
    few = {p for p in projections if FEW * most <= size[p]}
    towards_layer = rounded is not None and "down" in projections
    if towards_layer and FIT_FEW * most < size["down"]:
        # the target's fit from the tokens costs O(n^2 I + n I R) against the dense H's O(I^3 + I^2 R) (9 of a
        # Qwen3-30B-A3B-shaped layer's 73 s of export, benchmarks/README.md); round_factors forms the dense H for the
        # rounding where the batch's busiest expert has more than I / FEW tokens
        few.add("down")
    out = {
        p: torch.zeros(len(experts), *((most, size[p]) if p in few else (size[p], size[p])), device=x.device)
        for p in projections
    }
    if towards_layer:
        out["down-deviation"] = torch.zeros_like(out["down"])
        out["down-tokens"] = torch.zeros(len(experts), device=x.device)
    # every token's rank-space inputs once (N x H x R), not once per expert it is routed to (k times that)
    z = {p: routed.z(bases[p]) for p in ("gate", "up") if p in out or towards_layer}
    for e in routed.experts:
        if e not in experts:
            continue
        token, slot = routed.tokens(e)
        we, i = w[token, slot], e - experts.start
        for p in ("gate", "up"):
            if p in out:
                ze = z[p][token]
                _add_moment(out[p], i, ze, ze, we, p in few)
        if "down" in out:
            a = act(*routed.pre(e))
            u = a
            if towards_layer:
                u = act(
                    *with_biases(weights, e, z["gate"][token] @ rounded["gate"][e], z["up"][token] @ rounded["up"][e])
                )
                _add_moment(out["down-deviation"], i, a - u, u, we, "down" in few)
                out["down-tokens"][i] = len(token)
            _add_moment(out["down"], i, u, u, we, "down" in few)
    return {p: Tokens(h, counts.tolist()) if p in few else h for p, h in out.items()}


def _add_moment(out: torch.Tensor, e: int, left: torch.Tensor, right: torch.Tensor, w: torch.Tensor, few: bool):
    """out[e] = the sum over an expert's tokens of w^2 left^T right, or with few tokens (lowrank.Tokens) its first
    rows the tokens' w left."""
    moment = left * w[:, None] if few else (left * (w**2)[:, None]).T @ right
    out[e, : len(moment)] = moment


def hessian_size(weights: dict[str, torch.Tensor], bases: dict[str, torch.Tensor | None], projection: str) -> int:
    if projection == "down":
        return weights["down"].shape[1]
    basis = bases[projection]
    return weights[projection].shape[2] if basis is None else basis.shape[0]


def expert_batches(weights: dict[str, torch.Tensor], bases: dict[str, torch.Tensor | None], projection: str):
    """The experts in batches whose Hessians of `projection` take HESSIAN_BYTES and whose factors FACTOR_BATCH_BYTES:
    each expert's Hessian, its factorisations and its rounding are its own, so a layer is handled a batch at a time,
    not all at once."""
    E, I, H = weights[projection].shape
    n = hessian_size(weights, bases, projection)
    step = max(1, min(HESSIAN_BYTES // (4 * n * n), FACTOR_BATCH_BYTES // (4 * H * I)))  # a factor has <= H rows
    return [range(s, min(s + step, E)) for s in range(0, E, step)]


def round_factors(
    projection: str,
    factors: torch.Tensor,
    bits: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    steps: int,
    odd: bool = True,
    deviation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """factors [E, R, I], bits [E, R], hessian [E, n, n] or lowrank.Tokens -> the rounded factors [E, R, I] (codes
    times scales) and their scales [E, R, I/G] (0 for rows of width 0); odd: format version 2's codes
    (bitsmoe_vllm.packing).

    deviation: (down only) hessians' "down-deviation" ([E, I, I]; with Tokens [E, n, I]) and "down-tokens" [E]: the
    rounding aims at the factors whose output on the inputs comes closest to the layer's original output (corrected),
    not at the factors."""
    few = isinstance(hessian, Tokens)
    if deviation is not None:
        if few:
            factors = few_tokens_fit(factors, hessian, *deviation)
        else:
            factors = by_experts(lambda h, d, n, f: corrected(f, h, d, n), hessian, *deviation, factors)
    if few and FEW * max(hessian.tokens) > hessian.z.shape[2]:  # the tokens were kept for the fit: round densely
        hessian, few = hessian.z.transpose(1, 2) @ hessian.z, False
    deviation = None  # not held through the rounding
    diag = hessian.diagonal(dim1=1, dim2=2).clone()  # not a view: the dense H is freed below
    busiest = diag.argsort(dim=1, descending=True, stable=True)  # [E, n]
    order = busiest
    if projection != "down":
        order = busiest.gather(1, bits.gather(1, busiest).argsort(dim=1, stable=True))  # by width, then by H_ii
    if few:
        z = take(hessian.z, order, 2)
        v, c = schur(z.double(), take(damping(diag), order, 1), hessian.tokens)
        run = partial(few_tokens_feedback, z=z, v=v, c=c)
    else:  # one [E, n, n] at a time besides the result (a big layer's are GBs): the caller's H goes once reordered
        reordered = take(take(hessian, order, 1), order, 2)
        del hessian
        run = partial(feedback, u=inverse_cholesky(reordered))
        del reordered
    if projection != "down":
        rounded, scales = _round_rank_rows(take(factors, order, 1), bits.gather(1, order), group_size, steps, odd, run)
        return put(rounded, order, 1), put(scales, order, 1)
    rounded, scales = _round_columns(take(factors, order, 2), bits, group_size, steps, order, odd, run)
    return put(rounded, order, 2), scales


def take(t: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """t [E, ...] with dimension dim reordered per expert by order [E, n]."""
    return t.gather(dim, _index(t, order, dim))


def put(t: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of take."""
    return torch.empty_like(t).scatter_(dim, _index(t, order, dim), t)


def _index(t: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [order.shape[0] if d == 0 else order.shape[1] if d == dim else 1 for d in range(t.dim())]
    return order.view(shape).expand_as(t)


def _round_rank_rows(factors: torch.Tensor, bits: torch.Tensor, group_size: int, steps: int, odd: bool, run):
    """round_factors of gate and up, the rank rows in the order to round them; run(w, quantize): feedback with
    inverse_cholesky of their H, or lowrank.feedback."""
    E, R, I = factors.shape
    scales = torch.zeros(E, R, I // group_size, device=factors.device)
    rounded = run(factors.transpose(1, 2), quantize=RankRows(bits, scales, group_size, steps, odd)).transpose(1, 2)
    return rounded.contiguous(), scales


def _round_columns(
    factors: torch.Tensor, bits: torch.Tensor, group_size: int, steps: int, order: torch.Tensor, odd: bool, run
):
    """round_factors of down, the columns in the order order [E, I] to round them (run: as _round_rank_rows'); the
    group scales are fitted to the columns in place, before any rounding."""
    E, R, I = factors.shape
    scales = torch.zeros(E, R, I // group_size, device=factors.device)
    in_place = put(factors, order, 2)
    for b in bits.unique().tolist():
        if b:
            e, k = (bits == b).nonzero(as_tuple=True)
            scales[e, k] = quantize_rows(in_place[e, k], b, group_size, steps, odd)[1].float()
    # [E, I, R]: each column's scales, in order, coordinate-major as the feedback reads them (a strided column of
    # [E, R, I] made each read a gather)
    step = take(scales.repeat_interleave(group_size, dim=2), order, 2).transpose(1, 2).contiguous()
    return run(factors, quantize=Columns(bits, step, odd)), scales


def by_experts(fn, hessian: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """fn(hessian, *more) over the experts (the first dimension of hessian [E, n, n] and of each of `more`) a batch
    at a time (FACTOR_BYTES of float64 copies of its largest operand), concatenated: the same values as
    fn(hessian, *more), each expert's factorisation being its own."""
    step = max(1, FACTOR_BYTES // (8 * max(t[0].numel() for t in (hessian, *more))))
    return torch.cat([fn(*(t[s : s + step] for t in (hessian, *more))) for s in range(0, hessian.shape[0], step)])


def corrected(
    factors: torch.Tensor, hessian: torch.Tensor, deviation: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """The down projection's target in round_factors: with F the factors [E, R, I] and u their inputs,
    argmin_F* sum w^2 |F* u - F a|^2 + lambda |F* - F|^2 = F + F D (H + lambda)^-1, D the deviation. lambda is GPTQ's
    damping plus mean(H_ii) I / n for an expert's n tokens [E]: the fit is a regression of I coordinates on n tokens,
    which few tokens per coordinate overfit (on 16 experts of I 128 with 2,048 tokens, without it, the experts'
    error on other tokens rose; benchmarks/README.md); a coordinate few tokens excite stays near F, not near 0."""
    h = damped(hessian)
    h.diagonal(dim1=1, dim2=2).add_(fit_damping(hessian.double().diagonal(dim1=1, dim2=2), tokens))
    f = factors.double()
    rhs = deviation.double().transpose(1, 2) @ f.transpose(1, 2)
    with factor_threads():  # h is positive definite; MKL's batched LU (solve) failed on two threads for I 512
        step = torch.cholesky_solve(rhs, torch.linalg.cholesky(h))
    return (f + step.transpose(1, 2)).float()


def fit_damping(diag: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[E, n] float64 H_ii, tokens [E] -> corrected's damping beyond GPTQ's: mean(H_ii) I / n for n tokens."""
    return diag.mean(1, keepdim=True) * diag.shape[-1] / tokens.double().clamp(min=1)[:, None]


def few_tokens_fit(
    factors: torch.Tensor, hessian: Tokens, deviation: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """few_tokens_corrected an expert at a time on its own tokens: on a batch at once, every expert's products were
    padded to the busiest's tokens (3x the mean's in Qwen3-30B-A3B's batches), and its float64 copies of the factors
    took 0.8 GB. An expert without tokens keeps its factor (the fit's step is 0)."""
    return torch.cat(
        [
            few_tokens_corrected(f[None], hessian.z[e : e + 1, :n], deviation[e : e + 1, :n], tokens[e : e + 1])
            if n
            else f[None]
            for e, (f, n) in enumerate(zip(factors, hessian.tokens, strict=True))
        ]
    )


def few_tokens_corrected(
    factors: torch.Tensor, z: torch.Tensor, deviation: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """corrected with H = Z^T Z and D = deviation^T Z (hessians' Tokens and token deviations [E, n, I]): with Lambda
    the damping and P = Z Lambda^-1 Z^T [n, n], F D (H + Lambda)^-1 = F deviation^T (I + P)^-1 Z Lambda^-1."""
    diag = z.double().square().sum(1)
    lam = damping(diag) + fit_damping(diag, tokens)
    scaled = z.double() / lam[:, None, :]  # Z Lambda^-1
    p = scaled @ z.double().transpose(1, 2)
    p.diagonal(dim1=1, dim2=2).add_(1)
    f = factors.double()
    with factor_threads():
        step = torch.cholesky_solve(deviation.double() @ f.transpose(1, 2), torch.linalg.cholesky(p))  # [E, n, R]
    return (f + step.transpose(1, 2) @ scaled).float()


def compensation(projection: str, hessian: torch.Tensor) -> torch.Tensor:
    """[E, n]: the share of each coordinate's rounding loss that the error feedback leaves, for the cost model.
    Rounding coordinate i after those before it in the order costs d^2 / U_ii^2 (the damped H's Schur complement of
    the coordinates not yet rounded, U_ii^-2 <= H_ii) against d^2 H_ii rounded to nearest. The order is
    round_factors': the down projection's columns by descending H_ii; the rank rows by ascending width, which the
    allocation has not chosen yet, so ascending H_ii stands in for it (the rows that matter least get the widths
    that drop or coarsen them, and go first). hessian: or lowrank.Tokens."""
    if isinstance(hessian, Tokens):
        diag = hessian.diagonal().double()
        lam = damping(diag)
        full = diag + lam  # damped's diagonal
        order = full.argsort(dim=1, descending=projection == "down", stable=True)
        share = schur(take(hessian.z.double(), order, 2), take(lam, order, 1), hessian.tokens)[1] / take(full, order, 1)
        return put(share.clamp(max=1), order, 1).float()
    return by_experts(lambda h: _compensation(projection, h), hessian)


def _compensation(projection: str, hessian: torch.Tensor) -> torch.Tensor:
    h = damped(hessian)
    diag = h.diagonal(dim1=1, dim2=2)
    order = diag.argsort(dim=1, descending=projection == "down", stable=True)
    # U_ii^-2 is the Schur complement of the coordinates rounded after i: the squared diagonal of the Cholesky
    # factor of H with the order reversed (one factorisation instead of inverse_cholesky's three)
    later_first = take(take(h, order, 1), order, 2).flip(1, 2)
    with factor_threads():
        schur = torch.linalg.cholesky(later_first).diagonal(dim1=1, dim2=2).flip(1) ** 2
    share = schur / take(diag, order, 1)
    return put(share.clamp(max=1), order, 1).float()


def damped(hessian: torch.Tensor) -> torch.Tensor:
    """[E, n, n] float64 H + DAMP * mean(H_ii) I; a coordinate no token excited gets H_ii = 1."""
    h = hessian.double().clone()
    diag = h.diagonal(dim1=1, dim2=2)
    diag += damping(diag)
    return h


def damping(diag: torch.Tensor) -> torch.Tensor:
    """[E, n] H_ii -> [E, n] float64 lambda with damped(H) = H + diag(lambda)."""
    none = diag <= 0
    diag = torch.where(none, 1.0, diag.double())
    return DAMP * diag.mean(1, keepdim=True) + none


def inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """[E, n, n] -> the upper Cholesky factor U of the damped H's inverse, float32: U = P L^-1 P with P the reversal
    of the coordinates and L the lower Cholesky factor of P H P (U^T U = P (P H P)^-1 P = H^-1); a factorisation
    and a triangular solve instead of a factorisation, an inverse and a second factorisation."""

    def factor(h: torch.Tensor) -> torch.Tensor:
        with factor_threads():
            low = torch.linalg.cholesky(damped(h.flip(1, 2))).float()
            eye = torch.eye(h.shape[-1], device=h.device).expand_as(low)
            return torch.linalg.solve_triangular(low, eye, upper=False).flip(1, 2)

    return by_experts(factor, hessian)


def feedback(w: torch.Tensor, u: torch.Tensor, quantize) -> torch.Tensor:
    """GPTQ over the last dimension of w [E, rows, n] with u [E, n, n]; quantize(i, column [E, rows]) rounds
    coordinate i. Returns the rounded w."""
    w = w.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # coordinate-major, as every update below
    out = torch.empty_like(w)
    n = w.shape[1]
    for start in range(0, n, BLOCK):
        end = min(start + BLOCK, n)
        err = torch.empty(w.shape[0], end - start, w.shape[2], device=w.device)
        for i0 in range(start, end, SUB):
            i1 = min(i0 + SUB, end)
            ui = u[:, i0:i1, i0:i1]  # coordinate i's error d = (w_i - q_i) / U_ii moves w_j by -d U_ij
            coef, divisor, e = -ui.transpose(1, 2), ui.diagonal(dim1=1, dim2=2), err[:, i0 - start : i1 - start]
            sub_block(quantize, i0, w[:, i0:i1], None, coef, divisor, out[:, i0:i1], e)
            w[:, i1:end].baddbmm_(u[:, i0:i1, i1:end].transpose(1, 2), err[:, i0 - start : i1 - start], alpha=-1)
        w[:, end:].baddbmm_(u[:, start:end, end:].transpose(1, 2), err, alpha=-1)
    return out.transpose(1, 2)
