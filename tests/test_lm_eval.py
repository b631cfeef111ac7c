"""lm-eval through vLLM on a BitsMoE checkpoint, as the README's Evaluate section runs it: a local multiple-choice
task of a few documents (no hub here), the `lm_eval` command with `--model vllm`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from bitsmoe_vllm.offline.evaluate import load_model

pytest.importorskip("vllm")
pytest.importorskip("lm_eval")

TASK = """task: bitsmoe_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
DOCS = [
    {"question": "The opposite of hot is", "choices": ["cold", "loud", "green"], "answer": 0},
    {"question": "Two plus two is", "choices": ["seven", "four", "nine"], "answer": 1},
    {"question": "Water freezes into", "choices": ["steam", "sand", "ice"], "answer": 2},
    {"question": "A year has twelve", "choices": ["months", "legs", "wheels"], "answer": 0},
]


@pytest.mark.slow
def test_lm_eval_runs_a_local_task_through_vllm_on_a_bitsmoe_checkpoint(tiny_model_dir, quantize_tiny, tmp_path):
    bitsmoe = quantize_tiny(
        tiny_model_dir("qwen3_moe", layers=2, experts=16, intermediate=128), tmp_path / "bitsmoe", 2.5
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "bitsmoe_local.yaml").write_text(TASK.format(data=tasks / "docs.jsonl"))
    command = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model",
        "vllm",
        "--model_args",
        f"pretrained={bitsmoe},dtype=float32,max_model_len=256,enforce_eager=True",
        "--tasks",
        "bitsmoe_local",
        "--include_path",
        str(tasks),
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    # vLLM's CPU engine sometimes aborts as the interpreter exits, after lm-eval has written everything (SIGABRT,
    # "terminate called without an active exception": 3 runs in 12 on a 2-core AMD EPYC, 2026-12-05; none of this
    # project's code starts a thread). Only that end is let through; the results are checked below either way.
    aborted_at_exit = result.returncode == -6 and result.stderr.rstrip().endswith(
        "terminate called without an active exception"
    )
    assert result.returncode == 0 or aborted_at_exit, result.stderr[-4000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    metrics = json.loads(results.read_text())["results"]["bitsmoe_local"]
    assert metrics["alias"] == "bitsmoe_local" and 0 <= metrics["acc,none"] <= 1
    assert math.isclose(metrics["acc,none"] * len(DOCS), round(metrics["acc,none"] * len(DOCS)))  # whole documents
    assert json.loads(results.read_text())["n-samples"]["bitsmoe_local"]["effective"] == len(DOCS)

    # The teeth: each choice's log-likelihood as lm-eval got it from vLLM equals the reference forward's on the same
    # tokens (lm-eval's split: the whole string encoded, the context's tokens cut off the front).
    (samples,) = (tmp_path / "out").rglob("samples_bitsmoe_local_*.jsonl")
    model, tokenizer = load_model(str(bitsmoe), torch.device("cpu")), AutoTokenizer.from_pretrained(bitsmoe)
    checked = 0
    for sample in map(json.loads, samples.read_text().splitlines()):
        for request, ((loglikelihood, _),) in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = request["arg_0"], request["arg_1"]
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
            expected = sum(float(logits[i - 1, whole[i]]) for i in range(start, len(whole)))
            assert float(loglikelihood) == pytest.approx(expected, abs=1e-3), request  # float32 everywhere
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)
