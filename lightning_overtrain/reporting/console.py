"""One console line per snapshot, through Lightning's logging, so a long run is never silent.

The lines go to the ``lightning.pytorch`` logger at INFO (``rank_zero_info``), like
Lightning's own messages: they show by default and obey the user's verbosity
(``logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)`` hides them).
The formatting is a plain function of a record, :func:`format_snapshot`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_info

from lightning_overtrain.inflection.verdicts import FAR_FACTOR, far_tokens
from lightning_overtrain.reporting.base import Reporter

if TYPE_CHECKING:
    import lightning.pytorch as pl

_INFLECTION, _CROSSED, _FORECAST = "inflection/", "/crossed", "/forecast_tokens"


def format_tokens(tokens: float) -> str:
    """A token count in three significant digits: ``565k``, ``1.78M``, ``2.3T``.

    Example::

        >>> [format_tokens(t) for t in (512, 565_248, 1_778_279, 12_288_000)]
        ['512', '565k', '1.78M', '12.3M']
    """
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(tokens) >= scale:
            return f"{tokens / scale:.3g}{suffix}"
    return f"{tokens:.3g}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _deltas(record: dict[str, Any]) -> list[str]:
    """``gamma=<g> <delta>`` for every whole-model noise delta (per-layer keys are left out)."""
    out = []
    for key, value in record.items():
        parts = key.split("/")
        # <probe>/gamma=<g>/delta; the probe's name is shown unless it is the default one.
        if len(parts) == 3 and parts[1].startswith("gamma=") and parts[2] == "delta":
            label = parts[1] if parts[0] == "noise" else f"{parts[0]}/{parts[1]}"
            out.append(f"{label} {value:.4f}" if _finite(value) else f"{label} -")
    return out


def _verdict(record: dict[str, Any]) -> str:
    """What the detector says: which signals turned up, else the nearest forecast turn."""
    crossed, forecasts = [], []
    for key, value in record.items():
        if not key.startswith(_INFLECTION):
            continue
        if key.endswith(_CROSSED) and _finite(value) and value:
            signal = key[len(_INFLECTION) : -len(_CROSSED)]
            bottom = record.get(f"{_INFLECTION}{signal}/bottom_tokens")
            where = f" (bottom at {format_tokens(bottom)})" if _finite(bottom) else ""
            crossed.append(f"{signal}{where}")
        elif key.endswith(_FORECAST) and _finite(value) and value > record.get("tokens", 0):
            forecasts.append((value, key[len(_INFLECTION) : -len(_FORECAST)]))
    if crossed:
        return "TURNED UP: " + ", ".join(crossed)
    rising = [
        key[len(_INFLECTION) : -len("/rise")]
        for key, value in record.items()
        if key.startswith(_INFLECTION)
        and key.endswith("/rise")
        and _finite(value)
        and _finite(threshold := record.get(key + "_threshold"))
        and value > threshold
    ]
    if rising:  # above the noise once; the detector's patience has not passed yet
        return "rising above its bottom: " + ", ".join(rising)
    if forecasts:
        tokens, signal = min(forecasts)
        if far_tokens(tokens, record.get("tokens")):  # as the verdicts say it: not a date
            return f"no turn yet (any forecast lies beyond {FAR_FACTOR:g}x the observed tokens)"
        return f"no turn yet (forecast: {signal} at ~{format_tokens(tokens)})"
    return "no turn yet"


def format_snapshot(record: dict[str, Any]) -> str:
    """The console line for one snapshot's record (relative keys, as in ``history.jsonl``).

    Tokens and step, the reference loss, the noise probe's ``delta`` per gamma, the
    detector's verdict, the probes' cost, and the failures so far when there are any.

    Args:
        record: one snapshot's record.

    Returns:
        One line of text.

    Example::

        >>> format_snapshot({"tokens": 2048, "reference_loss": 2.5, "probe_seconds": 1.04})
        'OvertrainingMonitor @ 2.05k tokens: reference loss 2.5000 | no turn yet | probes 1.0 s'
    """
    tokens = record.get("tokens", 0)
    head = f"OvertrainingMonitor @ {format_tokens(tokens)} tokens"
    if "step" in record:
        head += f" (step {record['step']})"
    loss = record.get("reference_loss")
    parts = [
        f"{head}: reference loss {loss:.4f}" if _finite(loss) else f"{head}: no reference loss"
    ]
    deltas = _deltas(record)
    if deltas:
        parts.append("delta " + ", ".join(deltas))
    parts.append(_verdict(record))
    seconds = record.get("probe_seconds")
    if _finite(seconds):
        parts.append(f"probes {seconds:.1f} s")
    failures = record.get("probe_failures")
    if _finite(failures) and failures > 0:
        parts.append(f"{int(failures)} probe failure(s) so far")
    return " | ".join(parts)


def verdict_lines(history: Sequence[Mapping[str, Any]], best_path: str | None) -> list[str]:
    """The run's end in words: a verdict per watched signal, and the kept snapshot.

    Each signal the policy watched is "CROSSED at <tokens> (bottom at <tokens>)", "not
    crossed yet" with the forecast turn where there is one, or "no turn". The last line
    says which snapshot ``best_path`` holds: its tokens, step and the curve it is the
    bottom of.
    """
    if not history:
        return []
    last = history[-1]
    lines = []
    for key in last:
        if not (key.startswith(_INFLECTION) and key.endswith(_CROSSED)):
            continue
        signal = key[len(_INFLECTION) : -len(_CROSSED)]
        field = f"{_INFLECTION}{signal}/"
        bottom = last.get(field + "bottom_tokens")
        at = f"bottom at {format_tokens(bottom)} tokens" if _finite(bottom) else "no bottom yet"
        first = next((r for r in history if _finite(r.get(key)) and r.get(key)), None)
        if first is not None:
            verdict = f"CROSSED at {format_tokens(first['tokens'])} tokens ({at})"
        else:
            forecast = last.get(field + "forecast_tokens")
            verdict = f"not crossed yet ({at}"
            if _finite(forecast) and far_tokens(forecast, last.get("tokens")):
                verdict += f"; any forecast turn lies beyond {FAR_FACTOR:g}x the observed tokens)"
            elif _finite(forecast) and forecast > last.get("tokens", 0):
                verdict += f"; forecast to turn at ~{format_tokens(forecast)} tokens)"
            elif _finite(forecast):  # as the snapshot lines and figures: no past date
                verdict += "; the fit has it turned already, not yet above the noise)"
            else:
                verdict += "; no forecast turn)"
        lines.append(f"OvertrainingMonitor verdict: {signal}: {verdict}.")
    best_tokens = last.get("best/tokens")
    if best_path and _finite(best_tokens):
        kept = next((r for r in history if r.get("tokens") == best_tokens), {})
        signal = next(
            (
                k
                for k, v in kept.items()
                if f"{_INFLECTION}{k}{_CROSSED}" in last and v == last.get("best/value")
            ),
            "its best signal",
        )
        step = f" (step {kept['step']})" if "step" in kept else ""
        lines.append(
            f"OvertrainingMonitor kept {best_path}: the snapshot at"
            f" {format_tokens(best_tokens)} tokens{step}, the bottom of {signal}; fine-tune"
            " from it."
        )
    return lines


def files_under(directory: str) -> list[str]:
    """Every file under ``directory``, relative to it, sorted (empty if it does not exist)."""
    found = []
    for root, _, names in os.walk(directory):
        found.extend(os.path.relpath(os.path.join(root, n), directory) for n in names)
    return sorted(found)


class ConsoleReporter(Reporter):
    """Logs one line per snapshot (:func:`format_snapshot`) and, at the end, a verdict per
    watched signal, the kept snapshot (:func:`verdict_lines`) and the files written.

    The monitor adds it by itself, last, so its closing line sees the other reporters'
    files (``history.jsonl``, the plots, ``best.ckpt``). It reads only the run's
    ``history``, ``dirpath`` and ``tokens``.

    Example::

        monitor = OvertrainingMonitor(
            reference_data=val_batches,
            every_n_steps=500,
            reporters=[LoggerReporter(), FileReporter(), ConsoleReporter()],
        )
    """

    def report(self, trainer: pl.Trainer, monitor: Any, record: dict[str, Any]) -> None:
        rank_zero_info(format_snapshot(record))

    def teardown(self, trainer: pl.Trainer, monitor: Any) -> None:
        for line in verdict_lines(monitor.history, monitor.best_path):
            rank_zero_info(line)
        files = files_under(monitor.dirpath)
        listed = ", ".join(files) if files else "none yet"
        rank_zero_info(
            f"OvertrainingMonitor: {len(monitor.history)} snapshot(s) up to"
            f" {format_tokens(monitor.tokens)} tokens; files in {monitor.dirpath}: {listed}"
        )
