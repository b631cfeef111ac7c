"""The bit allocator against brute force, and its refusals."""

import itertools

import numpy as np
import pytest

from bitsmoe_vllm.offline import allocate as allocate_module
from bitsmoe_vllm.offline.allocate import allocate, feasible_range, undominated


def brute_force(loss, cost, budget):
    best = None
    for combo in itertools.product(range(loss.shape[1]), repeat=loss.shape[0]):
        units = np.arange(len(combo))
        if cost[units, combo].sum() <= budget and (best is None or loss[units, combo].sum() < best):
            best = loss[units, combo].sum()
    return best


@pytest.mark.parametrize("seed", range(40))
def test_equals_brute_force_on_tiny_instances(seed):
    rng = np.random.default_rng(seed)
    U, J = int(rng.integers(1, 6)), int(rng.integers(2, 6))
    cost = np.sort(rng.integers(0, 12, (U, J)).astype(float), 1)
    loss = rng.uniform(0, 10, (U, J))
    low, high = feasible_range(cost)
    budget = float(rng.uniform(low, high))
    result = allocate(loss, cost, budget)
    assert result.cost <= budget
    assert result.loss == pytest.approx(brute_force(loss, cost, budget), abs=1e-9)
    assert result.lp_bound <= result.loss + 1e-9


def test_dominated_options_are_dropped():
    loss = np.array([[5.0, 3.0, 3.0, 4.0, 1.0]])
    cost = np.array([[0.0, 1.0, 2.0, 2.0, 3.0]])
    assert undominated(loss, cost).tolist() == [[True, True, False, False, True]]


def test_budget_below_the_cheapest_allocation_names_the_range():
    cost = np.array([[2.0, 4.0], [3.0, 5.0]])
    with pytest.raises(ValueError, match=r"budget 4 is below the cheapest allocation 5; feasible range \[5, 9\]"):
        allocate(np.ones((2, 2)), cost, 4.0)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("share", [0.001, 0.3, 0.9, 1.0])
def test_sorting_only_the_steps_around_the_threshold_changes_nothing(monkeypatch, ties, share):
    """around_threshold sorts every hull step up to 4 SAMPLE of them, else a band read off a sample: the same
    allocation, LP bound and core either way (ties in efficiency keep unit and step order)."""
    rng = np.random.default_rng(int(ties))
    U = 20000
    loss = rng.integers(0, 6, (U, 7)).astype(float) if ties else np.sort(rng.lognormal(0, 1, (U, 7)), 1)[:, ::-1]
    loss[:, 0] = loss.max()
    cost = np.broadcast_to(np.array([0, 1, 2, 3, 4, 6, 8.0]) * 100, loss.shape)
    budget = share * feasible_range(cost)[1]
    whole = allocate(loss, cost, budget, core_steps=500)
    monkeypatch.setattr(allocate_module, "SAMPLE", 4096)  # 20,000 units have ~10^5 steps: past 4 x 4096
    banded = allocate(loss, cost, budget, core_steps=500)
    assert (banded.choice == whole.choice).all() and banded.lp_bound == whole.lp_bound
    assert banded.core_units == whole.core_units < U
    assert allocate_module.lp_bound(loss, cost, budget) == whole.lp_bound


def test_taken_steps_are_counted_per_unit_across_chunks_and_empty_units(monkeypatch):
    """The hull keeps one byte a step and computes its efficiencies again in chunks of steps: the same as each
    unit's steps read one at a time, with chunk edges inside and between units' steps."""
    monkeypatch.setattr(allocate_module, "CHUNK_UNITS", 3)
    rng = np.random.default_rng(0)
    loss = np.sort(rng.lognormal(0, 1, (20, 5)), 1)[:, ::-1].copy()
    loss[[0, 7, 19]] = 1.0  # units without steps, the first and last included
    cost = np.broadcast_to(np.array([0.0, 1, 2, 4, 8]), loss.shape)
    steps = allocate_module.hull_steps(loss, cost)
    per_step = [steps.at(np.array([i]))[0][0] for i in range(len(steps))]
    above = float(np.median(per_step))
    counts = allocate_module.taken_per_unit(steps, above)
    expected = [sum(per_step[i] > above for i in range(steps.start[u], steps.start[u + 1])) for u in range(20)]
    assert counts.tolist() == expected and counts[[0, 7, 19]].tolist() == [0, 0, 0]
    assert 0 < sum(expected) < len(steps)
    chunked = np.concatenate([eff for _, _, eff, _ in steps.chunks()])
    assert chunked.tolist() == per_step
