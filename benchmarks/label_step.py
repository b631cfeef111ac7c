"""Can the calibration text's own next tokens take back the trained MoE's first-order perplexity loss
(`first_order.py`)? A label-aware quantizer would aim each expert at W - mu D, D a direction that lowers the
calibration text's NLL: the gradient G of that NLL with respect to the experts, or the step a GPTQ-style quantizer
would take, G H^-1 with H each expert's Hessian of its routed inputs (the quadratic BitsMoE's error feedback
minimises). The cosine of G on the calibration and on the evaluation text; for each direction and step (|mu D| / |W|):
the unquantized model's change of NLL on the calibration and the evaluation text, and its KL from the original on the
evaluation text; then the gradient-shifted models quantized with `bitsmoe-quantize --bits 2.5` (defaults) and
measured against the original as bench_quality does, and for the unshifted one the correlation between the two texts
of each factor row's first-order cost of being dropped (could an allocation use the labels to choose rows to keep?).

    .venv/bin/python -m benchmarks.label_step    # about 5 minutes; writes results/label_step_trained_moe.json
"""

import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from benchmarks import machine
from benchmarks.bench_quality import BITSMOE
from benchmarks.first_order import factor_rows, mean_nll
from benchmarks.quality_metrics import compare, window_log_probs, windows
from bitsmoe_vllm.offline.calibrate import read_texts, token_stream
from bitsmoe_vllm.offline.evaluate import load_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "benchmarks/models/trained-moe"
WORK = ROOT / "benchmarks/work"
STEPS = (0.0003, 0.001, 0.003)
QUANTIZED_STEPS = (0.0, 0.0003, 0.0006)


def gradients(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """dNLL/dW per token for the routed experts' fused gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in experts.values():
        p.requires_grad_(True)
    count = mean_nll(model, tokens, backward=True)[1]
    out = {n: p.grad / count for n, p in experts.items()}
    for p in experts.values():
        p.requires_grad_(False)
        p.grad = None
    return out


@torch.no_grad()
def newton(model, tokens: torch.Tensor, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """G H^-1 per expert: H = sum x x^T of the expert's routed inputs (gate_up), of its routing-weighted
    activations (down), damped by 1 % of its mean diagonal."""
    hessians, hooks = {}, []

    def collect(name, experts):
        def hook(module, args):
            x, ids, weights = args
            for e in range(module.num_experts):
                token, slot = torch.where(ids == e)
                gate, up = torch.nn.functional.linear(x[token], module.gate_up_proj[e]).chunk(2, -1)
                a = module.act_fn(gate) * up * weights[token, slot, None]
                for key, v in ((f"{name}.gate_up_proj", x[token]), (f"{name}.down_proj", a)):
                    hessians.setdefault(key, torch.zeros(module.num_experts, v.shape[1], v.shape[1]))[e] += v.T @ v

        return hook

    for name, module in model.named_modules():
        if name.endswith(".experts"):
            hooks.append(module.register_forward_pre_hook(collect(name, module)))
    for w in windows(tokens):
        model(w[None])
    for h in hooks:
        h.remove()
    out = {}
    for n, H in hessians.items():
        H = H + 0.01 * H.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(H.shape[-1])
        out[n] = torch.linalg.solve(H, grads[n].transpose(1, 2)).transpose(1, 2)  # G H^-1, H symmetric
    return out


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


@torch.no_grad()
def shift(model, original: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], step: float) -> None:
    """W = original - mu D with |mu D| = step |original|."""
    mu = step * norm(original) / norm(direction)
    params = dict(model.named_parameters())
    for n, w in original.items():
        params[n].copy_(w - mu * direction[n])


def by_layer(tensors: dict[str, torch.Tensor], layers: int) -> list[dict]:
    """first_order's layout: per layer, gate and up [E, I, H] and down [E, H, I]."""
    out = []
    for i in range(layers):
        gate_up, down = (tensors[f"model.layers.{i}.mlp.experts.{n}"] for n in ("gate_up_proj", "down_proj"))
        out.append({"gate": gate_up[:, : down.shape[-1]], "up": gate_up[:, down.shape[-1] :], "down": down})
    return out


def drop_costs(checkpoint: Path, original: dict, grads: dict, on_eval: dict, layers: int) -> dict[str, float]:
    """The correlation over the checkpoint's factor rows of their first-order cost of being dropped (-F_k . dNLL/dF_k)
    on the calibration and on the evaluation text: over the rows of width 0 and over all."""
    weights, calib_rows, eval_rows = by_layer(original, layers), [], []
    for (_, bits, f, df, _), (*_, df_eval, _) in zip(
        factor_rows(str(checkpoint), weights, by_layer(grads, layers)),
        factor_rows(str(checkpoint), weights, by_layer(on_eval, layers)),
        strict=True,
    ):
        calib_rows.append(torch.stack([-(f * df).sum(1).double(), bits.double()]))
        eval_rows.append(-(f * df_eval).sum(1))
    (calib, widths), evaluation = torch.cat(calib_rows, 1), torch.cat(eval_rows)

    def correlation(rows: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([calib[rows].double(), evaluation[rows].double()]))[0, 1])

    return {"dropped_rows": correlation(widths == 0), "all_rows": correlation(widths >= 0)}


def main() -> None:
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    calib_file = WORK / "calib_tokens_trained-moe_16384.safetensors"  # bench_quality --model trained-moe writes it
    calib = load_file(calib_file)["input_ids"].flatten()
    evaluation = torch.tensor(token_stream(tokenizer, read_texts([str(WORK / "text-mixed/eval.jsonl")]))[:8192])
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    reference = window_log_probs(model, evaluation)
    with torch.no_grad():
        base = {"calib": mean_nll(model, calib)[0], "eval": mean_nll(model, evaluation)[0]}
    grads = gradients(model, calib)
    on_eval = gradients(model, evaluation)
    agreement = sum(float((grads[n] * on_eval[n]).sum()) for n in grads) / (norm(grads) * norm(on_eval))
    print(f"cosine of the calibration and evaluation texts' gradients: {agreement:.3f}", flush=True)
    directions = {"gradient": grads, "newton": newton(model, calib, grads)}
    rows = []
    for name, direction in directions.items():
        for step in STEPS:
            shift(model, original, direction, step)
            with torch.no_grad():
                metrics = compare(model, evaluation, reference)
                row = {"direction": name, "step": step, "calib_nll_change": mean_nll(model, calib)[0] - base["calib"]}
            row |= {"eval_nll_change": math.log(metrics["ppl_windows"]) - base["eval"], "kl": metrics["kl"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    quantized = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in QUANTIZED_STEPS:
            shift(model, original, directions["gradient"], step)
            source, out = Path(tmp) / f"source-{step}", Path(tmp) / f"quantized-{step}"
            model.save_pretrained(source)  # float32: the step is below bf16's resolution
            for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                shutil.copy(MODEL / f, source)
            calib_args = ["--calib", str(WORK / "text-mixed/calib.jsonl"), "--calib-tokens", "16384"]
            subprocess.run(
                [*BITSMOE, "--model", str(source), "--out", str(out), "--bits", "2.5", *calib_args]
                + ["--calib-seq-len", "512", "--overwrite", "--allow-high-error"],
                check=True,
                capture_output=True,
            )
            row = {"direction": "gradient", "step": step, "bits": 2.5}
            row |= compare(load_model(str(out), torch.device("cpu")), evaluation, reference)
            if step == 0:
                layers = model.config.num_hidden_layers
                row["drop_cost_correlation"] = drop_costs(out, original, grads, on_eval, layers)
            quantized.append(row)
            print(json.dumps(row), flush=True)
    result = {"machine": machine.describe(), "calib_tokens": len(calib), "eval_tokens": len(evaluation)}
    result |= {"nll": base, "gradient_cosine_calib_eval": agreement, "unquantized": rows, "quantized": quantized}
    (ROOT / "benchmarks/results/label_step_trained_moe.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
