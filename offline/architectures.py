"""Where each supported model family keeps its routed experts in a Hugging Face checkpoint."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STANDARD_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class Architecture:
    experts_module: str  # checkpoint path of layer {layer}'s experts
    projection_names: dict[str, str]  # "gate"/"up"/"down" -> checkpoint name
    num_experts_keys: tuple[str, ...]  # config.json keys that may hold E, first found wins
    intermediate_size_key: str  # config.json key of I (per expert)
    renames: tuple[tuple[str, str], ...] = ()  # (transformers module path part, checkpoint part)
    text_config: bool = False  # a multimodal checkpoint: the text model (quantized) is described by its text_config

    def num_experts(self, config: Mapping[str, Any]) -> int:
        for key in self.num_experts_keys:
            if key in config:
                return config[key]
        raise ValueError(f"config.json has none of {list(self.num_experts_keys)} (the number of routed experts)")

    def intermediate_size(self, config: Mapping[str, Any]) -> int:
        if self.intermediate_size_key not in config:
            raise ValueError(f"config.json has no {self.intermediate_size_key!r} (the experts' intermediate size)")
        return config[self.intermediate_size_key]

    def checkpoint_name(self, module_name: str) -> str:
        """The checkpoint's name of a transformers parameter name."""
        for ours, theirs in self.renames:
            module_name = module_name.replace(ours, theirs)
        return module_name


# transformers 5 writes num_local_experts where older Qwen3-MoE checkpoints say num_experts.
ARCHITECTURES = {
    "qwen3_moe": Architecture(
        "model.layers.{layer}.mlp.experts",
        STANDARD_NAMES,
        ("num_experts", "num_local_experts"),
        "moe_intermediate_size",
    ),
    "olmoe": Architecture(
        "model.layers.{layer}.mlp.experts", STANDARD_NAMES, ("num_experts", "num_local_experts"), "intermediate_size"
    ),
    "deepseek_v2": Architecture(
        "model.layers.{layer}.mlp.experts", STANDARD_NAMES, ("n_routed_experts",), "moe_intermediate_size"
    ),
    "glm4_moe": Architecture(
        "model.layers.{layer}.mlp.experts", STANDARD_NAMES, ("n_routed_experts",), "moe_intermediate_size"
    ),
    "deepseek_v3": Architecture(
        "model.layers.{layer}.mlp.experts", STANDARD_NAMES, ("n_routed_experts",), "moe_intermediate_size"
    ),
    "qwen3_next": Architecture(
        "model.layers.{layer}.mlp.experts", STANDARD_NAMES, ("num_experts",), "moe_intermediate_size"
    ),
    # the text model of a multimodal checkpoint, under model.language_model. (the vision tower is kept as stored)
    "qwen3_5_moe": Architecture(
        "model.language_model.layers.{layer}.mlp.experts",
        STANDARD_NAMES,
        ("num_experts",),
        "moe_intermediate_size",
        renames=(("model.", "model.language_model."),),
        text_config=True,
    ),
    "mixtral": Architecture(
        "model.layers.{layer}.block_sparse_moe.experts",
        {"gate": "w1", "up": "w3", "down": "w2"},
        ("num_local_experts",),
        "intermediate_size",
        renames=((".mlp.", ".block_sparse_moe."),),
    ),
}


def architecture(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]
