"""The gated activation of a routed expert, a = act(h_gate, h_up), and its partial derivatives (FORMAT.md section 4).

    silu:       a = silu(g) * u
    swigluoai:  a = (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'),   g' = min(g, limit)   (gpt-oss)

Shared by the reference forward, the quantizer's calibration and its cost model (which needs the derivatives).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "swigluoai")


@dataclass(frozen=True)
class Activation:
    name: str = "silu"
    alpha: float | None = None  # swigluoai only
    limit: float | None = None  # swigluoai only

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.name!r}; known: {list(ACTIVATIONS)}")
        if (self.name == "swigluoai") != (self.alpha is not None and self.limit is not None):
            raise ValueError(f"activation {self.name!r}: alpha and limit are for swigluoai, and it needs both")

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.name == "silu":
            return F.silu(gate) * up
        g = gate.clamp(max=self.limit)
        return (up.clamp(-self.limit, self.limit) + 1) * g * torch.sigmoid(self.alpha * g)

    def derivatives(self, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(da/dh_gate, da/dh_up), elementwise; 0 where a clamp is active."""
        if self.name == "silu":
            sig = torch.sigmoid(gate)
            return sig * (1 + gate * (1 - sig)) * up, gate * sig
        g = gate.clamp(max=self.limit)
        sig = torch.sigmoid(self.alpha * g)
        glu = g * sig
        d_glu = (sig * (1 + self.alpha * g * (1 - sig))) * (gate <= self.limit)
        inside = (up >= -self.limit) & (up <= self.limit)
        return (up.clamp(-self.limit, self.limit) + 1) * d_glu, glu * inside


SILU = Activation()
