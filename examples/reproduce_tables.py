"""The numbers of ``docs/reproduction.md``, as Markdown tables written from the results.

``reproduce_paper.py --publish`` replaces the block between the two markers below in
``docs/reproduction.md`` with :func:`tables`, so the page never quotes a number the
results file does not hold.
"""

from __future__ import annotations

import math
from typing import Any

START = "<!-- reproduction-numbers:start -->"
END = "<!-- reproduction-numbers:end -->"


def _pp(value: float) -> str:
    """Tokens per parameter, short."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _interval(b: dict[str, Any]) -> str:
    return (
        f"{_pp(b['per_parameter'])} [{_pp(b['per_parameter_low'])}, {_pp(b['per_parameter_high'])}]"
    )


def _lead(lead: dict[str, Any]) -> str:
    if lead["lower_bound"] and lead["upper_bound"]:
        return "neither turned"
    mark = "≥ " if lead["lower_bound"] else "≤ " if lead["upper_bound"] else ""
    low, high = lead["snapshots_low"], lead["snapshots_high"]
    return f"{mark}{lead['snapshots']:+.1f} [{low:+.1f}, {high:+.1f}]"


def run_table(summary: dict[str, Any]) -> list[str]:
    rows = [
        "| seed | snapshots | tokens per parameter | finished | CPU-seconds |",
        "|---|---|---|---|---|",
    ]
    for seed, r in summary["seeds_reached"].items():
        rows.append(
            f"| {seed} | {r['snapshots']}/{summary['planned_snapshots']} |"
            f" {_pp(r['tokens_per_parameter'])} | {'yes' if r['finished'] else 'no'} |"
            f" {r['cpu_seconds']} |"
        )
    c = summary["corpus"]
    rows += [
        "",
        f"Corpus: {c['files']} files, {c['bytes']:,} bytes, sha256 `{c['sha256'][:16]}...`"
        f" (Python {c['python']}, torch {c['torch']}).",
    ]
    return rows


def downstream_table(summary: dict[str, Any]) -> list[str]:
    a = summary["pretraining_alone"]
    rows = [
        "| seed | at init | before fine-tuning: first snapshot | lowest | last |"
        " best after the tuned fine-tune |",
        "|---|---|---|---|---|---|",
    ]
    for k, seed in enumerate(summary["seeds_reached"]):
        rows.append(
            f"| {seed} | {a['downstream_loss_at_init'][k]:.3f} |"
            f" {a['before_finetune_first'][k]:.3f} | {a['before_finetune_min'][k]:.3f} |"
            f" {a['before_finetune_last'][k]:.3f} |"
            f" {a['best_after_tuned_finetune'][k]:.3f} |"
        )
    rows += [
        "",
        f"Pretraining alone lowers the downstream loss by {a['pretraining_drop_mean']:.3f} nats"
        f" (mean over seeds, from init to its lowest); the tuned fine-tune lowers it a further"
        f" {a['finetune_drop_mean']:.3f}: {a['finetune_share_mean']:.0%} of the downstream"
        " learning is the fine-tune's.",
    ]
    return rows


def bottoms_table(summary: dict[str, Any]) -> list[str]:
    rows = [
        "| signal | bottom, tokens per parameter (mean over seeds [90%]) | seeds whose curve"
        " turned | the detector crossed it (seeds) | per seed |",
        "|---|---|---|---|---|",
    ]
    for name, pooled in summary["pooled_bottoms"].items():
        per_seed = summary["bottoms"][name]
        turned = sum(b["interior"] for b in per_seed)
        each = ", ".join(
            _interval(b)
            if b["interior"]
            else f"{'≥' if b['edge'] == 'last' else '≤'} {_pp(b['per_parameter'])}"
            for b in per_seed
        )
        verdicts = summary["detector"].get(name)
        crossed = f"{sum(v['crossed'] for v in verdicts)}/{len(verdicts)}" if verdicts else "-"
        # A mean over seeds some of which never turned is itself only a bound.
        bound = "≥ " if any(b["edge"] == "last" for b in per_seed) else ""
        bound += "≤ " if any(b["edge"] == "first" for b in per_seed) else ""
        rows.append(
            f"| {name} | {bound}{_interval(pooled)} | {turned}/{len(per_seed)} | {crossed} |"
            f" {each} |"
        )
    rows += [
        "",
        "A bottom is the vertex of a parabola in log tokens through the lowest snapshot and"
        " two neighbours a side; `≥` marks a curve still falling at its last snapshot (the"
        " bottom is past the run), `≤` one rising from its first; a mean over seeds of which"
        " one is a bound is marked the same. Pooled: bootstrap over seeds and each seed's"
        " replicates.",
    ]
    return rows


def leads_table(summary: dict[str, Any], target: str) -> list[str]:
    rows = [
        f"| cheap signal | lead over **{target}**, snapshots (mean [90%]) | ahead / behind"
        " (seeds, 90% interval clear of 0) | per seed |",
        "|---|---|---|---|",
    ]
    for row in summary["best_predictor"][target]:
        p, per_seed = row["lead_snapshots"], summary["leads"][row["signal"]][target]
        each = ", ".join(_lead(v) for v in per_seed)
        bound = "≥ " if any(v["lower_bound"] for v in per_seed) else ""
        bound += "≤ " if any(v["upper_bound"] for v in per_seed) else ""
        rows.append(
            f"| {row['signal']} | {bound}{p['mean']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}] |"
            f" {row['seeds_ahead']} / {row['seeds_behind']} | {each} |"
        )
    return rows


def tuned_table(summary: dict[str, Any]) -> list[str]:
    t = summary["tuned_lr"]
    rows = [
        "| seed | winning lr, first to last snapshot | forgetting at it, first → last |"
        " change per doubling, last two doublings |",
        "|---|---|---|---|",
    ]
    for k, seed in enumerate(summary["seeds_reached"]):
        lrs = [f"{v:g}" for v in t["winning_lr_per_seed"][k] if not math.isnan(v)]
        f = [v for v in t["forgetting_at_winning_lr_per_seed"][k] if not math.isnan(v)]
        rows.append(
            f"| {seed} | {' '.join(lrs)} | {f[0]:.3f} → {f[-1]:.3f} |"
            f" {t['forgetting_slope_last_two_doublings'][k]:+.4f} |"
        )
    rows += [
        "",
        f"Forgetting at the winning lr changes by {t['forgetting_slope_mean']:+.4f}"
        f" ± {t['forgetting_slope_se']:.4f} (s.e. across seeds) per doubling of tokens over"
        " the last two doublings.",
    ]
    return rows


def tables(summary: dict[str, Any]) -> str:
    """Every table of the page, from one results file."""
    lrs = summary["settings"]["finetune_lrs"]
    parts = [
        "### What each seed reached",
        *run_table(summary),
        "### How much of the downstream learning pretraining alone does",
        *downstream_table(summary),
        "### Bottoms, with intervals",
        *bottoms_table(summary),
        "### Does the cheap signal foresee the fine-tune?",
        "Lead = the fine-tune curve's bottom minus the cheap signal's, in snapshots (each"
        " a factor √2 in tokens); positive: the cheap signal bottoms first. Rows are ranked"
        " by the seeds where the cheap signal is ahead, then by its mean lead.",
    ]
    fixed = [f"ft pretrain loss lr={lr:g}" for lr in lrs]
    for target in ["ft tuned downstream loss", "ft tuned pretrain loss", *fixed]:
        parts += ["", *leads_table(summary, target)]
    parts += ["### The lr tuned per snapshot", *tuned_table(summary)]
    return "\n".join(parts) + "\n"


def replace_block(page: str, block: str) -> str:
    """``page`` with the text between the markers replaced by ``block``.

    Raises:
        ValueError: if the page lacks either marker.
    """
    if START not in page or END not in page:
        raise ValueError(f"the page has no `{START}` ... `{END}` block to fill")
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"
