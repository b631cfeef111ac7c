"""The cost model: for each unit (expert, projection, group of rank rows) and candidate width, the
estimated increase of the MoE layer's squared output error per calibration token, measured by really
rounding the rows; and the bits the unit stores.

Error of factor entry (k, i) of expert e, to first order, with w the routing weight, D_e the down
projection, h_g, h_u the gate and up pre-activations (biases included) and a = act(h_g, h_u) (a = silu(h_g) h_u
for most families; bitsmoe_vllm.activation):

    gate:  delta^2 * E[w^2 z_g,k^2 (da/dh_g,i)^2] * |D_e[:, i]|^2
    up:    delta^2 * E[w^2 z_u,k^2 (da/dh_u,i)^2] * |D_e[:, i]|^2
    down:  delta^2 * E[w^2 a_i^2]                          (the down basis is orthonormal)

(expectations over all calibration tokens, 0 where e is not selected; cross terms dropped). These
weights are the "importance" [E, R, I] (down: [E, 1, I], the same for every rank row); a row's loss at
width b is sum_i (Q_b(f) - f)_i^2 times them, and at width 0 the row's full weighted energy.
offline.quantize divides a layer's losses by the median squared norm of the residual stream after it,
so that losses of different layers are comparable. With error feedback (offline.gptq) offline.layer_cost
multiplies the importance by the share of each coordinate's loss that the feedback leaves
(offline.gptq.compensation).
"""

import torch
import torch.nn.functional as F

from bitsmoe_vllm import ops
from bitsmoe_vllm.activation import SILU, Activation
from bitsmoe_vllm.format import PROJECTIONS, factor_row_bits

from .calibrate import ByExpert, Routed, by_expert, pre_activations
from .rounding import REFINE_STEPS, quantize_rows
from .threads import factor_threads

CHUNK_ENTRIES = 1 << 20  # factor entries rounded at once: bounds the cost model's temporaries
PRIOR_TOKENS = 16  # an expert with fewer calibration tokens gets a prior from the layer's tokens (importance)
PRIOR_SAMPLE = 4096  # layer tokens the prior is computed from


def importance(
    routed: Routed | ByExpert,
    weights: dict[str, torch.Tensor],
    bases: dict[str, torch.Tensor | None],
    n_tokens: int,
    projections: tuple[str, ...] = PROJECTIONS,
    experts: range | None = None,
    act: Activation = SILU,
) -> dict[str, torch.Tensor]:
    """weights[p] [E, I, H] (down as D_e^T), the gate and up bases [R, H] (None: identity) -> importance per
    projection of `projections`: gate and up [E, R, I], down [E, 1, I]; of the experts `experts` only (their count
    in place of E), else of all.

    An expert that received fewer than PRIOR_TOKENS calibration tokens also gets, in proportion to the shortfall,
    a prior: its own weights applied to the layer's tokens, as if it received its balanced share (N K / E) of them
    with the layer's mean squared routing weight. Without it an expert no calibration token reached would cost
    nothing at any width, and get 0 bits. routed: a ByExpert shares its work with other calls on the layer."""
    E, I, _ = weights["gate"].shape
    experts = experts or range(E)
    device = weights["gate"].device
    routed = by_expert(routed, weights)
    x, ids, w = routed.x, routed.ids, routed.routing
    z = {p: routed.z(bases[p]) for p in ("gate", "up") if p in projections}  # [N, R]
    out = {p: torch.zeros(len(experts), z[p].shape[1], I, device=device) for p in z}
    if "down" in projections:
        out["down"] = torch.zeros(len(experts), 1, I, device=device)
    for e in routed.experts:
        if e not in experts:
            continue
        token, slot = routed.tokens(e)
        ze = {q: z[q][token] for q in z}
        stats = expert_statistics(weights, e, x[token], ze, w[token, slot] ** 2, tuple(out), act, routed.pre(e))
        for p, v in stats.items():
            out[p][e - experts.start] += v
    counts = torch.bincount(ids.flatten(), minlength=E)
    sample = slice(0, PRIOR_SAMPLE)
    with factor_threads():
        mean_w2 = float((w**2).mean())
    for e in (counts < PRIOR_TOKENS).nonzero().flatten().tolist():
        if e not in experts:
            continue
        w2 = torch.full((len(x[sample]),), mean_w2, device=device)
        share = (1 - int(counts[e]) / PRIOR_TOKENS) * len(x) * ids.shape[1] / E / len(x[sample])
        ze = {q: z[q][sample] for q in z}
        for p, v in expert_statistics(weights, e, x[sample], ze, w2, tuple(out), act).items():
            out[p][e - experts.start] += share * v
    return {p: o / n_tokens for p, o in out.items()}


def expert_statistics(
    weights: dict[str, torch.Tensor],
    e: int,
    xe: torch.Tensor,
    ze: dict[str, torch.Tensor],
    w2: torch.Tensor,
    projections: tuple[str, ...] = PROJECTIONS,
    act: Activation = SILU,
    pre: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Expert e's summed importance of `projections` over tokens xe [n, H] (their z [n, R] of the gate and up among
    them) with squared routing weights w2 [n]; pre: their pre_activations, when already computed."""
    h_g, h_u = pre_activations(weights, e, xe) if pre is None else pre  # [n, I]
    column = (weights["down"][e].float() ** 2).sum(1)  # |D_e[:, i]|^2
    sensitivity = dict(zip(("gate", "up"), act.derivatives(h_g, h_u)))  # [n, I] each
    out = {p: ((w2[:, None] * ze[p] ** 2).T @ s**2) * column for p, s in sensitivity.items() if p in projections}
    if "down" in projections:
        # SiLU's a as h_g sigmoid(h_g) h_u, the same float32 operations as before activations were pluggable, so
        # that the costs, and the checkpoints, stay the same bit for bit
        a = sensitivity["up"] * h_u if act.name == "silu" else act(h_g, h_u)
        out["down"] = (w2[:, None] * a**2).sum(0)[None]
    return out


def unit_losses(
    factors: torch.Tensor,
    weight: torch.Tensor,
    widths: list[int],
    unit_rows: int,
    group_size: int,
    scale_steps: int = REFINE_STEPS,
    odd: bool = True,
) -> torch.Tensor:
    """factors [E, R, I], importance [E, R or 1, I] -> loss [E, units, J] float64 for widths[j]; several importances
    [V, E, R or 1, I] (the rounding done once for all) -> [V, E, units, J]."""
    E, R, I = factors.shape
    units, lead = -(-R // unit_rows), weight.shape[:-3]
    if factors.device.type == "cpu" and ops.CPU_KERNEL:  # the same rounding in one pass, csrc/cpu/rounding_losses.cpp
        weights = weight.reshape(-1, *weight.shape[-3:]).float()
        row_loss = torch.ops.bitsmoe.rounding_losses(factors.float(), weights, widths, group_size, scale_steps, odd)
    else:
        row_loss = row_losses(factors, weight, widths, group_size, scale_steps, odd)
    row_loss = F.pad(row_loss.reshape(*lead, E, R, len(widths)), (0, 0, 0, units * unit_rows - R))
    return row_loss.reshape(*lead, E, units, unit_rows, len(widths)).sum(-2)


def row_losses(
    factors: torch.Tensor, weight: torch.Tensor, widths: list[int], group_size: int, scale_steps: int, odd: bool
) -> torch.Tensor:
    """[..., E, R, J] float64: each factor row's loss at widths[j], rounded by offline.rounding.quantize_rows (the
    reference of the CPU kernel torch.ops.bitsmoe.rounding_losses)."""
    E, R, I = factors.shape
    row_loss = torch.zeros(*weight.shape[:-3], E, R, len(widths), dtype=torch.float64, device=factors.device)
    chunk = max(1, CHUNK_ENTRIES // (R * I))
    for s in range(0, E, chunk):
        f = factors[s : s + chunk]  # [chunk, R, I]
        a = weight[..., s : s + chunk, :, :]
        for j, b in enumerate(widths):
            if b == 0:
                err = f**2
            else:
                codes, scales = quantize_rows(f.reshape(-1, I), b, group_size, scale_steps, odd)
                dequant = codes.float() * scales.float().repeat_interleave(group_size, dim=1)
                err = (dequant.reshape(f.shape) - f) ** 2
            row_loss[..., s : s + chunk, :, j] = (err * a).sum(-1).double()
    return row_loss


def unit_costs(rank: int, intermediate_size: int, widths: list[int], unit_rows: int, group_size: int) -> torch.Tensor:
    """[units, J] bits one expert's unit stores at widths[j]: codes and scales (FORMAT.md section 6)."""
    rows = torch.tensor([min(unit_rows, rank - start) for start in range(0, rank, unit_rows)], dtype=torch.float64)
    per_row = torch.tensor([factor_row_bits(b, intermediate_size, group_size) for b in widths], dtype=torch.float64)
    return rows[:, None] * per_row[None, :]
