"""The backend oracle: which implementation runs a BitsMoE layer, decided at load and checked before it is trusted.

    kernel, choice = prepare(layer, "model.layers.0.mlp.experts")   # at load
    y = ops.moe_layer(x, topk_weights, topk_ids, layer, kernel)      # per call

`select_backend` decides from the device, the CPU's instruction set and what this install compiled:
- cuda:       the CUDA kernels (bitsmoe_vllm/cuda.py; decode and prefill paths, chosen per call by token count);
- cpu-int:    the CPU integer path on AVX-512 VNNI, and AMX tiles where present (bitsmoe_vllm/cpu_layout.py);
- cpu-float:  the CPU float kernel (AVX-512 or AVX2) behind torch.ops.bitsmoe.moe;
- reference:  the PyTorch reference (bitsmoe_vllm/reference.py), where no kernel applies.
`prepare` puts the layer in the chosen kernel's layout and runs the kernel against the reference on a slice of the
real layer (random tokens routed to random experts; on CUDA also enough tokens to take the prefill path). Beyond
TOLERANCE it logs one ERROR line naming the layer and the error, and the layer runs the reference: a wrong kernel
costs speed, never the model's output.
"""

import enum
import logging
import math
from dataclasses import dataclass

import torch

from bitsmoe_vllm import cpu_layout, cuda, ops
from bitsmoe_vllm.reference import MoELayer, moe_forward

# Inside vLLM's logger tree (its init_logger is logging.getLogger), so these lines reach the server log as vLLM's do.
logger = logging.getLogger("vllm.bitsmoe")

CHECK_TOKENS = 8  # tokens of the check at load; on CUDA also enough for the prefill path
# Relative error (Frobenius) of a kernel's output against the float32 reference beyond which it is not trusted: the
# kernels round activations to 16-bit integers (CPU integer path, ~1e-5) or to bf16/fp16 (prefill tiles, ~4e-3);
# a wrong kernel is off by order 1.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}
# torch.ops.bitsmoe.cpu_isa() where the CPU integer path runs, and what it runs on
INT_PATH_ISAS = {"avx512-amx": "AVX-512 VNNI, AMX tiles for experts with many tokens", "avx512-vnni": "AVX-512 VNNI"}


class Backend(enum.Enum):
    REFERENCE = "reference"
    CPU_FLOAT = "cpu-float"
    CPU_INT = "cpu-int"
    CUDA = "cuda"


@dataclass(frozen=True)
class Choice:
    backend: Backend
    reason: str


def select_backend(device: torch.device) -> Choice:
    """The fastest implementation this device and install have for a BitsMoE layer, with the reason."""
    if device.type == "cuda":
        if cuda.load_kernels():
            return Choice(Backend.CUDA, f"the CUDA kernels of this install on {torch.cuda.get_device_name(device)}")
        return Choice(
            Backend.REFERENCE,
            "this install has no CUDA kernels (no bitsmoe_vllm._cuda), so the slow PyTorch reference runs; reinstall "
            "bitsmoe-vllm where a CUDA torch and nvcc are both present",
        )
    if device.type == "cpu":
        if not ops.CPU_KERNEL:
            return Choice(
                Backend.REFERENCE,
                "this install has no CPU kernel (no bitsmoe_vllm._cpu), so the slow PyTorch reference runs; reinstall "
                "with `pip install --no-build-isolation -e .` on x86-64",
            )
        isa = torch.ops.bitsmoe.cpu_isa()
        if isa in INT_PATH_ISAS:
            return Choice(Backend.CPU_INT, f"the CPU integer path ({INT_PATH_ISAS[isa]})")
        return Choice(Backend.CPU_FLOAT, f"the CPU float kernel ({isa}; the integer path needs AVX-512 VNNI)")
    return Choice(Backend.REFERENCE, f"no BitsMoE kernel for {device.type} devices")


def prepare(layer: MoELayer, module: str) -> tuple[ops.Kernel, Choice]:
    """The kernel argument of ops.moe_layer for `layer` (its tensors on one device), checked against the reference."""
    choice = select_backend(layer.gate.codes.device)
    _log_once(
        logging.WARNING if choice.backend is Backend.REFERENCE else logging.INFO,
        f"bitsmoe: MoE layers run {choice.backend.value}: {choice.reason}",
    )
    if choice.backend is Backend.REFERENCE:
        return ops.REFERENCE, choice
    if choice.backend is Backend.CPU_INT:
        kernel = cpu_layout.to_cpu_layer(layer)
    elif choice.backend is Backend.CUDA:
        kernel = cuda.to_kernel_layer(layer)
    else:
        kernel = None  # torch.ops.bitsmoe.moe: the C++ kernel registered for CPU
    for dtype, tokens in _checks(choice.backend, layer):
        error = check_kernel(layer, kernel, dtype, tokens)
        if not error <= TOLERANCE[dtype]:  # NaN included
            logger.error(
                "bitsmoe: %s: the %s kernel is off the reference by %.3g (relative, %d %s tokens; tolerance %g), so "
                "this layer runs the slow PyTorch reference instead; please report this line",
                module,
                choice.backend.value,
                error,
                tokens,
                str(dtype).removeprefix("torch."),
                TOLERANCE[dtype],
            )
            return ops.REFERENCE, Choice(Backend.REFERENCE, f"the {choice.backend.value} kernel failed its check")
    return kernel, choice


def _checks(backend: Backend, layer: MoELayer) -> list[tuple[torch.dtype, int]]:
    if backend is not Backend.CUDA:
        return [(torch.float32, CHECK_TOKENS)]
    E = layer.gate.bits.shape[0]
    prefill = math.ceil(ops.PREFILL_SLOTS_PER_EXPERT * E / min(E, 2))  # enough slots to take the prefill path
    return [(torch.float32, CHECK_TOKENS), (torch.bfloat16, prefill)]


def check_kernel(layer: MoELayer, kernel: ops.Kernel, dtype: torch.dtype, tokens: int, seed: int = 0) -> float:
    """Relative error of ops.moe_layer with `kernel` against reference.moe_forward in float32 on random tokens."""
    device, E, H = layer.gate.codes.device, layer.gate.bits.shape[0], _hidden_size(layer)
    g = torch.Generator().manual_seed(seed)
    K = min(E, 2)
    x = torch.randn(tokens, H, generator=g).to(device)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).to(device)
    weights = torch.softmax(torch.randn(tokens, K, generator=g), -1).to(device)
    y = ops.moe_layer(x.to(dtype), weights, ids, layer, kernel).float()
    ref = moe_forward(x.to(dtype).float(), weights, ids, layer)
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def _hidden_size(layer: MoELayer) -> int:
    return layer.gate_basis.weight.shape[1] if layer.gate_basis is not None else layer.gate.bits.shape[1]


_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)
