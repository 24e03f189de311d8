"""The reproduction's snapshots: a cooled branch at each snapshot, noise kept per direction.

Why a cooldown branch per snapshot rather than the monitor's ``cooldown_steps``: the
paper anneals every token budget to zero lr, and a branch proportional to the tokens
so far (10%) keeps every snapshot equally annealed; the monitor's branch has a fixed
length. The branch itself is the monitor's :class:`CooldownBranch`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_overtrain import NoiseProbe, ProbeContext, keys
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.init_std import init_std_from_weights
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.engine.snapshot import measure_snapshot
from lightning_overtrain.history import Record, write_history
from lightning_overtrain.probes.cooldown import CooldownBranch
from lightning_overtrain.probes.noise import summarize_noise


def direction_key(gamma: float, direction: int) -> str:
    """``directions/gamma=<gamma>/<k>``: the perturbed loss along one antithetic pair."""
    return f"directions/gamma={keys.number(gamma)}/{direction}"


class DirectionNoiseProbe(NoiseProbe):
    """The noise probe, one antithetic pair at a time, each pair's value recorded too.

    It records the :class:`NoiseProbe` keys (``noise/gamma=<g>/...``, from the same
    summary) plus the perturbed loss along each direction (:func:`direction_key`), so an
    analysis can resample directions. Direction ``k`` is the one a ``NoiseProbe`` with
    ``pairs=1`` and seed ``1000 * seed + k`` draws: independent of the others, and the
    same at every snapshot (common random numbers).

    Args:
        gammas: noise magnitudes.
        pairs: directions (antithetic pairs).
        seed: this run's seed.
    """

    def __init__(self, gammas: Sequence[float], pairs: int, seed: int) -> None:
        super().__init__(gammas=gammas, pairs=pairs, seed=seed)
        self.directions = [NoiseProbe(gammas, pairs=1, seed=1000 * seed + k) for k in range(pairs)]

    def run(self, ctx: ProbeContext) -> dict[str, float]:
        record: dict[str, float] = {}
        per_direction = []
        for k, probe in enumerate(self.directions):
            values = probe.run(ctx)
            ctx.backup.restore()  # each direction starts from the unperturbed weights
            per_direction.append([values[keys.noise_key(g, "perturbed_loss")] for g in self.gammas])
            for g in self.gammas:
                record[direction_key(g, k)] = values[keys.noise_key(g, "perturbed_loss")]
        for gi, gamma in enumerate(self.gammas):
            # Each value is already the mean of +eps and -eps: pass it as both.
            pair_means = [row[gi] for row in per_direction]
            summary = summarize_noise(ctx.reference_loss, pair_means, pair_means)
            record.update({keys.noise_key(gamma, q): v for q, v in summary.items()})
        return record


class CooledSnapshots(pl.Callback):
    """At each snapshot step: anneal a branch, probe it, put the live run back.

    Args:
        steps: the optimizer steps to probe at.
        tokens_per_step: tokens in one optimizer step.
        cooldown_fraction: branch length, as a fraction of the steps so far.
        reference: held-out pretraining batches, the same at every snapshot.
        cooldown_batches: pretraining batches the branches train on, the same each time.
        probes: run on the cooled branch.
        out: where this run's ``history.jsonl`` goes (rewritten after every snapshot).
        seed: seeds the branch's data order.
        on_snapshot: called with the history after every snapshot.
    """

    def __init__(
        self,
        steps: Sequence[int],
        tokens_per_step: int,
        cooldown_fraction: float,
        reference: list[Any],
        cooldown_batches: list[Any],
        probes: list[Any],
        out: str,
        seed: int,
        on_snapshot: Callable[[list[Record]], None] = lambda history: None,
    ) -> None:
        self.steps, self.tokens_per_step, self.seed = set(steps), tokens_per_step, seed
        self.cooldown_fraction = cooldown_fraction
        self.reference, self.cooldown_batches = reference, cooldown_batches
        self.probes, self.out, self.on_snapshot = probes, out, on_snapshot
        self.history: list[Record] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The monitor's defaults: init std measured from the weights at step 0.
        self.backup = ModelBackup(pl_module)
        self.optimizer = trainer.optimizers[0]  # the sharpness probe's update direction
        stds = init_std_from_weights(pl_module)
        self.sigmas = [stds[name] for name in self.backup.names]
        self.weights = [int(b["input_ids"].numel()) for b in self.reference]
        for probe in self.probes:
            probe.validate(self._context(pl_module))

    def _context(self, pl_module: pl.LightningModule) -> ProbeContext:
        return ProbeContext(
            module=pl_module,
            backup=self.backup,
            sigmas=self.sigmas,
            batches=self.reference,
            weights=self.weights,
            loss_fn=transformers_loss,
            extras={"optimizer": self.optimizer},
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps:
            return
        start = time.perf_counter()
        length = max(1, round(self.cooldown_fraction * step))
        branch = CooldownBranch(pl_module, self.cooldown_batches, steps=length, seed=self.seed)
        optimizer = trainer.optimizers[0]

        def failed(what: str, exc: Exception) -> None:
            raise RuntimeError(f"the {what} probe failed at step {step}") from exc

        record: Record = {keys.TOKENS: step * self.tokens_per_step, keys.STEP: step}
        record.update(
            measure_snapshot(
                self._context(pl_module),
                self.probes,
                failed,
                cooldown=lambda ctx: branch.branch(ctx, optimizer),
            )
        )
        record[keys.PROBE_SECONDS] = time.perf_counter() - start
        self.history.append(record)
        write_history(self.history, self.out)
        self.on_snapshot(self.history)
        tuned = record.get(keys.finetune_tuned_key("downstream_loss_after"), float("nan"))
        print(
            f"  seed {self.seed}  {record[keys.TOKENS]:>11,} tokens  cooled loss"
            f" {record[keys.REFERENCE_LOSS]:.4f}  perturbed (gamma=1)"
            f" {record.get(keys.noise_key(1.0, 'perturbed_loss'), float('nan')):.4f}"
            f"  tuned downstream {tuned:.4f}  [{record[keys.PROBE_SECONDS]:.0f}s]",
            flush=True,
        )
