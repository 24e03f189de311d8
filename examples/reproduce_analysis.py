"""The analysis of ``reproduce_paper.py``: what reproduced, with its uncertainty.

Kept apart from the runs so ``reproduce_paper.py --report-only`` rebuilds it from the
per-seed histories. Every curve carries standard errors (across seeds, and for the
noise probe across directions); every bottom and lead an interval
(:mod:`reproduce_stats`). The checks, one per claim of the paper:

1. delta rises with tokens at fixed gamma; the perturbed loss is U-shaped, larger
   gamma earlier (section 3.3);
2. at each fixed fine-tuning lr, the pretraining loss after fine-tuning and the
   downstream loss turn upward, larger lr earlier (section 3.4);
3. with the lr tuned per snapshot (Figure 5): the best downstream loss, the winning
   lr, the forgetting at that lr and how fast it still rises;
4. per seed, how far each cheap signal's bottom (noise at each gamma, the critical
   sharpness) precedes each fine-tune curve's bottom, and which foresees best;
5. how much of the downstream learning pretraining alone does.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from reproduce_snapshots import direction_key
from reproduce_stats import (
    bottom_with_interval,
    lead_with_interval,
    pooled,
    slope_per_doubling,
)

from lightning_overtrain import keys
from lightning_overtrain.history import Record
from lightning_overtrain.inflection.detector import InflectionDetector

SKIP = (keys.STEP, keys.PROBE_SECONDS)


def table(histories: list[list[Record]], n: int) -> dict[str, np.ndarray]:
    """Per key: a ``[seed, snapshot]`` array, NaN where a seed did not get that far."""
    names = [k for k in max(histories, key=len)[0] if k not in SKIP]
    out = {}
    for key in names:
        values = np.full((len(histories), n), np.nan)
        for i, h in enumerate(histories):
            values[i, : len(h)] = [r.get(key, math.nan) for r in h]
        out[key] = values
    return out


def curves(data: dict[str, np.ndarray]) -> dict[str, dict[str, list]]:
    """Per metric: the mean over seeds, its standard error across seeds, each seed's values.

    Noise metrics also carry ``se_directions``: the standard error of the mean that
    the spread across noise directions alone would give (each seed's own error,
    combined); ``n`` is how many seeds reached each snapshot.
    """
    out = {}
    for key, values in data.items():
        if key == keys.TOKENS or key.endswith("_stderr") or key.startswith("directions/"):
            continue
        n = np.isfinite(values).sum(axis=0)
        with warnings.catch_warnings():  # a snapshot one seed reached has no spread: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)
            se = np.nanstd(values, axis=0, ddof=1) / np.sqrt(n)
        curve = {"mean": mean, "se": se, "n": n, "per_seed": values}
        if key + "_stderr" in data:
            stderr = data[key + "_stderr"]
            curve["se_directions"] = np.sqrt(np.nansum(stderr**2, axis=0)) / n
            curve["per_seed_se"] = stderr
        out[key] = {k: np.asarray(v, dtype=float).round(6).tolist() for k, v in curve.items()}
    return out


def expensive_signals(s: Any) -> dict[str, str]:
    """The fine-tune curves whose bottoms the cheap signals should foresee."""
    out = {}
    for lr in s.finetune_lrs:
        out[f"ft pretrain loss lr={lr:g}"] = keys.finetune_key(lr, "reference_loss_after")
        out[f"ft downstream loss lr={lr:g}"] = keys.finetune_key(lr, "downstream_loss_after")
    out["ft tuned pretrain loss"] = keys.finetune_tuned_key("reference_loss_after")
    out["ft tuned downstream loss"] = keys.finetune_tuned_key("downstream_loss_after")
    return out


def cheap_curves(data: dict[str, np.ndarray], s: Any) -> dict[str, tuple[np.ndarray, Any]]:
    """Per cheap signal: its ``[seed, snapshot]`` curve and per-seed direction values (or None).

    The critical sharpness rises without a bottom, so it enters as the perturbed loss it
    implies: ``reference_loss + delta_1(T0) * lambda(T) / lambda(T0)``, the sensitivity
    term growing like the sharpness instead of like delta (scaled to the largest
    gamma's delta at the first snapshot).
    """
    out: dict[str, tuple[np.ndarray, Any]] = {}
    for g in s.gammas:
        directions = np.stack([data[direction_key(g, k)] for k in range(s.pairs)], axis=1)
        out[f"noise gamma={g:g}"] = (data[keys.noise_key(g, "perturbed_loss")], directions)
    delta = data[keys.noise_key(max(s.gammas), "delta")]
    for name, label in (("sharpness", "update"), ("sharpness_gradient", "gradient")):
        key = keys.sharpness_key("critical_sharpness", name)
        if key in data:
            growth = data[key] / data[key][:, :1]
            out[f"sharpness ({label})"] = (
                data[keys.REFERENCE_LOSS] + delta[:, :1] * growth,
                None,
            )
    return out


def analyse(histories: list[list[Record]], runs: list[dict], s: Any, params: int) -> dict:
    """Everything ``reproduction.json`` publishes beyond the settings."""
    rng = np.random.default_rng(0)
    longest = max(histories, key=len)
    tokens = np.array([r[keys.TOKENS] for r in longest], dtype=float)
    x, step = np.log2(tokens), math.log2(s.snapshot_ratio)
    data = table(histories, len(tokens))
    cheap, expensive = cheap_curves(data, s), expensive_signals(s)
    bottoms: dict[str, list[dict]] = {}
    for name, (values, directions) in cheap.items():
        bottoms[name] = [
            bottom_with_interval(x, values[i], None if directions is None else directions[i], rng)
            for i in range(len(histories))
        ]
    for name, key in expensive.items():
        bottoms[name] = [bottom_with_interval(x, v, None, rng) for v in data[key]]
    leads = {
        c: {
            e: [lead_with_interval(a, b, step) for a, b in zip(bottoms[c], bottoms[e])]
            for e in expensive
        }
        for c in cheap
    }
    pooled_leads = {
        c: {
            e: pooled(
                [(b["samples"] - a["samples"]) / step for a, b in zip(bottoms[c], bottoms[e])],
                [lead["snapshots"] for lead in leads[c][e]],
                rng,
            )
            for e in expensive
        }
        for c in cheap
    }
    pooled_bottoms = {
        name: _in_tokens(
            pooled([b["samples"] for b in per_seed], [b["log2_tokens"] for b in per_seed], rng),
            params,
        )
        for name, per_seed in bottoms.items()
    }
    result = {
        "tokens": tokens.astype(int).tolist(),
        "tokens_per_parameter": (tokens / params).round(2).tolist(),
        "bottoms": {
            name: [_public(b, params) for b in per_seed] for name, per_seed in bottoms.items()
        },
        "pooled_bottoms": pooled_bottoms,
        "leads": {
            c: {e: [_round(v) for v in per] for e, per in d.items()} for c, d in leads.items()
        },
        "pooled_leads": pooled_leads,
        "best_predictor": {e: best_predictor(leads, pooled_leads, e) for e in expensive},
        "detector": detector_verdicts(data, s),
        "delta_rises": delta_rises(data, s),
        "tuned_lr": tuned_view(data, x, s),
        "pretraining_alone": pretraining_alone(data, runs),
        "curves": curves(data),
    }
    result["headline"] = headline(result, s)
    return result


def best_predictor(leads: dict, pooled_leads: dict, target: str) -> list[dict[str, Any]]:
    """Cheap signals ranked for ``target``: first by the seeds whose lead interval is above
    zero, then by the mean lead (the earlier warning first), then by how steady it is."""
    rows = []
    for cheap, per_target in leads.items():
        per_seed = per_target[target]
        snaps = np.array([v["snapshots"] for v in per_seed])
        rows.append(
            {
                "signal": cheap,
                # A bound counts only on its own side: "at least +2" is ahead, "at most -1" behind.
                "seeds_ahead": int(
                    sum(v["snapshots_low"] > 0 and not v["upper_bound"] for v in per_seed)
                ),
                "seeds_behind": int(
                    sum(v["snapshots_high"] < 0 and not v["lower_bound"] for v in per_seed)
                ),
                "seeds_cheap_turned": int(sum(v["cheap_turned"] for v in per_seed)),
                "seeds_target_turned": int(sum(not v["lower_bound"] for v in per_seed)),
                "lead_snapshots": pooled_leads[cheap][target],
                "lead_sd_across_seeds": float(snaps.std(ddof=1)) if len(snaps) > 1 else math.nan,
            }
        )
    return sorted(
        rows,
        key=lambda r: (-r["seeds_ahead"], -r["lead_snapshots"]["mean"], r["lead_sd_across_seeds"]),
    )


def detector_verdicts(data: dict[str, np.ndarray], s: Any) -> dict[str, list[dict]]:
    """The project's detector on each seed's curves, as a live run would have fed it."""
    watched = {f"noise gamma={g:g}": keys.noise_key(g, "perturbed_loss") for g in s.gammas}
    watched.update(expensive_signals(s))
    tokens = data[keys.TOKENS]
    out = {}
    for name, key in watched.items():
        stderr = data.get(key + "_stderr")
        verdicts = []
        for i, row in enumerate(data[key]):
            detector = InflectionDetector()
            state = None
            for j, value in enumerate(row):
                if not math.isfinite(value):
                    break
                se = None if stderr is None else float(stderr[i, j])
                state = detector.update(float(tokens[i, j]), float(value), se)
            verdicts.append(
                {
                    "crossed": bool(state and state.crossed),
                    "crossed_at_tokens": state.crossed_at_tokens if state else None,
                }
            )
        out[name] = verdicts
    return out


def delta_rises(data: dict[str, np.ndarray], s: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for g in s.gammas:
        d = np.diff(data[keys.noise_key(g, "delta")], axis=1)
        known = np.isfinite(d)
        out[f"{g:g}"] = {
            "rising_neighbour_pairs": int((d[known] > 0).sum()),
            "neighbour_pairs": int(known.sum()),
        }
    return out


def tuned_view(data: dict[str, np.ndarray], x: np.ndarray, s: Any) -> dict[str, Any]:
    """The paper's Figure 5: the winning lr, and the forgetting at it, still rising or not.

    ``forgetting_slope_last_two_doublings``: per seed, the least-squares change of the
    forgetting at the winning lr per doubling of tokens over each seed's last five
    snapshots (two doublings); with its mean and standard error across seeds.
    """
    forgetting = data[keys.finetune_tuned_key("reference_loss_after")] - data[keys.REFERENCE_LOSS]
    slopes = []
    for row in forgetting:
        known = np.flatnonzero(np.isfinite(row))[-5:]
        slopes.append(slope_per_doubling(x[known], row[known]))
    slopes_arr = np.array(slopes)
    lrs = data[keys.finetune_tuned_key("lr")]
    return {
        "winning_lr_per_seed": lrs.tolist(),
        "forgetting_at_winning_lr_per_seed": forgetting.round(4).tolist(),
        "forgetting_slope_last_two_doublings": slopes_arr.round(4).tolist(),
        "forgetting_slope_mean": float(slopes_arr.mean()),
        "forgetting_slope_se": float(slopes_arr.std(ddof=1) / math.sqrt(len(slopes_arr)))
        if len(slopes_arr) > 1
        else math.nan,
    }


def pretraining_alone(data: dict[str, np.ndarray], runs: list[dict]) -> dict[str, Any]:
    """How much of the downstream learning pretraining alone does, and the fine-tune does."""
    before = data[keys.finetune_key(None, "downstream_loss_before")]
    tuned = data[keys.finetune_tuned_key("downstream_loss_after")]
    init = np.array([run["downstream_loss_at_init"] for run in runs])
    last = np.array([row[np.isfinite(row)][-1] for row in before])
    best_tuned = np.nanmin(tuned, axis=1)
    drop_pretraining = init - np.nanmin(before, axis=1)
    drop_finetune = np.nanmin(before, axis=1) - best_tuned
    return {
        "downstream_loss_at_init": init.round(4).tolist(),
        "before_finetune_first": before[:, 0].round(4).tolist(),
        "before_finetune_min": np.nanmin(before, axis=1).round(4).tolist(),
        "before_finetune_last": last.round(4).tolist(),
        "best_after_tuned_finetune": best_tuned.round(4).tolist(),
        "pretraining_drop_mean": float(drop_pretraining.mean()),
        "finetune_drop_mean": float(drop_finetune.mean()),
        "finetune_share_mean": float((drop_finetune / (drop_finetune + drop_pretraining)).mean()),
    }


def headline(result: dict, s: Any) -> dict[str, Any]:
    """The few numbers to read first (printed at the end of a run)."""
    out = {
        "pretraining_alone_drop": round(result["pretraining_alone"]["pretraining_drop_mean"], 3),
        "finetune_drop": round(result["pretraining_alone"]["finetune_drop_mean"], 3),
        "tuned_forgetting_slope_per_doubling": round(
            result["tuned_lr"]["forgetting_slope_mean"], 4
        ),
    }
    for name, b in result["pooled_bottoms"].items():
        out[f"bottom {name} (tokens/param, 90%)"] = [
            round(b["per_parameter"], 1),
            round(b["per_parameter_low"], 1),
            round(b["per_parameter_high"], 1),
        ]
    for target in ("ft tuned downstream loss", f"ft pretrain loss lr={max(s.finetune_lrs):g}"):
        out[f"best predictor of {target}"] = result["best_predictor"][target][0]["signal"]
    return out


def _in_tokens(p: dict[str, float], params: int) -> dict[str, float]:
    """A pooled bottom (in log2 tokens) as tokens and tokens per parameter."""
    out = dict(p)
    for field, suffix in (("mean", ""), ("low", "_low"), ("high", "_high")):
        out["tokens" + suffix] = 2.0 ** p[field]
        out["per_parameter" + suffix] = 2.0 ** p[field] / params
    return out


def _public(bottom: dict, params: int) -> dict[str, Any]:
    """A per-seed bottom for the results file: tokens, tokens per parameter, no replicates."""
    return {
        "tokens": round(2.0 ** bottom["log2_tokens"]),
        "tokens_low": round(2.0 ** bottom["low"]),
        "tokens_high": round(2.0 ** bottom["high"]),
        "per_parameter": round(2.0 ** bottom["log2_tokens"] / params, 1),
        "per_parameter_low": round(2.0 ** bottom["low"] / params, 1),
        "per_parameter_high": round(2.0 ** bottom["high"] / params, 1),
        "interior": bool(bottom["interior"]),
        "edge": bottom["edge"],
        "interior_fraction": round(bottom["interior_fraction"], 2),
    }


def _round(lead: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in lead.items()}
