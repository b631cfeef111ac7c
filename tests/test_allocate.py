"""The bit allocator against brute force, and on an instance the size of Qwen3-30B-A3B."""

import itertools

import numpy as np
import pytest

from offline.allocate import allocate, feasible_range, undominated


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


def qwen3_30b_instance(unit_rows: int, seed: int = 0):
    """48 layers x 3 projections x 128 experts x 2048 ranks in units of unit_rows, widths 0..8, I 768, G 128."""
    rng = np.random.default_rng(seed)
    widths = np.array([0, 1, 2, 3, 4, 6, 8])
    per_expert = 2048 // unit_rows
    U = 48 * 3 * 128 * per_expert
    cost = np.broadcast_to(unit_rows * (widths * 768 + (widths > 0) * 6 * 16), (U, len(widths))).astype(float)
    energy = rng.lognormal(0, 1, U) * np.exp(-4 * np.tile(np.arange(per_expert), U // per_expert) / per_expert)
    relative = np.array([1.0, 0.36, 0.12, 0.035, 0.0095, 0.0006, 0.00004])  # error of rounding at each width
    loss = energy[:, None] * relative * rng.uniform(0.7, 1.3, (U, len(widths)))
    loss[:, 0] = energy
    return loss, cost, 2.5 * 48 * 3 * 128 * 2048 * 768


def test_qwen3_30b_sized_instance_within_a_tenth_of_a_percent():
    loss, cost, budget = qwen3_30b_instance(unit_rows=64)  # 589,824 units x 7 widths
    result = allocate(loss, cost, budget)
    assert result.cost <= budget
    assert result.gap <= 1e-3
    assert result.core_units < len(loss)  # the core decomposition was used
