"""The CPU MoE layer (csrc/cpu) against vLLM's bf16 `cpu_fused_moe` on the same weights dequantized, and against the
PyTorch reference, on the MoE layer shapes of real models, at 2.0 / 2.5 / 3.0 factor bits per weight. Writes JSON
and a plot to benchmarks/results/.

BitsMoE is timed as the vLLM method runs it here (`bitsmoe_ms`): the integer path (torch.ops.bitsmoe.moe_int on
the CPU layout) where the CPU has AVX-512 VNNI, BW, VBMI and GFNI (with AMX tiles for the experts with many tokens
and the bases of large calls where it has AMX-INT8; `kernel_isa` avx512-amx), else the float kernels
(torch.ops.bitsmoe.moe); the float kernels are also timed on their own (`float_kernel_ms`).

    .venv/bin/python -m benchmarks.bench_cpu_moe [--tokens 1 4 16 128] [--shapes qwen3-30b-a3b deepseek-v2-lite]

gpt-oss-20b's layers carry random expert biases and its swigluoai activation on both sides (vLLM's cpu_fused_moe takes
them as the gpt-oss model passes them: w13 rows interleaved, biases in bf16):

    .venv/bin/python -m benchmarks.bench_cpu_moe --shapes gpt-oss-20b --out benchmarks/results/cpu_moe_gpt_oss.json

Layers are random (codes, scales, bases; tests/test_cpu_kernel.py checks correctness), full rank (R = H), with float16
or int8 bases, the group size the quantizer chooses (128; 96 for gpt-oss's I of 2880). Widths per rank row: 2.0 bits =
every row 2 bits, 2.5 = half 2 and half 3, 3.0 = every row 3 bits. The bf16 baseline gets the dense experts of the
2.5-bit layer (B^T F per expert, in bf16; its time does not depend on the values) and its output is compared with
BitsMoE's on that layer. Each timed call gets fresh routing and runs after the last-level cache has been flushed by
reading twice its size, at least 256 MiB (written once at the start: a never-written buffer reads as the one zero
page, which evicts nothing, and runs before 2026-11-23 flushed that way), as in decoding a real model, where the
next layer's weights are not in cache and the other layers' fill it. bf16 and the three widths take turns call by
call (this VM's speed drifts), and the median of each is reported. "Bytes" are what must be read at least once: the
codes, scales and bit widths of the selected experts, the bases, the activations; the bf16 baseline's are the
selected experts' dense weights, and their ratio (`bytes_ratio_vs_bf16`) is the most BitsMoE can gain over bf16 when
both read at the same rate. The bound is those bytes at the read bandwidth of the same minutes: the flush before
each call is torch's sum of that buffer (same threads), timed, and the median over the calls of one T is that row's
`read_GBps` (it moved between 30 and 64 GB/s from run to run here). torch's copy of a buffer that size (bytes read
plus written) and its sum, measured once at the start, are printed beside it.
Both sides' weights are on huge pages: to_cpu_layer puts the integer path's there, and this script copies the bf16
baseline's there too (torch.ops.bitsmoe.huge_page_copy), although vLLM serving bf16 leaves them on 4 KiB pages (unless
started with THP_MEM_ALLOC_ENABLE=1); the float kernels read the canonical tensors, on 4 KiB pages."""

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import describe, last_level_cache_bytes  # noqa: E402
from bitsmoe_vllm import ops  # noqa: E402
from bitsmoe_vllm.activation import SILU, Activation  # noqa: E402
from bitsmoe_vllm.backend import INT_PATH_ISAS  # noqa: E402
from bitsmoe_vllm.cpu_layout import to_cpu_layer  # noqa: E402
from bitsmoe_vllm.offline.plan import choose_group_size  # noqa: E402
from bitsmoe_vllm.reference import (  # noqa: E402
    Basis,
    Biases,
    Factors,
    MoELayer,
    dequantize_basis,
    expert_factor,
    moe_forward,
)

SHAPES = {  # H, I, E, top-k
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "gpt-oss-20b": (2880, 2880, 32, 4),  # with expert biases and swigluoai, on both sides
}
GPT_OSS = Activation("swigluoai", 1.702, 7.0)
BITS = {2.0: (2,), 2.5: (2, 3), 3.0: (3,)}  # widths, each on an equal share of the rank rows
GROUP = 128
# written (see above); twice the last-level cache and at least 256 MiB: on the AMX Xeon's 480 MiB L3 a 256 MiB read
# left a third of a 20 MiB layer in cache (read at 31.8 GB/s after it, 19.4 after 1 GiB)
FLUSH = torch.ones(max(256 * 2**20, 2 * last_level_cache_bytes()) // 4)


def random_factors(E: int, R: int, I: int, widths: tuple[int, ...], g: torch.Generator, group: int = GROUP) -> Factors:
    bits = torch.tensor(widths).repeat_interleave(R // len(widths) + 1)[:R].to(torch.uint8).expand(E, R).contiguous()
    planes, rows = int(bits.long().sum()), E * R
    codes = torch.randint(-(2**31), 2**31 - 1, (planes, I // 32), generator=g, dtype=torch.int32)
    scales = (torch.rand(rows, I // group, generator=g) * 0.02 + 0.001).half()
    return Factors(codes, scales, bits)


def random_basis(rows: int, cols: int, dtype: str, g: torch.Generator) -> Basis:
    w = torch.randn(rows, cols, generator=g) / cols**0.5
    if dtype == "int8":
        scale = w.abs().amax(1) / 127
        return Basis((w / scale[:, None]).round().to(torch.int8), scale.half())
    return Basis(w.half())


def factor_bytes(f: Factors, e: int) -> int:
    b = f.bits[e].long()
    return int(b.sum()) * f.codes.shape[1] * 4 + int((b > 0).sum()) * f.scales.shape[1] * 2 + b.numel()


def dense_weights(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H], w2 [E, H, I] in bf16: the layer's experts multiplied out (gate and up rows interleaved for
    swigluoai, as vLLM's CPU MoE reads them then)."""
    B_g, B_u, B_d = (dequantize_basis(b) for b in (layer.gate_basis, layer.up_basis, layer.down_basis))
    E = layer.gate.bits.shape[0]
    w13, w2 = [], []
    for e in range(E):
        F_g, F_u, F_d = (expert_factor(f, e, layer.group_size) for f in (layer.gate, layer.up, layer.down))
        gate, up = F_g.T @ B_g, F_u.T @ B_u
        interleaved = layer.activation.name == "swigluoai"
        w13.append((torch.stack([gate, up], 1).flatten(0, 1) if interleaved else torch.cat([gate, up])).bfloat16())
        w2.append((B_d @ F_d).bfloat16())
    return torch.stack(w13), torch.stack(w2)


def random_biases(E: int, I: int, H: int, g: torch.Generator) -> Biases:
    return Biases(*(torch.randn(E, n, generator=g) * 0.1 for n in (I, I, H)))


def median_ms(fns: dict, inputs: list, repeats: int) -> tuple[dict, float]:
    """Median ms per call of each function, the functions taking turns (this VM's speed drifts over minutes), and the
    GB/s of the flushes before the calls (torch's sum of FLUSH: the read bandwidth of the same minutes), median."""
    for fn in fns.values():
        fn(*inputs[0])  # warm-up
    times, flushes = {name: [] for name in fns}, []
    for r in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            FLUSH.sum()  # evict the previous call's weights by reading: clean lines, as after a layer's weights
            flushes.append(time.perf_counter() - start)
            start = time.perf_counter()
            fn(*inputs[r % len(inputs)])
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}, FLUSH.numel() * 4 / statistics.median(
        flushes
    ) / 1e9


def bandwidths() -> tuple[float, float]:
    """GB/s of torch's copy of FLUSH's size (bytes read plus written) and of its sum (bytes read), medians of 9."""
    src, dst = torch.ones(FLUSH.numel()), torch.zeros(FLUSH.numel())
    copy, read = [], []
    for _ in range(9):
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(copy) / 1e9, src.numel() * 4 / statistics.median(read) / 1e9


def routings(T: int, E: int, K: int, H: int, n: int, g: torch.Generator) -> list:
    out = []
    for _ in range(n):
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
        w = torch.softmax(torch.randn(T, K, generator=g), -1)
        out.append((torch.randn(T, H, generator=g).bfloat16(), w, ids))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 128])
    p.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "deepseek-v2-lite"], choices=list(SHAPES))
    p.add_argument("--bases", nargs="+", default=["int8", "float16"], choices=["float16", "int8"])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--reference-max-tokens", type=int, default=16, help="time the (slow) reference only up to this T")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_moe.json"))
    a = p.parse_args()
    if not ops.CPU_KERNEL:
        raise SystemExit("bench_cpu_moe: the CPU kernel is not built (bitsmoe_vllm/_cpu*.so); run scripts/setup.sh")
    from vllm import _custom_ops as vllm_ops

    isa = "amx" if torch.cpu._is_amx_tile_supported() else "vec"
    g = torch.Generator().manual_seed(0)
    copy, read = bandwidths()
    print(
        f"{describe()}; {torch.get_num_threads()} threads; copy {copy:.1f} GB/s, read {read:.1f} GB/s; "
        f"kernel {torch.ops.bitsmoe.cpu_isa()}",
        flush=True,
    )
    rows, agreement = [], {}
    for name in a.shapes:
        H, I, E, K = SHAPES[name]
        for basis_dtype in a.bases:
            # bases of its own for each layer, as in a model
            gpt_oss = name.startswith("gpt-oss")
            biases = random_biases(E, I, H, g) if gpt_oss else None
            group = choose_group_size(I, None)  # the quantizer's: 96 for gpt-oss's I of 2880
            layers = {
                bits: MoELayer(
                    *(random_basis(H, H, basis_dtype, g) for _ in range(3)),
                    *(random_factors(E, H, I, w, g, group) for _ in range(3)),
                    group,
                    GPT_OSS if gpt_oss else SILU,
                    biases,
                )
                for bits, w in BITS.items()
            }
            bases = (layers[2.5].gate_basis, layers[2.5].up_basis, layers[2.5].down_basis)
            basis_bytes = sum(
                b.weight.numel() * b.weight.element_size() + (0 if b.scale is None else b.scale.numel() * 2)
                for b in bases
            )
            int_path = torch.ops.bitsmoe.cpu_isa() in INT_PATH_ISAS
            kernels = {bits: to_cpu_layer(layer) if int_path else None for bits, layer in layers.items()}
            w13, w2 = dense_weights(layers[2.5])
            w13, w2 = (torch.ops.bitsmoe.huge_page_copy(vllm_ops.cpu_prepack_moe_weight(w, isa)) for w in (w13, w2))

            if gpt_oss:  # gate and up biases interleaved as w13's rows
                b13, b2 = torch.stack([biases.gate, biases.up], 2).flatten(1).bfloat16(), biases.down.bfloat16()
            else:
                b13 = b2 = None

            def bf16(x, w, ids, w13=w13, w2=w2, b13=b13, b2=b2, act=layers[2.5].activation.name):
                out = torch.empty_like(x)
                vllm_ops.cpu_fused_moe(out, x, w13, w2, b13, b2, w, ids, act, isa)
                return out

            x, w, ids = routings(4, E, K, H, 1, g)[0]
            y_bits, y_bf16 = ops.moe_layer(x, w, ids, layers[2.5], kernels[2.5]), bf16(x, w, ids)
            agreement[f"{name}/{basis_dtype}"] = float((y_bits.float() - y_bf16.float()).norm() / y_bits.float().norm())
            for T in a.tokens:
                inputs = routings(T, E, K, H, 4, g)
                selected = statistics.mean(len(ids.unique()) for _, _, ids in inputs)
                act_bytes = 2 * T * H * 2 + T * K * 8
                fns = {
                    "bf16": bf16,
                    **{
                        bits: partial(ops.moe_layer, layer=layer, kernel=kernels[bits])
                        for bits, layer in layers.items()
                    },
                }
                if int_path:
                    fns |= {("float", bits): partial(ops.moe_layer, layer=layer) for bits, layer in layers.items()}
                ms_of, read_now = median_ms(fns, inputs, a.repeats)
                bf16_ms = ms_of["bf16"]
                bf16_bytes = selected * 3 * I * H * 2 + act_bytes
                for bits, layer in layers.items():
                    per_expert = sum(factor_bytes(f, 0) for f in (layer.gate, layer.up, layer.down))
                    must_read = selected * per_expert + basis_bytes + act_bytes
                    ms, ref_ms = ms_of[bits], None
                    if T <= a.reference_max_tokens:
                        ref_ms = median_ms({"reference": partial(moe_forward, layer=layer)}, inputs, 3)[0]["reference"]
                    row = {
                        "shape": name,
                        "H": H,
                        "I": I,
                        "E": E,
                        "top_k": K,
                        "basis_dtype": basis_dtype,
                        "group_size": group,
                        "bits": bits,
                        "T": T,
                        "selected_experts": selected,
                        "bytes_must_read": must_read,
                        "bitsmoe_ms": ms,
                        "bitsmoe_GBps": must_read / ms / 1e6,
                        "read_GBps": read_now,
                        "bound_ms": must_read / read_now / 1e6,
                        "bf16_ms": bf16_ms,
                        "bf16_bytes": bf16_bytes,
                        "bf16_GBps": bf16_bytes / bf16_ms / 1e6,
                        "speedup_vs_bf16": bf16_ms / ms,
                        "bytes_ratio_vs_bf16": bf16_bytes / must_read,
                        "float_kernel_ms": ms_of.get(("float", bits), ms),
                        "reference_ms": ref_ms,
                    }
                    rows.append(row)
                    print(
                        f"{name:17s} {basis_dtype:7s} {bits:.1f} T={T:4d}  bitsmoe {ms:8.2f} ms "
                        f"{row['bitsmoe_GBps']:5.1f} GB/s "
                        f"(bound {row['bound_ms']:6.2f} ms at {read_now:4.1f} GB/s, float kernel "
                        f"{row['float_kernel_ms']:6.2f} ms)  bf16 {bf16_ms:8.2f} ms  x{bf16_ms / ms:4.2f} "
                        f"(bytes x{bf16_bytes / must_read:4.2f})  "
                        f"reference {'-' if ref_ms is None else f'{ref_ms:.1f}'} ms",
                        flush=True,
                    )
            del w13, w2
    result = {
        "machine": describe(),
        "threads": torch.get_num_threads(),
        "kernel_isa": torch.ops.bitsmoe.cpu_isa(),
        "bf16_isa": isa,
        "copy_GBps": copy,
        "read_GBps": read,
        "torch": torch.__version__,
        "bf16_vs_bitsmoe_relative_difference": agreement,
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, a.out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    keys = sorted({(r["shape"], r["basis_dtype"]) for r in result["rows"]})
    cols = min(2, len(keys))
    fig, axes = plt.subplots(
        -(-len(keys) // cols), cols, figsize=(6 * cols, 4.5 * -(-len(keys) // cols)), squeeze=False
    )
    for ax, (shape, basis) in zip(axes.flat, keys):
        rows = [r for r in result["rows"] if (r["shape"], r["basis_dtype"]) == (shape, basis)]
        for bits in BITS:
            sel = [r for r in rows if r["bits"] == bits]
            ax.plot([r["T"] for r in sel], [r["bitsmoe_ms"] for r in sel], "o-", label=f"BitsMoE {bits} bits")
            ax.plot(
                [r["T"] for r in sel],
                [r["bound_ms"] for r in sel],
                ":",
                color=ax.lines[-1].get_color(),
                label=f"  bandwidth bound {bits}",
            )
        sel = [r for r in rows if r["bits"] == 2.5]
        ax.plot([r["T"] for r in sel], [r["bf16_ms"] for r in sel], "s-k", label="vLLM bf16 cpu_fused_moe")
        ref = [r for r in sel if r["reference_ms"] is not None]
        ax.plot(
            [r["T"] for r in ref], [r["reference_ms"] for r in ref], "x--", color="grey", label="reference 2.5 bits"
        )
        ax.set(
            xscale="log", yscale="log", xlabel="tokens T", ylabel="MoE layer time (ms)", title=f"{shape}, {basis} bases"
        )
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{result['machine']}, {result['threads']} threads", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
