"""A run's cost measurements, read from its layer files a kind at a time. Each MoE layer's costs are saved as it is
measured (offline.quantize.cost_layer); the allocation reads one kind ("loss-identity", "nearest-int8",
"basis_loss-int8", ...) over every layer when it needs it and drops it after: Qwen3-30B-A3B's identity basis has
37.7M units, 2.1 GB a kind in float64, and holding every kind at once put the allocation's peak at 13 GB."""

from pathlib import Path

import torch
from safetensors import safe_open

KINDS = ("loss-", "nearest-", "basis_loss-")


class CostFiles:
    def __init__(self, paths: list[Path]):
        self.paths = paths
        with safe_open(paths[0], "pt") as f:
            self.kinds = [k for k in f.keys() if k.startswith(KINDS)]

    def __contains__(self, kind: str) -> bool:
        return kind in self.kinds

    def __getitem__(self, kind: str) -> torch.Tensor:
        """[U, J] (or [U]): every layer's `kind`, the layers one after the other."""
        return self.read(kind, lambda t, at: t)

    def column(self, kind: str, j: int) -> torch.Tensor:
        """[U]: column j of every layer's `kind`."""
        return self.read(kind, lambda t, at: t[:, j])

    def chosen(self, kind: str, choice: torch.Tensor) -> torch.Tensor:
        """[U]: each unit's `kind` at its option choice [U]."""
        return self.read(kind, lambda t, at: t.gather(1, choice[at : at + len(t), None])[:, 0])

    def stacked(self, name: str) -> torch.Tensor:
        """[L, ...]: every layer's tensor `name` (a small one: routed tokens per expert, the residual energy)."""
        parts = []
        for path in self.paths:
            with safe_open(path, "pt") as f:
                parts.append(f.get_tensor(name))
        return torch.stack(parts)

    def read(self, kind: str, part) -> torch.Tensor:
        """part(layer's tensor, its first unit) of every layer, into one tensor (no list of parts beside it)."""
        if kind not in self:
            raise KeyError(f"{kind!r}: the run's cost files hold {self.kinds}")
        sizes = []
        for path in self.paths:
            with safe_open(path, "pt") as f:
                sizes.append(f.get_slice(kind).get_shape()[0])
        out, at = None, 0
        for path, size in zip(self.paths, sizes):
            with safe_open(path, "pt") as f:
                t = part(f.get_tensor(kind), at)
            if out is None:
                out = torch.empty((sum(sizes), *t.shape[1:]), dtype=t.dtype)
            out[at : at + size] = t
            at += size
        return out
