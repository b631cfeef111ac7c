"""The quality benchmark's table (NAME.md) and plots (NAME_ppl.png, NAME_time.png) from its rows."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLUMNS = ("name", "all-in bits", "ppl (512 windows)", "ppl (stride 512)", "KL", "top-1", "quantize s", "peak RSS MB")
MARKERS = {
    "rtn": "s",
    "gptq": "^",
    "hqq": "v",
    "autoround": "P",
    "bitsmoe": "o",
    "bitsmoe-identity": "x",
    "bitsmoe-nearest": "*",
    "bitsmoe-v1": "d",
}
LABELS = {
    "autoround": "AutoRound (50 iterations)",
    "bitsmoe": "BitsMoE (defaults)",
    "bitsmoe-identity": "BitsMoE, identity basis",
    "bitsmoe-nearest": "BitsMoE, round to nearest",
    "bitsmoe-v1": "BitsMoE, format 1's codes (with zero)",
}


def cells(r: dict) -> list[str]:
    bits = f"{r['all_in_bits']:.3f}" + (f" ({r['factor_bits']:.3f} factors)" if "factor_bits" in r else "")
    return [
        r["name"],
        bits,
        f"{r['ppl_windows']:.2f}",
        f"{r['ppl_stride']:.2f}",
        f"{r['kl']:.3g}",
        f"{100 * r['top1_agreement']:.1f} %",
        f"{r['quantize_wall_s']:.0f}" if "quantize_wall_s" in r else "-",
        f"{r['quantize_peak_rss_mb']}" if "quantize_peak_rss_mb" in r else "-",
    ]


MEASURES = {"ppl_windows": "ppl (windows)", "ppl_stride": "ppl (stride)", "kl": "KL"}


def head_to_head(rows: list[dict]) -> list[str]:
    """Each peer's row against BitsMoE with default options at the same all-in bits: which is lower, per measure."""
    ours = {r["bits"]: r for r in rows if r["family"] == "bitsmoe"}
    lines = []
    for peer in rows:
        r = None if peer["family"] == "unquantized" or "factor_bits" in peer else ours.get(peer["all_in_bits"])
        if r is None:
            continue
        wins = [label for k, label in MEASURES.items() if r[k] < peer[k]]
        verdict = "BitsMoE lower on all three" if len(wins) == 3 else "BitsMoE lower on " + (", ".join(wins) or "none")
        lines.append(
            f"| {peer['name']} | {peer['all_in_bits']:.3f} | {peer['ppl_windows']:.2f} / {r['ppl_windows']:.2f} | "
            f"{peer['ppl_stride']:.2f} / {r['ppl_stride']:.2f} | {peer['kl']:.3g} / {r['kl']:.3g} | {verdict} |"
        )
    if not lines:
        return []
    header = "| peer | all-in bits | ppl (512 windows), peer / BitsMoE | ppl (stride 512) | KL | |"
    return [
        "",
        "BitsMoE with default options at each peer's all-in bits:",
        "",
        header,
        "|---|---|---|---|---|---|",
        *lines,
    ]


def write_report(payload: dict, out: Path, name: str) -> None:
    rows = payload["rows"]
    lines = [
        (
            f"Model: {payload['model']}. {payload['calib_tokens']} calibration tokens, {payload['eval_tokens']} "
            "evaluation "
            f"tokens; peers use groups of {payload['peer_group_size']}, asymmetric. Machine: {payload['machine']}."
        ),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(cells(r)) + " |" for r in rows),
        *head_to_head(rows),
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    fig, (ax, kl) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = next((r["ppl_windows"] for r in rows if r["family"] == "unquantized"), None)
    for family, marker in MARKERS.items():
        pts = sorted((r["all_in_bits"], r["ppl_windows"], r["kl"]) for r in rows if r["family"] == family)
        if pts:
            bits, ppl, div = zip(*pts)
            ax.plot(bits, ppl, marker=marker, label=LABELS.get(family, family.upper()))
            kl.plot(bits, div, marker=marker, label=LABELS.get(family, family.upper()))
    if base:
        ax.axhline(base, color="gray", ls="--", label="unquantized MoE")
    for a, label in ((ax, "perplexity (512-token windows)"), (kl, "KL(unquantized || quantized), nats per token")):
        a.set_yscale("log")
        a.set_xlabel("all-in bits per routed-expert weight")
        a.set_ylabel(label)
    fig.suptitle(f"{payload['title']}: quality against bits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{name}_ppl.png", dpi=110)
    plt.close(fig)

    timed = [r for r in rows if "quantize_wall_s" in r and r["family"] != "bitsmoe-ablation"]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(timed) + 1.2))
        ax.barh([r["name"] for r in timed], [r["quantize_wall_s"] for r in timed])
        ax.invert_yaxis()
        ax.set_xlabel("quantization wall time, s (whole command)")
        fig.tight_layout()
        fig.savefig(out / f"{name}_time.png", dpi=110)
        plt.close(fig)
