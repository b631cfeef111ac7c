"""The allocator on bench_allocate's instance the size of Qwen3-30B-A3B."""

from benchmarks.bench_allocate import qwen3_30b_instance
from bitsmoe_vllm.offline.allocate import allocate


def test_qwen3_30b_sized_instance_within_a_tenth_of_a_percent():
    loss, cost, budget = qwen3_30b_instance(unit_rows=64)  # 589,824 units x 7 widths
    result = allocate(loss, cost, budget)
    assert result.cost <= budget
    assert result.gap <= 1e-3
    assert result.core_units < len(loss)  # the core decomposition was used
