"""Reading a checkpoint directory: its safetensors tensors lazily by name, and for a BitsMoE checkpoint
its validated `quantization_config` and layers (FORMAT.md)."""

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from bitsmoe_vllm.format import (
    PROJECTIONS,
    QuantConfig,
    check_bits,
    check_layer_tensors,
    expert_tensor_name,
    tensor_specs,
)
from bitsmoe_vllm.reference import MoELayer, gather_layer

WEIGHTS_INDEX = "model.safetensors.index.json"
_DTYPE_OF_HEADER = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


class TensorFiles(Mapping):
    """name -> tensor over the safetensors files of a directory (those its index names, when it has one)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.shard_of = self._index()
        self._open: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        """name -> shard, from the shards themselves (each opened once, so a missing or cut-short one is named now)."""
        shard_of = {}
        for shard in shard_files(self.dir):
            with open_shard(self.dir / shard) as f:
                shard_of.update(dict.fromkeys(f.keys(), shard))
        return shard_of

    def _file(self, name: str):
        if name not in self.shard_of:
            raise KeyError(f"tensor {name!r} is not in {self.dir}")
        shard = self.shard_of[name]
        if shard not in self._open:
            self._open[shard] = open_shard(self.dir / shard)
        return self._open[shard]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def header(self, name: str) -> tuple[torch.dtype | str, list[int]]:
        """A tensor's dtype (as a safetensors name where torch has none) and shape, from its header (no data read)."""
        info = self._file(name).get_slice(name)
        return _DTYPE_OF_HEADER.get(info.get_dtype(), info.get_dtype()), info.get_shape()

    def numel(self, name: str) -> int:
        """Element count of a tensor, from its header (no data read)."""
        return math.prod(self.header(name)[1])

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


def shard_files(directory: str | Path) -> list[str]:
    """The safetensors files of a checkpoint: those its index names (each must exist), else every *.safetensors."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{index}: not a safetensors index (expected JSON with a weight_map object: {err})"
            ) from None
        for shard in shards:
            if not (directory / shard).is_file():
                raise FileNotFoundError(f"shard {shard} named in {index} is missing; copy or download it again")
        return shards
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    return shards


def open_shard(path: Path):
    """safe_open(path), with an error that names the file when it is cut short or not safetensors."""
    try:
        return safe_open(path, "pt")
    except SafetensorError as err:
        size = path.stat().st_size
        raise ValueError(
            f"{path} ({size} bytes) is truncated or not a safetensors file ({err}); copy or download it again"
        ) from None


def check_files(directory: str | Path, cfg: QuantConfig) -> None:
    """Before loading: every shard is present and whole; every BitsMoE tensor of `cfg` is there with its dtype and
    shape (from the safetensors headers), nothing else sits under its layers, no basis or scale holds NaN or Inf,
    and the bit widths are candidates that add up to the layout (the only tensors whose data is read here)."""
    files = TensorFiles(directory)
    specs = tensor_specs(cfg)
    for name, spec in specs.items():
        if name not in files.shard_of:
            raise ValueError(
                f"BitsMoE checkpoint is missing tensor '{name}' (expected {spec.dtype} {list(spec.shape)})"
            )
        dtype, shape = files.header(name)
        if dtype != spec.dtype or shape != list(spec.shape):
            raise ValueError(
                f"tensor '{name}' in {files.shard_of[name]}: expected {spec.dtype} {list(spec.shape)}, found {dtype} "
                f"{shape}"
            )
    modules = tuple(layer.module + "." for layer in cfg.layers)
    for name in files:
        if name.startswith(modules) and name not in specs:
            raise ValueError(
                f"unexpected tensor '{name}' in {files.shard_of[name]} (FORMAT.md section 3 has no such tensor)"
            )
    for name, spec in specs.items():
        if spec.dtype.is_floating_point and not torch.isfinite(files[name]).all():
            raise ValueError(f"tensor '{name}' in {files.shard_of[name]}: holds NaN or Inf")
    for layer in cfg.layers:
        for p in PROJECTIONS:
            pl = layer.projection(p)
            for e in range(cfg.num_experts):
                name = expert_tensor_name(layer.module, e, cfg.projection_names[p], "bits")
                check_bits(cfg, name, files[name], pl.rows[e], pl.planes[e])


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
