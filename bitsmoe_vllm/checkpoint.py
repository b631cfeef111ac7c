"""Reading a checkpoint directory: its safetensors tensors lazily by name, and for a BitsMoE checkpoint
its validated `quantization_config` and layers (FORMAT.md)."""

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from bitsmoe_vllm.format import QuantConfig, check_layer_tensors
from bitsmoe_vllm.reference import MoELayer, gather_layer

WEIGHTS_INDEX = "model.safetensors.index.json"


class TensorFiles(Mapping):
    """name -> tensor over the safetensors files of a directory (through the index when there is one)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.shard_of = self._index()
        self._open: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        index = self.dir / WEIGHTS_INDEX
        if index.is_file():
            shard_of = json.loads(index.read_text())["weight_map"]
            for shard in sorted(set(shard_of.values())):
                if not (self.dir / shard).is_file():
                    raise FileNotFoundError(f"shard {shard} named in {index} is missing")
            return shard_of
        shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors file in {self.dir}")
        shard_of = {}
        for shard in shards:
            with safe_open(self.dir / shard, "pt") as f:
                shard_of.update(dict.fromkeys(f.keys(), shard))
        return shard_of

    def _file(self, name: str):
        if name not in self.shard_of:
            raise KeyError(f"tensor {name!r} is not in {self.dir}")
        shard = self.shard_of[name]
        if shard not in self._open:
            self._open[shard] = safe_open(self.dir / shard, "pt")
        return self._open[shard]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def numel(self, name: str) -> int:
        """Element count of a tensor, from its header (no data read)."""
        return math.prod(self._file(name).get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self.shard_of)

    def __len__(self) -> int:
        return len(self.shard_of)

    def close(self) -> None:
        """Drop the open files (their memory maps count in the process's RSS); they reopen when needed."""
        self._open.clear()

    def under(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with `prefix`, loaded."""
        return {name: self[name] for name in self.shard_of if name.startswith(prefix)}


def read_quant_config(directory: str | Path) -> QuantConfig:
    """The validated quantization_config of a BitsMoE checkpoint; errors name config.json."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a checkpoint directory")
    config = json.loads(path.read_text())
    if "quantization_config" not in config:
        raise ValueError(f"{path} has no quantization_config: not a BitsMoE checkpoint")
    try:
        return QuantConfig.from_dict(config["quantization_config"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_layer(files: TensorFiles, cfg: QuantConfig, module: str) -> MoELayer:
    """One MoE layer of a BitsMoE checkpoint, validated, in the reference's form."""
    return gather_layer(cfg, module, files.under(module + "."))


def validate_checkpoint(directory: str | Path) -> QuantConfig:
    """Read every BitsMoE tensor back and check it against config.json; return the config."""
    cfg = read_quant_config(directory)
    files = TensorFiles(directory)
    for layer in cfg.layers:
        check_layer_tensors(cfg, layer, files.under(layer.module + "."))
    return cfg
