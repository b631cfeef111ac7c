"""The quality guard: every exported MoE layer, run through the reference forward on held-out calibration tokens
(sequences the cost model never saw), against the original experts on the same inputs and routing.

A layer's relative output error ||y_q - y|| / ||y|| is 1 when it outputs zeros. MAX_RELATIVE_ERROR lies between
the worst layer of a model that is poor but works (2 bits a weight) and those of collapsed ones (a shared basis cut
to a third of its rank), as measured in benchmarks/README.md ("The quality guard"); at or above it the quantizer
refuses to write the checkpoint (unless --allow-high-error).
"""

import torch

from bitsmoe_vllm.activation import SILU, Activation
from bitsmoe_vllm.checkpoint import TensorFiles, load_layer, read_quant_config
from bitsmoe_vllm.reference import moe_forward

from .calibrate import Routed, experts_output

MAX_RELATIVE_ERROR = 0.9
HELD_OUT_SHARE = 8  # one held-out sequence per 8 calibration sequences, at least one


class QualityError(ValueError):
    """The exported checkpoint failed the guard; the message is one line that says what to change."""


def held_out_count(sequences: int) -> int:
    return max(1, sequences // HELD_OUT_SHARE)


def held_out_mask(total: int, held_out: int) -> torch.Tensor:
    """[total] bool: `held_out` sequences spread evenly over `total` (never the first or last, unless only one)."""
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.linspace(0, total - 1, held_out + 2)[1:-1].round().long()] = True
    return mask


def held_out_record(
    weights: dict[str, torch.Tensor], routed: Routed, act: Activation = SILU
) -> dict[str, torch.Tensor]:
    """What the guard needs of one layer, saved with the run: inputs, routing and the original output."""
    return {
        "x": routed.x.float(),
        "ids": routed.ids,
        "weights": routed.weights.float(),
        "y": experts_output(weights, routed, act),
    }


def relative_errors(checkpoint, records: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """experts module -> relative output error of the exported layer on its held-out record."""
    cfg, files = read_quant_config(checkpoint), TensorFiles(checkpoint)
    errors = {}
    for module, r in records.items():
        with torch.no_grad():
            y = moe_forward(r["x"], r["weights"], r["ids"], load_layer(files, cfg, module))
        errors[module] = float((y.float() - r["y"]).norm() / r["y"].norm().clamp_min(1e-30))
    files.close()
    return errors


def check(errors: dict[str, float], bits: float, basis: str) -> None:
    """Raise QualityError naming the worst layer when it is at MAX_RELATIVE_ERROR or above."""
    module = max(errors, key=errors.get)
    if errors[module] >= MAX_RELATIVE_ERROR:
        other = "--basis-dtype identity" if basis != "identity" else "a shared basis (--basis-dtype int8)"
        raise QualityError(
            f"{module} has a relative output error of {errors[module]:.3f} on held-out calibration tokens (broken at "
            f"{MAX_RELATIVE_ERROR}); nothing was written: raise --bits above {bits:g}, try {other}, or pass "
            "--allow-high-error to write it anyway"
        )
