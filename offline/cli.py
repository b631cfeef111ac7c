"""`bitsmoe-quantize` / `python -m bitsmoe_vllm.offline`: a Hugging Face MoE checkpoint in, a BitsMoE checkpoint out."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .plan import AUTO_BASES, BASIS_DTYPES, Options


def parse(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="bitsmoe-quantize",
        description="Quantize the routed experts of a local Hugging Face MoE checkpoint with BitsMoE (FORMAT.md).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory, or a model id already in the local HF cache")
    p.add_argument(
        "--out", required=True, help="output directory (written as OUT.partial, moved into place when complete)"
    )
    p.add_argument("--bits", required=True, type=float, help="budget in bits per routed-expert weight")
    p.add_argument(
        "--calib",
        required=True,
        nargs="+",
        metavar="FILE",
        help="calibration text: .txt, .jsonl ('text'), .parquet ('text')",
    )
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument(
        "--budget-scope",
        choices=["all", "factors"],
        default="all",
        help="what --bits counts: all stored bits of the experts (default), or factor codes and scales only (the "
        "paper's)",
    )
    p.add_argument(
        "--allocation",
        choices=["global", "per-layer"],
        default="global",
        help="one budget over all MoE layers (default), or the same budget in every layer",
    )
    p.add_argument(
        "--basis-dtype",
        choices=["auto", *BASIS_DTYPES],
        default="auto",
        help=f"the basis: auto (default) takes whichever of {', '.join(AUTO_BASES)} has the least estimated "
        "loss at this budget; int8 (one scale per row), fp16 or bf16: a shared basis per projection stored so; "
        "int8-layer (one scale), fp16-layer, bf16-layer: one basis per layer that the gate, up and down projections "
        "share; identity: no basis, each expert's weights are its factors",
    )
    p.add_argument(
        "--rank",
        default="auto",
        help="shared rank R, or auto (default): the multiple of --unit-rows whose allocation has the least "
        "estimated loss",
    )
    p.add_argument(
        "--candidate-bits", default="0,1,2,3,4,6,8", help="widths a rank row may get (default 0,1,2,3,4,6,8)"
    )
    p.add_argument(
        "--unit-rows",
        type=int,
        default=None,
        help="rank rows per allocation unit (default 8; 1 with --basis-dtype identity)",
    )
    p.add_argument(
        "--scale-steps",
        type=int,
        default=Options.scale_steps,
        help="least-squares steps refining each group's scale (default %(default)s; 0: absmax scales)",
    )
    p.add_argument(
        "--rounding",
        choices=["gptq", "nearest"],
        default=Options.rounding,
        help="gptq (default): rounding errors fed back into the entries not yet rounded, on each expert's "
        "calibration tokens; nearest: every row rounded on its own",
    )
    p.add_argument(
        "--feedback-inputs",
        choices=["quantized", "original"],
        default=Options.feedback_inputs,
        help="the inputs gptq rounding feeds its errors back on: quantized (default): each layer's, with the layers "
        "before it already quantized, as the quantized model sees them; original: the original model's",
    )
    p.add_argument(
        "--feedback-target",
        choices=["layer", "projection"],
        default=Options.feedback_target,
        help="what gptq rounding of the down projection aims at: layer (default): the expert's original output, on "
        "the inputs of the gate and up as rounded (compensating their errors); projection: its own output (GPTQ)",
    )
    p.add_argument(
        "--format-version",
        type=int,
        choices=[1, 2, 3],
        default=Options.format_version,
        help="default: 3 for a source with fp8 block-quantized linear weights (DeepSeek-V3), which keeps them as "
        "stored, else 2 (odd codes up to 6 bits: no zero level, a finer grid at the same bits); 2 with an fp8 source: "
        "its linear weights dequantized (for readers before version 3, and vLLM's CPU build without AMX); 1: for "
        "readers of version 1, whose codes include zero (FORMAT.md)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="columns per scale (default: 128, or the largest of 96/64/32 dividing I)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that cost the MoE layers while the model is walked, each on an equal share of the threads "
        "(the output is the same with any number; each holds a layer's experts in memory; default 1)",
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in OUT.partial")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--allow-high-error",
        action="store_true",
        help="write the checkpoint even when a layer's error on held-out tokens marks a broken model",
    )
    a = p.parse_args(argv)
    try:
        widths = tuple(int(b) for b in a.candidate_bits.split(","))
    except ValueError:
        p.error(f"--candidate-bits {a.candidate_bits!r}: expected comma-separated integers such as 0,1,2,3,4,6,8")
    if a.rank != "auto" and not a.rank.isdigit():
        p.error(f"--rank {a.rank!r}: expected a positive integer or auto")
    for flag, value in (
        ("--calib-tokens", a.calib_tokens),
        ("--calib-seq-len", a.calib_seq_len),
        ("--workers", a.workers),
    ):
        if value < 1:
            p.error(f"{flag} {value}: must be positive")
    return Options(
        model=a.model,
        out=a.out,
        bits=a.bits,
        calib=tuple(a.calib),
        calib_tokens=a.calib_tokens,
        calib_seq_len=a.calib_seq_len,
        budget_scope=a.budget_scope,
        allocation=a.allocation,
        basis_dtype=a.basis_dtype,
        rank=None if a.rank == "auto" else int(a.rank),
        candidate_bits=widths,
        unit_rows=a.unit_rows,
        scale_steps=a.scale_steps,
        rounding=a.rounding,
        feedback_inputs=a.feedback_inputs,
        feedback_target=a.feedback_target,
        format_version=a.format_version,
        group_size=a.group_size,
        device=a.device,
        workers=a.workers,
        resume=a.resume,
        overwrite=a.overwrite,
        allow_high_error=a.allow_high_error,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    start = time.monotonic()
    # MKL's float sums may depend on where its operands lie in memory, which depends on what the process did before:
    # a resumed run would round some weights otherwise than an uninterrupted one. Strict conditional numerical
    # reproducibility makes them the same on a given CPU (read at MKL's first call, which comes later).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    from .guard import QualityError
    from .quantize import quantize  # torch and transformers load after the arguments are checked

    try:
        out = quantize(options)
    except QualityError as err:
        print(f"bitsmoe-quantize: error: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"bitsmoe-quantize: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a lost mount, a worker killed: what was done so far stays in OUT.partial
        print(
            f"bitsmoe-quantize: error: {err}; the run so far is kept in {options.out}.partial: fix the cause and "
            "rerun the same command with --resume",
            file=sys.stderr,
        )
        return 1
    print(summary(out, time.monotonic() - start))
    return 0


def summary(out: Path, seconds: float) -> str:
    """One line: where, bits all-in, the basis, sizes of the weights before and after, the worst layer, the time."""
    r = json.loads((out / "quantization_report.json").read_text())
    worst = max(r["layers"], key=lambda m: r["layers"][m]["relative_error"])
    before, after = (sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) / 1e6 for d in (r["model"], out))
    return (
        f"bitsmoe-quantize: wrote {out}: {r['bits']['achieved_all']:.3f} bits per routed-expert weight all-in, "
        f"{r['basis']['dtype']} basis{' (one per layer)' * (r['basis'].get('sharing') == 'layer')} of rank "
        f"{r['basis']['rank']}; weights {before:,.1f} MB -> {after:,.1f} MB; worst "
        f"layer error {r['layers'][worst]['relative_error']:.3f} ({worst}); {seconds:.0f} s"
    )
