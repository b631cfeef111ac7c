"""FORMAT.md's tensor names against vLLM's own per-expert name mapping (no model is loaded)."""

import re

import pytest

from bitsmoe_vllm.format import tensor_specs
from bitsmoe_vllm.offline.architectures import ARCHITECTURES
from tests.helpers import random_checkpoint

vllm_moe = pytest.importorskip("vllm.model_executor.layers.fused_moe.routed_experts")

SHARDS = {"gate": "w1", "up": "w3", "down": "w2"}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("basis_dtype", ["float16", "int8", "identity"])
def test_every_tensor_routes_through_vllms_expert_mapping(model_type, basis_dtype):
    """Per-expert tensors reach their expert; the bases (named as expert 0's) reach the layer's parameters."""
    arch = ARCHITECTURES[model_type]
    module = arch.experts_module.format(layer=11)
    names = arch.projection_names
    cfg, _ = random_checkpoint(64, 64, 12, (64, 64, 64), 32, module=module, names=names, basis_dtype=basis_dtype)
    mapping = vllm_moe.RoutedExperts.build_expert_params_mapping(
        names["gate"], names["down"], names["up"], num_experts=12
    )
    for name in tensor_specs(cfg):
        routes = [(param, expert, shard) for param, weight, expert, shard in mapping if weight in name]
        expert, projection, kind = name.removeprefix(module + ".").split(".")
        canonical = next(p for p, n in names.items() if n == projection)
        prefix = "w2_" if canonical == "down" else "w13_"
        assert routes == [(f"experts.routed_experts.{prefix}", int(expert), SHARDS[canonical])], name
        assert kind in {"codes", "scales", "bits"} or (kind.startswith("basis") and expert == "0"), name


@pytest.mark.parametrize("basis_dtype", ["int8", "identity"])
def test_gpt_oss_tensors_reach_their_parameters_through_the_wrapped_loader(basis_dtype):
    """vLLM's gpt-oss loader has its own rules and skips other expert tensors; bitsmoe_vllm.vllm_loaders routes
    BitsMoE's to their parameter, expert and shard, after vLLM's renaming of gpt-oss names (".down_proj.bias" ->
    ".w2_bias")."""
    gpt_oss = pytest.importorskip("vllm.model_executor.models.gpt_oss")
    from bitsmoe_vllm.vllm_loaders import _TENSOR

    module, names = "model.layers.11.mlp.experts", ARCHITECTURES["gpt_oss"].projection_names
    cfg, _ = random_checkpoint(
        64, 64, 12, (64, 64, 64), 32, module=module, names=names, basis_dtype=basis_dtype, gpt_oss=True
    )
    mapper = gpt_oss.GptOssForCausalLM.hf_to_vllm_mapper
    renamed = 0
    for name in tensor_specs(cfg):
        vllm_name = next(iter(mapper.apply([(name, None)])))[0]
        renamed += vllm_name != name
        match = _TENSOR.fullmatch(vllm_name)
        expert, projection, kind = name.removeprefix(module + ".").split(".")
        canonical = next(p for p, n in names.items() if n == projection)
        assert match is not None and match["experts"] == module and int(match["expert"]) == int(expert), name
        assert (match["projection"] or "down", match["kind"] or match["w2"]) == (canonical, kind), name
    assert renamed == 12  # every down bias: the case the pattern's w2_bias is for


def test_fp8_linear_weights_go_to_vllms_fp8_method_or_are_refused_with_the_fix(monkeypatch):
    """Format version 3: the linear layers outside the experts get vLLM's fp8 method, with the fp8 config's 16-bit
    activations; a CPU build without its fp8 kernel (no AMX) refuses the checkpoint naming the fix."""
    import dataclasses

    import torch
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUFp8BlockScaledMMKernel
    from vllm.model_executor.layers.linear import LinearBase

    from bitsmoe_vllm.config import BitsMoEConfig

    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    cfg, _ = random_checkpoint(64, 64, 4, (64, 64, 64), 32)
    cfg = dataclasses.replace(cfg, format_version=3, linear_quantization=fp8)
    monkeypatch.setattr(CPUFp8BlockScaledMMKernel, "is_supported", classmethod(lambda cls, *a: (True, None)))
    config = BitsMoEConfig(cfg)
    assert torch.float32 not in config.get_supported_act_dtypes()
    assert config.linear.weight_block_size == [128, 128]
    config.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    # vLLM's fp8 config chooses the method (Fp8LinearMethod, whose construction needs a whole model config: the
    # serving test runs it), seeing the model's fused layers
    seen = []
    fp8_config = type(config.linear)
    monkeypatch.setattr(fp8_config, "get_quant_method", lambda self, layer, prefix: seen.append((self, prefix)) or 1)
    prefix = "model.layers.0.mlp.gate_up_proj"
    assert config.get_quant_method(LinearBase.__new__(LinearBase), prefix) == 1
    assert seen == [(config.linear, prefix)] and config.linear.packed_modules_mapping == config.packed_modules_mapping
    reason = "requires AMX tile support (Sapphire Rapids or newer)."
    monkeypatch.setattr(CPUFp8BlockScaledMMKernel, "is_supported", classmethod(lambda cls, *a: (False, reason)))
    with pytest.raises(
        ValueError, match=f"keeps its source.s fp8 linear weights .* {re.escape(reason)} Quantize again with "
    ):
        BitsMoEConfig(cfg)
