"""A real MoE layer of each tiny architecture, decomposed and encoded, against the transformers module."""

import itertools
import json

import pytest
import torch
import transformers

from bitsmoe_vllm.format import PROJECTIONS, QuantConfig, expert_tensor_name
from bitsmoe_vllm.offline.decompose import shared_basis
from bitsmoe_vllm.offline.demo import ARCHITECTURES, LAYERS, TOP_K
from bitsmoe_vllm.offline.encode import build_quant_config, encode_layer
from bitsmoe_vllm.offline.source import SourceCheckpoint
from bitsmoe_vllm.reference import gather_layer, moe_forward

MOE_LAYER = LAYERS - 1  # the last layer is MoE in every tiny model (DeepSeek-V2's first one is dense)


def quantize_layer(model_dir, bits: int, rank: int | None = None):
    """Full-rank (default) decomposition of the tiny model's MoE layer, every rank row at `bits` bits."""
    source = SourceCheckpoint(model_dir)  # of a multimodal checkpoint, the text model's config
    config, arch = source.config, source.architecture
    module = arch.experts_module.format(layer=MOE_LAYER)
    E, H = arch.num_experts(config), config["hidden_size"]
    weights = source.expert_weights(MOE_LAYER)  # [E, I, H] per projection, whatever the checkpoint's layout
    decompositions = {p: shared_basis(weights[p], rank or H) for p in PROJECTIONS}
    widths = {p: torch.full((E, rank or H), bits) for p in PROJECTIONS}
    layout, tensors = encode_layer(
        module, decompositions, widths, group_size=32, basis_dtype="float16", projection_names=arch.projection_names
    )
    if arch.expert_bias:  # gpt-oss: stored as read
        for p in PROJECTIONS:
            name = arch.projection_names[p]
            tensors |= {expert_tensor_name(module, e, name, "bias"): weights[f"{p}_bias"][e] for e in range(E)}
    act = arch.activation(config)
    cfg = build_quant_config(
        [layout],
        bits=16.0,
        budget_scope="all",
        candidate_bits=(0, 1, 2, 3, 4, 6, 8),
        group_size=32,
        basis_dtype="float16",
        activation=act.name,
        hidden_size=H,
        intermediate_size=arch.intermediate_size(config),
        num_experts=E,
        projection_names=arch.projection_names,
        swiglu_alpha=act.alpha,
        swiglu_limit=act.limit,
        expert_bias=arch.expert_bias,
    )
    cfg = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # as a loader would see it
    return gather_layer(cfg, module, tensors)


def decoder(model_dir) -> torch.nn.Module:
    """transformers' decoder of the checkpoint (its text model's, for a multimodal one)."""
    if SourceCheckpoint(model_dir).architecture.text_config:
        return transformers.AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=torch.float32
        ).model.language_model
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).model


def relative_error(model_dir, layer, seed: int, T: int = 33) -> float:
    source = SourceCheckpoint(model_dir)
    experts = source.architecture.experts(decoder(model_dir).layers[MOE_LAYER])
    g = torch.Generator().manual_seed(seed)
    H, E = source.config["hidden_size"], source.architecture.num_experts(source.config)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:TOP_K] for _ in range(T)])  # expert E-1 unused
    w = torch.softmax(torch.randn(T, TOP_K, generator=g), dim=-1)
    with torch.no_grad():
        expected = experts(x, ids, w)
    return float((moe_forward(x, w, ids, layer) - expected).norm() / expected.norm())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_rank_8_bit_reconstructs_the_layer(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    err = relative_error(model_dir, quantize_layer(model_dir, bits=8), seed=0)
    assert err < 1e-2, f"{arch}: relative error {err:.2e} at 8 bits, full rank"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_error_grows_as_bits_go_down(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    seeds = (0, 1, 2)
    mean_error = {}
    for bits in (8, 6, 4, 3, 2, 1):
        layer = quantize_layer(model_dir, bits=bits)
        mean_error[bits] = sum(relative_error(model_dir, layer, s) for s in seeds) / len(seeds)
    errors = list(mean_error.values())
    assert all(a < b for a, b in itertools.pairwise(errors)), f"{arch}: mean relative error by bits {mean_error}"


def test_rank_truncation_costs_accuracy(tiny_model_dir):
    model_dir = tiny_model_dir("qwen3_moe")
    full = relative_error(model_dir, quantize_layer(model_dir, bits=8), seed=0)
    half = relative_error(model_dir, quantize_layer(model_dir, bits=8, rank=32), seed=0)
    assert full < 1e-2 < half
