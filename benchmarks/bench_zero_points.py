"""Would asymmetric codes (a zero point per group) pay for their bits? The squared rounding error of real factor rows
(the defaults' basis of each model: the trained MoE's shared basis, the MoEfied SmolLM2's identity) with BitsMoE's odd
symmetric codes against two asymmetric grids, per width:

- "int zero": GPTQ's and RTN's codes, w = s (q - z), q and z integers in [0, 2^b - 1], z stored in b bits;
- "fp16 zero": HQQ's, w = s q + z, z a float16 offset.

Scales start at min-max and are refined by alternating least squares as offline/rounding.py refines the symmetric
ones (the best seen is kept). A grid that lowers the error by a factor r at width b is worth log(r) / log(r_b) bits,
r_b the factor the next width gives the symmetric codes; the zero point costs b / G (int) or 16 / G (fp16) bits per
weight. Unweighted squared error: the cost model's importance is not applied.

    .venv/bin/python -m benchmarks.bench_zero_points     # a minute; writes results/zero_points.json
"""

import json
import math
from pathlib import Path

import torch

from benchmarks import machine
from bitsmoe_vllm.format import PROJECTIONS
from bitsmoe_vllm.offline.decompose import project, top_basis
from bitsmoe_vllm.offline.rounding import REFINE_STEPS, quantize_rows
from bitsmoe_vllm.offline.source import SourceCheckpoint

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # model: (directory, group size the quantizer chooses, the defaults' basis, layers)
    "trained-moe": (ROOT / "benchmarks/models/trained-moe", 128, "shared", range(6)),
    "smollm2-moe": (ROOT / "benchmarks/work/smollm2-moe-e8k6", 64, "identity", (0, 10, 20, 29)),
}
WIDTHS = (2, 3, 4)
NEXT = {2: 3, 3: 4, 4: 6}  # the symmetric codes' next stored width


def symmetric_error(x: torch.Tensor, bits: int, group: int) -> float:
    codes, scales = quantize_rows(x, bits, group)
    return float((codes.float() * scales.float().repeat_interleave(group, 1) - x).pow(2).sum())


def asymmetric_error(x: torch.Tensor, bits: int, group: int, integer_zero: bool) -> float:
    g = x.reshape(len(x), -1, group)
    top = 2**bits - 1
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    if integer_zero:  # the grid holds 0: GPTQ's min-max range
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale, zero = _fp16(((hi - lo) / top).clamp_min(1e-12)), _fp16(lo)
    best = torch.full_like(lo, float("inf"))
    for _ in range(REFINE_STEPS + 1):
        if integer_zero:
            z = (-lo / scale).round().clamp(0, top)
            d = (g / scale + z).round().clamp(0, top) - z  # q - z
            best = torch.minimum(best, (scale * d - g).pow(2).sum(-1, keepdim=True))
            dd = d.pow(2).sum(-1, keepdim=True)
            scale = torch.where(dd > 0, _fp16((d * g).sum(-1, keepdim=True) / dd.clamp_min(1e-12)), scale)
        else:  # least squares for scale and offset given the codes
            q = ((g - zero) / scale).round().clamp(0, top)
            best = torch.minimum(best, (scale * q + zero - g).pow(2).sum(-1, keepdim=True))
            n, sq, sqq = group, q.sum(-1, keepdim=True), q.pow(2).sum(-1, keepdim=True)
            sx, sqx = g.sum(-1, keepdim=True), (q * g).sum(-1, keepdim=True)
            det = n * sqq - sq * sq
            ok = det > 0
            scale = torch.where(ok, _fp16(((n * sqx - sq * sx) / det.clamp_min(1e-12)).clamp_min(1e-12)), scale)
            zero = torch.where(ok, _fp16((sx - scale * sq) / n), zero)
        scale = scale.clamp_min(1e-12)
    return float(best.sum())


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def measure(name: str) -> dict:
    directory, group, basis, layers = MODELS[name]
    source = SourceCheckpoint(str(directory))
    sums = {(kind, b): 0.0 for kind in ("symmetric", "int zero", "fp16 zero") for b in (*WIDTHS, 6)}
    total = 0.0
    for layer in layers:
        weights = source.expert_weights(source.moe_layers()[layer])
        for p in PROJECTIONS:
            w = weights[p].float()
            rows = project(w, top_basis(w, w.shape[-1])[0] if basis == "shared" else None).reshape(-1, w.shape[1])
            rows = rows[rows.pow(2).sum(1) > 0].contiguous()
            total += float(rows.pow(2).sum())
            for b in (*WIDTHS, 6):
                sums["symmetric", b] += symmetric_error(rows, b, group)
            for b in WIDTHS:
                sums["int zero", b] += asymmetric_error(rows, b, group, True)
                sums["fp16 zero", b] += asymmetric_error(rows, b, group, False)
    rel = {k: v / total for k, v in sums.items()}
    out = {"model": name, "basis": basis, "group_size": group, "layers": list(layers), "widths": {}}
    for b in WIDTHS:
        per_bit = math.log(rel["symmetric", b] / rel["symmetric", NEXT[b]]) / (NEXT[b] - b)
        row = {"symmetric": rel["symmetric", b]}
        for kind, cost in (("int zero", b / group), ("fp16 zero", 16 / group)):
            gain = math.log(rel["symmetric", b] / rel[kind, b]) / per_bit
            row[kind] = {
                "relative_error": rel[kind, b],
                "worth_bits": gain,
                "costs_bits": cost,
                "net_bits": gain - cost,
            }
        out["widths"][b] = row
    return out


def main() -> None:
    torch.manual_seed(0)
    results = {"machine": machine.describe(), "models": [measure(m) for m in MODELS]}
    for m in results["models"]:
        print(f"{m['model']} ({m['basis']} basis, groups of {m['group_size']})")
        for b, row in m["widths"].items():
            cells = [
                f"{k}: {v['relative_error']:.4f}, net {v['net_bits']:+.3f} bits"
                for k, v in row.items()
                if k != "symmetric"
            ]
            print(f"  {b} bits: symmetric {row['symmetric']:.4f}; " + "; ".join(cells))
    out = ROOT / "benchmarks" / "results" / "zero_points.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
