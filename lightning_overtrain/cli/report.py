"""``lightning-overtrain report``: the summary table, the verdict and the plots of a run."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from lightning_overtrain import keys
from lightning_overtrain.cli.main import EXIT_OK
from lightning_overtrain.cli.series import (
    SeriesError,
)
from lightning_overtrain.history import PLOTS_DIR, SETTINGS_FILE, Record, columns, read_history
from lightning_overtrain.inflection.crossing import DEFAULT_MIN_POINTS
from lightning_overtrain.inflection.detector import InflectionState
from lightning_overtrain.inflection.policy import InflectionPolicy

# The summary table's columns; per-layer and diagnostic keys stay in history.csv.
SUMMARY_COLUMNS = re.compile(
    r"^(reference_loss|noise/gamma=[^/]+/(perturbed_loss|delta)|[^/]+/lr=[^/]+/forgetting)$"
)
_JUDGED = ("inflection/", "best/")  # keys the policy adds; recomputed by `judge`
_SUMMARY_FILE = "summary.md"
_INFLECTION_FILE = "inflection.json"


def report_command(run_dir: str) -> int:
    """``lightning-overtrain report RUN_DIR``: table, inflection and plots of each history."""
    paths = _find_histories(run_dir)
    for path in paths:
        directory = os.path.dirname(path)
        if len(paths) > 1:
            print(f"\n== {directory}")
        render_report(read_history(path), directory, _run_policy(directory))
    return EXIT_OK


def _run_policy(directory: str) -> InflectionPolicy:
    """The policy the run was judged with (from its ``monitor.json``), else the default."""
    path = os.path.join(directory, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f).get("policy")
        if isinstance(config, dict):
            try:
                return InflectionPolicy(**config)
            except (TypeError, ValueError) as exc:
                print(f"the run's policy settings do not load ({exc}); using the defaults")
    return InflectionPolicy()


def _find_histories(run_dir: str) -> list[str]:
    if not os.path.isdir(run_dir):
        raise SeriesError(f"RUN_DIR {run_dir!r}: no such directory.")
    here = os.path.join(run_dir, "history.jsonl")
    if os.path.isfile(here):
        return [here]
    found = sorted(
        os.path.join(dirpath, "history.jsonl")
        for dirpath, _, files in os.walk(run_dir)
        if "history.jsonl" in files
    )
    if not found:
        raise SeriesError(
            f"RUN_DIR {run_dir!r} holds no history.jsonl. Pass the monitor's directory"
            " (<log_dir>/overtrain by default) or a `probe --out` directory."
        )
    return found


def render_report(
    history: Sequence[Record], directory: str, policy: InflectionPolicy
) -> list[Record]:
    """Judge the history, print and write the summary and the verdicts; render the plots.

    Args:
        history: the run's records, in token order (left as they are on disk).
        directory: where ``summary.md`` and ``inflection.json`` go (the plots: its ``plots/``).
        policy: a fresh policy, set up as the run's (its detectors fill up here).

    Returns:
        The judged history (see :func:`judge`).
    """
    history = judge(history, policy)
    states = {signal: d.state for signal, d in policy.detectors.items()}
    lines = [summary_table(history), "", "Inflection (the detector's verdict per signal):"]
    lines += [f"- {describe_inflection(k, s, policy.patience)}" for k, s in states.items()]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(directory, _SUMMARY_FILE), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(directory, _INFLECTION_FILE), "w") as f:
        json.dump({k: _json_ready(s.to_dict()) for k, s in states.items()}, f, indent=2)
    for path in _render_plots(history, directory):
        print(f"plot: {path}")
    return history


def _json_ready(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def judge(history: Sequence[Record], policy: InflectionPolicy) -> list[Record]:
    """Replay the history through ``policy`` in token order, as the live monitor judges it.

    Every record gets the policy's ``inflection/<signal>/...`` verdicts and the
    ``best/...`` snapshot so far, computed afresh (a resumed series may have gained
    checkpoints in the middle), so a probed series carries the same keys as a live run.
    """
    judged = []
    for old in history:
        record = {k: v for k, v in old.items() if not k.startswith(_JUDGED)}
        record.update(policy.update(record)[0])
        candidate = policy.best_candidate(record)
        if candidate is not None:
            signal, value = candidate
            policy.best = {"signal": signal, "value": value, "tokens": record[keys.TOKENS]}
        if policy.best is not None:
            record[keys.BEST_TOKENS] = policy.best["tokens"]
            record[keys.BEST_VALUE] = policy.best["value"]
        judged.append(record)
    return judged


def describe_inflection(key: str, state: InflectionState, patience: int) -> str:
    """One line: crossed or not, the bottom, and the forecast."""
    if state.n_points == 0:
        return f"{key}: no finite values."
    bottom = (
        f"bottom at {_tokens(state.bottom_tokens)} tokens"
        f" ({state.bottom_value:.4g} ± {state.bottom_stderr:.2g})"
    )
    if state.crossed:
        verdict = f"CROSSED at {_tokens(state.crossed_at_tokens)} tokens; {bottom}"
    elif state.consecutive_above:
        verdict = (
            f"not crossed yet: the latest {state.consecutive_above} snapshot(s) sit above the"
            f" {bottom} (it takes {patience} in a row)"
        )
    elif state.rise is not None and state.rise > 0:
        verdict = (
            f"not crossed yet: {bottom}, latest +{state.rise:.3g} above it"
            f" (within the noise threshold {state.rise_threshold:.3g})"
        )
    else:
        verdict = f"not crossed: no rise above the {bottom}"
    if state.forecast_tokens is not None:
        verdict += (
            f"; forecast T* = {_tokens(state.forecast_tokens)} tokens"
            f" [{_tokens(state.forecast_low)}, {_tokens(state.forecast_high, 'unbounded')}]"
        )
    if state.n_points < DEFAULT_MIN_POINTS:
        verdict += f"; only {state.n_points} snapshot(s), the detector needs more to decide"
    return f"{key}: {verdict}."


def summary_table(history: Sequence[Record]) -> str:
    """A markdown table: tokens, step and the headline metrics (± their standard errors)."""
    metrics = [k for k in columns(history) if SUMMARY_COLUMNS.match(k)]
    header = ["tokens", "step", *metrics]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in history:
        cells = [_tokens(record.get(keys.TOKENS)), _number(record.get(keys.STEP), "d")]
        for key in metrics:
            cell = _number(record.get(key), ".4f")
            stderr = record.get(key + "_stderr")
            if _finite(stderr) and cell:
                cell += f" ± {stderr:.4f}"
            cells.append(cell)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _render_plots(history: Sequence[Record], directory: str) -> list[str]:
    from lightning_overtrain.reporting.figures import write_figures

    try:  # where a live run's PlotReporter writes them: one place per figure
        return list(write_figures(history, os.path.join(directory, PLOTS_DIR)).values())
    except ImportError:
        return []  # matplotlib (the `plots` extra) is optional


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, fmt: str) -> str:
    if not _finite(value):
        return ""
    return format(int(value), fmt) if fmt == "d" else format(value, fmt)


def _tokens(value: Any, infinite: str = "?") -> str:
    if value == math.inf:
        return infinite
    if not _finite(value):
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"
