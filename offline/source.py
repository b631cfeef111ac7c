"""The model to quantize: a local Hugging Face checkpoint read lazily, one tensor at a time."""

import json
from pathlib import Path

import torch

from bitsmoe_vllm.checkpoint import TensorFiles

from .architectures import Architecture, architecture


def resolve_model_dir(model: str) -> Path:
    """A directory, or a model id already in the local Hugging Face cache (nothing is downloaded)."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except (ValueError, OSError) as err:  # an invalid id, or one not in the cache
        raise FileNotFoundError(
            f"model {model!r} is neither a directory nor a model id in the local Hugging Face cache "
            f"({err.__class__.__name__}); "
            "pass the checkpoint's directory, or download it first"
        ) from None


class SourceCheckpoint:
    """config.json, tokenizer files and safetensors tensors of a Hugging Face checkpoint."""

    def __init__(self, model: str):
        self.dir = resolve_model_dir(model)
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a Hugging Face checkpoint directory")
        self.config = json.loads(config_path.read_text())
        try:
            self.tensors = TensorFiles(self.dir)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; BitsMoE reads safetensors checkpoints only") from None

    @property
    def architecture(self) -> Architecture:
        return architecture(self.config.get("model_type", "<missing model_type>"))

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def moe_layers(self) -> list[int]:
        """Decoder layers whose routed experts are in the checkpoint."""
        arch, names = self.architecture, self.tensors.shard_of
        layers = range(self.config["num_hidden_layers"])
        gate = arch.projection_names["gate"]
        return [i for i in layers if f"{arch.experts_module.format(layer=i)}.0.{gate}.weight" in names]

    def expert_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """Projection -> float32 [E, I, H] (gate and up as stored; down transposed from [E, H, I])."""
        arch = self.architecture
        module, E = arch.experts_module.format(layer=layer), arch.num_experts(self.config)
        out = {}
        for p, name in arch.projection_names.items():
            w = torch.stack([self.get(f"{module}.{e}.{name}.weight").float() for e in range(E)])
            out[p] = w.transpose(1, 2).contiguous() if p == "down" else w
        return out
