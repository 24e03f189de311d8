"""How the engine agrees on a probe's failure across ranks, whatever the probe does.

A probe that raises on some ranks only would leave the others waiting in its
next collective. The engine therefore guards every collective a probe makes
through its context: before each one, every rank adds a tiny *state*
``[failed, done, cut]``. A rank whose probe raised goes straight to the end of
the probe, where it adds ``[1, 1, 0]`` until every rank is done; a healthy rank
sees ``failed > 0`` (or ``done > 0``: another rank left early) at its next
guarded collective, raises :class:`ProbeFailure` (it is *cut* off), and reaches
the end too. At the end, every rank adds ``[failed, 1, cut]`` until ``done``
equals the world size, so all of them leave on the same call and know how many
ranks failed, and whether any was cut off (then the ranks' partial results may
differ, and none is kept).

Cost: one 3-element all-reduce before each of the probe's collectives and one
at its end; nothing at all in one process. Only when some rank failed, every rank
also gathers each rank's error text (one ``all_gather_object``), so rank 0, which
alone logs, can say what went wrong on the rank that failed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from lightning_overtrain.engine.contract import ProbeFailure

#: The longest error text each rank sends (a traceback's first line is enough).
ERROR_MAX_CHARS = 500

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


class Agreement:
    """The guard of one probe's collectives on one rank (see the module docstring).

    Args:
        reduce_sum: the real sum across ranks, in place.
        world_size: the number of ranks (> 1).
        device: where the state tensor lives (the collective's device).

    Example::

        agreement = Agreement(all_reduce_sum, world_size, device)
        ctx.reduce_sum = agreement.reduce_sum
        failed_here = False
        try:
            result = probe.run(ctx)
        except Exception:
            failed_here = True
        failed_ranks, cut_ranks = agreement.finish(failed_here)  # every rank, always
    """

    def __init__(self, reduce_sum: ReduceSum, world_size: int, device: torch.device) -> None:
        self.inner = reduce_sum
        self.world_size = world_size
        self.device = device
        self._broken: str | None = None  # why this rank stopped communicating
        #: per rank, ``(error text, cut off)`` once a failure was agreed (see :meth:`finish`).
        self.errors: list[tuple[str, bool] | None] = []

    @property
    def cut(self) -> bool:
        """Whether this rank stopped the probe because of another rank."""
        return self._broken is not None

    def _state(self, failed: bool, done: bool) -> tuple[int, int, int]:
        flags = [float(failed), float(done), float(self._broken is not None)]
        state = torch.tensor(flags, dtype=torch.float64, device=self.device)
        failed_ranks, done_ranks, cut_ranks = self.inner(state).tolist()
        return int(failed_ranks), int(done_ranks), int(cut_ranks)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The probe's sum across ranks, made only once every rank is still in the probe.

        Raises:
            ProbeFailure: if another rank failed or already finished the probe.
        """
        if self._broken is None:
            failed, done, _ = self._state(failed=False, done=False)
            if failed:
                self._broken = f"it failed on {failed} other rank(s)"
            elif done:
                self._broken = (
                    f"{done} rank(s) finished it while this one made another collective; a"
                    " probe must make the same collectives, through its context, on every rank"
                )
        if self._broken is not None:
            raise ProbeFailure(f"not summed across ranks: {self._broken}")
        return self.inner(tensor)

    def finish(self, failed: bool, error: BaseException | None = None) -> tuple[int, int]:
        """Make state collectives until every rank has finished the probe.

        Args:
            failed: whether the probe raised on this rank.
            error: its error, whose text the other ranks get (see :meth:`other_errors`).

        Returns:
            ``(failed ranks, ranks cut off by another's failure)``, the same on every rank.
        """
        failed = failed or self._broken is not None
        while True:
            failed_ranks, done_ranks, cut_ranks = self._state(failed, done=True)
            if done_ranks == self.world_size:
                if failed_ranks:  # every rank knows it: all of them make this gather
                    self.errors = gather_errors(error if failed else None, self.cut)
                return failed_ranks, cut_ranks

    def other_errors(self) -> str:
        """The other ranks' own errors, e.g. ``" (rank 1: RuntimeError: out of memory)"``.

        Empty when none failed by itself or the texts could not be gathered.
        """
        return describe_other_errors(self.errors)


def describe_other_errors(errors: list[tuple[str, bool] | None]) -> str:
    """The other ranks' own errors in ``errors`` (from :func:`gather_errors`), as
    ``" (rank 1: RuntimeError: ...)"``; empty when there are none."""
    here = dist.get_rank() if dist.is_available() and dist.is_initialized() else -1
    texts = [
        f"rank {rank}: {entry[0]}"
        for rank, entry in enumerate(errors)
        if entry is not None and not entry[1] and rank != here
    ]
    return f" ({'; '.join(texts)})" if texts else ""


def gather_errors(error: BaseException | None, cut: bool) -> list[tuple[str, bool] | None]:
    """Every rank's error text and whether it was cut off (None: no error); a collective.

    Returns an empty list outside an initialized process group (nothing to gather).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    text = None
    if error is not None:
        text = (f"{type(error).__name__}: {error}"[:ERROR_MAX_CHARS], cut)
    gathered: list[tuple[str, bool] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, text)
    return gathered
