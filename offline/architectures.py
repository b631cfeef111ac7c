"""Where each supported model family keeps its routed experts in a Hugging Face checkpoint."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bitsmoe_vllm.activation import SILU, Activation

STANDARD_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class Architecture:
    experts_module: str  # checkpoint path of layer {layer}'s experts
    projection_names: dict[str, str]  # "gate"/"up"/"down" -> checkpoint name
    num_experts_keys: tuple[str, ...]  # config.json keys that may hold E, first found wins
    intermediate_size_key: str  # config.json key of I (per expert)
    renames: tuple[tuple[str, str], ...] = ()  # (transformers module path part, checkpoint part)
    text_config: bool = False  # a multimodal checkpoint: the text model (quantized) is described by its text_config
    # stacked experts stored under other names than transformers 5's `{experts}.gate_up_proj` / `.down_proj`: (leaf,
    # name beside the experts module), e.g. Granite-MoE's block_sparse_moe.input_linear.weight
    fused_names: tuple[tuple[str, str], ...] = ()
    moe_block: str = "mlp"  # the attribute of a transformers decoder layer that holds its sparse MoE block
    # how stacked experts are laid out: "rows", transformers 5's gate_up_proj [E, 2I, H] (gate rows, then up rows) and
    # down_proj [E, H, I]; "gpt_oss", gate_up_proj [E, H, 2I] (gate in the even columns, up in the odd) and down_proj
    # [E, I, H], with biases gate_up_proj_bias [E, 2I] (interleaved) and down_proj_bias [E, H]
    fused_layout: str = "rows"
    activation_name: str = "silu"  # bitsmoe_vllm.activation; swigluoai's alpha and limit come from config.json

    def experts(self, decoder_layer):
        """The routed-experts module of a transformers decoder layer."""
        return getattr(decoder_layer, self.moe_block).experts

    def num_experts(self, config: Mapping[str, Any]) -> int:
        for key in self.num_experts_keys:
            if key in config:
                return config[key]
        raise ValueError(f"config.json has none of {list(self.num_experts_keys)} (the number of routed experts)")

    def intermediate_size(self, config: Mapping[str, Any]) -> int:
        if self.intermediate_size_key not in config:
            raise ValueError(f"config.json has no {self.intermediate_size_key!r} (the experts' intermediate size)")
        return config[self.intermediate_size_key]

    @property
    def expert_bias(self) -> bool:
        return self.fused_layout == "gpt_oss"

    def activation(self, config: Mapping[str, Any]) -> Activation:
        if self.activation_name == "silu":
            return SILU
        # transformers' GptOssConfig defaults (gpt-oss's config.json states the limit only)
        return Activation(self.activation_name, config.get("swiglu_alpha", 1.702), config.get("swiglu_limit", 7.0))

    def fused_name(self, module: str, leaf: str) -> str:
        """The checkpoint name of stacked-experts tensor `leaf` (source.FUSED_EXPERTS) of experts `module`."""
        names = dict(self.fused_names)
        return f"{module.rpartition('.')[0]}.{names[leaf]}" if leaf in names else f"{module}.{leaf}"

    def checkpoint_name(self, module_name: str) -> str:
        """The checkpoint's name of a transformers parameter name."""
        for ours, theirs in self.renames:
            module_name = module_name.replace(ours, theirs)
        return module_name


# Granite-MoE: stacked experts under their own names ([E, 2I, H] gate rows first, [E, H, I]), the router as
# router.layer, the MoE block as block_sparse_moe in transformers too
GRANITE_MOE = Architecture(
    "model.layers.{layer}.block_sparse_moe.experts",
    STANDARD_NAMES,
    ("num_local_experts",),
    "intermediate_size",
    renames=(("router.weight", "router.layer.weight"),),
    fused_names=(("gate_up_proj", "input_linear.weight"), ("down_proj", "output_linear.weight")),
    moe_block="block_sparse_moe",
)

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
    # experts stacked with biases, gate and up interleaved, and a clamped SwiGLU (Architecture.fused_layout)
    "gpt_oss": Architecture(
        "model.layers.{layer}.mlp.experts",
        STANDARD_NAMES,
        ("num_local_experts",),
        "intermediate_size",
        fused_layout="gpt_oss",
        activation_name="swigluoai",
    ),
    "granitemoe": GRANITE_MOE,
    "granitemoeshared": GRANITE_MOE,  # with a shared expert (shared_mlp), kept as stored
    "granitemoehybrid": GRANITE_MOE,  # Granite 4.0: Mamba-2 and attention layers, each with MoE and a shared expert
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
