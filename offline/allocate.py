"""Bit allocation: one multiple-choice knapsack over every unit of every layer, solved with HiGHS.

Unit u (a group of rank rows of one expert's factor) takes exactly one option j (a candidate width),
which stores cost[u, j] bits and adds loss[u, j] to the estimated output error. Minimise the total
loss with the total cost within the budget.

How: (1) drop dominated options (no cheaper, and no lower loss, than another option of the unit);
(2) solve the LP relaxation exactly with the greedy over each unit's lower convex hull (the
multiple-choice knapsack LP); (3) give HiGHS the MIP over the "core": the units whose hull steps lie
nearest the LP's price of a bit, every other unit fixed at its LP choice, warm-started with the LP
solution rounded down. The gap is measured against the LP bound of the whole problem, so it is a
true optimality gap. Small problems are all core, and HiGHS solves them exactly.
"""

import time
from dataclasses import dataclass
from typing import NamedTuple

import highspy
import numpy as np
from highspy._core import _Highs

CORE_STEPS = 4000  # hull steps on each side of the LP threshold whose units form the core
# units whose [U, J] temporaries are built at once: Qwen3-30B-A3B with the identity basis has 37.7M units (one per
# rank row), whose [U, J] float64 arrays are 2 GB each; unchunked, its allocation ran out of this VM's 24 GB
CHUNK_UNITS = 1 << 20
SAMPLE = 1 << 20  # hull steps sampled to find the LP's threshold without sorting every step (around_threshold)


@dataclass(frozen=True)
class Allocation:
    choice: np.ndarray  # [U] chosen option per unit
    loss: float  # total loss of the choice
    cost: float  # total cost of the choice
    lp_bound: float  # LP relaxation optimum: no allocation has less loss
    gap: float  # (loss - lp_bound) / loss
    core_units: int  # units HiGHS decided; the rest kept their LP choice
    mip_status: str
    seconds: float


def feasible_range(cost: np.ndarray) -> tuple[float, float]:
    """Cheapest and dearest total cost: every unit at its cheapest option, every unit at its dearest."""
    return float(cost.min(1).sum()), float(cost.max(1).sum())


def allocate(
    loss: np.ndarray, cost: np.ndarray, budget: float, *, core_steps: int = CORE_STEPS, time_limit: float = 300.0
) -> Allocation:
    """loss, cost [U, J] float -> the allocation of least loss with sum of cost <= budget. cost may be a broadcast
    view (np.broadcast_to): units of one size share one row of costs."""
    start = time.perf_counter()
    loss, cost = np.asarray(loss, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    low, high = feasible_range(cost)
    if not low <= budget + 1e-9 * max(1.0, abs(low)):
        raise ValueError(
            f"budget {budget:.6g} is below the cheapest allocation {low:.6g}; feasible range [{low:.6g}, {high:.6g}]"
        )
    keep = undominated(loss, cost)
    lp = lp_relaxation(loss, cost, keep, budget, core_steps)
    core = core_units(lp.near, core_steps, len(loss))
    choice, status = solve_core(loss, cost, keep, budget, lp.choice, core, time_limit)
    units = np.arange(len(loss))
    total_loss, total_cost = float(loss[units, choice].sum()), float(cost[units, choice].sum())
    gap = (total_loss - lp.bound) / total_loss if total_loss > 0 else 0.0
    return Allocation(
        choice, total_loss, total_cost, lp.bound, max(gap, 0.0), int(core.sum()), status, time.perf_counter() - start
    )


def allocate_in_parts(loss: np.ndarray, cost: np.ndarray, budget: float, parts: int) -> Allocation:
    """`parts` equal consecutive slices of the units, each with budget / parts (one knapsack each), as one
    allocation; its gap is against the sum of the slices' LP bounds."""
    if parts == 1:
        return allocate(loss, cost, budget)
    runs = [allocate(l, c, budget / parts) for l, c in zip(np.split(loss, parts), np.split(cost, parts))]
    total, bound = sum(a.loss for a in runs), sum(a.lp_bound for a in runs)
    return Allocation(
        np.concatenate([a.choice for a in runs]),
        total,
        sum(a.cost for a in runs),
        bound,
        max((total - bound) / total, 0.0) if total > 0 else 0.0,
        sum(a.core_units for a in runs),
        ",".join(sorted({a.mip_status for a in runs})),
        sum(a.seconds for a in runs),
    )


def lp_bound(loss: np.ndarray, cost: np.ndarray, budget: float) -> float:
    """The LP relaxation's optimum: no allocation within the budget has less loss (inf when none fits)."""
    loss, cost = np.asarray(loss, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    if feasible_range(cost)[0] > budget + 1e-9 * max(1.0, abs(budget)):
        return float("inf")
    return lp_relaxation(loss, cost, undominated(loss, cost), budget, 0).bound


def undominated(loss: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """[U, J] bool: options not dominated by another option of the same unit (ties keep the first)."""
    U, J = loss.shape
    keep = np.ones((U, J), dtype=bool)
    for s in range(0, U, CHUNK_UNITS):
        l, c, k = loss[s : s + CHUNK_UNITS], cost[s : s + CHUNK_UNITS], keep[s : s + CHUNK_UNITS]
        for j in range(J):
            other_cheaper_or_equal = (c <= c[:, j : j + 1]) & (l <= l[:, j : j + 1])
            strictly_better = (c < c[:, j : j + 1]) | (l < l[:, j : j + 1])
            tie_first = (c == c[:, j : j + 1]) & (l == l[:, j : j + 1]) & (np.arange(J) < j)
            k[:, j] = ~((other_cheaper_or_equal & (strictly_better | tie_first)).any(1))
    return keep


class Steps(NamedTuple):
    """Every unit's convex-hull steps, units in order and each unit's steps in order: unit u's steps are start[u] to
    start[u + 1] - 1; step i moves its unit to option to[i], saving eff[i] loss per bit over dc[i] bits."""

    start: np.ndarray  # [U + 1]
    eff: np.ndarray
    dc: np.ndarray
    to: np.ndarray

    def unit_of(self, i: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.start, i, side="right") - 1


class LP(NamedTuple):
    choice: np.ndarray  # [U] the LP solution with its fractional step rounded down
    bound: float  # the LP optimum
    near: np.ndarray  # units of the hull steps within core_steps positions of the first step that does not fit


def hull_steps(loss: np.ndarray, cost: np.ndarray, keep: np.ndarray, base: np.ndarray) -> Steps:
    """The hull steps of every unit from its cheapest undominated option base [U], a chunk of units at a time, each
    step in 17 bytes (a big model has ~10^8; each unit's place is in start, 8 bytes a unit)."""
    counts, parts = [], []
    for s in range(0, len(loss), CHUNK_UNITS):
        e = s + CHUNK_UNITS
        count, *fields = _hull_steps(loss[s:e], cost[s:e], keep[s:e], base[s:e])
        counts.append(count)
        parts.append([a.astype(t, copy=False) for a, t in zip(fields, (np.float64, np.float64, np.int8))])
    fields = []
    for f in range(3):  # a field at a time, the chunks' copies dropped as it is built
        fields.append(np.concatenate([p[f] for p in parts]))
        for p in parts:
            p[f] = None
    return Steps(np.r_[0, np.cumsum(np.concatenate(counts))], *fields)


def _hull_steps(loss, cost, keep, base) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[U] steps per unit, then eff, dc, to of the steps, units in order and each unit's steps in order."""
    U = len(loss)
    units = np.arange(U)
    big = np.inf
    current = base
    unit_list, eff_list, dc_list, to_list = [], [], [], []
    for _ in range(loss.shape[1]):  # at most J - 1 hull steps per unit; each round appends every unit's next step
        dc = np.where(keep, cost - cost[units, current][:, None], big)
        dl = loss[units, current][:, None] - loss  # loss saved
        eff = np.where((dc > 0) & (dc < big) & (dl > 0), dl / np.where(dc > 0, dc, 1), -1.0)
        nxt = eff.argmax(1)
        best = eff[units, nxt]
        # among equally efficient options take the farthest, so hull steps stay strictly less efficient
        far = np.where(eff == best[:, None], cost, -big).argmax(1)
        moving = np.flatnonzero(best > 0)
        if not len(moving):
            break
        target = far[moving]
        unit_list.append(moving)
        eff_list.append(best[moving])
        dc_list.append(cost[moving, target] - cost[moving, current[moving]])
        to_list.append(target)
        current = current.copy()
        current[moving] = target
    if not unit_list:
        return np.zeros(U, dtype=np.int64), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int8)
    unit = np.concatenate(unit_list)
    by_unit = np.argsort(unit, kind="stable")  # the rounds' order kept: each unit's steps in order
    return (np.bincount(unit, minlength=U), *(np.concatenate(a)[by_unit] for a in (eff_list, dc_list, to_list)))


def cheapest(cost: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """[U]: each unit's cheapest undominated option."""
    return np.concatenate(
        [
            np.where(keep[s : s + CHUNK_UNITS], cost[s : s + CHUNK_UNITS], np.inf).argmin(1)
            for s in range(0, len(cost), CHUNK_UNITS)
        ]
    )


class Band(NamedTuple):
    """The hull steps around the LP's threshold in efficiency order: `before` steps, of total cost `spent`, come
    first (every step more efficient than `above`), then `ranked` (indices into the steps), of which the first
    `fit` fit the budget after them."""

    before: int
    spent: float
    above: float
    ranked: np.ndarray
    fit: int


def around_threshold(eff: np.ndarray, dc: np.ndarray, limit: float, core_steps: int) -> Band:
    """The steps in order of efficiency (descending; ties in unit and step order) around the first whose cumulative
    cost exceeds `limit`, with core_steps positions on either side of it (or to the ends). Sorting every step costs
    two index arrays as large as the steps (Qwen3-30B-A3B's identity basis: 3.6 GB); past 4 SAMPLE steps only those
    between two efficiencies read off a sample are sorted, after one pass that sums the steps above them."""
    if len(eff) <= 4 * SAMPLE:
        ranked = np.argsort(-eff, kind="stable")
        return Band(0, 0.0, np.inf, ranked, _fit(0.0, dc[ranked], limit))
    stride = len(eff) // SAMPLE
    order = np.argsort(-eff[::stride], kind="stable")
    sample, estimate = eff[::stride][order], np.cumsum(dc[::stride][order]) * stride
    at = int(np.searchsorted(estimate, limit, side="right"))
    margin = core_steps // stride + 64  # in sampled steps
    while True:
        above = sample[at - margin] if at - margin >= 0 else np.inf
        below = sample[at + margin] if at + margin < len(sample) else -np.inf
        before, spent, band = 0, 0.0, []
        for s in range(0, len(eff), CHUNK_UNITS):
            e = eff[s : s + CHUNK_UNITS]
            higher = e > above
            before, spent = before + int(higher.sum()), spent + float(dc[s : s + CHUNK_UNITS][higher].sum())
            band.append(np.flatnonzero(~higher & (e > below)) + s)
        band = np.concatenate(band)
        ranked = band[np.argsort(-eff[band], kind="stable")]
        j = _fit(spent, dc[ranked], limit)
        if spent <= limit and (before == 0 or j >= core_steps) and (below == -np.inf or len(ranked) - j > core_steps):
            return Band(before, spent, above, ranked, j)
        margin *= 4


def _fit(spent: float, dc: np.ndarray, limit: float) -> int:
    """How many of the steps of costs dc [n] (> 0) fit within limit after spent."""
    return int(np.searchsorted(spent + np.cumsum(dc), limit, side="right"))


def lp_relaxation(loss, cost, keep, budget, core_steps: int) -> LP:
    """The exact LP optimum by the greedy over convex-hull steps, taken in order of efficiency (descending; ties by
    unit, then step) while they fit."""
    units = np.arange(len(loss))
    base = cheapest(cost, keep)
    steps = hull_steps(loss, cost, keep, base)
    room = budget - cost[units, base].sum()
    limit = room + 1e-9 * max(1.0, abs(budget))
    band = around_threshold(steps.eff, steps.dc, limit, core_steps)
    ranked, j = band.ranked, band.fit
    taken = steps.eff > band.above
    taken[ranked[:j]] = True
    counts = taken_per_unit(taken, steps.start)  # each unit's steps taken are the first of its steps
    del taken
    moved = np.flatnonzero(counts)
    choice = base.copy()
    choice[moved] = steps.to[steps.start[moved] + counts[moved] - 1]
    bound = loss[units, choice].sum()
    if j < len(ranked):
        spare = room - (band.spent + steps.dc[ranked[:j]].sum())
        t = ranked[j]
        u, to = steps.unit_of(t), steps.to[t]
        was = steps.to[t - 1] if t > steps.start[u] else base[u]  # the unit's option before this step
        bound -= (loss[u, was] - loss[u, to]) * spare / steps.dc[t]
    near = steps.unit_of(ranked[max(j - core_steps, 0) : j + core_steps])
    return LP(choice, float(bound), near)


def taken_per_unit(taken: np.ndarray, start: np.ndarray) -> np.ndarray:
    """[U]: how many of each unit's steps (start [U + 1]) are marked in taken, a chunk of units at a time."""
    counts = np.empty(len(start) - 1, dtype=np.int64)
    for s in range(0, len(counts), CHUNK_UNITS):
        e = min(s + CHUNK_UNITS, len(counts))
        running = np.r_[0, np.cumsum(taken[start[s] : start[e]])]
        counts[s:e] = running[start[s + 1 : e + 1] - start[s]] - running[start[s:e] - start[s]]
    return counts


def core_units(near: np.ndarray, core_steps: int, U: int) -> np.ndarray:
    """[U] bool: units with a hull step within core_steps positions of the LP threshold (all, if few)."""
    core = np.zeros(U, dtype=bool)
    if U <= 2 * core_steps:
        core[:] = True
    else:
        core[near] = True
    return core


def solve_core(loss, cost, keep, budget, lp_choice, core, time_limit) -> tuple[np.ndarray, str]:
    """HiGHS MIP over the core units' undominated options; other units keep lp_choice."""
    units = np.arange(len(loss))
    core_idx = np.flatnonzero(core)
    choice = lp_choice.copy()
    if not len(core_idx):
        return choice, "no core"
    fixed_cost = cost[units[~core], lp_choice[~core]].sum()
    u_of, j_of = np.nonzero(keep[core_idx])  # variables: (position in core, option)
    c, l = cost[core_idx[u_of], j_of], loss[core_idx[u_of], j_of]
    scale_c = max(float(c.max()), 1e-30)
    scale_l = max(float(l.max()), 1e-30)
    n = len(u_of)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, len(core_idx) + 1
    lp.col_cost_ = l / scale_l
    lp.col_lower_, lp.col_upper_ = np.zeros(n), np.ones(n)
    lp.row_lower_ = np.r_[np.ones(len(core_idx)), -highspy.kHighsInf]
    lp.row_upper_ = np.r_[np.ones(len(core_idx)), (budget - fixed_cost) / scale_c]
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(n + 1) * 2
    lp.a_matrix_.index_ = np.stack([u_of, np.full(n, len(core_idx))], 1).ravel().astype(np.int32)
    lp.a_matrix_.value_ = np.stack([np.ones(n), c / scale_c], 1).ravel()
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    # highspy.Highs() enables its callbacks on construction, a call that prints HiGHS's banner before any option
    # can be set; the core class takes output_flag first.
    h = _Highs()
    for option, value in {
        "output_flag": False,
        "mip_rel_gap": 1e-3,
        "time_limit": time_limit,
        "threads": 2,
        "random_seed": 0,
    }.items():
        h.setOptionValue(option, value)
    h.passModel(lp)
    start = highspy.HighsSolution()
    start.col_value = (j_of == lp_choice[core_idx[u_of]]).astype(float).tolist()
    start.value_valid = True
    h.setSolution(start)
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    values = np.asarray(h.getSolution().col_value)
    if len(values) == n and h.getInfo().primal_solution_status == 2:  # 2: feasible
        picked = values > 0.5
        choice[core_idx[u_of[picked]]] = j_of[picked]
    return choice, status
