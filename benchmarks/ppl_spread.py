"""Is a perplexity difference real? Per-window negative log-likelihood of checkpoints of the trained MoE on N of its
evaluation tokens, each one's increase over the unquantized model and every pair's difference, in nats per token with
standard errors over the 512-token windows.

    .venv/bin/python -m benchmarks.ppl_spread 65536 CKPT_A CKPT_B ...
"""

import math
import sys

import torch
import transformers

from benchmarks.quality_metrics import windows
from bitsmoe_vllm.offline.calibrate import read_texts, token_stream
from bitsmoe_vllm.offline.evaluate import load_model

MODEL = "benchmarks/models/trained-moe"
EVAL = "benchmarks/work/text-mixed/eval.jsonl"  # written by bench_quality --model trained-moe


@torch.no_grad()
def window_nll(checkpoint: str, tokens: torch.Tensor) -> torch.Tensor:
    model = load_model(checkpoint, torch.device("cpu"))
    out = [
        -torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1).gather(1, w[1:, None]).sum()
        for w in windows(tokens)
    ]
    return torch.stack(out).double()


def mean_and_error(per_window: torch.Tensor, tokens_per_window: float) -> str:
    x = per_window / tokens_per_window
    return f"{float(x.mean()):.5f} +- {float(x.std() / math.sqrt(len(x))):.5f} nats/token"


def main() -> None:
    n, checkpoints = int(sys.argv[1]), sys.argv[2:]
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    tokens = torch.tensor(token_stream(tokenizer, read_texts([EVAL]))[:n])
    count = sum(len(w) - 1 for w in windows(tokens))
    base = window_nll(MODEL, tokens)
    per = count / len(base)
    print(f"{n} tokens, {len(base)} windows; unquantized perplexity {math.exp(base.sum() / count):.3f}", flush=True)
    nll = {}
    for c in checkpoints:
        nll[c] = window_nll(c, tokens)
        print(
            f"{c}: perplexity {math.exp(nll[c].sum() / count):.3f}, increase {mean_and_error(nll[c] - base, per)}",
            flush=True,
        )
    for i, a in enumerate(checkpoints):
        for b in checkpoints[i + 1 :]:
            print(f"{a} - {b}: {mean_and_error(nll[a] - nll[b], per)}", flush=True)


if __name__ == "__main__":
    main()
