"""What several test modules share: the one table of test shapes (awkward sizes on purpose: edges are where kernels
break), random BitsMoE layers (orthonormal bases, random factors, random per-row widths), routings, error measures, and
for the CPU integer path the instruction sets this CPU has and how a test forces one."""

import dataclasses
import sys

import torch

from bitsmoe_vllm import ops
from bitsmoe_vllm.format import FORMAT_VERSION, PROJECTIONS, QuantConfig, expert_tensor_name
from bitsmoe_vllm.offline.architectures import STANDARD_NAMES
from bitsmoe_vllm.offline.decompose import Decomposition
from bitsmoe_vllm.offline.encode import build_quant_config, encode_layer
from bitsmoe_vllm.reference import gather_layer

TOKENS = (1, 3, 17, 65)  # T
KERNEL_TOKENS = TOKENS + (222,)  # T for the CUDA kernels: 222 spans several 64-slot prefill tiles
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WIDTHS = (1, 2, 3, 4, 6, 8)  # every packed code width
ALLOCATION_WIDTHS = (0,) + WIDTHS  # widths a rank row can get, 0 = dropped
PACK_LENGTHS = (1, 5, 31, 32, 33, 37, 64, 100)  # codes per row, odd ones included
# (H, I, E, K, R per projection, G): a square one, a rank-truncated one, one with H not a multiple of 32
LAYERS = (
    (64, 64, 8, 2, (64, 64, 64), 32),
    (48, 96, 5, 3, (17, 30, 48), 32),
    (72, 128, 4, 2, (40, 72, 9), 64),
)
QUANT_SHAPE = {"layers": 4, "experts": 16, "intermediate": 128}  # shared bases ~0.5 bits/weight, as in real MoEs

MODULE = "model.layers.0.mlp.experts"


def random_checkpoint(
    H: int,
    I: int,
    E: int,
    ranks: tuple[int, int, int],
    G: int,
    *,
    widths=ALLOCATION_WIDTHS,
    basis_dtype: str = "float16",
    basis_sharing: str = "projection",
    seed: int = 0,
    module: str = MODULE,
    names: dict[str, str] = STANDARD_NAMES,
    gpt_oss: bool = False,
) -> tuple[QuantConfig, dict[str, torch.Tensor]]:
    """A one-layer checkpoint (config, name -> tensor) with every width of `widths` in use; `gpt_oss`: with expert
    biases and gpt-oss's activation (swigluoai, alpha 1.702, a limit of 1.5 that clamps many entries);
    basis_sharing "layer": the gate's basis serves all three (their ranks must be equal)."""
    g = torch.Generator().manual_seed(seed)
    decompositions, bits = {}, {}
    for p, R in zip(PROJECTIONS, ranks):
        if basis_dtype == "identity":
            basis = None  # R must be H
        elif basis_sharing == "layer" and p != "gate":
            basis = decompositions["gate"].basis
        else:
            basis = torch.linalg.qr(torch.randn(H, R, generator=g)).Q.T.contiguous()  # [R, H], orthonormal rows
        factors = torch.randn(E, R, I, generator=g) / I**0.5  # [E, R, I]
        decompositions[p] = Decomposition(basis, factors, torch.ones(R, dtype=torch.float64))
        choice = torch.randint(0, len(widths), (E, R), generator=g)
        bits[p] = torch.tensor(widths)[choice]  # [E, R]
    layout, tensors = encode_layer(
        module,
        decompositions,
        bits,
        group_size=G,
        basis_dtype=basis_dtype,
        basis_sharing=basis_sharing,
        projection_names=names,
    )
    cfg = build_quant_config(
        [layout],
        bits=16.0,
        budget_scope="all",
        candidate_bits=tuple(sorted(set(widths) | {0})),
        group_size=G,
        basis_dtype=basis_dtype,
        basis_sharing=basis_sharing,
        activation="swigluoai" if gpt_oss else "silu",
        hidden_size=H,
        intermediate_size=I,
        num_experts=E,
        projection_names=names,
        **(dict(swiglu_alpha=1.702, swiglu_limit=1.5, expert_bias=True) if gpt_oss else {}),
    )
    if gpt_oss:
        for p in PROJECTIONS:
            for e in range(E):
                size = H if p == "down" else I
                tensors[expert_tensor_name(module, e, names[p], "bias")] = torch.randn(size, generator=g)
    return cfg, tensors


def routing(T: int, E: int, K: int, seed: int, used_experts: int | None = None):
    """Top-k ids without repeats from the first `used_experts` experts (the rest get no tokens)."""
    g = torch.Generator().manual_seed(seed)
    used = used_experts or E
    ids = torch.stack([torch.randperm(used, generator=g)[:K] for _ in range(T)])  # [T, K]
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)  # [T, K]
    return weights, ids


def layer_of(shape, widths=(0,) + WIDTHS, basis_dtype="float16", seed=0, format_version=FORMAT_VERSION, gpt_oss=False):
    """A random layer; format_version 1 reads the same stored bits as version 1's codes."""
    H, I, E, K, ranks, G = shape
    ranks = (H, H, H) if basis_dtype == "identity" else ranks
    cfg, tensors = random_checkpoint(
        H, I, E, ranks, G, widths=widths, basis_dtype=basis_dtype, seed=seed, gpt_oss=gpt_oss
    )
    return gather_layer(dataclasses.replace(cfg, format_version=format_version), MODULE, tensors)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def dense_from_cpu_basis(weight: torch.Tensor) -> torch.Tensor:
    """The row-major [n, in] matrix of an int8 basis in the CPU basis layout, read as moe_cpu.h describes it."""
    n, k = weight.shape
    flat, dense, at = weight.flatten(), torch.empty_like(weight), 0
    for first in range(0, n, 4):  # blocks of 4 rows, the last one what is left
        for c0 in range(0, k, 64):  # chunks of 64 columns, the last one what is left
            for row in range(first, min(first + 4, n)):
                dense[row, c0 : c0 + 64] = flat[at : at + min(64, k - c0)]
                at += min(64, k - c0)
    assert at == flat.numel()
    return dense


def quantize_command(model, out, calib_file, *extra: str, calib_tokens: int = 2048) -> list[str]:
    """`python -m bitsmoe_vllm.offline` at 2.5 bits on the tests' small calibration (for runs in a subprocess)."""
    args = ["--model", model, "--out", out, "--bits", 2.5, "--calib", calib_file, "--calib-tokens", calib_tokens]
    args += ["--calib-seq-len", 128, "--unit-rows", 8]
    return [sys.executable, "-m", "bitsmoe_vllm.offline", *map(str, args), *extra]


def checkpoint_bytes(directory) -> dict[str, bytes]:
    """A BitsMoE checkpoint's files and their bytes, but for the report (it holds the run's wall times)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "quantization_report.json"}


def stack_experts(model_dir, out_dir, num_experts: int):
    """A copy of a per-expert checkpoint (`{experts}.{e}.gate_proj.weight`, ...) with each layer's experts stacked as
    transformers 5 holds them: `{experts}.gate_up_proj` [E, 2I, H] (gate rows, then up rows), `{experts}.down_proj`
    [E, H, I]."""
    import re
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shutil.copytree(model_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(path)
    modules = sorted({m.group(1) for name in tensors if (m := re.match(r"(.*\.experts)\.0\.gate_proj\.weight$", name))})
    for module in modules:
        w = {n: [tensors.pop(f"{module}.{e}.{n}_proj.weight") for e in range(num_experts)] for n in STANDARD_NAMES}
        tensors[f"{module}.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(w["gate"], w["up"])])
        tensors[f"{module}.down_proj"] = torch.stack(w["down"])
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def fp8_block_copy(model_dir, out_dir, block: tuple[int, int], dequantized: bool = False):
    """A copy of a checkpoint with its decoder layers' linear weights (not the router, not the norms) in
    DeepSeek-V3's fp8 layout: float8_e4m3fn, one float32 `{name}_scale_inv` per [block] block (amax / 448), and a
    `quantization_config` saying so. `dequantized`: the same weights written back as float32 instead, unquantized."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shutil.copytree(model_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(path)
    b0, b1 = block
    for name in [n for n, t in tensors.items() if n.startswith("model.layers.") and t.dim() == 2]:
        if name.endswith("norm.weight") or name.endswith("mlp.gate.weight"):
            continue
        w = tensors[name].float()
        N, K = w.shape
        padded = torch.zeros(-(-N // b0) * b0, -(-K // b1) * b1)
        padded[:N, :K] = w
        amax = padded.reshape(-(-N // b0), b0, -(-K // b1), b1).abs().amax((1, 3))
        scale = (amax / 448).clamp(min=1e-12)  # float8_e4m3fn's largest value is 448
        expanded = scale.repeat_interleave(b0, 0)[:N].repeat_interleave(b1, 1)[:, :K]
        codes = (w / expanded).to(torch.float8_e4m3fn)
        if dequantized:
            tensors[name] = codes.float() * expanded
        else:
            tensors[name], tensors[f"{name}_scale_inv"] = codes, scale
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    if not dequantized:
        config = json.loads((out_dir / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
        }
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def mxfp4_copy(model_dir, out_dir, dequantized: bool = False):
    """A copy of a gpt-oss checkpoint with its experts in the layout of gpt-oss's releases: `{name}_blocks` [E, out,
    in/32, 16] uint8 (two E2M1 codes a byte, low nibble first) and `{name}_scales` [E, out, in/32] (the block's power
    of two as a biased exponent, E8M0), rounded to nearest, and a `quantization_config` saying so. `dequantized`: the
    same values written back as float32 in transformers' layout instead, unquantized."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shutil.copytree(model_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = load_file(model_dir / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(name).float().transpose(1, 2)  # [E, out, in]
        blocks = w.reshape(*w.shape[:2], -1, 32)
        exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-30) / 6))  # the block's largest to <= 6
        codes = ((blocks / torch.exp2(exponent)[..., None])[..., None] - values).abs().argmin(-1)  # [E, out, in/32, 32]
        if dequantized:
            tensors[name] = (values[codes] * torch.exp2(exponent)[..., None]).reshape(w.shape).transpose(1, 2)
            continue
        tensors[f"{name}_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
        tensors[f"{name}_scales"] = (exponent + 127).to(torch.uint8)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    if not dequantized:
        config = json.loads((out_dir / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "self_attn"]}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# ---- the CPU integer path ----

CPU_FLAGS = open("/proc/cpuinfo").read()
HAS_INT_PATH = all(flag in CPU_FLAGS for flag in ("avx512_vnni", "avx512bw", "avx512vbmi", "gfni"))
HAS_AMX = HAS_INT_PATH and all(flag in CPU_FLAGS for flag in ("amx_tile", "amx_int8"))
HAS_AMX_BF16 = HAS_AMX and all(flag in CPU_FLAGS for flag in ("amx_bf16", "avx512_bf16"))

# The kernel rounds activations to 16-bit integers (one scale per 128 rank rows and column group for gate/up, per
# slot and column group for down, per token for int8 bases): about 2^-16 of the largest value each; 16-bit outputs
# add their own rounding.
INT_PATH_TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def force_isa(monkeypatch, isa: str) -> None:
    import pytest  # here: scripts/check_vllm_033.sh imports this module in a venv without pytest

    assert ops.CPU_KERNEL, (
        "bitsmoe_vllm/_cpu*.so is not built: run `pip install --no-build-isolation -e .` (scripts/setup.sh does)"
    )
    if not HAS_INT_PATH:
        pytest.skip("this CPU lacks one of AVX-512 VNNI, BW, VBMI and GFNI")
    if isa == "avx512-amx" and not HAS_AMX:
        pytest.skip("this CPU lacks AMX-TILE or AMX-INT8")
    monkeypatch.setenv("BITSMOE_CPU_ISA", isa)
    assert torch.ops.bitsmoe.cpu_isa() == isa
