"""Where does a quantized trained MoE's perplexity increase come from? For checkpoints of the trained MoE: the increase
of the mean negative log-likelihood (NLL) per token on N tokens of a split, and its first-order part g . delta, g the
gradient of that NLL with respect to the unquantized routed experts' weights and delta the quantized weights less the
unquantized ones, split by projection and by the width of the factor rows (each row k of an expert contributes
(F^_k - F_k) . dNLL/dF_k, F = the unquantized weights in the checkpoint's basis). KL is second order in delta; an NLL
increase well above the KL is first order: the errors are aligned with the loss's gradient.

    .venv/bin/python -m benchmarks.first_order eval CKPT ...    # or calib; writes results/first_order_trained_moe.json
"""

import json
import sys
from pathlib import Path

import torch
import transformers

from benchmarks import machine
from benchmarks.quality_metrics import windows
from bitsmoe_vllm.checkpoint import TensorFiles, load_layer, read_quant_config
from bitsmoe_vllm.format import PROJECTIONS
from bitsmoe_vllm.offline.calibrate import read_texts, token_stream
from bitsmoe_vllm.offline.evaluate import load_model
from bitsmoe_vllm.reference import dequantize_basis, expert_factor

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "benchmarks/models/trained-moe"
TEXT = ROOT / "benchmarks/work/text-mixed"  # written by bench_quality --model trained-moe
TOKENS = 8192


def mean_nll(model, tokens: torch.Tensor, backward: bool = False) -> float:
    total, count = 0.0, 0
    for w in windows(tokens):
        with torch.set_grad_enabled(backward):
            loss = -torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1).gather(1, w[1:, None]).sum()
        if backward:
            loss.backward()
        total, count = total + float(loss), count + len(w) - 1
    return total / count, count


def expert_gradients(tokens: torch.Tensor) -> tuple[float, list[dict], list[dict]]:
    """The unquantized NLL and, per layer, the experts' weights and dNLL/dW: gate and up [E, I, H], down [E, H, I]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    for name, p in model.named_parameters():
        p.requires_grad_("experts" in name)
    nll, count = mean_nll(model, tokens, backward=True)
    weights, gradients = [], []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        I = experts.down_proj.shape[-1]
        for out, gate_up, down in (
            (weights, experts.gate_up_proj.detach(), experts.down_proj.detach()),
            (gradients, experts.gate_up_proj.grad / count, experts.down_proj.grad / count),
        ):
            out.append({"gate": gate_up[:, :I], "up": gate_up[:, I:], "down": down})
    return nll, weights, gradients


def factor_rows(checkpoint: str, unquantized: list[dict], gradients: list[dict]):
    """Per layer, projection and expert of a checkpoint: (projection, the rows' widths [R], the unquantized factor F,
    dNLL/dF and the quantized factor, [R, I] each), F in the checkpoint's basis."""
    cfg, files = read_quant_config(checkpoint), TensorFiles(checkpoint)
    for i, layout in enumerate(cfg.layers):
        layer = load_layer(files, cfg, layout.module)
        for p in PROJECTIONS:
            basis = getattr(layer, f"{p}_basis")
            B = torch.eye(cfg.hidden_size) if basis is None else dequantize_basis(basis)  # gate/up [R, H], down [H, R]
            factors = getattr(layer, p)
            for e in range(cfg.num_experts):
                W, g = unquantized[i][p][e], gradients[i][p][e]
                if p == "down":  # W [H, I] = B F
                    f, df = torch.linalg.solve(B, W), B.T @ g
                else:  # W [I, H] = F^T B
                    f, df = torch.linalg.solve(B.T, W.T), B @ g.T
                yield p, factors.bits[e].long(), f, df, expert_factor(factors, e, cfg.group_size)


def first_order(checkpoint: str, unquantized: list[dict], gradients: list[dict]) -> dict[str, dict[int, float]]:
    """Projection -> row width -> the summed g . delta of the rows of that width."""
    out = {p: {} for p in PROJECTIONS}
    for p, bits, f, df, quantized in factor_rows(checkpoint, unquantized, gradients):
        per_row = ((quantized - f) * df).sum(1)
        for b in bits.unique().tolist():
            out[p][b] = out[p].get(b, 0.0) + float(per_row[bits == b].sum())
    return out


def main() -> None:
    split, checkpoints = sys.argv[1], sys.argv[2:]
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    tokens = torch.tensor(token_stream(tokenizer, read_texts([str(TEXT / f"{split}.jsonl")]))[:TOKENS])
    nll, unquantized, gradients = expert_gradients(tokens)
    rows = []
    for c in checkpoints:
        increase = mean_nll(load_model(c, torch.device("cpu")), tokens)[0] - nll
        by_width = first_order(c, unquantized, gradients)
        linear = sum(v for w in by_width.values() for v in w.values())
        rows.append({"checkpoint": Path(c).name, "nll_increase": increase, "first_order": linear, "by_width": by_width})
        widths = "; ".join(
            f"{p} " + " ".join(f"{b}:{v:+.5f}" for b, v in sorted(w.items())) for p, w in by_width.items()
        )
        print(f"{Path(c).name}: NLL increase {increase:+.5f}, g . delta {linear:+.5f} ({widths})", flush=True)
    out = ROOT / "benchmarks/results/first_order_trained_moe.json"
    done = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    done["runs"] = [r for r in done["runs"] if r["split"] != split] + [
        {"split": split, "tokens": len(tokens), "machine": machine.describe(), "nll": nll, "rows": rows}
    ]
    out.write_text(json.dumps(done, indent=2) + "\n")


if __name__ == "__main__":
    main()
