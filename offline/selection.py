"""Which basis and shared rank a run stores: of the candidates (--basis-dtype, --rank), the one whose allocation has
the least estimated loss by the LP bound (see pick), counting the rows past the rank (their whole energy) and the
rounding of the basis itself. A basis's bits come out of the same budget, so a shared basis that costs more than it
saves (few, narrow experts: E * I not much larger than H) loses to the identity here."""

import torch

from bitsmoe_vllm.format import PROJECTIONS

from .allocate import Steps, bound_of, hull_steps
from .cost_files import CostFiles
from .plan import Plan, factor_kind


def unit_costs_of(plan: Plan) -> torch.Tensor:
    """[U, J] bits of every unit of every layer, projection and expert, per width; a view when every unit costs the
    same (the identity basis's 37.7M units of Qwen3-30B-A3B would be 2.1 GB)."""
    n = len(plan.moe_layers) * len(PROJECTIONS) * plan.num_experts
    per_expert = plan.unit_cost
    if bool((per_expert == per_expert[:1]).all()):
        return per_expert[:1].expand(n * len(per_expert), per_expert.shape[1])
    return per_expert[None].expand(n, *per_expert.shape).reshape(-1, per_expert.shape[1])


def masked(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """t[mask], without a copy when every unit is kept."""
    return t if bool(mask.all()) else t[mask]


def kept_units(plan: Plan, rank: int) -> torch.Tensor:
    """[U] bool: the units (of plan's rank) whose rows lie below `rank`."""
    per_expert = torch.arange(len(plan.unit_cost)) * plan.unit_rows < rank
    return per_expert.repeat(len(plan.moe_layers) * len(PROJECTIONS) * plan.num_experts)


def dropped_loss(costs: CostFiles, kind: str) -> torch.Tensor:
    """[U]: the whole loss of each unit, what it costs past the rank (width 0, the first of plan.widths whenever rows
    are dropped). Rounded to nearest: rows past the rank are not in the basis the error feedback works in."""
    return costs.column(f"nearest-{kind}" if f"nearest-{kind}" in costs else f"loss-{kind}", 0)


def fixed_loss(plan: Plan, dropped: torch.Tensor, basis_loss: torch.Tensor | None, rank: int) -> tuple[float, float]:
    """What an allocation at `rank` loses whatever it chooses: the energy of the dropped rows, and the basis's rounding
    loss over the kept ones."""
    units = kept_units(plan, rank)
    return float(dropped[~units].sum()), float(basis_loss[units].sum()) if basis_loss is not None else 0.0


def estimated_loss(plan: Plan, steps: Steps, fixed: tuple[float, float], rank: int) -> float:
    """The least loss an allocation at `rank` can have: the LP bound over the kept units (steps: the hulls of every
    unit at full rank), plus its fixed loss."""
    return (
        bound_of(steps.subset(kept_units(plan, rank).numpy()), plan.with_rank(rank).budget_bits) + fixed[0] + fixed[1]
    )


def choose(plan: Plan, costs: CostFiles) -> tuple[Plan, dict]:
    """The plan at the chosen basis (full rank: its units are those of the costs) and what the choice saw:
    {"basis", "rank", "estimated_loss": {basis: least over its ranks}, "rank_estimates": {rank: loss} of the chosen}.
    The bases that share a kind of costs (the shared int8 and fp16 bases) share its units' hulls, which serve every
    rank; one kind of costs is held at a time."""
    candidates = plan.basis_candidates()
    by_kind = {kind: [plan.with_basis(b) for b in bases] for kind, bases in plan.candidates_by_kind().items()}
    best, estimates, compared = {}, {}, {}
    for kind, bases in by_kind.items():
        fixed, dropped = {}, dropped_loss(costs, kind)
        for candidate in bases:
            name = f"basis_loss-{candidate.basis}"
            basis_loss = costs[name] if name in costs else None
            fixed[candidate.basis] = {
                r: fixed_loss(candidate, dropped, basis_loss, r) for r in candidate.rank_candidates()
            }
        del dropped
        steps = hulls(costs, f"loss-{kind}", bases)
        for candidate in bases:
            by_rank = {r: estimated_loss(candidate, steps, f, r) for r, f in fixed[candidate.basis].items()}
            best[candidate.basis] = min(by_rank, key=lambda r: (by_rank[r], r))
            estimates[candidate.basis] = by_rank
        del steps
        # The kinds are compared rounded to nearest (pick): the error feedback's share (offline.gptq.compensation)
        # bounds what it saves far more loosely for the identity's correlated channels than for a shared basis's rows
        # (on the trained MoE at 2.5 bits it rated the identity 1.6x below int8; measured, its error was 2x above).
        steps = hulls(costs, f"nearest-{kind}", bases) if f"nearest-{kind}" in costs else None
        for candidate in bases:
            b, rank = candidate.basis, best[candidate.basis]
            compared[b] = (
                estimates[b][rank] if steps is None else estimated_loss(candidate, steps, fixed[b][rank], rank)
            )
        del steps
    feedback = {b: estimates[b][best[b]] for b in candidates}
    basis = pick([[c.basis for c in bases] for bases in by_kind.values()], feedback, compared)
    info = {
        "basis": basis,
        "rank": best[basis],
        "estimated_loss": feedback,
        "estimated_loss_nearest": {b: compared[b] for b in candidates},
        "rank_estimates": {str(r): v for r, v in estimates[basis].items()},
    }
    return plan.with_basis(basis), info


def screen(plan: Plan, first: CostFiles) -> dict:
    """Which kind of factors the MoE layers after the first are costed for: that of the basis choose() picks on the
    first layer's costs alone (`first`), at that layer's share of the budget. The shared kinds' costs are most of the
    cost stage (two thirds of it on Qwen3-30B-A3B's shape, where the identity wins), and on the trained MoE every
    layer alone picks the kind that all six pick (benchmarks/README.md)."""
    _, info = choose(plan.for_layers(plan.moe_layers[:1]), first)
    return {"layer": plan.moe_layers[0], "kind": factor_kind(info["basis"])} | info


def pick(kinds: list[list[str]], feedback: dict[str, float], nearest: dict[str, float]) -> str:
    """The basis to store, from each kind's bases (those sharing a kind of factor costs) and their estimates. Within a
    kind the bases differ only in the bits and rounding of the basis, and the error feedback's estimate, the closer to
    what export measures, picks one (on the trained MoE at 4 bits it rates the fp16 basis per layer 1.3x below the
    int8 one, measured 2.3-4.4x in KL; rounded to nearest, 0.9x). Across kinds the estimates rounded to nearest decide
    (see choose). Ties go to the earlier basis."""
    winners = [min(bases, key=lambda b: feedback[b]) for bases in kinds]
    return min(winners, key=lambda b: nearest[b])


def hulls(costs: CostFiles, name: str, bases: list[Plan]) -> Steps:
    """The hull steps of every unit of the costs `name`, at full rank, for bases whose units cost the same."""
    unit_cost = bases[0].unit_cost
    if any(not torch.equal(b.unit_cost, unit_cost) for b in bases):
        raise ValueError(f"bases {[b.basis for b in bases]} share the costs {name} but not their units' bits")
    return hull_steps(costs[name].numpy(), unit_costs_of(bases[0]).numpy())
