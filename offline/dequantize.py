"""A BitsMoE checkpoint turned back into a plain Hugging Face checkpoint: each routed expert's weights
are exactly what the BitsMoE layer computes (W_gate = F_gate^T B_gate, W_up = F_up^T B_up,
W_down = B_down F_down, from reference.py). Serving it unquantized must give the BitsMoE checkpoint's
outputs, which is how the vLLM method is checked; it also lets any tool evaluate a BitsMoE model.

    python -m bitsmoe_vllm.offline.dequantize BITSMOE_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from bitsmoe_vllm.checkpoint import WEIGHTS_INDEX, TensorFiles, load_layer, read_quant_config
from bitsmoe_vllm.format import PROJECTIONS, QuantConfig
from bitsmoe_vllm.reference import MoELayer, dequantize_basis, expert_factor

from .architectures import Architecture
from .export import copy_side_files
from .rundir import save_tensors
from .source import SourceCheckpoint


def dequantize_checkpoint(bitsmoe_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the plain checkpoint to out_dir one shard per MoE layer (and one for everything else), so that memory
    holds one layer's dequantized experts at a time."""
    source = SourceCheckpoint(str(bitsmoe_dir))
    cfg, files = read_quant_config(source.dir), TensorFiles(source.dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_names = [f"model-{i:05d}-of-{len(cfg.layers) + 1:05d}.safetensors" for i in range(1, len(cfg.layers) + 2)]
    weight_map, total_bytes = {}, 0

    def write(shard: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total_bytes
        save_tensors(out / shard, tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    quantized = tuple(layout.module + "." for layout in cfg.layers)
    # fp8 linear weights kept as stored (format version 3) dequantized: the plain checkpoint has no quantization
    write(shard_names[0], {n: source.get(n) for n in source.tensor_names() if not n.startswith(quantized)})
    for layout, shard in zip(cfg.layers, shard_names[1:]):
        layer = load_layer(files, cfg, layout.module)
        write(shard, dequantize_layer(cfg, layer, layout.module, dtype, source.architecture))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = {k: v for k, v in source.file_config.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(source, out)
    return out


def dense_weights(cfg: QuantConfig, layer: MoELayer) -> dict[str, torch.Tensor]:
    """Projection -> float32 [E, I, H], the layer's experts as dense weights (down as D_e^T, as offline.source
    reads the original's), and "{p}_bias" where the layer has biases."""
    B_gate, B_up, B_down = (
        torch.eye(cfg.hidden_size) if b is None else dequantize_basis(b)
        for b in (layer.gate_basis, layer.up_basis, layer.down_basis)
    )
    E, I, H = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    out = {p: torch.empty(E, I, H) for p in PROJECTIONS}  # filled an expert at a time: no list to stack
    for e in range(E):
        out["gate"][e] = expert_factor(layer.gate, e, cfg.group_size).T @ B_gate
        out["up"][e] = expert_factor(layer.up, e, cfg.group_size).T @ B_up
        out["down"][e] = (B_down @ expert_factor(layer.down, e, cfg.group_size)).T
    if layer.biases is not None:  # as offline.source reads a family's biases
        out |= {f"{p}_bias": getattr(layer.biases, p).float() for p in PROJECTIONS}
    return out


def dequantize_layer(
    cfg: QuantConfig, layer: MoELayer, module: str, dtype: torch.dtype, arch: Architecture | None = None
) -> dict[str, torch.Tensor]:
    """Every expert's gate, up and down weights of one BitsMoE layer, by their Hugging Face names: one tensor per
    expert and projection, or, for a family that stores its experts stacked under names of its own
    (Architecture.fused_names, e.g. Granite's input_linear [E, 2I, H] and output_linear [E, H, I]), those, which
    transformers reads for it."""
    weights = dense_weights(cfg, layer)
    if arch is not None and arch.fused_layout == "gpt_oss":  # gate and up interleaved, [E, H, 2I]; down [E, I, H]
        gate_up = arch.fused_name(module, "gate_up_proj")
        down = arch.fused_name(module, "down_proj")
        E, I, H = weights["gate"].shape
        return {
            gate_up: torch.stack([weights["gate"], weights["up"]], 2).reshape(E, 2 * I, H).mT.contiguous().to(dtype),
            f"{gate_up}_bias": torch.stack([weights["gate_bias"], weights["up_bias"]], 2).reshape(E, 2 * I).to(dtype),
            down: weights["down"].to(dtype),
            f"{down}_bias": weights["down_bias"].to(dtype),
        }
    weights["down"] = weights["down"].transpose(1, 2)  # [E, H, I], as stored
    if arch is not None and arch.fused_names:
        return {
            arch.fused_name(module, "gate_up_proj"): torch.cat([weights["gate"], weights["up"]], 1).to(dtype),
            arch.fused_name(module, "down_proj"): weights["down"].to(dtype).contiguous(),
        }
    return {
        f"{module}.{e}.{cfg.projection_names[p]}.weight": weights[p][e].to(dtype).contiguous()
        for e in range(cfg.num_experts)
        for p in PROJECTIONS
    }


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bitsmoe_vllm.offline.dequantize BITSMOE_DIR OUT_DIR")
    print(dequantize_checkpoint(sys.argv[1], sys.argv[2]))
