"""The analysis and figure of ``reproduce_paper.py``: what reproduced, as numbers and plots.

Kept apart from the runs so ``reproduce_paper.py --report-only`` can rebuild both from
the per-seed histories. Every claim of the paper gets one entry in :func:`checks`:

1. delta rises with tokens at fixed gamma; the perturbed loss is U-shaped, larger
   gamma earlier (section 3.3);
2. at each fixed fine-tuning lr, the pretraining loss after fine-tuning and the
   downstream loss turn upward, larger lr earlier (section 3.4);
3. with the lr tuned per snapshot (Figure 5): the best downstream loss, the winning
   lr (constant, slowly or quickly falling?) and the pretraining loss at that lr;
4. per seed, where each signal's bottom lies, the detector's crossing and forecast,
   and whether the noise probe's bottom precedes, meets or trails the fine-tune's;
5. the critical sharpness (Kalra et al.) beside the noise probe's delta.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_overtrain import keys
from lightning_overtrain.history import Record
from lightning_overtrain.inflection.detector import InflectionDetector

SHARPNESS = ("sharpness", "sharpness_gradient")


def curves(histories: list[list[Record]]) -> dict[str, dict[str, list[float]]]:
    """Per metric: the mean over seeds, its standard error across seeds, each seed's values."""
    names = [k for k in histories[0][0] if k not in (keys.TOKENS, keys.STEP)]
    out = {}
    for key in names:
        if key.endswith("_stderr") or key == keys.PROBE_SECONDS:
            continue
        values = np.array([[r.get(key, math.nan) for r in h] for h in histories], dtype=float)
        se = values.std(axis=0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else None
        out[key] = {
            "mean": values.mean(axis=0).tolist(),
            "se": se.tolist() if se is not None else [math.nan] * values.shape[1],
            "per_seed": values.tolist(),
        }
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def turn_up(tokens: list[int], values: list[float], stderrs: list[float] | None) -> dict:
    """The project's detector on one curve, plus the plain bottom and the rise after it."""
    detector = InflectionDetector()
    for i, (t, v) in enumerate(zip(tokens, values)):
        se = stderrs[i] if stderrs is not None and math.isfinite(stderrs[i]) else None
        state = detector.update(t, v, se)
    bottom = int(np.nanargmin(values))
    return {
        "crossed": state.crossed,
        "crossed_at_tokens": state.crossed_at_tokens,
        "detector_bottom_tokens": state.bottom_tokens,
        "forecast_tokens": state.forecast_tokens,
        "bottom_tokens": tokens[bottom],
        "bottom_snapshot": bottom,
        "interior_bottom": bottom < len(values) - 1,
        "rise_after_bottom": values[-1] - values[bottom],
    }


def signal_keys(s: Any) -> dict[str, str]:
    """The curves whose bottoms matter, by a short name: noise, fixed-lr and tuned fine-tune."""
    out = {f"noise gamma={g:g}": keys.noise_key(g, "perturbed_loss") for g in s.gammas}
    for lr in s.finetune_lrs:
        out[f"ft pretrain loss lr={lr:g}"] = keys.finetune_key(lr, "reference_loss_after")
        out[f"ft downstream loss lr={lr:g}"] = keys.finetune_key(lr, "downstream_loss_after")
    out["ft tuned downstream loss"] = keys.finetune_tuned_key("downstream_loss_after")
    out["ft tuned pretrain loss"] = keys.finetune_tuned_key("reference_loss_after")
    return out


def compare(noise: dict, finetune: dict) -> dict[str, Any]:
    """Does the noise curve's bottom precede, meet or trail the fine-tune curve's?"""
    if not finetune["interior_bottom"]:
        verdict = "fine-tune still falling, " + (
            "noise turned" if noise["interior_bottom"] else "neither turned"
        )
        return {"verdict": verdict, "snapshots": None}
    lead = finetune["bottom_snapshot"] - noise["bottom_snapshot"]
    verdict = "precedes" if lead > 0 else "meets" if lead == 0 else "trails"
    return {"verdict": verdict, "snapshots": lead}


def lr_trend(tokens: list[int], lrs: list[float]) -> dict[str, Any]:
    """The winning lr against tokens: its log-log slope over each half of the snapshots.

    A word for each half: constant (the same lr won throughout), slowly falling (slope
    above -0.5: the lr falls less than a factor 10 per 100x tokens), quickly falling.
    """

    def slope(t: list[int], y: list[float]) -> float:
        return float(np.polyfit(np.log(t), np.log(y), 1)[0]) if len(set(y)) > 1 else 0.0

    def word(k: float) -> str:
        if k == 0:
            return "constant"
        return "rising" if k > 0 else "slowly falling" if k > -0.5 else "quickly falling"

    half = len(tokens) // 2
    early, late = slope(tokens[: half + 1], lrs[: half + 1]), slope(tokens[half:], lrs[half:])
    return {
        "winning_lrs": lrs,
        "loglog_slope_first_half": early,
        "loglog_slope_second_half": late,
        "trend": f"{word(early)}, then {word(late)}",
    }


def checks(tokens: list[int], c: dict, s: Any) -> dict[str, Any]:
    """What reproduced, as numbers: one entry per claim of the paper."""
    n_seeds = len(s.seeds)
    result: dict[str, Any] = {"delta_rises": {}, "perturbed_loss_turns_up": {}, "forgetting": {}}
    for gamma in s.gammas:
        per_seed = np.array(c[keys.noise_key(gamma, "delta")]["per_seed"])
        rising = np.diff(per_seed, axis=1) > 0
        result["delta_rises"][f"{gamma:g}"] = {
            "rising_neighbour_pairs": f"{int(rising.sum())}/{rising.size}",
            "spearman_per_seed": [round(spearman(tokens, d), 3) for d in per_seed],
            "last_over_first": float(np.mean(per_seed[:, -1] / per_seed[:, 0])),
        }
    for lr in s.finetune_lrs:
        per_seed = np.array(c[keys.finetune_key(lr, "forgetting")]["per_seed"])
        result["forgetting"][f"{lr:g}"] = {
            "spearman_per_seed": [round(spearman(tokens, f), 3) for f in per_seed],
            "first": float(per_seed[:, 0].mean()),
            "min": float(per_seed.mean(axis=0).min()),
            "max": float(per_seed.mean(axis=0).max()),
            "last": float(per_seed[:, -1].mean()),
        }
    # Every signal: the mean curve, and each seed on its own.
    signals = {}
    for name, key in signal_keys(s).items():
        curve = c[key]
        seeds = [turn_up(tokens, v, None) for v in curve["per_seed"]]
        mean = turn_up(tokens, curve["mean"], curve["se"] if n_seeds > 1 else None)
        rises = np.array([x["rise_after_bottom"] for x in seeds])
        signals[name] = {
            "key": key,
            "mean": mean,
            "per_seed": seeds,
            "seeds_with_interior_bottom": sum(x["interior_bottom"] for x in seeds),
            "seeds_crossed": sum(x["crossed"] for x in seeds),
            "rise_after_bottom_mean": float(rises.mean()),
            "rise_after_bottom_se": float(rises.std(ddof=1) / math.sqrt(n_seeds))
            if n_seeds > 1
            else None,
        }
    result["signals"] = signals
    result["perturbed_loss_turns_up"] = {f"{g:g}": signals[f"noise gamma={g:g}"] for g in s.gammas}
    tuned_lrs = c[keys.finetune_tuned_key("lr")]["per_seed"]
    result["tuned_lr"] = [lr_trend(tokens, lrs) for lrs in tuned_lrs]
    # Does the cheap probe foresee the expensive one? Per seed, each noise curve against
    # each fine-tune curve, in snapshots (log-spaced by the snapshot ratio).
    lead: dict[str, dict[str, list]] = {}
    for noise in (n for n in signals if n.startswith("noise")):
        lead[noise] = {}
        for ft in (n for n in signals if n.startswith("ft")):
            lead[noise][ft] = [
                compare(a, b) for a, b in zip(signals[noise]["per_seed"], signals[ft]["per_seed"])
            ]
    result["noise_vs_finetune"] = lead
    result["sharpness"] = {}
    for name in SHARPNESS:
        key = keys.sharpness_key("critical_sharpness", name)
        if key not in c:
            continue
        per_seed = np.array(c[key]["per_seed"])
        result["sharpness"][name] = {
            "spearman_per_seed": [round(spearman(tokens, v), 3) for v in per_seed],
            "first": float(per_seed[:, 0].mean()),
            "max": float(per_seed.mean(axis=0).max()),
            "max_at_tokens": tokens[int(np.argmax(per_seed.mean(axis=0)))],
            "last": float(per_seed[:, -1].mean()),
            "lr_times_sharpness_last": float(per_seed[:, -1].mean() * s.lr),
            "forward_passes_mean": float(
                np.mean(c[keys.sharpness_key("forward_passes", name)]["per_seed"])
            ),
        }
    return result


# ---------------------------------------------------------------------- figure
LR_COLORS = ("#1f78b4", "#33a02c", "#e6ab02", "#e7298a", "#6a3d9a", "#b15928")


def figure(tokens: list[int], c: dict, result: dict, s: Any, params: int, path: str) -> None:
    from matplotlib.figure import Figure

    from lightning_overtrain.reporting.figures import plot_signal

    records: list[dict[str, float]] = [{keys.TOKENS: t} for t in tokens]
    for key, curve in c.items():
        for record, mean, se in zip(records, curve["mean"], curve["se"]):
            record[key], record[key + "_stderr"] = mean, se
    for found in result["signals"].values():
        prefix = f"inflection/{found['key']}/"
        records[-1][prefix + "crossed"] = float(found["mean"]["crossed"])
        records[-1][prefix + "bottom_tokens"] = found["mean"]["detector_bottom_tokens"] or math.nan

    fig = Figure(figsize=(17, 14), layout="constrained")
    axes = fig.subplots(3, 3)
    colors = {g: c_ for g, c_ in zip(s.gammas, ("#1b9e77", "#d95f02", "#7570b3"))}
    lr_colors = dict(zip(s.finetune_lrs, LR_COLORS))
    n = len(s.seeds)
    band = f"mean ± s.e. over {n} seeds" if n > 1 else "one seed"
    ax = axes[0, 0]
    for g in s.gammas:
        plot_signal(ax, records, keys.noise_key(g, "delta"), label=f"γ={g:g}", color=colors[g])
    ax.set_yscale("log")
    _finish(ax, "δ = E[L(θ+ε)] − L(θ)", f"1. Noise sensitivity rises with tokens ({band})", params)
    ax = axes[0, 1]
    plot_signal(ax, records, keys.REFERENCE_LOSS, label="no noise", color="black")
    for g in s.gammas:
        key = keys.noise_key(g, "perturbed_loss")
        plot_signal(ax, records, key, label=f"γ={g:g}", color=colors[g])
    _finish(ax, "loss (cooled branch)", "2. Perturbed loss: U-shaped, larger γ earlier", params)
    ax = axes[0, 2]
    for name, color in zip(SHARPNESS, ("#a6361c", "#555555")):
        key = keys.sharpness_key("critical_sharpness", name)
        if key in c:
            first = c[key]["mean"][0]
            ax.plot(
                tokens,
                np.array(c[key]["mean"]) / first,
                marker="s",
                color=color,
                label=f"λc, {'AdamW update' if name == 'sharpness' else 'gradient'}",
            )
    for g in s.gammas[-2:]:
        key = keys.noise_key(g, "delta")
        ax.plot(
            tokens,
            np.array(c[key]["mean"]) / c[key]["mean"][0],
            marker="o",
            color=colors[g],
            alpha=0.7,
            label=f"δ, γ={g:g}",
        )
    ax.set_yscale("log")
    _finish(
        ax,
        "value / value at the first snapshot",
        "5. Critical sharpness (Kalra et al.) beside noise δ",
        params,
    )
    for ax, quantity, title in (
        (axes[1, 0], "reference_loss_after", "3a. Pretraining loss after fine-tuning, fixed lr"),
        (axes[1, 1], "downstream_loss_after", "3b. Downstream (prose) loss after, fixed lr"),
        (axes[1, 2], "forgetting", "3c. Forgetting L(θ_ft) − L(θ), fixed lr"),
    ):
        for lr in s.finetune_lrs:
            plot_signal(
                ax,
                records,
                keys.finetune_key(lr, quantity),
                label=f"lr={lr:g}",
                color=lr_colors[lr],
            )
        _finish(ax, quantity.replace("_", " "), f"{title} ({s.finetune_steps} AdamW steps)", params)
    ax = axes[2, 0]
    plot_signal(
        ax,
        records,
        keys.finetune_tuned_key("downstream_loss_after"),
        label="best downstream loss",
        color="#e7298a",
    )
    plot_signal(
        ax,
        records,
        keys.finetune_tuned_key("reference_loss_after"),
        label="pretraining loss at that lr",
        color="#1f78b4",
    )
    _finish(ax, "loss", "4a. lr tuned per snapshot (paper's Fig. 5)", params)
    ax = axes[2, 1]
    for k, lrs in enumerate(c[keys.finetune_tuned_key("lr")]["per_seed"]):
        ax.plot(
            tokens,
            np.array(lrs) * 1.06 ** (k - 1),
            marker="o",
            alpha=0.8,
            label=f"seed {s.seeds[k]}",
        )
    ax.set_yscale("log")
    ax.minorticks_off()
    ax.set_yticks(list(s.finetune_lrs), [f"{lr:g}" for lr in s.finetune_lrs])
    ax.set_ylim(min(s.finetune_lrs) / 1.5, max(s.finetune_lrs) * 1.5)
    _finish(
        ax, "winning fine-tune lr (seeds offset slightly)", "4b. The lr that won, per seed", params
    )
    ax = axes[2, 2]
    g = max(s.gammas)
    key = keys.noise_key(g, "perturbed_loss")
    tuned = keys.finetune_tuned_key("downstream_loss_after")
    for k in range(n):
        color = f"C{k}"
        noise = np.array(c[key]["per_seed"][k])
        down = np.array(c[tuned]["per_seed"][k])
        ax.plot(
            tokens,
            noise - noise.min(),
            marker="o",
            color=color,
            label=f"seed {s.seeds[k]} noise γ={g:g}",
        )
        ax.plot(
            tokens,
            down - down.min(),
            marker="x",
            linestyle="--",
            color=color,
            label=f"seed {s.seeds[k]} tuned downstream",
        )
    _finish(ax, "value − its minimum", "6. Each seed: noise bottom vs fine-tune bottom", params)
    fig.suptitle(
        f"Catastrophic overtraining in miniature: {params / 1e3:.0f}k-parameter byte-level GPT-2,"
        f" {n} seed(s), cooldown branch of {s.cooldown_fraction:.0%} at each snapshot,"
        f" up to {tokens[-1] / params:.0f} tokens per parameter",
        fontsize=12,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)


def _finish(ax: Any, ylabel: str, title: str, params: int) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("tokens of the constant-lr run at the branch point")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    top = ax.secondary_xaxis("top", functions=(lambda t: t / params, lambda r: r * params))
    top.set_xlabel("tokens per parameter", fontsize=8)
