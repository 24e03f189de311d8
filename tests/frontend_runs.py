"""One tiny model trained on the same batches through each front end (the tests' helpers).

Each ``run_*`` trains :func:`conftest.make_module` for ``len(batches)`` optimizer steps
with the module's own AdamW and warm-up schedule, with ``monitor`` attached (or none),
and returns the final weights and the monitor.
"""

from __future__ import annotations

from typing import Any

import torch
from conftest import make_module, make_trainer

from lightning_overtrain.engine.losses import transformers_loss


def optimizer_and_schedule(module: Any) -> tuple[Any, Any]:
    config = module.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_lightning(tmp_path: Any, batches: list, monitor: Any = None) -> tuple[dict, Any]:
    module = make_module()
    callbacks = [monitor] if monitor is not None else []
    trainer = make_trainer(tmp_path, callbacks, max_steps=len(batches))
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return weights(module), trainer


def run_loop(batches: list, monitor: Any = None) -> tuple[dict, int]:
    module = make_module()
    optimizer, schedule = optimizer_and_schedule(module)
    module.train()
    if monitor is not None:
        monitor.start(module, optimizer=optimizer)
    steps = 0
    for batch in batches:
        transformers_loss(module.model, batch).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        steps += 1
        if monitor is not None:
            monitor.step(model=module, batch=batch, optimizer=optimizer)
            if monitor.should_stop:
                break
    if monitor is not None:
        monitor.finish()
    return weights(module), steps


def run_fabric(batches: list, monitor: Any = None) -> tuple[dict, int]:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[monitor] if monitor else [])
    module = make_module()
    optimizer, schedule = optimizer_and_schedule(module)
    # The transformers model itself: Fabric would call a LightningModule's own hooks too.
    model, optimizer = fabric.setup(module.model, optimizer)
    model.train()
    fabric.call("on_train_start", fabric=fabric, model=model, optimizer=optimizer)
    steps = 0
    for batch in batches:
        fabric.backward(transformers_loss(model, batch))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        steps += 1
        fabric.call("on_train_batch_end", fabric=fabric, model=model, batch=batch)
        if monitor is not None and monitor.should_stop:
            break
    fabric.call("on_train_end", fabric=fabric)
    return weights(module), steps


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batches: list) -> None:
        self.rows = [row for batch in batches for row in batch["input_ids"]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids}


def hf_trainer(tmp_path: Any, batches: list, module: Any, max_steps: int, **args: Any) -> Any:
    from transformers import Trainer, TrainingArguments

    optimizer, schedule = optimizer_and_schedule(module)
    settings: dict[str, Any] = dict(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=len(batches[0]["input_ids"]),
        max_steps=max_steps,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(args)
    trainer = Trainer(
        model=module.model,  # the transformers model the demo module wraps
        args=TrainingArguments(**settings),
        train_dataset=_Rows(batches),
        data_collator=_collate,
        optimizers=(optimizer, schedule),
    )
    # The demo model's forward takes **kwargs; the mean loss, as the other front ends train.
    trainer.model_accepts_loss_kwargs = False
    return trainer


def run_hf(tmp_path: Any, batches: list, monitor: Any = None, **args: Any) -> tuple[dict, Any]:
    module = make_module()
    trainer = hf_trainer(tmp_path, batches, module, len(batches), **args)
    if monitor is not None:
        monitor.attach(trainer)
    trainer.train()
    return weights(module), trainer
