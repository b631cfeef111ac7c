"""Source checkpoints whose experts are stacked in 3-D tensors, as transformers 5 holds them (gate_up_proj [E, 2I, H],
down_proj [E, H, I]), quantize exactly as the same weights stored one tensor per expert."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from bitsmoe_vllm.offline.dequantize import dequantize_checkpoint
from bitsmoe_vllm.offline.evaluate import load_model
from bitsmoe_vllm.offline.source import dequantize_mxfp4
from tests.helpers import checkpoint_bytes, fp8_block_copy, mxfp4_copy, stack_experts

SHAPE = {"layers": 2, "experts": 8, "intermediate": 64}


def logits(model_dir) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.arange(3, 40)[None]).logits


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_stacked_experts_quantize_to_the_bytes_of_per_expert_ones(arch, tiny_model_dir, quantize_tiny, tmp_path):
    per_expert = tiny_model_dir(arch, **SHAPE)
    stacked = stack_experts(per_expert, tmp_path / "stacked", SHAPE["experts"])
    assert not any(".experts.0." in name for name in load_file(stacked / "model.safetensors"))
    # the copy is the layout transformers reads: the same model (were gate and up swapped, it would differ)
    assert torch.equal(logits(stacked), logits(per_expert))
    ours = quantize_tiny(stacked, tmp_path / "from-stacked", 2.5)
    theirs = quantize_tiny(per_expert, tmp_path / "from-per-expert", 2.5)
    assert checkpoint_bytes(ours) == checkpoint_bytes(theirs)


def test_stacked_experts_in_another_layout_are_refused_with_the_shapes(tiny_model_dir, quantize_tiny, tmp_path):
    stacked = stack_experts(tiny_model_dir("qwen3_moe", **SHAPE), tmp_path / "stacked", SHAPE["experts"])
    tensors = load_file(stacked / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    tensors[name] = tensors[name].transpose(1, 2).contiguous()  # [E, H, 2I], as gpt-oss and Llama 4 store theirs
    save_file(tensors, stacked / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name} has shape \[8, 64, 128\]; expected \[8, 128, 64\]"):
        quantize_tiny(stacked, tmp_path / "out", 2.5)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_fp8_block_quantized_weights_quantize_as_their_dequantized_values(tiny_model_dir, quantize_tiny, tmp_path):
    """DeepSeek-V3's fp8 checkpoints: each weight read as its codes times its block's scale (blocks of 32 x 48 here,
    so that the last block of a row is cut short); with --format-version 2 the linear weights are written so."""
    original = tiny_model_dir("deepseek_v3", **SHAPE)
    fp8 = fp8_block_copy(original, tmp_path / "fp8", (32, 48))
    assert any(t.dtype == torch.float8_e4m3fn for t in load_file(fp8 / "model.safetensors").values())
    dequantized = fp8_block_copy(original, tmp_path / "dequantized", (32, 48), dequantized=True)
    ours = quantize_tiny(fp8, tmp_path / "from-fp8", 2.5, format_version=2)
    theirs = quantize_tiny(dequantized, tmp_path / "from-dequantized", 2.5)
    assert checkpoint_bytes(ours) == checkpoint_bytes(theirs)
    assert not any(name.endswith("_scale_inv") for name in load_file(ours / "model-00001-of-00003.safetensors"))


def all_tensors(directory) -> dict[str, torch.Tensor]:
    return {name: t for path in sorted(directory.glob("*.safetensors")) for name, t in load_file(path).items()}


def test_fp8_linear_weights_are_kept_as_stored_by_default(tiny_model_dir, quantize_tiny, tmp_path):
    """Format version 3: the source's fp8 weights outside the routed experts and their scales are written as stored,
    the fp8 quantization_config under linear_quantization; the experts are those of --format-version 2, byte for
    byte, and so are the dequantized checkpoint and the reference forward's logits."""
    fp8 = fp8_block_copy(tiny_model_dir("deepseek_v3", **SHAPE), tmp_path / "fp8", (32, 48))
    kept = quantize_tiny(fp8, tmp_path / "kept", 2.5)
    dequantized = quantize_tiny(fp8, tmp_path / "dequantized", 2.5, format_version=2)
    config = json.loads((kept / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 3
    assert config["linear_quantization"] == json.loads((fp8 / "config.json").read_text())["quantization_config"]

    source, ours, theirs = all_tensors(fp8), all_tensors(kept), all_tensors(dequantized)
    experts = {name for name in source if ".mlp.experts." in name}
    assert experts and any(name.endswith("_scale_inv") for name in experts)
    outside = {name: t for name, t in source.items() if name not in experts}
    assert sum(t.dtype == torch.float8_e4m3fn for t in outside.values()) >= 10  # attention, dense and shared MLPs
    for name, t in outside.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name].view(torch.uint8), t.view(torch.uint8)), name
    bitsmoe = {name for name in theirs if ".mlp.experts." in name}
    assert bitsmoe and bitsmoe <= ours.keys() and set(ours) == bitsmoe | set(outside)
    assert all(torch.equal(ours[name], theirs[name]) for name in bitsmoe)
    assert checkpoint_bytes(dequantize_checkpoint(kept, tmp_path / "plain-kept")) == checkpoint_bytes(
        dequantize_checkpoint(dequantized, tmp_path / "plain-dequantized")
    )
    tokens = torch.arange(3, 40)[None]
    with torch.no_grad():
        logits = [load_model(str(d), torch.device("cpu"))(tokens).logits for d in (kept, dequantized)]
    assert torch.equal(*logits)


def test_format_version_3_needs_an_fp8_source_and_a_bitsmoe_one_is_refused(tiny_model_dir, quantize_tiny, tmp_path):
    original = tiny_model_dir("deepseek_v3", **SHAPE)
    with pytest.raises(
        ValueError, match="--format-version 3 keeps a source's fp8 linear weights as stored, and .* has none"
    ):
        quantize_tiny(original, tmp_path / "out", 2.5, format_version=3)
    kept = quantize_tiny(fp8_block_copy(original, tmp_path / "fp8", (32, 48)), tmp_path / "kept", 2.5)
    with pytest.raises(ValueError, match="already quantized \\(quant_method 'bitsmoe'\\)"):
        quantize_tiny(kept, tmp_path / "again", 2.5)


def test_checkpoints_quantized_otherwise_are_refused(tiny_model_dir, quantize_tiny, tmp_path):
    model = tmp_path / "gptq"
    shutil.copytree(tiny_model_dir("qwen3_moe", **SHAPE), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="already quantized \\(quant_method 'gptq'\\); BitsMoE starts from"):
        quantize_tiny(model, tmp_path / "out", 2.5)


def assert_reference_is_transformers_on_dequantized(original, bitsmoe, tmp_path, model_class):
    """The reference forward of the BitsMoE checkpoint gives the logits transformers (`model_class`) gives on its
    dequantized weights, and not those of the original; returns the dequantized checkpoint's directory."""
    tokens = torch.arange(3, 60)[None]
    with torch.no_grad():
        ours = load_model(str(bitsmoe), torch.device("cpu"))(tokens).logits
    dequantized = dequantize_checkpoint(bitsmoe, tmp_path / "dequantized")
    expected = {}
    for model in (dequantized, original):
        net = model_class.from_pretrained(model, dtype=torch.float32)
        with torch.no_grad():
            expected[model] = net(input_ids=tokens).logits
    assert (ours - expected[dequantized]).abs().max() < 1e-4
    assert (ours - expected[original]).abs().max() > 1e-2  # the comparison's teeth: quantization moved the model
    return dequantized


def test_a_multimodal_checkpoints_text_model_quantizes_and_runs_as_transformers_runs_it(
    tiny_model_dir, quantize_tiny, tmp_path
):
    """Qwen3.5-MoE: the text model sits under model.language_model. beside a vision tower. Its experts are quantized,
    the vision tower is kept as stored, and the reference forward of the BitsMoE checkpoint gives the logits
    transformers gives on its dequantized weights (vLLM's Qwen3.5 imports torchvision, which this CPU build cannot
    load beside its torch: README, support matrix)."""
    original = tiny_model_dir("qwen3_5_moe", **SHAPE)
    bitsmoe = quantize_tiny(original, tmp_path / "bitsmoe", 2.5)
    stored = {}
    for path in bitsmoe.glob("model-*.safetensors"):
        stored |= load_file(path)
    source = load_file(original / "model.safetensors")
    vision = [name for name in source if name.startswith("model.visual.")]
    assert vision and all(torch.equal(stored[name], source[name]) for name in vision)
    assert any(name.startswith("model.language_model.layers.1.mlp.experts.3.") for name in stored)

    assert_reference_is_transformers_on_dequantized(
        original, bitsmoe, tmp_path, transformers.Qwen3_5MoeForConditionalGeneration
    )


def test_granite_4_quantizes_and_runs_as_transformers_runs_it(tiny_model_dir, quantize_tiny, tmp_path):
    """Granite 4.0 (granitemoehybrid: Mamba-2 and attention layers, no rotary embedding, experts stacked as
    block_sparse_moe.input_linear / output_linear): the reference forward of the BitsMoE checkpoint gives the logits
    transformers gives on its dequantized weights, written in the family's stacked layout (vLLM 0.32 cannot load it:
    README, support matrix)."""
    original = tiny_model_dir("granitemoehybrid", **SHAPE)
    bitsmoe = quantize_tiny(original, tmp_path / "bitsmoe", 2.5)
    dequantized = assert_reference_is_transformers_on_dequantized(
        original, bitsmoe, tmp_path, transformers.AutoModelForCausalLM
    )
    stored = set()
    for path in dequantized.glob("*.safetensors"):
        stored |= set(load_file(path))
    assert "model.layers.1.block_sparse_moe.input_linear.weight" in stored


def test_gpt_oss_quantizes_with_its_biases_and_activation_and_runs_as_transformers_runs_it(
    tiny_model_dir, quantize_tiny, tmp_path
):
    """gpt-oss: experts stacked as gate_up_proj [E, H, 2I] (gate and up interleaved) and down_proj [E, I, H], with
    biases and a clamped SwiGLU. The checkpoint stores the biases (float32) and the activation, the reference forward
    gives the logits transformers gives on the dequantized weights, written back in gpt-oss's layout."""
    original = tiny_model_dir("gpt_oss", **SHAPE)
    bitsmoe = quantize_tiny(original, tmp_path / "bitsmoe", 2.5)
    config = json.loads((bitsmoe / "config.json").read_text())["quantization_config"]
    assert (config["activation"], config["swiglu_alpha"], config["swiglu_limit"]) == ("swigluoai", 1.702, 7.0)
    assert config["expert_bias"] is True
    stored = {}
    for path in bitsmoe.glob("model-*.safetensors"):
        stored |= load_file(path)
    source = load_file(original / "model.safetensors")
    gate_up_bias = source["model.layers.1.mlp.experts.gate_up_proj_bias"]
    assert torch.equal(stored["model.layers.1.mlp.experts.3.gate_proj.bias"], gate_up_bias[3, 0::2])
    assert torch.equal(stored["model.layers.1.mlp.experts.3.up_proj.bias"], gate_up_bias[3, 1::2])
    down_bias = source["model.layers.1.mlp.experts.down_proj_bias"]
    assert torch.equal(stored["model.layers.1.mlp.experts.3.down_proj.bias"], down_bias[3])
    dequantized = assert_reference_is_transformers_on_dequantized(
        original, bitsmoe, tmp_path, transformers.AutoModelForCausalLM
    )
    written = load_file(next(dequantized.glob("*00002*.safetensors")))
    assert set(written) == {
        f"model.layers.0.mlp.experts.{n}" for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    }


def test_mxfp4_experts_quantize_as_their_dequantized_values(tiny_model_dir, quantize_tiny, tmp_path):
    """gpt-oss's released layout: MXFP4 blocks and scales, read as codes times their block's power of two."""
    original = tiny_model_dir("gpt_oss", **SHAPE)
    mxfp4 = mxfp4_copy(original, tmp_path / "mxfp4")
    stored = load_file(mxfp4 / "model.safetensors")
    blocks, scales = (stored[f"model.layers.0.mlp.experts.down_proj_{k}"] for k in ("blocks", "scales"))
    assert blocks.dtype == torch.uint8
    # the reading, against transformers' own (an error shared by the helper and the reader would pass the rest)
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2), expected)
    dequantized = mxfp4_copy(original, tmp_path / "dequantized", dequantized=True)
    ours = quantize_tiny(mxfp4, tmp_path / "from-mxfp4", 2.5)
    theirs = quantize_tiny(dequantized, tmp_path / "from-dequantized", 2.5)
    assert checkpoint_bytes(ours) == checkpoint_bytes(theirs)
    stored = set()
    for path in ours.glob("*.safetensors"):
        stored |= set(load_file(path))
    assert not any(name.endswith(("_blocks", "_scales")) for name in stored)
    # the teeth: MXFP4 moved the weights, so quantizing the original gives another checkpoint
    assert checkpoint_bytes(quantize_tiny(original, tmp_path / "from-original", 2.5)) != checkpoint_bytes(ours)
