"""Source checkpoints whose experts are stacked in 3-D tensors, as transformers 5 holds them (gate_up_proj [E, 2I, H],
down_proj [E, H, I]), quantize exactly as the same weights stored one tensor per expert."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.helpers import checkpoint_bytes, stack_experts

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
