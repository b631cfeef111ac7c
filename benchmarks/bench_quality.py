"""Quality and quantization speed of BitsMoE against RTN, GPTQ (llmcompressor) and HQQ on a real MoE with real text
(benchmarks/corpus.py), one run per row. Two models:

- smollm2-moe: SmolLM2-135M MoEfied into 8 experts, top-6 (benchmarks/make_moe_model.py), Wikipedia summaries;
- trained-moe: the Qwen3-MoE trained from scratch (benchmarks/train_moe.py, its committed weights), 32 experts of
  I 128 on H 256, top-4, the calibration and evaluation splits of its training corpus.

    bash scripts/setup_peers.sh                # the peers' own environment (.venv-peers)
    .venv/bin/python -m benchmarks.bench_quality [--model trained-moe] [--only NAME ...] [--force]

Builds what is missing under --work (text splits, the MoEfied model, the calibration tokens), quantizes with every
method (same model, same calibration tokens, routed experts only), evaluates every result against the
unquantized MoE (benchmarks/quality_metrics.py) and writes benchmarks/results/quality[_trained_moe].{json,md} and
the plots. Rows already in the JSON are kept unless --force or named by --only.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import transformers
from safetensors.torch import save_file

from benchmarks import machine
from benchmarks.corpus import write_splits
from benchmarks.quality_metrics import evaluate, window_log_probs
from bitsmoe_vllm.offline.calibrate import read_texts, token_sequences, token_stream
from bitsmoe_vllm.offline.evaluate import load_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
BITSMOE = [str(ROOT / ".venv" / "bin" / "bitsmoe-quantize")]
PEERS = ("rtn", "gptq", "hqq", "autoround")
MAIN = ("unquantized", *PEERS, "bitsmoe", "bitsmoe-identity", "bitsmoe-nearest")  # --main: the headline's rows
AUTOROUND_ITERS = 50  # a quarter of its default 200 tuning iterations per block, affordable on 2 cores
MODELS = {  # peers' group size: the usual 128 where it divides H and I; SmolLM2's H 576 and I/E 192 need 64
    "smollm2-moe": {"group": 64, "results": "quality"},
    "trained-moe": {"group": 128, "results": "quality_trained_moe"},
}


def rows(model: str) -> list[dict]:
    """name, family, the command's extra arguments, and what the row is for."""
    out = [{"name": "unquantized", "family": "unquantized"}]
    for method in PEERS:
        out += [{"name": f"{method}-{b}bit", "family": method, "bits": b} for b in (2, 3, 4)]
    # The main rows run the defaults (--basis-dtype auto chooses the basis), at round budgets and at each peer's all-in
    # bits: b + (16-bit scale + b-bit zero) / group, HQQ's zero a 16-bit float.
    group = MODELS[model]["group"]
    peers = {b + (16 + z) / group for b in (2, 3, 4) for z in (b, 16)}  # exact: group is a power of two
    out += [
        {"name": f"bitsmoe-{b}", "family": "bitsmoe", "bits": b, "args": []}
        for b in sorted({2.0, 2.5, 3.0, 4.0} | peers)
    ]
    # format version 1's codes (a zero level) against version 2's odd codes, at the 2- and 3-bit peers' bits and 2.5
    version_1 = ["--format-version", "1"]
    out += [
        {"name": f"bitsmoe-{b}-format-version-1", "family": "bitsmoe-v1", "bits": b, "args": version_1}
        for b in sorted({2.5} | {b + (16 + b) / group for b in (2, 3)})
    ]
    # error feedback on the original model's inputs against the default's, those of the model quantized so far
    original = ["--feedback-inputs", "original"]
    out += [
        {"name": f"bitsmoe-{b}-original-inputs", "family": "bitsmoe-original-inputs", "bits": b, "args": original}
        for b in sorted({2.5} | {b + (16 + b) / group for b in (2, 3)})
    ]
    # the down projection rounded toward the expert's original output (the default) against GPTQ's objective
    projection = ["--feedback-target", "projection"]
    out += [
        {"name": f"bitsmoe-{b}-projection-target", "family": "bitsmoe-projection-target", "bits": b, "args": projection}
        for b in sorted({2.5} | {b + (16 + b) / group for b in (2, 3)})
    ]
    # smaller groups than the default (the largest of 128, 96, 64, 32 that divides I): more scale bits, finer scales;
    # on SmolLM2 (default 96) the peers' 64 at 3 and 4 bits, where AutoRound's perplexity is below the defaults'
    if model == "trained-moe":
        groups, group_bits = (64, 32), {2.5} | {b + (16 + b) / group for b in (2, 3, 4)}
    else:
        groups, group_bits = (64,), {b + (16 + b) / group for b in (3, 4)}
    out += [
        {"name": f"bitsmoe-{b}-group-{g}", "family": f"bitsmoe-group-{g}", "bits": b, "args": ["--group-size", str(g)]}
        for g in groups
        for b in sorted(group_bits)
    ]
    # no factor row dropped (width 0), where the peers' perplexity is below the defaults' (benchmarks/README.md)
    no_zero = ["--candidate-bits", "1,2,3,4,6,8"]
    out += [
        {"name": f"bitsmoe-{b}-no-width-0", "family": "bitsmoe-no-width-0", "bits": b, "args": no_zero}
        for b in ((2.140625, 2.5) if model == "trained-moe" else (3.296875, 4.3125))
    ]
    if model == "trained-moe":
        # rank rows per allocation unit of the shared basis the defaults take here, against their 8
        out += [
            {
                "name": f"bitsmoe-{b}-unit-rows-{u}",
                "family": f"bitsmoe-unit-rows-{u}",
                "bits": b,
                "args": ["--unit-rows", str(u)],
            }
            for u in (1, 4, 16, 32)
            for b in (2.140625, 2.5)
        ]
        # the paper's claim: the defaults (a shared int8 basis here) against the identity basis
        identity = ["--basis-dtype", "identity"]
        out += [
            {"name": f"bitsmoe-{b}-identity", "family": "bitsmoe-identity", "bits": b, "args": identity}
            for b in (2.0, 2.5, 3.0)
        ]
        nearest = ["--rounding", "nearest"]  # the ablation of the error feedback
        return out + [
            {"name": f"bitsmoe-{b}-nearest", "family": "bitsmoe-nearest", "bits": b, "args": nearest}
            for b in (2.0, 2.5, 3.0)
        ]
    # E * I / H = 2.7 here: a shared basis at full rank would cost 16 / 2.7 = 6 bits per weight, so auto takes the
    # identity; the shared-basis rows show what happens otherwise.
    identity = ["--basis-dtype", "identity"]
    # each against bitsmoe-2.5 (identity basis, global budget, widths 0-8, 1 row per unit, refined scales, feedback)
    ablations = {
        "per-layer": ["--allocation", "per-layer"],
        "unit-rows-8": ["--unit-rows", "8"],
        "unit-rows-32": ["--unit-rows", "32"],
        "widths-0248": ["--candidate-bits", "0,2,4,8"],
        "widths-01234": ["--candidate-bits", "0,1,2,3,4"],
        "absmax-scales": ["--scale-steps", "0"],
        "nearest-rounding": ["--rounding", "nearest"],
    }
    out += [
        {"name": f"bitsmoe-2.5-{k}", "family": "bitsmoe-ablation", "bits": 2.5, "args": identity + v}
        for k, v in ablations.items()
    ]
    fp16, int8 = ["--basis-dtype", "fp16"], ["--basis-dtype", "int8"]
    shared = {  # the method's shared basis (auto rank, 8 rows per unit)
        "shared-basis": fp16,
        "shared-basis-int8": int8,
        "shared-basis-rank-128": fp16 + ["--rank", "128"],
        "shared-basis-factors-scope": fp16 + ["--budget-scope", "factors"],
        "shared-basis-int8-factors-scope": int8 + ["--budget-scope", "factors"],
    }
    out += [
        {"name": f"bitsmoe-2.5-{k}", "family": "bitsmoe-ablation", "bits": 2.5, "args": v} for k, v in shared.items()
    ]
    return out


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run cmd (stdout/stderr to log); wall seconds and peak RSS in MB of its process tree (polled every 0.1 s)."""
    start, peak = time.time(), 0
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.1)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.time() - start, peak / 2**20


def quantize(row: dict, model: Path, text: dict, calib_file: Path, calib_tokens: int, work: Path, group: int) -> dict:
    out = work / "quantized" / model.name / row["name"]
    log = work / "logs" / model.name / f"{row['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # a run this script killed earlier
    if row["family"] in PEERS:
        cmd = [
            str(PEERS_PYTHON),
            "benchmarks/peers.py",
            row["family"],
            "--model",
            str(model),
            "--bits",
            str(row["bits"]),
            "--group-size",
            str(group),
            "--calib",
            str(calib_file),
            "--out",
            str(out),
        ]
        if row["family"] == "autoround":
            cmd += ["--iters", str(AUTOROUND_ITERS)]
    else:
        cmd = [
            *BITSMOE,
            "--model",
            str(model),
            "--out",
            str(out),
            "--bits",
            str(row["bits"]),
            "--calib",
            str(text["calib"]),
            "--calib-tokens",
            str(calib_tokens),
            "--calib-seq-len",
            "512",
            "--overwrite",
            "--allow-high-error",
            *row["args"],
        ]
    seconds, rss = run_measured(cmd, log)
    info = {"quantize_wall_s": round(seconds, 1), "quantize_peak_rss_mb": round(rss)}
    if row["family"].startswith("bitsmoe"):
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        report = json.loads((out / "quantization_report.json").read_text())
        info |= {
            "all_in_bits": cfg["achieved_bits"]["all"],
            "factor_bits": cfg["achieved_bits"]["factors"],
            "basis": report["basis"],
            "worst_relative_error": report["worst_relative_error"],
        }
    else:
        info |= {"all_in_bits": json.loads((out / "peer.json").read_text())["all_in_bits"]}
    return info | {"checkpoint": out}


def prepare(name: str, work: Path, a) -> tuple[Path, dict[str, Path], str]:
    """The model's directory, its calibration and evaluation text, and one line that describes it."""
    if name == "trained-moe":
        model = ROOT / "benchmarks" / "models" / "trained-moe"
        text = {k: work / "text-mixed" / f"{k}.jsonl" for k in ("calib", "eval")}
        if not all(f.is_file() for f in text.values()):
            write_splits(work / "text-mixed", mixed=True)
        t = json.loads((model / "training.json").read_text())
        c = t["config"]
        return (
            model,
            text,
            (
                f"A Qwen3-MoE trained from scratch (benchmarks/train_moe.py): H {c['hidden_size']}, "
                f"{c['num_hidden_layers']} "
                f"layers, {c['num_experts']} experts of I {c['moe_intermediate_size']}, "
                f"top-{c['num_experts_per_tok']}, "
                f"{t['tokens_seen'] / 1e6:.1f} M training tokens; perplexity {t['ppl_windows_512']:.2f} on its "
                "evaluation split"
            ),
        )
    text = {k: work / "text" / f"{k}.jsonl" for k in ("calib", "eval")}
    if not all(f.is_file() for f in text.values()):
        write_splits(work / "text")
    model = work / f"smollm2-moe-e{a.experts}k{a.top_k}"
    if not model.is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.make_moe_model",
                str(model),
                "--experts",
                str(a.experts),
                "--top-k",
                str(a.top_k),
                "--calib",
                str(text["calib"]),
                "--eval",
                str(text["eval"]),
            ],
            check=True,
            cwd=ROOT,
        )
    m = json.loads((model / "moefication.json").read_text())
    ppl = m["perplexity_512_windows"]
    return (
        model,
        text,
        (
            f"SmolLM2-135M-Instruct MoEfied into {m['experts']} experts, top-{m['top_k']} (dense perplexity "
            f"{ppl['dense']:.2f}, "
            f"MoE {ppl['moe']:.2f} on {m['eval_tokens']} tokens)"
        ),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="smollm2-moe")
    p.add_argument(
        "--work", type=Path, default=ROOT / "benchmarks" / "work", help="models, text and quantized checkpoints"
    )
    p.add_argument("--experts", type=int, default=8, help="smollm2-moe: experts of the MoEfication")
    p.add_argument("--top-k", type=int, default=6, help="smollm2-moe: experts per token")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--only", nargs="*", help="rows to (re)run by name")
    p.add_argument(
        "--main", action="store_true", help="only the main rows: unquantized, peers, defaults, identity, nearest"
    )
    p.add_argument("--force", action="store_true", help="rerun every row")
    p.add_argument("--results", help="results file name in benchmarks/results (default: the model's)")
    a = p.parse_args()
    results = a.results or MODELS[a.model]["results"]
    torch.manual_seed(0)
    work, group = a.work, MODELS[a.model]["group"]
    model, text, description = prepare(a.model, work, a)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    calib_file = work / f"calib_tokens_{model.name}_{a.calib_tokens}.safetensors"
    if not calib_file.is_file():
        save_file(
            {"input_ids": token_sequences(tokenizer, read_texts([str(text["calib"])]), a.calib_tokens, 512)}, calib_file
        )
    tokens = torch.tensor(token_stream(tokenizer, read_texts([str(text["eval"])]))[: a.eval_tokens])

    results_file = RESULTS / f"{results}.json"
    done = {r["name"]: r for r in json.loads(results_file.read_text())["rows"]} if results_file.is_file() else {}
    todo = [r for r in rows(a.model) if a.force or r["name"] not in done or (a.only and r["name"] in a.only)]
    if a.only:
        todo = [r for r in todo if r["name"] in a.only]
    if a.main:
        todo = [r for r in todo if r["family"] in MAIN]
    print(f"{len(todo)} rows to run: {[r['name'] for r in todo]}", flush=True)
    if any(r["family"] in PEERS for r in todo) and not PEERS_PYTHON.exists():
        raise SystemExit(f"{PEERS_PYTHON} is missing: run `bash scripts/setup_peers.sh` first")
    reference = window_log_probs(load_model(str(model), torch.device("cpu")), tokens) if todo else []
    header = {"title": a.model, "machine": machine.describe(), "model": description, "calib_tokens": a.calib_tokens}
    header |= {"eval_tokens": len(tokens), "peer_group_size": group}
    for row in todo:
        print(f"== {row['name']}", flush=True)
        if row["family"] == "unquantized":
            info = {"all_in_bits": 16.0, "checkpoint": model}  # the bf16 weights a deployment would serve
        else:
            info = quantize(row, model, text, calib_file, a.calib_tokens, work, group)
        metrics = evaluate(info.pop("checkpoint"), tokens, reference)
        result = {"args": [], **row} | info | metrics
        write_results({row["name"]: result}, header, a.model, results)
        print(json.dumps(result), flush=True)
    write_results({}, header, a.model, results)


def write_results(new: dict, header: dict, model: str, name: str) -> None:
    """Merge the rows just measured into the results file as it is now (another run may have added rows since)."""
    from benchmarks.quality_report import write_report

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    done = {r["name"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    done |= new
    order = [r["name"] for r in rows(model)]
    payload = header | {"rows": [done[n] for n in order if n in done]}
    tmp = RESULTS / f"{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(RESULTS / f"{name}.json")
    write_report(payload, RESULTS, name)


if __name__ == "__main__":
    main()
