"""What one MoE layer's calibration yields for the allocation: the unit losses of its factors for every kind of
basis the run may choose (a basis per projection, one per layer, identity), and for each shared basis dtype the
estimated loss of rounding the basis itself, all relative to the residual energy after the layer (offline.cost has the
model behind them)."""

import torch

from bitsmoe_vllm.format import PROJECTIONS
from bitsmoe_vllm.reference import Basis, dequantize_basis

from . import gptq
from .calibrate import ByExpert, Routed
from .cost import importance, unit_losses
from .decompose import gram, project, top_eigenvectors
from .plan import BASIS_DTYPES, Plan, factor_kind
from .rounding import quantize_basis


def residual_energy(hidden: torch.Tensor) -> float:
    """Median squared norm per token of the residual stream after a layer [S, L, H]. The next layers read the
    residual through RMS norms, so an output error matters relative to it: dividing each layer's losses by it
    makes them comparable across layers for the global budget (the median ignores attention-sink tokens)."""
    return float(hidden.float().pow(2).sum(-1).median())


def shared_bases(plan: Plan, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's shared bases, computed once for the costs and the export, at the rank the costs measure (--rank,
    else full): "{p}" [R, H] and "energy-{p}" [R] per projection where a basis per projection is a candidate, and
    "layer" and "energy-layer" (offline.decompose) where one per layer is; empty when only the identity is."""
    kinds = set(plan.candidates_by_kind())
    if kinds == {"identity"}:
        return {}
    rank = plan.with_basis("int8").rank
    grams, out = {p: gram(weights[p]) for p in PROJECTIONS}, {}
    if "shared" in kinds:
        for p in PROJECTIONS:
            out[p], out[f"energy-{p}"] = top_eigenvectors(grams[p], rank)
    if "layer" in kinds:
        out["layer"], out["energy-layer"] = top_eigenvectors(sum(grams.values()), rank)
    return out


def basis_key(kind: str, projection: str) -> str:
    """The key of shared_bases that holds a projection's basis for a shared kind of factors (Plan.factor_kind)."""
    return "layer" if kind == "layer" else projection


def kind_bases(kind: str, layer_bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Each projection's basis [R, H] (None: the identity) for a kind of factors (Plan.factor_kind)."""
    return {p: None if kind == "identity" else layer_bases[basis_key(kind, p)] for p in PROJECTIONS}


def layer_costs(
    plan: Plan, weights: dict[str, torch.Tensor], routed: Routed, n_tokens: int, layer_bases: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The costs of each factor kind of plan.basis_candidates(): "loss-{kind}" [3 * E * units, J] (with --rounding
    gptq, times the share of each coordinate's loss the error feedback leaves, offline.gptq.compensation, and the
    loss rounded to nearest as "nearest-{kind}"), and for each shared basis among them "basis_loss-{basis}"
    [3 * E * units]; `layer_bases`: shared_bases. One projection's factors, importance and Hessians of a batch of
    experts (offline.gptq.expert_batches) in memory at a time: a whole layer's are GBs."""
    out = {}
    routed = ByExpert(routed, weights)  # what every pass below reads, computed once
    for kind, of_kind in sorted(plan.candidates_by_kind().items()):
        shared = [] if kind == "identity" else list(of_kind)
        p_plan = plan.with_basis(of_kind[0])
        bases = kind_bases(kind, layer_bases)
        losses = {"loss": [], "nearest": [], **{b: [] for b in shared}}
        widths, rows = list(plan.widths), p_plan.unit_rows
        for p in PROJECTIONS:
            ratios = {basis: rounding_ratio(bases[p], basis, p, routed).double() for basis in shared}  # [R]
            for b in gptq.expert_batches(weights, bases, p):
                # once, for the kernels below
                factors = project(weights[p][b.start : b.stop], bases[p]).float().contiguous()
                w = importance(routed, weights, bases, n_tokens, (p,), b, plan.activation)[p]
                if plan.options.rounding == "gptq":  # the rounding at every width done once for both importances
                    share = gptq.compensation(p, gptq.hessians(routed, weights, bases, (p,), b, act=plan.activation)[p])
                    both = torch.stack([w * (share[:, None, :] if p == "down" else share[:, :, None]), w])
                    loss, nearest = unit_losses(
                        factors, both, widths, rows, plan.group_size, plan.options.scale_steps, plan.odd_codes
                    )
                    losses["nearest"].append(nearest)
                else:
                    loss = unit_losses(
                        factors, w, widths, rows, plan.group_size, plan.options.scale_steps, plan.odd_codes
                    )
                losses["loss"].append(loss)
                if shared:
                    dropped = unit_losses(factors, w, [0], 1, plan.group_size)[..., 0]  # [E, R]: each row's whole loss
                    for basis, ratio in ratios.items():
                        losses[basis].append((dropped * ratio).reshape(len(factors), -1, rows).sum(-1))  # [E, units]
                del factors, w
        out[f"loss-{kind}"] = torch.cat([loss.reshape(-1, len(plan.widths)).cpu() for loss in losses.pop("loss")])
        if nearest := losses.pop("nearest"):
            out[f"nearest-{kind}"] = torch.cat([loss.reshape(-1, len(plan.widths)).cpu() for loss in nearest])
        out |= {f"basis_loss-{b}": torch.cat([loss.flatten().cpu() for loss in v]) for b, v in losses.items()}
    return out


def rounding_ratio(basis: torch.Tensor, name: str, projection: str, routed: ByExpert) -> torch.Tensor:
    """[R]: the output error of storing `basis` [R, H] as BASIS_DTYPES[name], per row, relative to the row's whole
    contribution (what dropping it costs). The gate and up bases act on the inputs: E[(e_k x)^2] / E[(v_k x)^2] over
    the calibration inputs x [N, H] (routed's, and its v x); the down basis writes the output: |e_k|^2 (its columns
    have unit norm)."""
    # as offline.encode stores it: down's own basis transposed, a layer's one basis [R, H] with a scale per row
    dtype, own = BASIS_DTYPES[name], projection == "down" and factor_kind(name) != "layer"
    stored = basis.T if own else basis
    rounded = dequantize_basis(Basis(*quantize_basis(stored, dtype)))
    error = (rounded.T if own else rounded) - basis  # [R, H]
    if projection == "down":
        return error.pow(2).sum(1)
    return (routed.x @ error.T).pow(2).mean(0) / routed.z(basis).pow(2).mean(0).clamp_min(1e-30)
