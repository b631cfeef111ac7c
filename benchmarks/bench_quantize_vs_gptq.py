"""Quantization time and peak memory, BitsMoE against GPTQ (issue 26), on the same calibration tokens: BitsMoE with
default options at --bits, GPTQ through llmcompressor as the quality benchmark runs it (benchmarks/peers.py: 2 bits,
groups of 128, activation order, MSE scale search; its own environment, `bash scripts/setup_peers.sh`). Each run alone
on the machine, wall time and peak RSS of its process tree; BitsMoE's stages from its report.

    .venv/bin/python -m benchmarks.bench_quantize_vs_gptq --model trained-moe
    .venv/bin/python -m benchmarks.bench_quantize_vs_gptq --model qwen3-30b-a3b --layers 1   # random weights
    .venv/bin/python -m benchmarks.bench_quantize_vs_gptq --model gpt-oss-20b --layers 1 --only bitsmoe
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from benchmarks import machine
from benchmarks.bench_quality import PEERS_PYTHON, ROOT, run_measured
from benchmarks.bench_serve import write_qwen3_30b_a3b
from benchmarks.corpus import write_splits
from bitsmoe_vllm.offline.calibrate import read_texts, token_sequences
from bitsmoe_vllm.offline.demo import corpus, train_tokenizer, write_random_model

RESULTS = ROOT / "benchmarks" / "results"


def qwen3_30b_a3b(work: Path, layers: int) -> tuple[Path, Path]:
    """`layers` layers of Qwen3-30B-A3B's shapes, random bf16 weights, the demo's tokenizer and text."""
    model, text = work / f"qwen3-30b-a3b-l{layers}", work / "demo-text.txt"
    if not (model / "config.json").is_file():
        write_qwen3_30b_a3b(model, layers)
    text.write_text("\n\n".join(corpus()))
    return model, text


GPT_OSS_20B = dict(  # its config.json's shapes
    hidden_size=2880,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    num_local_experts=32,
    intermediate_size=2880,
    num_experts_per_tok=4,
    sliding_window=128,
)


def gpt_oss_20b(work: Path, layers: int) -> tuple[Path, Path]:
    """`layers` layers of gpt-oss-20b's shapes (experts with biases, bf16 as transformers holds them), random weights,
    the demo's tokenizer and text."""
    model, text = work / f"gpt-oss-20b-l{layers}", work / "demo-text.txt"
    if not (model / "config.json").is_file():
        tokenizer = train_tokenizer()
        config = transformers.GptOssConfig(
            **GPT_OSS_20B,
            vocab_size=len(tokenizer),
            num_hidden_layers=layers,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
            max_position_embeddings=4096,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        write_random_model(config, tokenizer, model, dtype=torch.bfloat16)
    text.write_text("\n\n".join(corpus()))
    return model, text


MODELS = {"qwen3-30b-a3b": qwen3_30b_a3b, "gpt-oss-20b": gpt_oss_20b}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["trained-moe", *MODELS], default="trained-moe")
    p.add_argument("--layers", type=int, default=1, help="random models (not trained-moe): decoder layers")
    p.add_argument("--bits", type=float, default=2.5)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    p.add_argument("--only", choices=["bitsmoe", "gptq"], help="run one method, keep the other rows of the results")
    p.add_argument("--bitsmoe-args", default="", help="options besides the defaults; the row is named with them")
    a = p.parse_args()
    if a.only != "bitsmoe" and not PEERS_PYTHON.exists():
        sys.exit(f"{PEERS_PYTHON} is missing: run `bash scripts/setup_peers.sh` first")
    if a.model == "trained-moe":
        model, text = ROOT / "benchmarks" / "models" / "trained-moe", write_splits(a.work / "text-mixed", True)["calib"]
        calib_tokens, seq_len, name = 16384, 512, "trained_moe"
    else:
        model, text = MODELS[a.model](a.work, a.layers)
        calib_tokens, seq_len, name = 2048, 128, f"{a.model.replace('-', '_')}_{a.layers}l"
    tokens = token_sequences(
        transformers.AutoTokenizer.from_pretrained(model), read_texts([str(text)]), calib_tokens, seq_len
    )
    calib_file, out = a.work / f"calib_{name}.safetensors", a.work / "quantize_vs_gptq"
    save_file({"input_ids": tokens}, calib_file)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bitsmoe = [str(ROOT / ".venv" / "bin" / "bitsmoe-quantize"), "--model", str(model), "--bits", str(a.bits)]
    bitsmoe += ["--calib", str(text), "--calib-tokens", str(calib_tokens), "--calib-seq-len", str(seq_len)]
    slug = "".join(c if c.isalnum() else "-" for c in a.bitsmoe_args).strip("-")  # one directory per row
    bitsmoe_out = out / "-".join(filter(None, ["bitsmoe", name, slug]))
    bitsmoe += ["--out", str(bitsmoe_out), "--overwrite", "--allow-high-error", *a.bitsmoe_args.split()]
    gptq = [str(PEERS_PYTHON), "benchmarks/peers.py", "gptq", "--model", str(model), "--bits", "2"]
    gptq += ["--group-size", "128", "--calib", str(calib_file), "--out", str(out / f"gptq-{name}")]
    results = RESULTS / f"quantize_vs_gptq_{name}.json"
    rows = json.loads(results.read_text())["rows"] if a.only and results.is_file() else {}
    for method, cmd in (("bitsmoe", bitsmoe), ("gptq", gptq)):
        if a.only not in (None, method):
            continue
        row = f"bitsmoe {a.bitsmoe_args}".strip() if method == "bitsmoe" else method
        seconds, rss = run_measured(cmd, logs / f"{bitsmoe_out.name if method == 'bitsmoe' else 'gptq-' + name}.log")
        rows[row] = {"wall_s": round(seconds, 1), "peak_rss_mb": round(rss), "machine": machine.describe()}
        if method == "bitsmoe":
            report = json.loads((bitsmoe_out / "quantization_report.json").read_text())
            rows[row] |= {k: report[k] for k in ("stages", "basis", "options", "workers") if k in report}
        print(row, rows[row]["wall_s"], "s", rows[row]["peak_rss_mb"], "MB", flush=True)
    gptq_row = rows.get("gptq", {})
    result = {
        "model": str(model.relative_to(ROOT)),
        "calib_tokens": int(tokens.numel()),
        "calib_seq_len": seq_len,
        "rows": rows,
        # only between rows of one machine (a row kept by --only may be from another)
        "gptq_wall_over": {
            k: round(gptq_row["wall_s"] / v["wall_s"], 2)
            for k, v in rows.items()
            if k != "gptq" and gptq_row and v.get("machine") == gptq_row.get("machine")
        },
    }
    results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
