"""Train the tiny model with every probe on, unsharded in 1 process or FSDP2 on 2, and
write each rank's history.

``--all-probes`` adds the sharpness probes (along Adam's update, and along the
gradient with the relative view), the matched fine-tune and the schedule probe;
``--precision`` sets the trainer's; ``--no-monitor`` trains the same run without
the monitor (every rank still writes its training losses and weights, to compare).

FSDP2: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with
``fully_shard`` on every block and the root in ``configure_model``, on CPU with
gloo; the parameters are DTensors. Run as a script in a subprocess (test_fsdp.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CONTEXT, make_module, make_trainer, reference_batches

from lightning_overtrain import FineTuneProbe, InflectionPolicy, NoiseProbe, OvertrainingMonitor
from lightning_overtrain.engine.contract import Probe
from lightning_overtrain.engine.sharding import is_dtensor, local_tensor
from lightning_overtrain.inflection.config import DetectorConfig
from lightning_overtrain.probes.schedule import ScheduleProbe
from lightning_overtrain.probes.sharpness import SharpnessProbe
from lightning_overtrain.testing.demo import ByteWindows, TinyCausalLM, english_prose, stdlib_code

GLOBAL_BATCH = 8


class StateDictWhileBorrowed(Probe):
    """Perturbs the shards, then checks ``state_dict()`` still shows the live run.

    The live run is the cooldown's origin (the probes measure the cooled branch).
    Under FSDP2 the saved copies are local shards: they must be shown as DTensors of
    the parameter's global shape (what a checkpoint gathers or saves distributed).
    """

    name = "check"

    def __init__(self, origin):
        self.origin = origin  # () -> the backup that holds the live training weights

    def run(self, ctx):
        with torch.no_grad():
            for param in ctx.backup.params:
                local_tensor(param).add_(1.0)  # the probe's weights, not the run's
        shown = ctx.module.state_dict()
        names = {id(p): n for n, p in ctx.module.named_parameters()}
        same = True
        for param, saved in self.origin().saved_tensors():
            if id(param) in names:
                got = shown[names[id(param)]]
                same &= tuple(got.shape) == tuple(param.shape)
                same &= is_dtensor(got) == is_dtensor(param)
                same &= torch.equal(local_tensor(got), saved)
        return {"check/state_dict_live": float(same)}


class ShardedLM(TinyCausalLM):
    """The tiny GPT with FSDP2 applied the way the README shows."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of this rank's parameter shards and buffers, bit for bit."""
    digest = hashlib.sha256()
    for tensor in [*module.parameters(), *module.buffers()]:
        digest.update(local_tensor(tensor).detach().float().numpy().tobytes())
    return digest.hexdigest()


class WriteHistory(pl.Callback):
    def __init__(self, monitor: OvertrainingMonitor | None, out: str) -> None:
        self.monitor, self.out = monitor, out
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(self.out, f"history_rank{trainer.global_rank}.json")
        run = {"losses": self.losses, "weights": weights_digest(pl_module)}
        if self.monitor is None:
            with open(path, "w") as f:
                json.dump(run, f)
            return
        params = list(pl_module.parameters())
        with open(path, "w") as f:
            json.dump(
                {
                    **run,
                    "history": self.monitor.history,
                    "failures": self.monitor.probe_failures,
                    "sharded": all(is_dtensor(p) for p in params),
                    "backup_bytes": self.monitor.core.backup.nbytes,
                    "local_param_bytes": sum(
                        p.to_local().nbytes if is_dtensor(p) else p.nbytes for p in params
                    ),
                    "best_path": self.monitor.best_path,
                    "global_step": trainer.global_step,
                },
                f,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--all-probes", action="store_true")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--no-monitor", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    text = stdlib_code(max_bytes=200_000)
    prose = english_prose()[:20_000]
    data = ByteWindows(text[:100_000], CONTEXT)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sampler = DistributedSampler(data, num_replicas=args.devices, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // args.devices, sampler=sampler)
    windows = ByteWindows(prose, CONTEXT)
    # Odd batch sizes on purpose: 3 rows split 2/1, 1 row leaves a rank empty.
    finetune = FineTuneProbe(
        train_data=list(DataLoader(windows, batch_size=3))[:2],
        eval_data=list(DataLoader(windows, batch_size=1))[10:13],
        steps=2,
        lrs=(1e-3,),
        # Far enough that the matched view runs past the 2-step budget: reached or not.
        matched_loss=5.15 if args.all_probes else None,
        matched_max_steps=4,
    )
    extra = []
    if args.all_probes:
        extra = [
            SharpnessProbe("update"),
            SharpnessProbe(
                "gradient",
                name="sharpness_grad",
                downstream_data=list(DataLoader(windows, batch_size=3))[2:4],
            ),
            ScheduleProbe(),
        ]
    cooldown = list(DataLoader(data, batch_size=1))[200:202]
    check = StateDictWhileBorrowed(lambda: monitor.core.cooldown.origin)
    monitor = OvertrainingMonitor(
        reference_batches(text, n=3, batch_size=4),  # 3 batches: 2 and 1 per rank
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(1.0,), pairs=2, per_layer=True), finetune, check, *extra],
        cooldown_steps=2,
        cooldown_data=cooldown,
        dirpath=args.out,
        policy=InflectionPolicy(detector=DetectorConfig(patience=1)),
    )
    if args.devices > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
        module = make_module(0)
        sharded = ShardedLM(**module.hparams)
        sharded.load_state_dict(module.state_dict())
        module = sharded
    else:
        strategy, module = "auto", make_module(0)
    callbacks = [WriteHistory(None, args.out)]
    if not args.no_monitor:
        callbacks = [monitor, WriteHistory(monitor, args.out)]
    trainer = make_trainer(
        args.out,
        callbacks,
        max_steps=args.max_steps,
        devices=args.devices,
        strategy=strategy,
        use_distributed_sampler=False,
        gradient_clip_val=1.0,  # the cooldown clips DTensor gradients as training does
        precision=args.precision,
    )
    trainer.fit(module, loader)


if __name__ == "__main__":
    main()
