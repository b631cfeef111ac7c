"""Which basis and shared rank a run stores: of the candidates (--basis-dtype, --rank), the one whose allocation has
the least estimated loss by the LP bound, counting the rows past the rank (their whole energy) and the rounding of
the basis itself. A basis's bits come out of the same budget, so a shared basis that costs more than it saves
(few, narrow experts: E * I not much larger than H) loses to the identity here."""

import torch

from bitsmoe_vllm.format import PROJECTIONS

from .allocate import lp_bound
from .plan import Plan


def unit_costs_of(plan: Plan) -> torch.Tensor:
    """[U, J] bits of every unit of every layer, projection and expert, per width; a view when every unit of an
    expert costs the same (the identity basis's 37.7M units of Qwen3-30B-A3B would be 2 GB)."""
    n = len(plan.moe_layers) * len(PROJECTIONS) * plan.num_experts
    return plan.unit_cost[None].expand(n, *plan.unit_cost.shape).reshape(-1, plan.unit_cost.shape[1])


def masked(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """t[mask], without a copy when every unit is kept."""
    return t if bool(mask.all()) else t[mask]


def kept_units(plan: Plan, rank: int) -> torch.Tensor:
    """[U] bool: the units (of plan's rank) whose rows lie below `rank`."""
    per_expert = len(plan.unit_cost)
    first_row = (
        torch.arange(per_expert * len(plan.moe_layers) * len(PROJECTIONS) * plan.num_experts)
        % per_expert
        * plan.unit_rows
    )
    return first_row < rank


def dropped_loss(costs: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """[U]: the whole loss of each unit, what it costs past the rank (width 0, the first of plan.widths whenever rows
    are dropped). Rounded to nearest: rows past the rank are not in the basis the error feedback works in."""
    return costs.get(f"nearest-{kind}", costs[f"loss-{kind}"])[:, 0]


def estimated_loss(
    plan: Plan, losses: torch.Tensor, dropped: torch.Tensor, basis_loss: torch.Tensor | None, rank: int
) -> float:
    """The least loss an allocation at `rank` can have: the LP bound over the kept units, plus the energy of the
    dropped rows and the basis's rounding loss over the kept ones."""
    units = kept_units(plan, rank)
    bound = lp_bound(
        masked(losses, units).numpy(), masked(unit_costs_of(plan), units).numpy(), plan.with_rank(rank).budget_bits
    )
    rounding = float(basis_loss[units].sum()) if basis_loss is not None else 0.0
    return bound + float(dropped[~units].sum()) + rounding


def choose(plan: Plan, costs: dict[str, torch.Tensor]) -> tuple[Plan, dict]:
    """The plan at the chosen basis (full rank: its units are those of the costs) and what the choice saw:
    {"basis", "rank", "estimated_loss": {basis: least over its ranks}, "rank_estimates": {rank: loss} of the chosen}."""
    best, estimates, compared = {}, {}, {}
    for basis in plan.basis_candidates():
        candidate = plan.with_basis(basis)
        kind = candidate.factor_kind
        losses, dropped, basis_loss = costs[f"loss-{kind}"], dropped_loss(costs, kind), costs.get(f"basis_loss-{basis}")
        by_rank = {
            rank: estimated_loss(candidate, losses, dropped, basis_loss, rank) for rank in candidate.rank_candidates()
        }
        best[basis] = min(by_rank, key=lambda r: (by_rank[r], r))
        estimates[basis] = by_rank
        # The bases are compared rounded to nearest: the error feedback's share (offline.gptq.compensation) bounds
        # what it saves far more loosely for the identity's correlated channels than for a shared basis's rows (on
        # the trained MoE at 2.5 bits it rated the identity 1.6x below int8; measured, its error was 2x above).
        nearest = costs.get(f"nearest-{kind}")
        compared[basis] = (
            by_rank[best[basis]]
            if nearest is None
            else estimated_loss(candidate, nearest, dropped, basis_loss, best[basis])
        )
    basis = min(best, key=lambda b: compared[b])
    info = {
        "basis": basis,
        "rank": best[basis],
        "estimated_loss": {b: estimates[b][best[b]] for b in best},
        "estimated_loss_nearest": compared,
        "rank_estimates": {str(r): v for r, v in estimates[basis].items()},
    }
    return plan.with_basis(basis), info
