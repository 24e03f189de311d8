"""The figure of ``reproduce_paper.py``: every curve with its standard-error band, every
bottom and lead with its 90% interval, from the published numbers alone."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lightning_overtrain import keys

GAMMA_COLORS = ("#1b9e77", "#d95f02", "#7570b3")
LR_COLORS = ("#1f78b4", "#33a02c", "#e6ab02", "#e7298a", "#6a3d9a")


def band(ax: Any, t: np.ndarray, curve: dict, label: str, color: str, scale: float = 1.0) -> None:
    """The mean over seeds with a band of one standard error across seeds."""
    mean = np.array(curve["mean"]) / scale
    se = np.nan_to_num(np.array(curve["se"]) / scale)
    ax.plot(t, mean, marker="o", markersize=3, color=color, label=label)
    ax.fill_between(t, mean - se, mean + se, color=color, alpha=0.25, linewidth=0)


def figure(summary: dict[str, Any], path: str) -> None:
    """Draw ``summary`` (what ``reproduce_paper.py`` writes) into ``path``."""
    from matplotlib.figure import Figure

    s, c, params = summary["settings"], summary["curves"], summary["parameters"]
    t = np.array(summary["tokens"], dtype=float)
    fig = Figure(figsize=(18, 15), layout="constrained")
    axes = fig.subplots(3, 3)
    gammas, lrs = s["gammas"], s["finetune_lrs"]
    ax = axes[0, 0]
    for g, color in zip(gammas, GAMMA_COLORS):
        band(ax, t, c[keys.noise_key(g, "delta")], f"γ={g:g}", color)
    ax.set_yscale("log")
    _finish(ax, "δ = E[L(θ+ε)] − L(θ)", "1. Noise sensitivity δ rises with tokens", params)
    ax = axes[0, 1]
    band(ax, t, c[keys.REFERENCE_LOSS], "no noise", "black")
    for g, color in zip(gammas, GAMMA_COLORS):
        key = keys.noise_key(g, "perturbed_loss")
        band(ax, t, c[key], f"γ={g:g}", color)
        _bottom_bar(ax, summary["pooled_bottoms"][f"noise gamma={g:g}"], c[key], color)
    _finish(ax, "loss (cooled branch)", "2. Perturbed loss, bottoms with 90% intervals", params)
    ax = axes[0, 2]
    for name, color, label in (
        ("sharpness", "#a6361c", "λc along AdamW's update"),
        ("sharpness_gradient", "#555555", "λc along the gradient"),
    ):
        key = keys.sharpness_key("critical_sharpness", name)
        if key in c:
            band(ax, t, c[key], label, color, scale=c[key]["mean"][0])
    band(
        ax,
        t,
        c[keys.noise_key(max(gammas), "delta")],
        f"δ, γ={max(gammas):g}",
        "#7570b3",
        scale=c[keys.noise_key(max(gammas), "delta")]["mean"][0],
    )
    ax.set_yscale("log")
    _finish(ax, "value / value at the first snapshot", "3. Critical sharpness beside δ", params)
    for ax, quantity, title in (
        (axes[1, 0], "reference_loss_after", "4. Pretraining loss after fine-tuning"),
        (axes[1, 1], "downstream_loss_after", "5. Downstream loss after fine-tuning"),
        (axes[1, 2], "forgetting", "6. Forgetting L(θ_ft) − L(θ)"),
    ):
        for lr, color in zip(lrs, LR_COLORS):
            band(ax, t, c[keys.finetune_key(lr, quantity)], f"lr={lr:g}", color)
        _finish(ax, quantity.replace("_", " "), f"{title} ({s['finetune_steps']} steps)", params)
    band(axes[1, 1], t, c[keys.finetune_tuned_key("downstream_loss_after")], "tuned lr", "black")
    ax = axes[2, 0]
    band(ax, t, c[keys.finetune_key(None, "downstream_loss_before")], "before fine-tuning", "grey")
    band(ax, t, c[keys.finetune_tuned_key("downstream_loss_after")], "after, lr tuned", "#e7298a")
    band(
        ax,
        t,
        c[keys.finetune_tuned_key("reference_loss_after")],
        "pretraining loss at that lr",
        "#1f78b4",
    )
    _finish(ax, "loss", "7. lr tuned per snapshot: downstream learning is the fine-tune's", params)
    ax = axes[2, 1]
    for k, won in enumerate(c[keys.finetune_tuned_key("lr")]["per_seed"]):
        ax.plot(
            t,
            np.array(won) * 1.06 ** (k - 2),
            marker="o",
            markersize=3,
            alpha=0.8,
            label=f"seed {s['seeds'][k]}",
        )
    ax.set_yscale("log")
    ax.minorticks_off()
    ax.set_yticks(list(lrs), [f"{lr:g}" for lr in lrs])
    _finish(ax, "winning lr (seeds offset slightly)", "8. The lr that won, per seed", params)
    _leads(axes[2, 2], summary)
    reached = [r["tokens_per_parameter"] for r in summary["seeds_reached"].values()]
    fig.suptitle(
        f"Catastrophic overtraining in miniature: {params / 1e3:.1f}k-parameter byte-level GPT-2,"
        f" {len(reached)} seeds reaching {min(reached):.0f} to {max(reached):.0f} tokens per"
        " parameter;"
        " bands: ± 1 s.e. across seeds"
        + (
            f"\nINCOMPLETE: {summary['planned_snapshots']} snapshots to"
            f" {s['final_tokens'] / params:.0f} tokens per parameter were planned"
            if summary["incomplete"]
            else ""
        )
        + (f"\n{summary['machine']}" if summary.get("machine") else ""),
        fontsize=12,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=72)


def _bottom_bar(ax: Any, bottom: dict, curve: dict, color: str) -> None:
    """A pooled bottom as a horizontal 90% interval just under the curve's minimum."""
    y = np.nanmin(curve["mean"]) - 0.02
    ax.errorbar(
        bottom["tokens"],
        y,
        xerr=[
            [bottom["tokens"] - bottom["tokens_low"]],
            [bottom["tokens_high"] - bottom["tokens"]],
        ],
        fmt="v",
        color=color,
        capsize=3,
    )


def _leads(ax: Any, summary: dict) -> None:
    """Per cheap signal: each seed's lead over two fine-tune bottoms, with 90% intervals."""
    lrs = summary["settings"]["finetune_lrs"]
    targets = ("ft tuned downstream loss", f"ft pretrain loss lr={max(lrs):g}")
    cheap = list(summary["leads"])
    for ti, (target, marker) in enumerate(zip(targets, ("o", "s"))):
        for ci, name in enumerate(cheap):
            per_seed = summary["leads"][name][target]
            for k, lead in enumerate(per_seed):
                y = ci + 0.35 * ti + 0.05 * k - 0.1
                ax.errorbar(
                    lead["snapshots"],
                    y,
                    xerr=[
                        [lead["snapshots"] - lead["snapshots_low"]],
                        [lead["snapshots_high"] - lead["snapshots"]],
                    ],
                    fmt=marker,
                    mfc="white" if lead["lower_bound"] else f"C{ti}",
                    color=f"C{ti}",
                    markersize=4,
                    capsize=2,
                    alpha=0.8,
                    label=target if ci == 0 and k == 0 else None,
                )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(cheap)), cheap, fontsize=8)
    ax.set_xlabel("lead of the cheap bottom, in snapshots (×√2 tokens each); open: a bound")
    ax.set_title("9. Does the cheap signal foresee the fine-tune? (per seed, 90%)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _finish(ax: Any, ylabel: str, title: str, params: int) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("tokens at the branch point")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    top = ax.secondary_xaxis("top", functions=(lambda v: v / params, lambda r: r * params))
    top.set_xlabel("tokens per parameter", fontsize=8)
