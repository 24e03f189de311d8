"""The fine-tune probe (Springer et al. 2025, section 3.4).

At each snapshot the probe fine-tunes the borrowed model for a fixed budget (the
same batches in the same order, the same steps, lr and optimizer settings every
time) on a downstream dataset unlike the pretraining text, then measures:

* **forgetting** ``L(theta_ft) - L(theta_T)`` on the monitor's reference set
  (the paper: at a fixed lr it rises with the tokens ``T``);
* the post-fine-tune reference loss ``L(theta_ft)`` (U-shaped in ``T``);
* **adaptation**: the held-out downstream loss before and after, and optionally
  a user metric;
* optionally, the forgetting at a **matched** downstream loss, and the steps the
  fine-tune took to reach it (:mod:`lightning_overtrain.probes.matched`).

The held-out split and its metric live in :mod:`lightning_overtrain.probes.downstream`;
the training loop, shared with the cooldown branch, in
:func:`lightning_overtrain.engine.train_loop.train_steps`: under DDP every global
batch is split across ranks by rows and the gradients are summed token-weighted,
so 2 processes follow 1 process on the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_overtrain import keys
from lightning_overtrain.checks import (
    check_callable,
    check_int,
    check_name,
    check_optional_int,
    check_positive_numbers,
)
from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.engine.data import (
    ShardedBatches,
    check_batches_argument,
    shard_batches,
    split_for_rank,
    take_batches,
)
from lightning_overtrain.engine.losses import LossFn, check_loss
from lightning_overtrain.engine.rng import seeded_rng
from lightning_overtrain.engine.sharding import any_sharded
from lightning_overtrain.engine.tokens import TokensFn, checked_token_count, count_tokens
from lightning_overtrain.engine.train_loop import grad_scaler, train_steps
from lightning_overtrain.keys import Signal
from lightning_overtrain.probes.downstream import (
    HeldOut,
    MetricInputs,
    is_torchmetric,
    next_token_inputs,
)
from lightning_overtrain.probes.matched import FineTuneWatch, matched_signals
from lightning_overtrain.probes.optimizers import OptimizerFactory, adamw, sgd
from lightning_overtrain.probes.tuned import tuned_lr

__all__ = ["FineTuneProbe", "adamw", "next_token_inputs", "sgd", "tuned_lr"]

Data = Iterable[Any] | Callable[[], Iterable[Any]]


def _structure(batch: Any) -> Any:
    return sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__


class FineTuneProbe(Probe):
    """Forgetting and adaptation after a short, fixed fine-tune, per learning rate.

    At every snapshot, for each lr: fine-tune the borrowed model for ``steps``
    optimizer steps on ``train_data`` (the same batches, in the same order, with a
    fresh optimizer from ``optimizer``), measure, and put the weights back. Logged,
    with ``finetune`` the probe's ``name``:

    * ``finetune/downstream_loss_before`` (and ``finetune/metric_before``): the
      held-out downstream loss of the snapshot itself;
    * ``finetune/lr=<lr>/forgetting``: ``L(theta_ft) - L(theta_T)`` on the reference set;
    * ``finetune/lr=<lr>/reference_loss_after``: ``L(theta_ft)``;
    * ``finetune/lr=<lr>/downstream_loss_after`` (and ``/metric_after``), and
      ``/adaptation``: ``downstream_loss_before - downstream_loss_after``;
    * the lr tuned per snapshot (:func:`tuned_lr`, over the lrs that ran):
      ``finetune/tuned/downstream_loss_after`` (the best), ``finetune/tuned/lr``
      (the winner) and ``finetune/tuned/reference_loss_after`` (at that lr);
    * with ``matched_loss``, per lr, the forgetting where the held-out downstream loss
      first reaches it (:mod:`~lightning_overtrain.probes.matched`):
      ``finetune/lr=<lr>/matched_forgetting``, ``/matched_steps`` (optimizer steps it
      took; 0 when the snapshot is already there) and ``/matched_reached`` (1, or 0
      with no forgetting or steps logged when ``matched_max_steps`` ran out).

    Memory beyond training's, in parameter sizes (this rank's shard under FSDP2):
    the monitor's backup (1, or 0 on the accelerator with ``backup_device="cpu"``),
    the fine-tune's gradients (1) and the probe optimizer's state, freed after each
    lr: AdamW (default) 2, SGD with momentum 1, :func:`sgd` 0. Measured by
    ``benchmarks/memory.py``. The training gradients are set aside, not copied.
    To keep it all off the training accelerators, probe the run's checkpoints from
    another process (``lightning-overtrain probe``). Under DDP it fine-tunes data-parallel:
    pass the same global batches on every rank (a list, or a DataLoader without a
    DistributedSampler); each batch is split across ranks by rows and gradients
    are summed token-weighted, so 2 processes match 1 (dropout aside).

    Args:
        train_data: downstream training batches (a DataLoader, a list, or a callable
            returning either); the first ``steps`` are taken once, before training,
            and cycled if fewer.
        eval_data: held-out downstream batches, taken once.
        steps: optimizer steps per fine-tune; >= 1.
        lrs: one or more learning rates; each > 0.
        optimizer: ``optimizer(params, lr) -> torch.optim.Optimizer``, called afresh for
            every lr at every snapshot; default AdamW with torch's defaults.
        metric: optional, on ``eval_data``: a torchmetrics ``Metric`` (updated with
            ``metric_inputs(module, batch)``, reset before use) or a callable
            ``metric(module, batch) -> float`` averaged token-weighted over batches.
        metric_inputs: the arguments of ``metric.update``; default
            :func:`next_token_inputs` (``logits[:, :-1], labels[:, 1:]``).
        eval_batches: take at most this many held-out batches.
        loss_fn: ``loss_fn(module, batch) -> scalar mean loss`` for downstream batches;
            default the monitor's.
        tokens_fn: ``tokens_fn(batch) -> int``, the weight of each batch; default
            counts ``attention_mask`` or ``input_ids``.
        seed: seeds dropout (and any global-RNG draw) during each fine-tune, the
            same at every snapshot; the training RNG is left untouched.
        name: the metric prefix, so two fine-tune probes (e.g. two datasets) coexist.
        matched_loss: the held-out downstream loss at which forgetting is also compared
            (the same at every snapshot, so it is a task-specific number: e.g. the
            ``downstream_loss_after`` an early snapshot reaches in ``steps``); None
            (default): no matched view. Each lr's fine-tune then runs on past ``steps``
            while needed, with one pass over the held-out split after every step.
        matched_max_steps: the step cap of the matched view; default ``4 * steps``.

    Raises:
        ValueError: on bad arguments; before training, on empty downstream data,
            batches the loss or the metric cannot take, train and held-out batches
            of different shapes, or an optimizer factory that does not return one.

    Example::

        probe = FineTuneProbe(
            train_data=prose_batches[:100],
            eval_data=prose_batches[100:108],
            steps=100,
            lrs=(1e-4, 1e-3),
        )
        monitor = OvertrainingMonitor(val_batches, points_per_decade=4, probes=[probe])
    """

    def __init__(
        self,
        train_data: Data,
        eval_data: Data,
        *,
        steps: int = 100,
        lrs: float | Sequence[float] = (1e-4, 1e-3),
        optimizer: OptimizerFactory | None = None,
        metric: Any = None,
        metric_inputs: MetricInputs | None = None,
        eval_batches: int | None = None,
        loss_fn: LossFn | None = None,
        tokens_fn: TokensFn | None = None,
        seed: int = 0,
        name: str = "finetune",
        matched_loss: float | None = None,
        matched_max_steps: int | None = None,
    ) -> None:
        check_batches_argument(
            train_data, "train_data", "downstream batches, e.g. train_data=prose_loader"
        )
        check_batches_argument(
            eval_data, "eval_data", "held-out downstream batches, e.g. eval_data=prose_eval_loader"
        )
        fix = "Pass the fine-tune budget in optimizer steps, e.g. steps=100."
        check_int("steps", steps, 1, fix, integral_floats=False)
        lrs = check_positive_numbers(
            "lrs", lrs, "one or more learning rates > 0", "Pass e.g. lrs=(1e-4, 1e-3)."
        )
        lr_keys = [keys.lr_key(lr) for lr in lrs]
        if len(set(lr_keys)) != len(lr_keys):
            raise ValueError(
                f"`lrs` must give distinct keys, got {tuple(lrs)!r} -> {lr_keys}. Pass"
                " learning rates that differ in their first 6 significant digits."
            )
        for argument, fn in (
            ("optimizer", optimizer),
            ("metric_inputs", metric_inputs),
            ("loss_fn", loss_fn),
            ("tokens_fn", tokens_fn),
        ):
            check_callable(argument, fn)
        if metric is not None and not (is_torchmetric(metric) or callable(metric)):
            raise ValueError(
                f"`metric` must be a torchmetrics Metric or a callable (module, batch) -> float,"
                f" got {type(metric).__name__}."
            )
        check_optional_int("eval_batches", eval_batches, 1, "", integral_floats=False)
        check_int("seed", seed, 0, "Pass e.g. seed=0.", integral_floats=False)
        check_name("name", name, "Pass e.g. name='finetune'.")
        if matched_loss is not None:
            (matched_loss,) = check_positive_numbers(
                "matched_loss", matched_loss, "a downstream loss > 0 or None",
                "Pass the held-out downstream loss to compare at, e.g. matched_loss=2.5.",
            )  # fmt: skip
        self.matched_max_steps = (
            4 * steps
            if matched_max_steps is None
            else check_int("matched_max_steps", matched_max_steps, 1, "Pass e.g. 400.")
        )
        self.matched_loss = matched_loss
        self.train_data = train_data
        self.eval_data = eval_data
        self.steps = steps
        self.lrs = tuple(float(lr) for lr in lrs)
        self.optimizer: OptimizerFactory = optimizer or adamw
        self.metric = metric
        self.metric_inputs: MetricInputs = metric_inputs or next_token_inputs
        self.eval_batches = eval_batches
        self.loss_fn = loss_fn
        self.tokens_fn: TokensFn = tokens_fn or count_tokens
        self.seed = seed
        self.name = name
        # Taken in validate(), once per fit: the same data at every snapshot.
        self._train: ShardedBatches | None = None
        self._held_out = HeldOut(metric=self.metric, metric_inputs=self.metric_inputs)

    def config(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "lrs": list(self.lrs),
            "optimizer": getattr(self.optimizer, "__name__", repr(self.optimizer)),
            "metric": None if self.metric is None else type(self.metric).__name__,
            "train_batches": len(self._train) if self._train is not None else None,
            "eval_batches": self.eval_batches,
            "seed": self.seed,
            "matched_loss": self.matched_loss,
            "matched_max_steps": self.matched_max_steps if self.matched_loss is not None else None,
        }

    def signals(self) -> list[Signal]:
        """Per lr, under this probe's ``name``: forgetting, and the reference loss after
        (U-shaped, ``reference_loss + forgetting``) and downstream loss after (U-shaped);
        with ``matched_loss``, the matched forgetting and its steps (not U-shaped: see
        :func:`~lightning_overtrain.probes.matched.matched_signals`)."""
        declared = keys.finetune_signals(self.lrs, self.name)
        if self.matched_loss is None:
            return declared
        return declared + matched_signals(self.lrs, self.name, declared[0].title)

    def validate(self, ctx: ProbeContext) -> None:
        rank, size, loss_fn = ctx.rank, ctx.world_size, self._loss_fn(ctx)
        # Seeded: a shuffling DataLoader gives the same batches on every rank and every fit.
        train = take_batches(self.train_data, self._total_steps, "train_data", seed=self.seed)
        held_out = take_batches(self.eval_data, self.eval_batches, "eval_data", seed=self.seed)
        if _structure(train[0]) != _structure(held_out[0]):
            raise ValueError(
                f"`train_data` and `eval_data` batches differ: {_structure(train[0])} vs"
                f" {_structure(held_out[0])}. Pass the same kind of batches for both splits."
            )
        # Sharded (FSDP2): every rank must run every pass, so no rank's share is empty.
        even = any_sharded(ctx.backup.params)
        self._train = shard_batches(
            train, rank, size, self.tokens_fn, ctx.device, "train_data", even=even
        )
        weights = [checked_token_count(self.tokens_fn, b) for b in held_out]
        if sum(weights) == 0:
            raise ValueError(
                "`eval_data` holds 0 tokens according to `tokens_fn`. Check its batches'"
                " `input_ids`/`attention_mask`, or pass `tokens_fn`."
            )
        local, local_weights = split_for_rank(held_out, weights, rank, size, even)
        self._held_out = HeldOut(
            [move_data_to_device(b, ctx.device) for b in local],
            local_weights,
            self.metric,
            self.metric_inputs,
        )
        first_train = move_data_to_device(train[0], ctx.device)
        first_eval = move_data_to_device(held_out[0], ctx.device)
        check_loss(ctx.module, ctx.backup, first_train, loss_fn, "train_data")
        check_loss(ctx.module, ctx.backup, first_eval, loss_fn, "eval_data")
        self._check_optimizer(ctx)
        if self.metric is not None:
            self._held_out.check_metric(ctx, first_eval)

    def run(self, ctx: ProbeContext) -> dict[str, float]:
        if self._train is None:
            raise RuntimeError("FineTuneProbe.run before validate(): call probe.validate(ctx).")
        key = partial(keys.finetune_key, probe=self.name)
        before = self._held_out.evaluate(ctx, self._loss_fn(ctx), reference=False)
        record = {key(None, f"{q}_before"): v for q, v in before.items()}
        failures, results = [], {}
        for lr in self.lrs:
            try:
                watch = self._fine_tune(ctx, lr, before["downstream_loss"])
            except ProbeFailure as exc:
                failures.append(f"lr={lr:g}: {exc}")
                continue
            assert watch.fixed is not None  # measured at the budget's last step
            after = dict(watch.fixed)
            results[lr] = dict(after)
            ref_after = after.pop("reference_loss")
            record[key(lr, "forgetting")] = ref_after - ctx.reference_loss
            record[key(lr, "reference_loss_after")] = ref_after
            record.update({key(lr, f"{q}_after"): v for q, v in after.items()})
            record[key(lr, "adaptation")] = before["downstream_loss"] - after["downstream_loss"]
            record.update(watch.record(lr, self.name))
        if results:
            tuned = tuned_lr(results)
            record.update({keys.finetune_tuned_key(q, self.name): v for q, v in tuned.items()})
        if failures:
            raise ProbeFailure("; ".join(failures), partial=record)
        return record

    # ------------------------------------------------------------------ steps
    @property
    def _total_steps(self) -> int:
        """Batches to take: the budget's, or the matched view's cap when it is larger."""
        return self.steps if self.matched_loss is None else max(self.steps, self.matched_max_steps)

    def _loss_fn(self, ctx: ProbeContext) -> LossFn:
        return self.loss_fn or ctx.loss_fn

    def _fine_tune(self, ctx: ProbeContext, lr: float, before: float) -> FineTuneWatch:
        """Fine-tune at ``lr`` from the live weights; measured along the way by the watch."""
        assert self._train is not None
        ctx.backup.restore()  # every lr fine-tunes the live weights (the engine restores after)
        params = [p for p in ctx.backup.params if p.requires_grad]
        loss_fn = self._loss_fn(ctx)
        watch = FineTuneWatch(
            ctx, self._held_out, loss_fn, self.steps, self.matched_loss,
            self.matched_max_steps, before,
        )  # fmt: skip
        try:
            optimizer = self.optimizer(params, lr)
            ctx.module.train()
            with torch.enable_grad(), seeded_rng(self.seed):
                train_steps(
                    ctx.module,
                    optimizer,
                    self._train,
                    watch.total_steps,
                    loss_fn,
                    forward_context=ctx.forward_context,
                    reduce_sum=ctx.reduce_sum,
                    world_size=ctx.world_size,
                    label=f"the fine-tune at lr={lr:g}",
                    sharded=any_sharded(params),
                    scaler=grad_scaler(ctx),
                    after_step=watch,
                )
        finally:
            # Free the fine-tune's gradients (its optimizer goes on return).
            for param in params:
                param.grad = None
            ctx.module.eval()
        return watch

    # ------------------------------------------------------------------ set-up checks
    def _check_optimizer(self, ctx: ProbeContext) -> None:
        params = [p for p in ctx.backup.params if p.requires_grad]
        try:
            optimizer = self.optimizer(params, self.lrs[0])
        except Exception as exc:
            raise ValueError(
                f"`optimizer` failed as optimizer(params, lr={self.lrs[0]:g}):"
                f" {type(exc).__name__}: {exc}. Pass a factory such as"
                " `lambda params, lr: torch.optim.SGD(params, lr)`."
            ) from exc
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"`optimizer(params, lr)` must return a torch.optim.Optimizer, got"
                f" {type(optimizer).__name__}."
            )
