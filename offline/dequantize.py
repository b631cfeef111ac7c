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
from safetensors.torch import save_file

from bitsmoe_vllm.checkpoint import TensorFiles, load_layer, read_quant_config
from bitsmoe_vllm.reference import dequantize_basis, expert_factor

from .export import copy_side_files
from .source import SourceCheckpoint


def dequantize_checkpoint(bitsmoe_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    source = SourceCheckpoint(str(bitsmoe_dir))
    cfg, files = read_quant_config(source.dir), TensorFiles(source.dir)
    quantized = tuple(layout.module + "." for layout in cfg.layers)
    tensors = {name: files[name] for name in files if not name.startswith(quantized)}
    for layout in cfg.layers:
        layer = load_layer(files, cfg, layout.module)
        B_gate, B_up, B_down = (
            torch.eye(cfg.hidden_size) if b is None else dequantize_basis(b)
            for b in (layer.gate_basis, layer.up_basis, layer.down_basis)
        )
        for e in range(cfg.num_experts):
            weights = {
                "gate": expert_factor(layer.gate, e, cfg.group_size).T @ B_gate,  # [I, H]
                "up": expert_factor(layer.up, e, cfg.group_size).T @ B_up,  # [I, H]
                "down": B_down @ expert_factor(layer.down, e, cfg.group_size),  # [H, I]
            }
            for p, w in weights.items():
                tensors[f"{layout.module}.{e}.{cfg.projection_names[p]}.weight"] = w.to(dtype).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(source, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bitsmoe_vllm.offline.dequantize BITSMOE_DIR OUT_DIR")
    print(dequantize_checkpoint(sys.argv[1], sys.argv[2]))
