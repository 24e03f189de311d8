"""The fine-tune probe (Springer et al. 2025, section 3.4), and data-parallel training steps.

At each snapshot the probe fine-tunes the borrowed model for a fixed budget (the
same batches in the same order, the same steps, lr and optimizer settings every
time) on a downstream dataset unlike the pretraining text, then measures:

* **forgetting** ``L(theta_ft) - L(theta_T)`` on the monitor's reference set
  (the paper: at a fixed lr it rises with the tokens ``T``);
* the post-fine-tune reference loss ``L(theta_ft)`` (U-shaped in ``T``);
* **adaptation**: the held-out downstream loss before and after, and optionally
  a user metric.

:func:`train_steps` is the training loop shared with the cooldown branch: under
DDP every global batch is split across ranks by rows and the gradients are
summed token-weighted, so 2 processes follow 1 process on the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_overtrain import keys
from lightning_overtrain.checks import (
    check_callable,
    check_int,
    check_name,
    check_optional_int,
    check_positive_numbers,
)
from lightning_overtrain.engine.backup import borrowed
from lightning_overtrain.engine.collectives import rank as global_rank
from lightning_overtrain.engine.contract import Probe, ProbeContext, ProbeFailure
from lightning_overtrain.engine.data import (
    ShardedBatches,
    check_batches_argument,
    shard_batches,
    split_for_rank,
    take_batches,
)
from lightning_overtrain.engine.losses import LossFn, check_loss, loss_sums
from lightning_overtrain.engine.rng import seeded_rng
from lightning_overtrain.engine.sharding import any_sharded
from lightning_overtrain.engine.tokens import TokensFn, checked_token_count, count_tokens
from lightning_overtrain.engine.train_loop import grad_scaler, train_steps
from lightning_overtrain.keys import Signal

OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
MetricInputs = Callable[[nn.Module, Any], tuple[Any, ...]]
Data = Iterable[Any] | Callable[[], Iterable[Any]]


def adamw(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The default fine-tune optimizer: ``torch.optim.AdamW(params, lr=lr)``.

    Its state is two parameter-sized tensors (the moments), allocated at the
    first step and freed after each lr.
    """
    return torch.optim.AdamW(params, lr=lr)


def sgd(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """A lighter fine-tune optimizer: plain ``torch.optim.SGD`` with no state at all.

    Pass ``optimizer=sgd`` where memory is tight: the probe's extra memory drops
    from about 4 x parameters (backup, gradients, AdamW's two moments) to about
    2 x (backup and gradients). The numbers differ from AdamW's, so keep the
    choice fixed for the run.
    """
    return torch.optim.SGD(params, lr=lr)


def next_token_inputs(module: nn.Module, batch: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(logits[:, :-1], labels[:, 1:])``: what a torchmetrics metric of next tokens takes.

    Fits e.g. ``torchmetrics.text.Perplexity(ignore_index=-100)``. Labels default to
    ``input_ids``, masked to -100 where ``attention_mask`` is 0.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = module(**inputs).logits
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            labels = labels.masked_fill(mask == 0, -100)
    return logits[:, :-1], labels[:, 1:]


def _is_torchmetric(metric: Any) -> bool:
    return all(callable(getattr(metric, a, None)) for a in ("update", "compute", "reset"))


def _structure(batch: Any) -> Any:
    return sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__


def tuned_lr(results: Mapping[float, Mapping[str, float]]) -> dict[str, float]:
    """The fine-tune with the lr tuned for the downstream task (the paper's Figure 5 view).

    Of the learning rates measured at one snapshot, the one with the lowest held-out
    downstream loss after fine-tuning wins (the smaller lr on a tie); reported are that
    loss, the lr itself and the pretraining reference loss at that lr.

    Args:
        results: ``{lr: {"downstream_loss": ..., "reference_loss": ...}}`` after fine-tuning.

    Returns:
        ``{"downstream_loss_after", "lr", "reference_loss_after"}``.

    Raises:
        ValueError: if ``results`` is empty.

    Example::

        >>> tuned_lr({1e-4: {"downstream_loss": 2.0, "reference_loss": 1.5},
        ...           1e-3: {"downstream_loss": 1.8, "reference_loss": 1.9}})["lr"]
        0.001
    """
    if not results:
        raise ValueError("`results` is empty: no learning rate was measured.")
    lr = min(results, key=lambda r: (results[r]["downstream_loss"], r))
    return {
        "downstream_loss_after": results[lr]["downstream_loss"],
        "lr": lr,
        "reference_loss_after": results[lr]["reference_loss"],
    }


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
      (the winner) and ``finetune/tuned/reference_loss_after`` (at that lr).

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
        if metric is not None and not (_is_torchmetric(metric) or callable(metric)):
            raise ValueError(
                f"`metric` must be a torchmetrics Metric or a callable (module, batch) -> float,"
                f" got {type(metric).__name__}."
            )
        check_optional_int("eval_batches", eval_batches, 1, "", integral_floats=False)
        check_int("seed", seed, 0, "Pass e.g. seed=0.", integral_floats=False)
        check_name("name", name, "Pass e.g. name='finetune'.")
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
        self._eval: list[Any] = []
        self._eval_weights: list[int] = []

    def config(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "lrs": list(self.lrs),
            "optimizer": getattr(self.optimizer, "__name__", repr(self.optimizer)),
            "metric": None if self.metric is None else type(self.metric).__name__,
            "train_batches": len(self._train) if self._train is not None else None,
            "eval_batches": self.eval_batches,
            "seed": self.seed,
        }

    def signals(self) -> list[Signal]:
        """Per lr, under this probe's ``name``: forgetting, and the reference loss after
        (U-shaped, ``reference_loss + forgetting``) and downstream loss after (U-shaped)."""
        return keys.finetune_signals(self.lrs, self.name)

    def validate(self, ctx: ProbeContext) -> None:
        rank, size, loss_fn = global_rank(), ctx.world_size, self._loss_fn(ctx)
        # Seeded: a shuffling DataLoader gives the same batches on every rank and every fit.
        train = take_batches(self.train_data, self.steps, "train_data", seed=self.seed)
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
        local, self._eval_weights = split_for_rank(held_out, weights, rank, size, even)
        self._eval = [move_data_to_device(b, ctx.device) for b in local]
        first_train = move_data_to_device(train[0], ctx.device)
        first_eval = move_data_to_device(held_out[0], ctx.device)
        check_loss(ctx.module, ctx.backup, first_train, loss_fn, "train_data")
        check_loss(ctx.module, ctx.backup, first_eval, loss_fn, "eval_data")
        self._check_optimizer(ctx)
        if self.metric is not None:
            self._check_metric(ctx, first_eval)

    def run(self, ctx: ProbeContext) -> dict[str, float]:
        if self._train is None:
            raise RuntimeError("FineTuneProbe.run before validate(): call probe.validate(ctx).")
        key = partial(keys.finetune_key, probe=self.name)
        before = self._evaluate(ctx, reference=False)
        record = {key(None, f"{q}_before"): v for q, v in before.items()}
        failures, results = [], {}
        for lr in self.lrs:
            try:
                self._fine_tune(ctx, lr)
                after = self._evaluate(ctx, reference=True)
            except ProbeFailure as exc:
                failures.append(f"lr={lr:g}: {exc}")
                continue
            results[lr] = dict(after)
            ref_after = after.pop("reference_loss")
            record[key(lr, "forgetting")] = ref_after - ctx.reference_loss
            record[key(lr, "reference_loss_after")] = ref_after
            record.update({key(lr, f"{q}_after"): v for q, v in after.items()})
            record[key(lr, "adaptation")] = before["downstream_loss"] - after["downstream_loss"]
        if results:
            tuned = tuned_lr(results)
            record.update({keys.finetune_tuned_key(q, self.name): v for q, v in tuned.items()})
        if failures:
            raise ProbeFailure("; ".join(failures), partial=record)
        return record

    # ------------------------------------------------------------------ steps
    def _loss_fn(self, ctx: ProbeContext) -> LossFn:
        return self.loss_fn or ctx.loss_fn

    def _fine_tune(self, ctx: ProbeContext, lr: float) -> None:
        assert self._train is not None
        ctx.backup.restore()  # every lr fine-tunes the live weights (the engine restores after)
        params = [p for p in ctx.backup.params if p.requires_grad]
        try:
            optimizer = self.optimizer(params, lr)
            ctx.module.train()
            with torch.enable_grad(), seeded_rng(self.seed):
                train_steps(
                    ctx.module,
                    optimizer,
                    self._train,
                    self.steps,
                    self._loss_fn(ctx),
                    forward_context=ctx.forward_context,
                    reduce_sum=ctx.reduce_sum,
                    world_size=ctx.world_size,
                    label=f"the fine-tune at lr={lr:g}",
                    sharded=any_sharded(params),
                    scaler=grad_scaler(ctx),
                )
        finally:
            # Free the fine-tune's gradients before measuring (its optimizer goes on return).
            for param in params:
                param.grad = None
            ctx.module.eval()

    def _evaluate(self, ctx: ProbeContext, reference: bool) -> dict[str, float]:
        """Losses (and the metric) of the current weights."""
        callable_metric = self.metric is not None and not _is_torchmetric(self.metric)
        size = 2 * (reference + 1 + callable_metric)

        def local() -> torch.Tensor:
            loss_fn = self._loss_fn(ctx)
            parts = [ctx.local_loss_sums()] if reference else []
            parts.append(
                loss_sums(ctx.module, self._eval, self._eval_weights, loss_fn, ctx.forward_context)
            )
            if callable_metric:
                parts.append(self._metric_sums(ctx))
            elif self.metric is not None:
                self.metric.reset()
                for batch, weight in zip(self._eval, self._eval_weights):
                    with ctx.forward_context():
                        inputs = self.metric_inputs(ctx.module, batch)
                    if weight:  # a weight-0 batch only keeps a sharded model's passes even
                        self.metric.update(*inputs)
            return torch.cat(parts)

        sums = ctx.reduce_or_fail(local, (size,)).tolist()
        values = [sums[i] / sums[i + 1] for i in range(0, size, 2)]
        names = ["reference_loss"] * reference + ["downstream_loss"] + ["metric"] * callable_metric
        out = dict(zip(names, values))
        if self.metric is not None and not callable_metric:
            try:  # every rank got here: the metric's own cross-rank sync cannot hang
                out["metric"] = float(self.metric.compute())
            except Exception as exc:
                raise ProbeFailure(
                    f"`metric.compute()` failed: {type(exc).__name__}: {exc}"
                ) from exc
        bad = {k: v for k, v in out.items() if not math.isfinite(v)}
        if bad:
            raise ProbeFailure(f"non-finite {bad}")
        return out

    def _metric_sums(self, ctx: ProbeContext) -> torch.Tensor:
        total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for batch, weight in zip(self._eval, self._eval_weights):
            with ctx.forward_context():
                value = self.metric(ctx.module, batch)
            total[0] += torch.as_tensor(value, dtype=torch.float64).to(ctx.device) * weight
            total[1] += weight
        return total

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

    def _check_metric(self, ctx: ProbeContext, batch: Any) -> None:
        metric = self.metric
        try:
            with borrowed(ctx.module, ctx.backup), torch.no_grad(), ctx.forward_context():
                if _is_torchmetric(metric):
                    metric.to(ctx.device)
                    metric.reset()
                    metric.update(*self.metric_inputs(ctx.module, batch))
                    # compute() syncs across ranks: only a single process may call it here.
                    value = metric.compute() if ctx.world_size == 1 else 0.0
                    metric.reset()
                else:
                    value = metric(ctx.module, batch)
            value = float(value)
        except Exception as exc:
            raise ValueError(
                f"`metric` failed on the first `eval_data` batch: {type(exc).__name__}: {exc}."
                " A torchmetrics Metric is updated with `metric_inputs(module, batch)` (default"
                " next-token logits and labels); a callable is called as metric(module, batch)"
                " and must return a number."
            ) from exc
        if not math.isfinite(value):
            raise ValueError(f"`metric` returned {value} on the first `eval_data` batch.")
