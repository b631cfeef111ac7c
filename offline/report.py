"""quantization_report.json and its plots: what the quantizer chose and what it cost to choose it."""

import json
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bitsmoe_vllm.format import PROJECTIONS, QuantConfig  # noqa: E402

from .heap import peak_rss_mb  # noqa: E402
from .plan import Plan  # noqa: E402


class StageTimer:
    """Wall time and peak RSS (so far) after each stage."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.stages[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}


def histograms(bits: dict[int, torch.Tensor], widths: tuple[int, ...]) -> dict[int, dict[str, dict[str, int]]]:
    """layer -> projection -> width -> stored rows, from bits[layer] [3, E, R]."""
    return {
        layer: {p: {str(w): int((b[j] == w).sum()) for w in widths} for j, p in enumerate(PROJECTIONS)}
        for layer, b in bits.items()
    }


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot_allocation(directory: Path, bits: dict[int, torch.Tensor]) -> list[str]:
    """bits_heatmap.png (layer x expert, mean bits per weight) and bits_by_rank.png (mean width per rank row)."""
    layers = sorted(bits)
    stacked = torch.stack([bits[i].double() for i in layers])  # [L, 3, E, R]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(layers) + 2))
    image = ax.imshow(stacked.mean((1, 3)).numpy(), aspect="auto", cmap="viridis")
    ax.set(
        xlabel="expert",
        ylabel="layer",
        yticks=range(len(layers)),
        yticklabels=layers,
        title="mean code bits per factor entry (gate, up, down)",
    )
    fig.colorbar(image, ax=ax)
    fig.savefig(directory / "bits_heatmap.png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, p in enumerate(PROJECTIONS):
        ax.plot(stacked[:, j].mean((0, 1)).numpy(), label=p)
    ax.set(
        xlabel="rank index (basis row, by decreasing energy)", ylabel="mean width (bits)", title="bits by rank index"
    )
    ax.legend()
    fig.savefig(directory / "bits_by_rank.png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return ["bits_heatmap.png", "bits_by_rank.png"]


def report(
    plan: Plan,
    cfg: QuantConfig,
    bits: dict[int, torch.Tensor],
    modules: list[str],
    losses: torch.Tensor,
    routed_tokens: torch.Tensor,
    energy: torch.Tensor,
    stats: dict,
    errors: dict[str, float],
    timer: StageTimer,
) -> dict:
    """quantization_report.json: what was chosen (the widths of every rank row `bits`: offline.quantize),
    at what estimated and measured error, in what time; `modules`: the MoE layers' experts modules; `losses` [U]: each
    unit's estimated loss at its chosen width."""
    relative = losses.reshape(len(plan.moe_layers), len(PROJECTIONS), -1).sum(-1)  # [L, 3]
    chosen = relative * energy[:, None].to(relative.dtype)  # squared output error per token
    return {
        "model": str(plan.source.dir),
        "options": plan.options.run_identity(),
        "bits": {
            "budget": plan.options.bits,
            "budget_scope": plan.options.budget_scope,
            "achieved_all": cfg.achieved_bits["all"],
            "achieved_factors": cfg.achieved_bits["factors"],
            "routed_expert_weights": plan.total_weights,
            "non_expert_params": non_expert_params(plan, modules),
        },
        "basis": {"dtype": plan.basis_dtype, "sharing": plan.basis_sharing, "rank": plan.rank},
        "allocation": stats,
        "layers": {
            module: {
                **{p: {"histogram": hist[p], "estimated_loss": float(chosen[k, j])} for j, p in enumerate(PROJECTIONS)},
                "relative_error": errors[module],
                "routed_tokens_per_expert": routed_tokens[k].tolist(),
                "residual_energy": float(energy[k]),
            }
            for k, (module, hist) in enumerate(zip(modules, histograms(bits, plan.widths).values()))
        },
        "worst_relative_error": max(errors.values()),
        "stages": timer.stages,
    }


def non_expert_params(plan: Plan, modules: list[str]) -> int:
    """Parameters BitsMoE leaves as they are (attention, router, shared experts, embeddings...); `modules`: the MoE
    layers' experts modules."""
    experts = tuple(f"{module}." for module in modules)
    return sum(plan.source.tensors.numel(n) for n in plan.source.tensor_names() if not n.startswith(experts))
