"""Quality of a quantized checkpoint against the unquantized one, on evaluation tokens, all in float32:

- perplexity over non-overlapping windows of 512 tokens (each window scores its tokens after the first);
- perplexity with the sliding-window protocol: windows of 1024 advanced by 512, each scoring its new tokens;
- KL(unquantized || quantized) of the next-token distributions and top-1 agreement, mean over the scored
  tokens of the non-overlapping windows.

A BitsMoE checkpoint runs its experts through bitsmoe_vllm.reference (offline.evaluate.load_model); a peer's
checkpoint holds its de-quantized weights and runs as a plain transformers model.
"""

import math

import torch
from tqdm import tqdm

from bitsmoe_vllm.offline.evaluate import load_model, perplexity

WINDOW, STRIDE_WINDOW, STRIDE = 512, 1024, 512


def windows(tokens: torch.Tensor) -> list[torch.Tensor]:
    return [w for w in tokens.split(WINDOW) if len(w) > 1]


@torch.no_grad()
def window_log_probs(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Log-probabilities [len - 1, vocab] of each non-overlapping window's next tokens."""
    return [
        torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1)
        for w in tqdm(windows(tokens), desc="windows", unit="window")
    ]


@torch.no_grad()
def compare(model, tokens: torch.Tensor, reference: list[torch.Tensor]) -> dict[str, float]:
    """Every metric of `model` on tokens; reference = window_log_probs of the unquantized model."""
    nll = kl = agree = count = 0.0
    for w, lp_ref, lp in zip(windows(tokens), reference, window_log_probs(model, tokens), strict=True):
        nll -= float(lp.gather(1, w[1:, None]).sum())
        kl += float((lp_ref.exp() * (lp_ref - lp)).sum())
        agree += float((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
        count += len(lp)
    return {
        "ppl_windows": math.exp(nll / count),
        "ppl_stride": perplexity(model, tokens, STRIDE_WINDOW, STRIDE),
        "kl": kl / count,
        "top1_agreement": agree / count,
    }


def evaluate(checkpoint, tokens: torch.Tensor, reference: list[torch.Tensor]) -> dict[str, float]:
    return compare(load_model(str(checkpoint), torch.device("cpu")), tokens, reference)
