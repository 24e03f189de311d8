"""``HFTrainerMonitor``: the monitor as a Hugging Face ``TrainerCallback``.

Tokens: with ``TrainingArguments(include_num_input_tokens_seen=True)`` (or
``"non_padding"``) the monitor uses the Trainer's own count,
``state.num_input_tokens_seen`` (all ranks); otherwise it counts the batches the
model is trained on (a forward pre-hook, in training mode only, never during a
snapshot). Stop: ``control.should_training_stop``. State: written beside each
Trainer checkpoint (``checkpoint-<step>/overtrain_monitor.pt``) and read back when
``trainer.train(resume_from_checkpoint=...)`` resumes from one under
``args.output_dir``. Logging: through ``Trainer.log`` (so W&B, TensorBoard, ... as
``report_to`` says) when the monitor was added with :meth:`HFTrainerMonitor.attach`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lightning_overtrain.core.fit_setup import default_reporters
from lightning_overtrain.core.host import Host, RunHandle
from lightning_overtrain.core.log import warn
from lightning_overtrain.core.monitor_core import MonitorCore
from lightning_overtrain.engine.collectives import Collectives
from lightning_overtrain.frontends.common import show_core
from lightning_overtrain.reporting.guard import output_failed
from lightning_overtrain.safe_io import write_atomic

#: The monitor's state beside each of the Trainer's checkpoints.
STATE_FILE = "overtrain_monitor.pt"


class TrainerLog:
    """A logger for ``LoggerReporter`` that hands each row to ``Trainer.log``."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.trainer.log(dict(metrics))


@show_core
class HFTrainerMonitor(TrainerCallback):
    """Watch a Hugging Face ``Trainer`` run for catastrophic overtraining.

    Takes the arguments of :class:`~lightning_overtrain.OvertrainingMonitor`;
    ``dirpath`` defaults to ``<args.output_dir>/<prefix>``.

    Raises:
        ValueError: on bad arguments, naming the argument, the value and the fix.

    Example::

        monitor = HFTrainerMonitor(held_out_batches, every_n_steps=100)
        trainer = Trainer(model=model, args=args, train_dataset=train_set)
        monitor.attach(trainer)  # or Trainer(callbacks=[monitor]): no Trainer.log then
        trainer.train()
    """

    def __init__(self, reference_data: Any, **settings: Any) -> None:
        self.core = MonitorCore(reference_data, **settings)
        self.trainer: Any = None
        self._handle = RunHandle()
        self._hook: Any = None
        self._trainer_counts = False

    def attach(self, trainer: Any) -> HFTrainerMonitor:
        """Add this callback to ``trainer`` and log each snapshot through ``trainer.log``."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    @property
    def state_key(self) -> str:
        return self.core.state_key

    @property
    def should_stop(self) -> bool:
        return self.core.stop_requested

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        # Accelerate wraps the optimizer; the probes (cooldown, sharpness) read torch's own.
        optimizer = getattr(optimizer, "optimizer", optimizer)
        scheduler = kwargs.get("lr_scheduler")
        device = next(model.parameters()).device
        collectives = Collectives.from_torch(device)
        resumed = self._load_beside_checkpoint(args, state, collectives)
        core = self.core
        core.set_default_dirpath(os.path.join(args.output_dir, core.prefix))
        core.use_reporters(default_reporters())
        loggers = [TrainerLog(self.trainer)] if self.trainer is not None else []
        self._handle = RunHandle(state.global_step, loggers, collectives.is_global_zero)
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        host = Host(
            module=model,
            collectives=collectives,
            # Accelerate wraps the model's own forward in the run's autocast already.
            optimizers=lambda: [optimizer] if optimizer is not None else [],
            # Read only: the schedule probe steps a copy of it.
            extras={"lr_scheduler": scheduler} if scheduler is not None else {},
            handle=self._handle,
            gradient_clip_val=clip,
            gradient_clip_algorithm="norm" if clip is not None else None,
            device=device,
        )
        core.start(host, step=state.global_step, resumed_from=resumed)
        self._trainer_counts = str(args.include_num_input_tokens_seen) not in ("no", "False")
        if not self._trainer_counts:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # Training forward passes only: not evaluation, not the probes' own passes.
        if module.training and torch.is_grad_enabled() and not self.core.probing:
            self.core.count(kwargs if kwargs else args[0])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if self._trainer_counts:
            due = self.core.set_tokens(state.num_input_tokens_seen, step)
        else:
            due = self.core.end_step(step)
        if due:
            self._handle.global_step = step
            self.core.snapshot(step)
            if self.core.stop_requested:
                control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor_state = self.core.state_dict()  # every rank: the count is summed
        if not self.core.collectives.is_global_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        try:  # a full disk costs this file, never the training run
            os.makedirs(folder, exist_ok=True)
            write_atomic(path, lambda f: torch.save(monitor_state, f), binary=True)
        except Exception as exc:
            self.core.output_failures += 1
            output_failed(f"the monitor's state {path}", exc, self.core.output_failures)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._handle.global_step = state.global_step
        self.core.end()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _load_beside_checkpoint(
        self, args: Any, state: Any, collectives: Collectives
    ) -> str | None:
        """The monitor's state saved with the checkpoint training resumes from, if any."""
        if state.global_step == 0:
            return None
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):  # missing, or not a regular file (a FIFO is never opened)
            warn(
                collectives,
                f"HFTrainerMonitor: training resumes at step {state.global_step} but {path}"
                " is not a regular file, so the monitor starts a new history (in a new"
                " directory). Resume from a checkpoint under `args.output_dir` written while"
                " the monitor was attached.",
            )
            return None
        try:  # data, never code: plain tensors and containers only
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict):
                raise TypeError(
                    f"expected the monitor's state (a dict), got {type(saved).__name__}"
                )
        except Exception as exc:
            warn(
                collectives,
                f"HFTrainerMonitor: {path} could not be read as the monitor's state"
                f" ({type(exc).__name__}: {exc}); the monitor starts a new history (in a new"
                " directory).",
            )
            return None
        self.core.load_state_dict(saved)
        return folder

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state (every rank must call it)."""
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)
