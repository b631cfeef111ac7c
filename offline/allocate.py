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
from typing import Iterator, NamedTuple

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


def as_rows(a: np.ndarray) -> np.ndarray:
    """a [U, J] as float64, C-contiguous unless every row is the first (a broadcast view, kept as it is)."""
    a = np.asarray(a, dtype=np.float64)
    return a if a.strides[0] == 0 and a.strides[1] == a.itemsize else np.ascontiguousarray(a)


def feasible_range(cost: np.ndarray) -> tuple[float, float]:
    """Cheapest and dearest total cost: every unit at its cheapest option, every unit at its dearest (a chunk of
    units at a time)."""
    chunks = [cost[s : s + CHUNK_UNITS] for s in range(0, len(cost), CHUNK_UNITS)]
    return sum(float(c.min(1).sum()) for c in chunks), sum(float(c.max(1).sum()) for c in chunks)


def allocate(
    loss: np.ndarray, cost: np.ndarray, budget: float, *, core_steps: int = CORE_STEPS, time_limit: float = 300.0
) -> Allocation:
    """loss, cost [U, J] float -> the allocation of least loss with sum of cost <= budget. cost may be a broadcast
    view (np.broadcast_to): units of one size share one row of costs."""
    start = time.perf_counter()
    loss, cost = as_rows(loss), as_rows(cost)
    low, high = feasible_range(cost)
    if not low <= budget + 1e-9 * max(1.0, abs(low)):
        raise ValueError(
            f"budget {budget:.6g} is below the cheapest allocation {low:.6g}; feasible range [{low:.6g}, {high:.6g}]"
        )
    lp = lp_relaxation(hull_steps(loss, cost), budget, core_steps)
    core = core_units(lp.near, core_steps, len(loss))
    choice, status = solve_core(loss, cost, budget, lp.choice, core, time_limit)
    total_loss, total_cost = chosen_sum(loss, choice), chosen_sum(cost, choice)
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
    return bound_of(hull_steps(loss, cost), budget)


def bound_of(steps: "Steps", budget: float) -> float:
    """lp_bound over the units of steps (whose hulls may serve several budgets, or subsets of their units)."""
    if feasible_range(steps.cost)[0] > budget + 1e-9 * max(1.0, abs(budget)):
        return float("inf")
    return lp_relaxation(steps, budget, 0).bound


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


def chosen_sum(a: np.ndarray, choice: np.ndarray, units: np.ndarray | None = None) -> float:
    """sum of a[u, choice[u]] over the units u (where units [U] is true, if given), a chunk of units at a time: no
    [U] array beside them (0.3 GB for Qwen3-30B-A3B's identity basis)."""
    total = 0.0
    for s in range(0, len(a), CHUNK_UNITS):
        picked = np.take_along_axis(a[s : s + CHUNK_UNITS], choice[s : s + CHUNK_UNITS, None].astype(np.intp), 1)
        total += float(picked[:, 0].sum() if units is None else picked[units[s : s + CHUNK_UNITS], 0].sum())
    return total


@dataclass(frozen=True, eq=False)
class Steps:
    """Every unit's convex-hull steps from its cheapest undominated option base[u]: unit u's steps are start[u] to
    start[u + 1] - 1, units in order and each unit's steps in order of falling efficiency; step i moves its unit to
    option to[i]. A step's efficiency (loss saved per bit) and cost are computed again from loss and cost when read
    (`deltas`), the same floats as when the hull was built: 5 bytes a unit and 1 a step are held (Qwen3-30B-A3B's
    identity basis has ~2 x 10^8 steps, which took 3.8 GB as floats)."""

    loss: np.ndarray  # [U, J]
    cost: np.ndarray  # [U, J]
    base: np.ndarray  # [U] int8
    start: np.ndarray  # [U + 1] int32 (int64 past 2^31 steps)
    to: np.ndarray  # [steps] int8

    def __len__(self) -> int:
        return int(self.start[-1])

    def unit_of(self, i: np.ndarray) -> np.ndarray:
        # i in start's dtype: numpy would otherwise convert all of start to i's for every search
        return np.searchsorted(self.start, np.asarray(i).astype(self.start.dtype, copy=False), side="right") - 1

    def at(self, i: np.ndarray, units: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Efficiency and cost in bits [n] of steps i [n] (of units `units`, if known)."""
        dl, dc = self.deltas(i, units)
        return dl / dc, dc

    def deltas(self, i: np.ndarray, units: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Loss saved and bits added [n] by steps i [n]."""
        u = self.unit_of(i) if units is None else units
        first = i == self.start[u]
        was = np.where(first, self.base[u], self.to[np.where(first, 0, i - 1)]).astype(np.intp)
        to = self.to[i].astype(np.intp)
        return _pick(self.loss, u, was) - _pick(self.loss, u, to), _pick(self.cost, u, to) - _pick(self.cost, u, was)

    def subset(self, units: np.ndarray) -> "Steps":
        """The steps of the units where units [U] (bool) is true: a unit's hull is its own."""
        if units.all():
            return self
        counts = np.diff(self.start)
        start = np.zeros(int(units.sum()) + 1, dtype=self.start.dtype)
        np.cumsum(counts[units], out=start[1:])
        steps = np.repeat(units, counts)
        return Steps(_rows(self.loss, units), _rows(self.cost, units), self.base[units], start, self.to[steps])

    def chunks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(first step, units, efficiencies, costs) of CHUNK_UNITS steps at a time, in order (each unit has a few
        steps, so a chunk's units are about as many as its steps)."""
        for s in range(0, len(self), CHUNK_UNITS):
            e = min(s + CHUNK_UNITS, len(self))
            u0, u1 = self.unit_of(np.array([s, e - 1]))
            units = np.repeat(np.arange(u0, u1 + 1), np.diff(np.clip(self.start[u0 : u1 + 2], s, e)))
            yield s, units, *self.at(np.arange(s, e), units)


def _pick(a: np.ndarray, u: np.ndarray, j: np.ndarray) -> np.ndarray:
    """a[u, j] for a C-contiguous a, or one whose rows are all its first (a broadcast view): flat gathers, several
    times faster than numpy's two-index gather."""
    if a.strides[0] == 0:
        return a[0].take(j)
    return a.reshape(-1).take(u * a.shape[1] + j)


def _rows(a: np.ndarray, units: np.ndarray) -> np.ndarray:
    """a[units], a broadcast view kept as one."""
    return np.broadcast_to(a[0], (int(units.sum()), a.shape[1])) if a.strides[0] == 0 else a[units]


def hull_steps(loss: np.ndarray, cost: np.ndarray) -> Steps:
    """The hull steps of every unit, from its undominated options, a chunk of units at a time."""
    loss, cost = as_rows(loss), as_rows(cost)  # Steps reads them as flat arrays (_pick); no copy if they are
    U, J = loss.shape
    if J > 128:
        raise ValueError(f"{J} options per unit: the hull steps count options in int8")
    # written in place, no chunk's part kept: small arrays that outlive the chunks' temporaries fragment the heap
    # (48 Qwen3-shaped layers' hulls: 0.5 GB more RSS); pages past the last step are never touched
    base, counts, to = np.empty(U, dtype=np.int8), np.empty(U, dtype=np.int8), np.empty(U * (J - 1), dtype=np.int8)
    n = 0
    for s in range(0, U, CHUNK_UNITS):
        l, c = loss[s : s + CHUNK_UNITS], cost[s : s + CHUNK_UNITS]
        keep = undominated(l, c)
        base[s : s + CHUNK_UNITS] = chunk_base = np.where(keep, c, np.inf).argmin(1)
        count, chunk_to = _hull_steps(l, c, keep, chunk_base)
        counts[s : s + CHUNK_UNITS], to[n : n + len(chunk_to)] = count, chunk_to
        n += len(chunk_to)
    start = np.zeros(U + 1, dtype=np.int32 if U * (J - 1) < 2**31 else np.int64)
    np.cumsum(counts, out=start[1:])
    return Steps(loss, cost, base, start, to[:n])


def _hull_steps(loss, cost, keep, base) -> tuple[np.ndarray, np.ndarray]:
    """[U] steps per unit, then the option each step moves to, units in order and each unit's steps in order."""
    U = len(loss)
    units = np.arange(U)
    big = np.inf
    current = base
    unit_list, to_list = [], []
    # each round appends every unit's next step; a step moves to a dearer option, so there are at most J - 1
    for _ in range(loss.shape[1] - 1):
        dc = np.where(keep, cost - cost[units, current][:, None], big)
        dl = loss[units, current][:, None] - loss  # loss saved
        eff = np.where((dc > 0) & (dc < big) & (dl > 0), dl / np.where(dc > 0, dc, 1), -1.0)
        best = eff[units, eff.argmax(1)]
        # among equally efficient options take the farthest, so hull steps stay strictly less efficient
        far = np.where(eff == best[:, None], cost, -big).argmax(1)
        moving = np.flatnonzero(best > 0)
        if not len(moving):
            break
        unit_list.append(moving)
        to_list.append(far[moving])
        current = current.copy()
        current[moving] = far[moving]
    if not unit_list:
        return np.zeros(U, dtype=np.int64), np.zeros(0, dtype=np.int64)
    unit = np.concatenate(unit_list)
    by_unit = np.argsort(unit, kind="stable")  # the rounds' order kept: each unit's steps in order
    return np.bincount(unit, minlength=U), np.concatenate(to_list)[by_unit]


class Band(NamedTuple):
    """The hull steps around the LP's threshold in efficiency order: `before` steps, of total cost `spent`, come
    first (every step more efficient than `above`), then `ranked` (indices into the steps, of costs `dc`), of which
    the first `fit` fit the budget after them."""

    before: int
    spent: float
    above: float
    ranked: np.ndarray
    dc: np.ndarray
    fit: int


def around_threshold(steps: Steps, limit: float, core_steps: int) -> Band:
    """The steps in order of efficiency (descending; ties in unit and step order) around the first whose cumulative
    cost exceeds `limit`, with core_steps positions on either side of it (or to the ends). Sorting every step costs
    two index arrays as large as the steps (Qwen3-30B-A3B's identity basis: 3.6 GB); past 4 SAMPLE steps only those
    between two efficiencies read off a sample are sorted, after one pass that sums the steps above them."""
    n = len(steps)
    if n <= 4 * SAMPLE:
        eff, dc = steps.at(np.arange(n))
        ranked = np.argsort(-eff, kind="stable")
        return Band(0, 0.0, np.inf, ranked, dc[ranked], _fit(0.0, dc[ranked], limit))
    stride = n // SAMPLE
    eff, dc = steps.at(np.arange(0, n, stride))
    order = np.argsort(-eff, kind="stable")
    sample, estimate = eff[order], np.cumsum(dc[order]) * stride
    at = int(np.searchsorted(estimate, limit, side="right"))
    margin = core_steps // stride + 64  # in sampled steps
    while True:
        above = sample[at - margin] if at - margin >= 0 else np.inf
        below = sample[at + margin] if at + margin < len(sample) else -np.inf
        before, spent, band = 0, 0.0, []
        for s, _, e, d in steps.chunks():
            higher = e > above
            before, spent = before + int(higher.sum()), spent + float(d[higher].sum())
            band.append(np.flatnonzero(~higher & (e > below)) + s)
        band = np.concatenate(band)
        eff, dc = steps.at(band)
        order = np.argsort(-eff, kind="stable")
        ranked, dc = band[order], dc[order]
        j = _fit(spent, dc, limit)
        if spent <= limit and (before == 0 or j >= core_steps) and (below == -np.inf or len(ranked) - j > core_steps):
            return Band(before, spent, above, ranked, dc, j)
        margin *= 4


def _fit(spent: float, dc: np.ndarray, limit: float) -> int:
    """How many of the steps of costs dc [n] (> 0) fit within limit after spent."""
    return int(np.searchsorted(spent + np.cumsum(dc), limit, side="right"))


class LP(NamedTuple):
    choice: np.ndarray  # [U] int8: the LP solution with its fractional step rounded down
    bound: float  # the LP optimum
    near: np.ndarray  # units of the hull steps within core_steps positions of the first step that does not fit


def lp_relaxation(steps: Steps, budget: float, core_steps: int) -> LP:
    """The exact LP optimum by the greedy over convex-hull steps, taken in order of efficiency (descending; ties by
    unit, then step) while they fit."""
    loss, cost = steps.loss, steps.cost
    room = budget - chosen_sum(cost, steps.base)
    limit = room + 1e-9 * max(1.0, abs(budget))
    band = around_threshold(steps, limit, core_steps)
    ranked, j = band.ranked, band.fit
    # each unit's taken steps are its first (their efficiencies fall): those above the band, then the band's first j
    counts = taken_per_unit(steps, band.above)
    np.add.at(counts, steps.unit_of(ranked[:j]), 1)
    choice = steps.base.copy()
    for s in range(0, len(choice), CHUNK_UNITS):  # a unit at its last step taken
        moved = np.flatnonzero(counts[s : s + CHUNK_UNITS]) + s
        choice[moved] = steps.to[steps.start[moved] + counts[moved] - 1]
    del counts
    bound = chosen_sum(loss, choice)
    if j < len(ranked):
        spare = room - (band.spent + band.dc[:j].sum())
        (dl,), (dc,) = steps.deltas(ranked[j : j + 1])
        bound -= dl * spare / dc
    near = steps.unit_of(ranked[max(j - core_steps, 0) : j + core_steps])
    return LP(choice, float(bound), near)


def taken_per_unit(steps: Steps, above: float) -> np.ndarray:
    """[U] int8: how many of each unit's steps are more efficient than `above`, a chunk of steps at a time."""
    counts = np.zeros(len(steps.start) - 1, dtype=np.int8)
    if above == np.inf:
        return counts
    for _, units, eff, _ in steps.chunks():
        taken = units[eff > above]
        if len(taken):
            counts[taken[0] : taken[-1] + 1] += np.bincount(taken - taken[0]).astype(np.int8)
    return counts


def core_units(near: np.ndarray, core_steps: int, U: int) -> np.ndarray:
    """[U] bool: units with a hull step within core_steps positions of the LP threshold (all, if few)."""
    core = np.zeros(U, dtype=bool)
    if U <= 2 * core_steps:
        core[:] = True
    else:
        core[near] = True
    return core


def solve_core(loss, cost, budget, lp_choice, core, time_limit) -> tuple[np.ndarray, str]:
    """[U] int64: HiGHS MIP over the core units' undominated options; other units keep lp_choice."""
    core_idx = np.flatnonzero(core)
    choice = lp_choice.astype(np.int64)
    if not len(core_idx):
        return choice, "no core"
    fixed_cost = chosen_sum(cost, lp_choice, ~core)
    u_of, j_of = np.nonzero(undominated(loss[core_idx], cost[core_idx]))  # variables: (position in core, option)
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
