"""When to take a snapshot: every N steps, every N tokens, or log-spaced in tokens.

The paper's x-axis is log tokens, so ``points_per_decade`` is the natural choice:
snapshot ``k`` is due at ``start_tokens * 10 ** (k / points_per_decade)``.

Counts are whole numbers, but ``1e6`` is accepted for ``1_000_000``
(see :func:`~lightning_overtrain.checks.check_int`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lightning_overtrain.checks import check_int

#: The first log-spaced snapshot when ``points_per_decade`` comes without ``start_tokens``.
DEFAULT_START_TOKENS = 1_000_000


#: The most log-spaced snapshots per decade: 1000 is already one every 0.23% of tokens.
MAX_POINTS_PER_DECADE = 1000
#: The largest count accepted (steps or tokens): a quintillion, beyond any run.
MAX_COUNT = 10**18


def _positive_int(name: str, value: Any, example: int, maximum: int = MAX_COUNT) -> int:
    return check_int(name, value, 1, f"Pass e.g. {name}={example}.", maximum=maximum)


@dataclass
class Cadence:
    """Decides, after each optimizer step, whether a snapshot is due.

    Exactly one of the three ways must be chosen.

    Args:
        every_n_steps: a snapshot every N optimizer steps.
        every_n_tokens: a snapshot each time the run's token count passes a multiple of N.
        points_per_decade: log-spaced snapshots, this many per factor of 10 in tokens,
            the first at ``start_tokens``.
        start_tokens: the first log-spaced snapshot (only with ``points_per_decade``);
            default :data:`DEFAULT_START_TOKENS` (1M tokens).

    Raises:
        ValueError: if none or several ways are chosen, or a value is not a positive int.

    Example::

        >>> c = Cadence(points_per_decade=2, start_tokens=1000)
        >>> [c.due(step=1, tokens=t) for t in (999, 1000, 2000, 3200)]
        [False, True, False, True]
    """

    every_n_steps: int | None = None
    every_n_tokens: int | None = None
    points_per_decade: int | None = None
    start_tokens: int | None = None
    next_index: int = 0
    #: A snapshot that was interrupted (Ctrl-C in a probe): due again at the next step,
    #: also after a resume from a checkpoint saved on that exception.
    retake: bool = False
    _retake_step: int | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        chosen = {
            k: v
            for k, v in (
                ("every_n_steps", self.every_n_steps),
                ("every_n_tokens", self.every_n_tokens),
                ("points_per_decade", self.points_per_decade),
            )
            if v is not None
        }
        if len(chosen) != 1:
            raise ValueError(
                f"Choose exactly one snapshot cadence, got {chosen or 'none'}. Pass one of"
                " `every_n_steps=1000`, `every_n_tokens=100_000_000` or"
                " `points_per_decade=4` (log-spaced tokens from `start_tokens`, default 1M)."
            )
        name, value = next(iter(chosen.items()))
        example = {"every_n_steps": 1000, "every_n_tokens": 10**8}.get(name, 4)
        # Stored as ints: 1e6 is accepted for 1_000_000, so thresholds and logs stay whole.
        limit = MAX_POINTS_PER_DECADE if name == "points_per_decade" else MAX_COUNT
        setattr(self, name, _positive_int(name, value, example, limit))
        if self.points_per_decade is None and self.start_tokens is not None:
            raise ValueError(
                f"`start_tokens={self.start_tokens!r}` only applies to `points_per_decade`."
                " Drop it, or use points_per_decade for log-spaced snapshots."
            )
        if self.points_per_decade is not None:
            if self.start_tokens is None:
                self.start_tokens = DEFAULT_START_TOKENS
            self.start_tokens = _positive_int("start_tokens", self.start_tokens, 10**6)

    def threshold(self, index: int) -> float:
        """The token count at which log-spaced or every-N-tokens snapshot ``index`` is due."""
        if self.every_n_tokens is not None:
            return float(self.every_n_tokens * (index + 1))
        assert self.points_per_decade is not None and self.start_tokens is not None
        # Rounded so that exact decades (1e6, 1e7, ...) are hit despite float error.
        return float(round(self.start_tokens * 10 ** (index / self.points_per_decade), 6))

    def due(self, step: int, tokens: int) -> bool:
        """Whether a snapshot is due now; advances past every threshold already reached.

        The work is bounded whatever the settings and however far ``tokens`` jumped
        (a resume with a large ``token_offset``): the next index is computed, then
        corrected by at most a few steps for float rounding.
        """
        if self.retake:
            if self._retake_step is None:  # the first step after the interruption
                self._retake_step = step
                if self.every_n_steps is None:
                    self.next_index = max(self.next_index, self._first_index_above(tokens))
                    while tokens >= self.threshold(self.next_index):
                        self.next_index += 1
            if self._retake_step == step:  # asked twice at one step: the same answer
                return True
            self.retake, self._retake_step = False, None
        if self.every_n_steps is not None:
            return step > 0 and step % self.every_n_steps == 0
        if tokens < self.threshold(self.next_index):
            return False
        self.next_index = max(self.next_index + 1, self._first_index_above(tokens))
        while tokens >= self.threshold(self.next_index):  # rounding: a step or two at most
            self.next_index += 1
        return True

    def _first_index_above(self, tokens: int) -> int:
        """About the first index whose threshold is above ``tokens`` (exact up to rounding)."""
        if self.every_n_tokens is not None:
            return tokens // self.every_n_tokens
        assert self.points_per_decade is not None and self.start_tokens is not None
        return max(0, math.floor(self.points_per_decade * math.log10(tokens / self.start_tokens)))

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index, "retake": self.retake and self._retake_step is None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_index = int(state.get("next_index", self.next_index))
        self.retake, self._retake_step = bool(state.get("retake", False)), None

    def describe(self) -> str:
        if self.every_n_steps is not None:
            return f"every {self.every_n_steps} steps"
        if self.every_n_tokens is not None:
            return f"every {self.every_n_tokens:,} tokens"
        return f"{self.points_per_decade} per decade of tokens from {self.start_tokens:,}"
