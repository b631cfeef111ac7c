"""quantization_report.json and its plots: what the quantizer chose and what it cost to choose it."""

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bitsmoe_vllm.format import PROJECTIONS  # noqa: E402


class StageTimer:
    """Wall time and peak RSS (so far) after each stage."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.stages[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": round(peak_mb, 1)}


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
