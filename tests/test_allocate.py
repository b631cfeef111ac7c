"""The bit allocator against brute force, and its refusals."""

import itertools

import numpy as np
import pytest

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
