"""FORMAT.md's tensor names against vLLM's own per-expert name mapping (no model is loaded)."""

import pytest

from bitsmoe_vllm.format import basis_name, tensor_specs
from offline.architectures import ARCHITECTURES
from tests.random_layers import random_checkpoint

vllm_moe = pytest.importorskip("vllm.model_executor.layers.fused_moe.routed_experts")

SHARDS = {"gate": "w1", "up": "w3", "down": "w2"}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_per_expert_tensors_route_through_vllms_mapping_and_bases_do_not(model_type):
    arch = ARCHITECTURES[model_type]
    module = arch.experts_module.format(layer=11)
    names = arch.projection_names
    cfg, _ = random_checkpoint(64, 64, 12, (64, 64, 64), 32, module=module, names=names)
    mapping = vllm_moe.RoutedExperts.build_expert_params_mapping(names["gate"], names["down"], names["up"], num_experts=12)
    bases = {basis_name(module, p) for p in SHARDS}
    for name in tensor_specs(cfg):
        routes = [(param, expert, shard) for param, weight, expert, shard in mapping if weight in name]
        if name in bases:
            assert routes == [], f"{name} would be taken for a per-expert tensor"
            continue
        expert, projection, _kind = name.removeprefix(module + ".").split(".")
        canonical = next(p for p, n in names.items() if n == projection)
        prefix = "w2_" if canonical == "down" else "w13_"
        assert routes == [(f"experts.routed_experts.{prefix}", int(expert), SHARDS[canonical])], name
