"""Where does a quantized trained MoE's perplexity increase come from? For checkpoints of the trained MoE: the increase
of the mean negative log-likelihood (NLL) per token on N tokens of a split, and its first-order part g . delta, g the
gradient of that NLL with respect to the unquantized routed experts' weights and delta the quantized weights less the
unquantized ones, split by projection and by the width of the factor rows (each row k of an expert contributes
(F^_k - F_k) . dNLL/dF_k, F = the unquantized weights in the checkpoint's basis). KL is second order in delta; an NLL
increase well above the KL is first order: the errors are aligned with the loss's gradient.

    .venv/bin/python -m benchmarks.first_order eval CKPT ...    # or calib; writes results/first_order_trained_moe.json

A peer's checkpoint (dense experts) is split by projection only. A checkpoint measured again replaces its row.
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
        weights.append(projections(experts.gate_up_proj.detach(), experts.down_proj.detach()))
        gradients.append(projections(experts.gate_up_proj.grad / count, experts.down_proj.grad / count))
    return nll, weights, gradients


def projections(gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' stacked experts (gate_up [E, 2 I, H], down [E, H, I]) as gate and up [E, I, H], down [E, H, I]."""
    I = down.shape[-1]
    return {"gate": gate_up[:, :I], "up": gate_up[:, I:], "down": down}


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


def dense_first_order(model, unquantized: list[dict], gradients: list[dict]) -> dict[str, float]:
    """A peer's checkpoint (dense experts, as transformers loads them): projection -> the summed g . delta."""
    out = dict.fromkeys(PROJECTIONS, 0.0)
    for layer, w, g in zip(model.model.layers, unquantized, gradients, strict=True):
        quantized = projections(layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)
        for p in PROJECTIONS:
            out[p] += float(((quantized[p].float() - w[p]) * g[p]).sum())
    return out


def main() -> None:
    split, checkpoints = sys.argv[1], sys.argv[2:]
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    tokens = torch.tensor(token_stream(tokenizer, read_texts([str(TEXT / f"{split}.jsonl")]))[:TOKENS])
    nll, unquantized, gradients = expert_gradients(tokens)
    rows = []
    for c in checkpoints:
        model = load_model(c, torch.device("cpu"))
        increase = mean_nll(model, tokens)[0] - nll
        row = {"checkpoint": Path(c).name, "machine": machine.describe(), "nll_increase": increase}
        if (Path(c) / "quantization_report.json").is_file():  # BitsMoE: split by the rows' widths too
            row["by_width"] = first_order(c, unquantized, gradients)
            row["by_projection"] = {p: sum(w.values()) for p, w in row["by_width"].items()}
        else:
            row["by_projection"] = dense_first_order(model, unquantized, gradients)
        row["first_order"] = sum(row["by_projection"].values())
        rows.append(row)
        projections = " ".join(f"{p} {v:+.5f}" for p, v in row["by_projection"].items())
        print(
            f"{row['checkpoint']}: NLL increase {increase:+.5f}, g . delta {row['first_order']:+.5f} ({projections})",
            flush=True,
        )
    out = ROOT / "benchmarks/results/first_order_trained_moe.json"
    done = {r["split"]: r for r in json.loads(out.read_text())["runs"]} if out.is_file() else {}
    run = done.get(split, {"split": split, "tokens": len(tokens), "nll": nll, "rows": []})
    if run["tokens"] != len(tokens) or abs(run["nll"] - nll) > 1e-6 * nll:
        raise SystemExit(f"{out}: its {split} rows were measured on other tokens; move it away to start anew")
    # the first-order change of the NLL per unit of growth of every expert, W -> (1 + t) W
    run["g_dot_w"] = {p: sum(float((w[p] * g[p]).sum()) for w, g in zip(unquantized, gradients)) for p in PROJECTIONS}
    measured = {r["checkpoint"] for r in rows}
    run["rows"] = [r for r in run["rows"] if r["checkpoint"] not in measured] + rows
    done[split] = run
    out.write_text(json.dumps({"runs": list(done.values())}, indent=2) + "\n")


if __name__ == "__main__":
    main()
