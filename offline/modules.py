"""The transformers model of a checkpoint, built on the meta device and filled module by module.

Only what a stage needs is ever in memory: `load_module` materializes one module (a decoder layer,
the embeddings) from the safetensors tensors and `release` returns it to the meta device.
"""

import ctypes

import torch
import transformers

from .source import FUSED_EXPERTS, SourceCheckpoint


def skeleton(source: SourceCheckpoint, device: torch.device) -> transformers.PreTrainedModel:
    """The model with every parameter on the meta device; the rotary embedding, if any, is real (it has no weights)."""
    config = special_floats(source.config)
    config.pop("quantization_config", None)
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    if model.model.rotary_emb is not None:  # (Granite 4.0 has none: no positional embedding)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    return model


def special_floats(value):
    """config.json's values with transformers' encoding of inf and nan ({"__float__": "Infinity"}, as in Granite 4.0's
    time_step_limit) decoded, which its strict config classes require."""
    if isinstance(value, dict):
        if value.keys() == {"__float__"}:
            return float(value["__float__"])
        return {k: special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [special_floats(v) for v in value]
    return value


def load_module(
    module: torch.nn.Module,
    prefix: str,
    source: SourceCheckpoint,
    device: torch.device,
    skip: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """Give `module` (at path `prefix` in the model) its checkpoint weights, as float32 on `device`; its submodule
    `skip` stays without weights (on the meta device)."""
    module.to_empty(device=device)
    if skip is not None:
        release(skip)
    with torch.no_grad():  # parameters and persistent buffers (a router's e_score_correction_bias is one)
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_meta:
                tensor.copy_(checkpoint_tensor(source, prefix + name))
    return module


def release(module: torch.nn.Module) -> None:
    """Free a module's weights (back to the meta device)."""
    module.to(torch.device("meta"))


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS. glibc keeps it otherwise, and the peak RSS of a run creeps up with
    every layer (benchmarks/README.md, design timings)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def checkpoint_tensor(source: SourceCheckpoint, name: str) -> torch.Tensor:
    """The checkpoint tensor behind transformers parameter `name`; stacked experts are assembled."""
    arch = source.architecture
    module, _, leaf = name.rpartition(".")
    if module.endswith(".experts") and leaf in FUSED_EXPERTS:
        return source.stacked_experts(arch.checkpoint_name(module + ".")[:-1], leaf)
    if name == "lm_head.weight" and name not in source.tensors and source.config.get("tie_word_embeddings"):
        name = "model.embed_tokens.weight"
    return source.get(arch.checkpoint_name(name))
