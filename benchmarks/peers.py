"""The quantizers people use today, applied to the routed experts of a Mixtral- or Qwen3-MoE-architecture
checkpoint, for the quality benchmark. Runs in the peers' own environment (`bash scripts/setup_peers.sh`:
llmcompressor, hqq, auto-round pin versions of their own), not in bitsmoe-vllm's. The methods: rtn (round to
nearest, min-max per group), hqq (half-quadratic, no data), gptq (llmcompressor, calibrated) and autoround
(Intel's AutoRound, SignRound tuning of the rounding and clipping against each block's output, calibrated;
--iters iterations per block).

Every method quantizes exactly the routed experts' w1/w2/w3 (asymmetric integer codes, groups of
--group-size along the input dimension) and leaves attention, router, embeddings and norms untouched. The
output is a plain HF checkpoint holding the de-quantized weights (what the method's kernels would compute
with), so one evaluator measures every method the same way, plus peer.json with the all-in bits:
codes + a 16-bit scale per group + the zero point (b bits when integer, 16 when a float).

    python benchmarks/peers.py gptq --model MOE --bits 3 --group-size 64 --calib calib_tokens.safetensors --out OUT
    python benchmarks/peers.py autoround --model MOE --bits 3 --group-size 64 --calib calib_tokens.safetensors --out OUT
"""

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EXPERT = re.compile(
    r"model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight"
)
MIXTRAL = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # llmcompressor's names -> Mixtral's


def expert_names(state: dict) -> list[str]:
    names = [n for n in state if EXPERT.fullmatch(n)]
    if not names:
        raise ValueError(
            "no routed-expert weights (model.layers.L.block_sparse_moe.experts.E.w1.weight or "
            "model.layers.L.mlp.experts.E.gate_proj.weight) in the checkpoint"
        )
    return names


def checkpoint_name(layer: str, expert: str, projection: str, names: set[str]) -> str:
    """The checkpoint's name of llmcompressor's linearised expert projection (gate_proj, up_proj, down_proj)."""
    mixtral = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL[projection]}.weight"
    return mixtral if mixtral in names else f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round to nearest, asymmetric min-max per group of `group` input columns; returns the de-quantized weight."""
    g = w.float().reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)
    q = torch.clamp(torch.round(g / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(w.shape)


def hqq(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """HQQ (half-quadratic optimisation of scale and zero, no calibration data); float zero point."""
    from hqq.core.quantize import Quantizer

    q, meta = Quantizer.quantize(
        w.float(), nbits=bits, group_size=group, axis=1, optimize=True, bitpack=False, device="cpu"
    )
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(q.float(), meta).reshape(w.shape)


def gptq(model_dir: Path, calib: torch.Tensor, bits: int, group: int, names: set[str]) -> dict[str, torch.Tensor]:
    """GPTQ through llmcompressor (sequential pipeline, experts linearised by load_quantizable_moe), tuned as its
    users tune it: activation order (static groups) and scales by an MSE search over clipping ranges."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    with load_quantizable_moe():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group}
    weights |= {"actorder": "static", "observer": "mse"}
    recipe = GPTQModifier(
        config_groups={"experts": {"targets": [r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"], "weights": weights}},
        ignore=["lm_head"],
    )
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(calib), max_seq_length=calib.shape[1])
    out = {}
    for name, module in model.named_modules():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)", name)
        if m:
            out[checkpoint_name(m[1], m[2], m[3], names)] = module.weight.detach().float().clone()
    return out


def autoround(
    model_dir: Path, calib: torch.Tensor, bits: int, group: int, names: set[str], iters: int
) -> dict[str, torch.Tensor]:
    """AutoRound (SignRound: signed-gradient descent on each weight's rounding offset and each group's min/max
    clipping, block by block, minimising the block's output error on the calibration data) as its users run it: its
    own defaults (batch 8, learning rate 1/iters, the best-loss parameters kept, each block tuned on the quantized
    blocks' outputs, float16 scales, integer zero points of `bits` bits) with `iters` iterations per block (its default
    200; fewer on CPU). Affordable on CPU: float32 (no bf16 autocast) and no torch.compile, whose compile time dwarfs
    the tuning of a small model. AutoRound unfuses transformers 5's 3-D experts itself (its Qwen3-MoE block patch,
    its linear_loop experts for Mixtral); a layer_config keeps every linear layer but the routed experts' in 16 bits."""
    import os
    import tempfile

    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    from auto_round.schemes import QuantizationScheme

    scheme = {"bits": bits, "group_size": group, "sym": False, "data_type": "int", "act_bits": 16}
    keep = {"bits": 16, "act_bits": 16, "data_type": "float", "act_data_type": "float"}
    not_expert = r"^(?!.*mlp.experts.\d+.(gate|up|down)_proj$).*"  # AutoRound escapes the bare dots itself
    data = [{"input_ids": s[None], "attention_mask": torch.ones_like(s[None])} for s in calib]  # not pile-10k
    with tempfile.TemporaryDirectory(prefix="autoround_") as work:  # its scratch space, else ./ar_work_space
        os.environ["AR_WORK_SPACE"] = work
        ar = AutoRound(
            str(model_dir),
            scheme=QuantizationScheme.from_dict(scheme),
            layer_config={not_expert: keep},
            alg_configs=SignRoundConfig(iters=iters),
            dataset=data,
            nsamples=len(calib),
            seqlen=calib.shape[1],
            device_map="cpu",
            amp=False,
            enable_torch_compile=False,
            low_cpu_mem_usage=False,
        )
        model, _ = ar.quantize()  # exports no format, so it leaves the fake-quantized weights in the model
    out, quantized = {}, set()
    for name, module in model.named_modules():
        if isinstance(getattr(module, "bits", None), int) and module.bits <= 8:
            quantized.add(name)
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)", name)
        if m:
            codes = name in quantized and module.zp.min() >= 0 and module.zp.max() < 2**bits
            if not codes or module.scale.dtype != torch.float16:
                raise SystemExit(f"peers: AutoRound did not give {name} {bits}-bit zero points and float16 scales")
            out[checkpoint_name(m[1], m[2], m[3], names)] = module.weight.detach().float().clone()
    if len(quantized) != len(out):
        raise SystemExit(f"peers: AutoRound quantized layers other than the routed experts: {sorted(quantized)[:8]}")
    return out


def zero_bits(method: str, bits: int) -> int:
    return 16 if method == "hqq" else bits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=["rtn", "hqq", "gptq", "autoround"])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--bits", required=True, type=int)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib", type=Path, help="safetensors file with 'input_ids' [sequences, length] (gptq, autoround)")
    p.add_argument("--iters", type=int, default=200, help="autoround's tuning iterations per block (its default 200)")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    torch.manual_seed(0)
    src = a.model / "model.safetensors"
    if not src.is_file():
        raise SystemExit(f"peers: {src} not found (expected a single-file checkpoint from benchmarks.make_moe_model)")
    state = load_file(src)
    names = expert_names(state)
    for n in names:
        if state[n].shape[1] % a.group_size:
            raise SystemExit(
                f"peers: --group-size {a.group_size} does not divide the input dimension of {n} {tuple(state[n].shape)}"
            )
    start = time.time()
    if a.method in ("gptq", "autoround"):
        if a.calib is None:
            raise SystemExit(f"peers: {a.method} needs --calib")
        calib = load_file(a.calib)["input_ids"]
        if a.method == "gptq":
            new = gptq(a.model, calib, a.bits, a.group_size, set(names))
        else:
            new = autoround(a.model, calib, a.bits, a.group_size, set(names), a.iters)
        if sorted(new) != sorted(names):
            raise SystemExit(f"peers: {a.method} returned {len(new)} expert weights, the checkpoint has {len(names)}")
    else:
        fn = rtn if a.method == "rtn" else hqq
        new = {n: fn(state[n], a.bits, a.group_size) for n in names}
    seconds = time.time() - start
    for n in names:
        state[n] = new[n].to(state[n].dtype).contiguous()
    partial = a.out.with_name(a.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(a.model, partial, ignore=shutil.ignore_patterns("*.safetensors", "moefication.json"))
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    weights = sum(state[n].numel() for n in names)
    all_in = a.bits + (16 + zero_bits(a.method, a.bits)) / a.group_size
    info = {
        "method": a.method,
        "bits": a.bits,
        "group_size": a.group_size,
        "all_in_bits": all_in,
        "expert_weights": weights,
        "quantize_seconds": round(seconds, 2),
    }
    if a.method == "autoround":  # fewer iterations than its default are part of the label
        info["iters"] = a.iters
    (partial / "peer.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(a.out, ignore_errors=True)
    partial.rename(a.out)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
