"""``lightning-overtrain report``: the summary table, the verdict and the plots of a run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_overtrain import keys
from lightning_overtrain.cli.exit_codes import EXIT_OK
from lightning_overtrain.cli.series import (
    SeriesError,
)
from lightning_overtrain.history import (
    PLOTS_DIR,
    SETTINGS_FILE,
    Record,
    columns,
    infer_signals,
    read_history_checked,
)
from lightning_overtrain.inflection.detector import DetectorConfig, InflectionState
from lightning_overtrain.inflection.policy import Decision, InflectionPolicy
from lightning_overtrain.inflection.verdicts import (
    bottom_text,
    forecast_text,
    latest_text,
    tokens_text,
)
from lightning_overtrain.keys import Signal
from lightning_overtrain.safe_io import confined_signals, inside, read_json_object, write_atomic

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
        settings = _run_settings(directory)
        signals = _run_signals(settings)
        policy = _run_policy(settings)
        policy.declare(signals or [])
        try:
            history, problem = read_history_checked(path)
        except (OSError, ValueError) as exc:
            raise SeriesError(f"{path} cannot be read: {exc}.") from exc
        if problem is not None:
            print(problem)
        render_report(history, directory, policy, signals)
    return EXIT_OK


def _run_settings(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, SETTINGS_FILE)
    if not os.path.lexists(path):
        return {}
    try:
        return read_json_object(path)
    except (OSError, ValueError) as exc:  # truncated, corrupt, a FIFO: report without it
        print(f"{path}: not read ({exc}); reporting with the default settings.")
        return {}


def _run_policy(settings: dict[str, Any]) -> InflectionPolicy:
    """The policy the run was judged with (from its ``monitor.json``), else the default."""
    config = settings.get("policy")
    if isinstance(config, dict):
        try:
            return InflectionPolicy.from_config(config)
        except (TypeError, ValueError) as exc:
            print(f"the run's policy settings do not load ({exc}); using the defaults")
    return InflectionPolicy()


def _run_signals(settings: dict[str, Any]) -> list[Signal] | None:
    """The probes' declared signals saved in ``monitor.json``; None for an older run
    (the built-in ones are then inferred from the history's keys)."""
    saved = settings.get("signals")
    if not isinstance(saved, list):
        return None
    try:
        signals = [Signal.from_dict(s) for s in saved]
    except (TypeError, ValueError) as exc:
        print(f"the run's declared signals do not load ({exc}); inferring them from the keys")
        return None
    signals, renamed = confined_signals(signals)
    for line in renamed:
        print(line)
    return signals


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
    history: Sequence[Record],
    directory: str,
    policy: InflectionPolicy,
    signals: Sequence[Signal] | None = None,
    decisions: list[Decision] | None = None,
) -> list[Record]:
    """Judge the history, print and write the summary and the verdicts; render the plots.

    Args:
        history: the run's records, in token order (left as they are on disk).
        directory: where ``summary.md`` and ``inflection.json`` go (the plots: its ``plots/``).
        policy: a fresh policy, set up as the run's (its detectors fill up here).
        signals: the probes' declarations; None infers the built-in ones from the keys.
        decisions: if given, the replay's decisions are appended to it (see :func:`judge`).

    Returns:
        The judged history (see :func:`judge`).
    """
    history = judge(history, policy, decisions)
    states = {signal: d.state for signal, d in policy.detectors.items()}
    lines = [
        summary_table(history, signals),
        "",
        "Inflection (the detector's verdict per signal; smoothed values are medians of 3"
        " neighbouring snapshots):",
    ]
    config = policy.detector_config
    lines += [f"- {describe_inflection(k, s, config)}" for k, s in states.items()]
    text = "\n".join(lines)
    print(text)
    verdicts = {k: _json_ready(s.to_dict()) for k, s in states.items()}
    # Replaced, never written through: a link planted at these names is not followed.
    write_atomic(os.path.join(directory, _SUMMARY_FILE), lambda f: f.write(text + "\n"))
    write_atomic(
        os.path.join(directory, _INFLECTION_FILE), lambda f: json.dump(verdicts, f, indent=2)
    )
    for path in _render_plots(history, directory, signals):
        print(f"plot: {path}")
    return history


def _json_ready(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def judge(
    history: Sequence[Record],
    policy: InflectionPolicy,
    decisions: list[Decision] | None = None,
) -> list[Record]:
    """Replay the history through ``policy`` in token order, as the live monitor judges it.

    Every record gets the policy's ``inflection/<signal>/...`` verdicts and the
    ``best/...`` snapshot so far, computed afresh (a resumed series may have gained
    checkpoints in the middle), so a probed series carries the same keys as a live run.

    Args:
        history: the records, in token order.
        policy: a fresh policy.
        decisions: if given, every decision the replay fires is appended to it (the
            watcher acts on the ones it has not acted on before).
    """
    if not policy.declared:  # a history saved without declarations: infer the built-in ones
        policy.declare(infer_signals(columns(history)))
    judged = []
    for old in history:
        record = {k: v for k, v in old.items() if not k.startswith(_JUDGED)}
        judgement = policy.judge(record)
        record.update(judgement.additions)
        if decisions is not None:
            decisions.extend(judgement.decisions)
        judged.append(record)
    return judged


def describe_inflection(
    key: str, state: InflectionState, config: DetectorConfig | int | None = None
) -> str:
    """One line: crossed or not, the bottom, the latest value and the forecast.

    The values quoted are the ones the summary table shows (measured at a named
    snapshot), and "smoothed" where the detector's median of 3 snapshots is meant. A
    forecast far beyond the observed tokens is called an extrapolation, not quoted.

    Args:
        key: the signal.
        state: its detector's state.
        config: the detector's settings (an int: its ``patience``); default the defaults.
    """
    if not isinstance(config, DetectorConfig):
        config = DetectorConfig() if config is None else DetectorConfig(patience=config)
    if state.n_points == 0:
        return f"{key}: no finite values."
    bottom = bottom_text(state)
    if state.crossed:
        verdict = f"CROSSED at {tokens_text(state.crossed_at_tokens)} tokens; {bottom}"
    elif state.consecutive_above:
        verdict = (
            f"not crossed yet: the latest {state.consecutive_above} snapshot(s) sit above the"
            f" {bottom} (it takes {config.patience} in a row)"
        )
    elif state.rise is not None and state.rise > 0:
        verdict = (
            f"not crossed yet: {bottom}; {latest_text(state)}, within the noise threshold"
            f" {state.rise_threshold:.3g}"
        )
    else:
        verdict = f"not crossed: no rise above the {bottom}"
    if state.crossed or state.consecutive_above:
        verdict += f"; {latest_text(state)}"
    forecast = forecast_text(state)
    if forecast is not None:
        verdict += f"; {forecast}"
    if state.n_points < config.min_points:
        verdict += f"; only {state.n_points} snapshot(s), the detector needs more to decide"
    return f"{key}: {verdict}."


def summary_table(history: Sequence[Record], signals: Sequence[Signal] | None = None) -> str:
    """A markdown table: tokens, step and the declared summary signals (± their stderrs).

    Args:
        history: the records.
        signals: the probes' declarations (their ``summary`` signals are the columns);
            None (an older history, written before signals were declared) infers the
            built-in ones from the keys. Per-layer and diagnostic keys stay in ``history.csv``.
    """
    present = set(columns(history))
    metrics = [s for s in declared_or_inferred(signals, present) if s.summary and s.key in present]
    header = ["tokens", "step", *(s.key for s in metrics)]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in history:
        cells = [tokens_text(record.get(keys.TOKENS)), _number(record.get(keys.STEP), "d")]
        for signal in metrics:
            cell = _number(record.get(signal.key), ".4f")
            stderr = record.get(signal.stderr)
            if _finite(stderr) and cell:
                cell += f" ± {stderr:.4f}"
            cells.append(cell)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def declared_or_inferred(
    signals: Sequence[Signal] | None, record_keys: Iterable[str]
) -> list[Signal]:
    """The run's declared signals as they are; only a history without them (``None``:
    written before signals were declared) has its built-in ones inferred from the keys."""
    if signals is not None:
        return list(signals)
    return infer_signals(record_keys)


def _render_plots(
    history: Sequence[Record], directory: str, signals: Sequence[Signal] | None
) -> list[str]:
    from lightning_overtrain.reporting.figures import write_figures

    try:  # where a live run's PlotReporter writes them: one place per figure
        plots = os.path.join(directory, PLOTS_DIR)
        if not inside(directory, plots):
            print(f"{plots}: leads outside {directory}; no plots written.")
            return []
        return list(write_figures(history, plots, signals=signals).values())
    except ImportError:
        return []  # matplotlib (the `plots` extra) is optional


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, fmt: str) -> str:
    if not _finite(value):
        return ""
    return format(int(value), fmt) if fmt == "d" else format(value, fmt)
