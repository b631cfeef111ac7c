import copy
import dataclasses
import json

import pytest
import torch

from bitsmoe_vllm.format import QuantConfig, check_tensors, stored_bits, tensor_specs
from tests.helpers import MODULE, random_checkpoint

H, I, E, G = 64, 64, 4, 32


@pytest.fixture(scope="module")
def checkpoint():
    return random_checkpoint(H, I, E, (64, 40, 64), G)


@pytest.fixture
def config_dict(checkpoint):
    return copy.deepcopy(checkpoint[0].to_dict())


def refuse(d, *fragments):
    with pytest.raises(ValueError) as err:
        QuantConfig.from_dict(d)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"


def test_dict_round_trip_through_json(checkpoint, config_dict):
    assert QuantConfig.from_dict(json.loads(json.dumps(config_dict))) == checkpoint[0]


def test_unknown_format_version_is_refused(config_dict):
    config_dict["format_version"] = 4
    refuse(config_dict, "format_version", "unknown version 4", "reads versions 1, 2, 3")


def test_fp8_linear_weights_come_with_version_3_and_only_with_it(config_dict):
    """DeepSeek-V3's fp8 block quantization of the weights outside the routed experts, kept as the source stored it:
    a reader of version 2 would take their fp8 codes for the weights, so the version says it."""
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    d = config_dict | {"format_version": 3, "linear_quantization": fp8}
    cfg = QuantConfig.from_dict(json.loads(json.dumps(d)))
    assert cfg.linear_quantization == fp8 and cfg.to_dict() == d and cfg.odd_codes
    refuse(d | {"format_version": 2}, "linear_quantization: present in format version 3 and only there")
    refuse(config_dict | {"format_version": 3}, "format_version is 3 and the key is missing")
    refuse(d | {"linear_quantization": fp8 | {"quant_method": "gptq"}}, "expected fp8 (e4m3) block quantization")
    refuse(d | {"linear_quantization": fp8 | {"weight_block_size": [128]}}, "weight_block_size: expected two positive")


def test_other_quant_method_is_refused(config_dict):
    config_dict["quant_method"] = "gptq"
    refuse(config_dict, "quant_method", "'bitsmoe'", "'gptq'")


@pytest.mark.parametrize(
    "key",
    [
        "format_version",
        "bits",
        "budget_scope",
        "achieved_bits",
        "candidate_bits",
        "group_size",
        "basis_dtype",
        "activation",
        "hidden_size",
        "intermediate_size",
        "num_experts",
        "projection_names",
        "layers",
    ],
)
def test_missing_key_is_named(config_dict, key):
    del config_dict[key]
    refuse(config_dict, f"quantization_config.{key}: missing key")


def test_missing_nested_key_is_named(config_dict):
    del config_dict["layers"][MODULE]["up"]["planes"]
    refuse(config_dict, f"quantization_config.layers['{MODULE}'].up.planes: missing key")


def test_wrong_type_is_named(config_dict):
    config_dict["group_size"] = "32"
    refuse(config_dict, "quantization_config.group_size", "expected an integer", "'32'")


def test_bits_outside_the_set_are_refused(config_dict):
    config_dict["candidate_bits"] = [0, 2, 5]
    refuse(config_dict, "quantization_config.candidate_bits", "found 5")


@pytest.mark.parametrize("group_size", [48, 128])
def test_group_size_must_be_a_multiple_of_32_dividing_I(config_dict, group_size):
    config_dict["group_size"] = group_size
    refuse(config_dict, "quantization_config.group_size", str(group_size), f"intermediate_size {I}")


def test_layout_length_must_match_num_experts(config_dict):
    config_dict["layers"][MODULE]["gate"]["rows"].append(1)
    refuse(config_dict, f"layers['{MODULE}'].gate.rows", f"expected {E} entries", f"found {E + 1}")


def test_rank_above_hidden_size_is_refused(config_dict):
    config_dict["layers"][MODULE]["down"]["rank"] = H + 1
    refuse(config_dict, f"layers['{MODULE}'].down.rank", f"found {H + 1}")


def test_planes_inconsistent_with_rows_are_refused(config_dict):
    config_dict["layers"][MODULE]["up"]["planes"][2] = 9 * config_dict["layers"][MODULE]["up"]["rows"][2]
    refuse(config_dict, f"layers['{MODULE}'].up", "expert 2")


def test_achieved_bits_must_match_the_layout(config_dict):
    config_dict["achieved_bits"]["all"] -= 0.5
    refuse(config_dict, "achieved_bits.all", "the layout stores")


def test_achieved_bits_must_fit_the_budget(config_dict):
    config_dict["bits"] = 2.0
    refuse(config_dict, "achieved_bits.all", "exceeds the budget bits=2.0")


def test_stored_bits_by_hand():
    cfg, _ = random_checkpoint(64, 64, 2, (64, 64, 64), 32, widths=(2,))  # every row 2 bits
    weights = 3 * 2 * 64 * 64
    factors = 3 * 2 * (64 * 2 * 64 + 64 * 2 * 16)  # codes + one fp16 scale per 32 columns
    everything = factors + 3 * (2 * 64 * 8 + 64 * 64 * 16)  # + bits tensors + fp16 bases
    assert stored_bits(cfg) == pytest.approx({"all": everything / weights, "factors": factors / weights})
    assert stored_bits(cfg)["factors"] == pytest.approx(2.5)


def test_identity_basis_stores_no_basis_and_needs_full_rank():
    cfg, tensors = random_checkpoint(64, 64, 2, (64, 64, 64), 32, widths=(2,), basis_dtype="identity")
    assert set(tensor_specs(cfg)) == set(tensors) and len(tensors) == 3 * 3 * 2  # codes, scales, bits only
    factors = 3 * 2 * (64 * 2 * 64 + 64 * 2 * 16)
    assert stored_bits(cfg)["all"] == pytest.approx((factors + 3 * 2 * 64 * 8) / (3 * 2 * 64 * 64))  # + bits tensors
    d = cfg.to_dict()
    d["layers"][MODULE]["up"]["rank"] = 40
    refuse(d, f"layers['{MODULE}'].up.rank", "identity basis has rank hidden_size (64)", "found 40")


def test_tensor_specs_count_and_shard_dims(checkpoint):
    cfg, tensors = checkpoint
    specs = tensor_specs(cfg)
    assert set(specs) == set(tensors) and len(specs) == 3 + 3 * 3 * E
    assert specs[f"{MODULE}.0.gate_proj.codes"].shard_dim == 1
    assert specs[f"{MODULE}.0.gate_proj.scales"].shard_dim == 1
    assert specs[f"{MODULE}.0.gate_proj.bits"].shard_dim is None
    assert (
        specs[f"{MODULE}.0.down_proj.basis"].shape == (H, 64) and specs[f"{MODULE}.0.down_proj.basis"].shard_dim is None
    )


def test_valid_tensors_pass(checkpoint):
    check_tensors(*checkpoint)


def refuse_tensors(checkpoint, name, change, *fragments):
    """check_tensors must refuse the checkpoint once tensor `name` is change(tensor) (None: removed)."""
    cfg, tensors = checkpoint
    tensors = dict(tensors)
    changed = change(tensors.get(name))
    if changed is None:
        del tensors[name]
    else:
        tensors[name] = changed
    with pytest.raises(ValueError) as err:
        check_tensors(cfg, tensors)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"


def test_missing_tensor_is_named(checkpoint):
    name = f"{MODULE}.3.down_proj.scales"
    refuse_tensors(checkpoint, name, lambda t: None, f"missing tensor '{name}'", "torch.float16")


def test_wrong_shape_is_named(checkpoint):
    name = f"{MODULE}.1.up_proj.codes"
    expected = list(checkpoint[1][name].shape)
    found = [expected[0] - 1, expected[1]]
    refuse_tensors(
        checkpoint, name, lambda t: t[:-1], f"tensor '{name}'", f"expected shape {expected}", f"found {found}"
    )


def test_wrong_dtype_is_named(checkpoint):
    name = f"{MODULE}.0.gate_proj.basis"
    refuse_tensors(
        checkpoint, name, torch.Tensor.float, f"tensor '{name}'", "expected dtype torch.float16", "found torch.float32"
    )


def test_bits_outside_the_set_in_a_tensor_are_named(checkpoint):
    name = f"{MODULE}.2.gate_proj.bits"
    refuse_tensors(
        checkpoint, name, lambda t: t.masked_fill(t == 4, 5), f"tensor '{name}'", "bit-width 5 is not in candidate_bits"
    )


def test_bits_inconsistent_with_the_layout_are_named(checkpoint):
    name = f"{MODULE}.0.down_proj.bits"
    refuse_tensors(checkpoint, name, lambda t: t.masked_fill(t == 2, 3), f"tensor '{name}'", "quantization_config says")


def test_nan_in_a_basis_is_named(checkpoint):
    name = f"{MODULE}.0.up_proj.basis"
    refuse_tensors(
        checkpoint,
        name,
        lambda t: t.index_fill(0, torch.tensor([0]), float("nan")),
        f"tensor '{name}': holds NaN or Inf",
    )


def test_left_over_dense_expert_weight_is_named(checkpoint):
    name = f"{MODULE}.0.gate_proj.weight"
    refuse_tensors(checkpoint, name, lambda t: torch.zeros(I, H), f"unexpected tensor '{name}'")


def test_gpt_oss_layers_store_their_biases_and_activation():
    cfg, tensors = random_checkpoint(64, 64, 2, (64, 64, 64), 32, widths=(2,), gpt_oss=True)
    specs = tensor_specs(cfg)
    assert set(specs) == set(tensors) and len(specs) == 3 + 3 * 4 * 2
    assert specs[f"{MODULE}.1.up_proj.bias"].shape == (64,) and specs[f"{MODULE}.1.up_proj.bias"].shard_dim == 0
    assert specs[f"{MODULE}.1.down_proj.bias"].dtype == torch.float32
    assert specs[f"{MODULE}.1.down_proj.bias"].shard_dim is None  # added once, by rank 0
    factors = 3 * 2 * (64 * 2 * 64 + 64 * 2 * 16)
    everything = factors + 3 * (2 * 64 * 8 + 64 * 64 * 16) + 2 * (64 + 64 + 64) * 32  # + float32 biases
    assert stored_bits(cfg)["all"] == pytest.approx(everything / (3 * 2 * 64 * 64))
    d = cfg.to_dict()
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert (d["activation"], d["swiglu_alpha"], d["swiglu_limit"], d["expert_bias"]) == ("swigluoai", 1.702, 1.5, True)
    refuse({k: v for k, v in d.items() if k != "swiglu_limit"}, "quantization_config.swiglu_limit: missing key")
    refuse(d | {"activation": "gelu"}, "quantization_config.activation", "['silu', 'swigluoai']", "'gelu'")
    refuse(d | {"expert_bias": 1}, "quantization_config.expert_bias: expected true or false, found 1")
    check_tensors(cfg, tensors)
    with pytest.raises(ValueError, match=f"missing tensor '{MODULE}.0.gate_proj.bias'"):
        check_tensors(cfg, {k: v for k, v in tensors.items() if k != f"{MODULE}.0.gate_proj.bias"})
    without_biases = dataclasses.replace(cfg, expert_bias=False)
    with pytest.raises(ValueError, match=f"unexpected tensor '{MODULE}.0.gate_proj.bias'"):
        check_tensors(without_biases, tensors)


def test_one_basis_per_layer_is_stored_once_and_counted_once():
    """basis_sharing "layer": the gate's int8 basis [R, H] and its row scales serve the three projections, down with
    one scale of its own."""
    cfg, tensors = random_checkpoint(
        64, 64, 2, (40, 40, 40), 32, widths=(2,), basis_dtype="int8", basis_sharing="layer"
    )
    bases = {n: tuple(t.shape) for n, t in tensors.items() if ".basis" in n}
    assert bases == {
        f"{MODULE}.0.gate_proj.basis": (40, 64),
        f"{MODULE}.0.gate_proj.basis_scale": (40,),
        f"{MODULE}.0.down_proj.basis_scale": (1,),
    }
    assert set(tensor_specs(cfg)) == set(tensors)
    check_tensors(cfg, tensors)
    factors = 3 * 2 * (40 * 2 * 64 + 40 * 2 * 16)
    everything = factors + 3 * 2 * 40 * 8 + 40 * 64 * 8 + 41 * 16  # + bits tensors + one int8 basis, 41 scales
    assert stored_bits(cfg) == pytest.approx(
        {"all": everything / (3 * 2 * 64 * 64), "factors": factors / (3 * 2 * 64 * 64)}
    )
    d = cfg.to_dict()
    assert d["basis_sharing"] == "layer" and QuantConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert "basis_sharing" not in random_checkpoint(64, 64, 2, (40, 40, 40), 32)[0].to_dict()  # older readers' dicts
    refuse(d | {"basis_sharing": "model"}, "quantization_config.basis_sharing", "'model'")
    uneven = copy.deepcopy(d)
    uneven["layers"][MODULE]["down"]["rank"] = 64
    refuse(uneven, f"layers['{MODULE}']", "ranks [40, 40, 64] differ", "basis_sharing 'layer'")
    refuse(d | {"basis_dtype": "identity"}, "basis_sharing: 'layer' shares a stored basis; basis_dtype is identity")
    with pytest.raises(ValueError, match="missing tensor .*down_proj.basis_scale"):
        check_tensors(cfg, {n: t for n, t in tensors.items() if not n.endswith("down_proj.basis_scale")})
    with pytest.raises(ValueError, match="unexpected tensor .*up_proj.basis"):
        check_tensors(cfg, tensors | {f"{MODULE}.0.up_proj.basis": tensors[f"{MODULE}.0.gate_proj.basis"]})
