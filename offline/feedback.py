"""The error feedback of one MoE layer's experts (offline.gptq), batch by batch, each batch encoded as soon as it is
rounded (offline.encode.encode_factor)."""

import torch

from bitsmoe_vllm.format import BITS_DTYPE
from bitsmoe_vllm.reference import dequantize_factor

from . import gptq, heap
from .calibrate import ByExpert, Routed
from .encode import encode_factor
from .plan import Plan


def feedback_rounding(
    plan: Plan, routed: Routed, weights: dict, decompositions: dict, widths: dict
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Projection -> each expert's factor rounded with error feedback on the tokens `routed` to it (offline.gptq), as
    the codes and scales of offline.encode.encode_factor: a batch of experts is encoded as soon as it is rounded (a
    big layer's rounded factors in float32 are GBs; the down projection's inputs decode the rounded gate and up an
    expert at a time)."""
    bases = {p: decompositions[p].basis for p in ("gate", "up")}
    routed = ByExpert(routed, weights, keep_pre=False)  # the inputs in each basis once; a pre-activation is read once
    encoded = {}
    for p, dec in decompositions.items():  # gate and up before down
        towards_layer = p == "down" and plan.options.feedback_target == "layer"
        done = {q: Decoded(encoded[q], widths[q], plan) for q in ("gate", "up")} if towards_layer else None
        encoded[p] = []
        for b in gptq.expert_batches(weights, bases, p):
            h = gptq.hessians(routed, weights, bases, (p,), b, done, plan.activation)
            bits = widths[p][b.start : b.stop].to(dec.factors.device)
            rounded, scales = gptq.round_factors(
                p,
                dec.factors[b.start : b.stop].float(),
                bits,
                h.pop(p),  # only round_factors holds it: freed as it goes
                plan.group_size,
                plan.options.scale_steps,
                plan.odd_codes,
                (h.pop("down-deviation"), h.pop("down-tokens")) if towards_layer else None,
            )
            encoded[p] += [
                encode_factor(f, w, plan.group_size, row_scales=s, odd=plan.odd_codes)
                for f, w, s in zip(rounded, bits, scales, strict=True)
            ]
            del h, rounded, scales
            heap.release()
    return encoded


class Decoded:
    """[e]: expert e's factor [R, I] float32 as feedback_rounding encoded it (the values it was rounded to)."""

    def __init__(self, encoded: list[tuple[torch.Tensor, torch.Tensor]], widths: torch.Tensor, plan: Plan):
        self.encoded, self.widths, self.plan = encoded, widths.to(BITS_DTYPE), plan

    def __getitem__(self, e: int) -> torch.Tensor:
        codes, scales = self.encoded[e]
        return dequantize_factor(codes, scales, self.widths[e], self.plan.group_size, self.plan.odd_codes)
