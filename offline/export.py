"""Writing the BitsMoE checkpoint (FORMAT.md): one safetensors shard per decoder layer plus one for
everything outside the layers, the index, config.json, and the tokenizer and other small files."""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from bitsmoe_vllm.checkpoint import WEIGHTS_INDEX
from bitsmoe_vllm.format import QuantConfig

from .rundir import save_tensors, write_atomic
from .source import SourceCheckpoint

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".tmp")
NOT_COPIED = {"config.json", WEIGHTS_INDEX, "pytorch_model.bin.index.json", "quantization_report.json"}


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def shard_files(num_layers: int) -> list[str]:
    """Shard of decoder layer i is entry i; the last entry holds everything outside the layers."""
    return [shard_name(i + 1, num_layers + 1) for i in range(num_layers + 1)]


def copied_tensors(
    source: SourceCheckpoint, prefix: str | None, experts_module: str | None, keep_fp8: bool = False
) -> dict[str, torch.Tensor]:
    """Source tensors kept unchanged: those under transformers' module path `prefix` (None: outside every decoder
    layer), minus routed experts. fp8 weights with their scales as stored where `keep_fp8` (format version 3), else
    dequantized to the checkpoint's dtype."""
    experts = source.expert_tensor_names(experts_module) if experts_module else set()
    experts |= {f"{name}_scale_inv" for name in experts}  # an fp8 source's experts' scales
    prefix, layers = (source.architecture.checkpoint_name(p) if p else None for p in (prefix, "model.layers."))
    out = {}
    for name in source.tensors if keep_fp8 else source.tensor_names():
        inside = name.startswith(prefix) if prefix else not name.startswith(layers)
        if not inside or name in experts:
            continue
        if experts_module and name.startswith(experts_module + "."):
            raise ValueError(
                f"tensor {name} under the routed experts is not one of their gate/up/down weights (per expert, or "
                "stacked as gate_up_proj and down_proj); unsupported"
            )
        out[name] = source.tensors[name] if keep_fp8 else source.get(name)
    return out


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_tensors(path, tensors, {"format": "pt"})


def write_index(directory: Path, files: list[str]) -> None:
    weight_map, total = {}, 0
    for file in files:
        with safe_open(directory / file, "pt") as f:
            for name in f.keys():
                weight_map[name] = file
                t = f.get_slice(name)
                total += _nbytes(t.get_dtype(), t.get_shape())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(directory / WEIGHTS_INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))


def write_config(directory: Path, source: SourceCheckpoint, cfg: QuantConfig) -> None:
    config = {**source.file_config, "quantization_config": cfg.to_dict()}
    write_atomic(directory / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))


def copy_side_files(source: SourceCheckpoint, directory: Path) -> list[str]:
    """Tokenizer, generation config, chat template and other small files; never weights."""
    copied = []
    for path in sorted(source.dir.iterdir()):
        if path.is_file() and path.name not in NOT_COPIED and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, directory / path.name)
            copied.append(path.name)
    return copied


_DTYPE_BYTES = {
    **{"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1},
    **{"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1},
}


def _nbytes(dtype: str, shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * _DTYPE_BYTES[dtype]
