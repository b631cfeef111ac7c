"""The allocator on bench_allocate's instance the size of Qwen3-30B-A3B, and the allocation stage on many layers."""

import json

from benchmarks.bench_allocate import qwen3_30b_instance
from bitsmoe_vllm.offline.allocate import allocate
from bitsmoe_vllm.offline.plan import AUTO_BASES


def test_qwen3_30b_sized_instance_within_a_tenth_of_a_percent():
    loss, cost, budget = qwen3_30b_instance(unit_rows=64)  # 589,824 units x 7 widths
    result = allocate(loss, cost, budget)
    assert result.cost <= budget
    assert result.gap <= 1e-3
    assert result.core_units < len(loss)  # the core decomposition was used


def test_the_allocation_stage_for_more_layers_than_the_model_has(tiny_model_dir):
    from benchmarks.bench_allocate import pipeline

    model = tiny_model_dir("qwen3_moe")
    config = json.loads((model / "config.json").read_text())
    run = pipeline(model, layers=5)
    assert run["layers"] == 5 and run["basis"] in AUTO_BASES
    # the identity basis: one unit per rank row, H of them per expert, projection and layer
    assert run["units"]["loss-identity"] == 5 * 3 * config["num_local_experts"] * config["hidden_size"]
    assert run["gap"] <= 1e-3 and run["mip_status"] == "Optimal"
