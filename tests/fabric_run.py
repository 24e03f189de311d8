"""A Fabric loop with ``FabricMonitor`` on 1 or 2 CPU processes (``strategy="ddp"``, gloo).

Each rank trains on its rows of the same global batches, writes its monitor's history,
saves the monitor through ``fabric.save`` and loads it back into a fresh monitor through
``fabric.load``. Run by tests/test_fabric.py in a subprocess with a timeout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_module, reference_batches, train_loader
from frontend_runs import optimizer_and_schedule

from lightning_overtrain import FabricMonitor, NoiseProbe
from lightning_overtrain.engine.losses import transformers_loss
from lightning_overtrain.testing.demo import stdlib_code


def monitor(text: bytes, out: str) -> FabricMonitor:
    return FabricMonitor(
        reference_batches(text, n=2),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
        dirpath=out,
        reporters=[],
    )


def main() -> None:
    from lightning.fabric import Fabric

    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = stdlib_code(max_bytes=200_000)
    mon = monitor(text, args.out)
    strategy = "ddp" if args.devices > 1 else "auto"
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy, callbacks=[mon])
    fabric.launch()
    module = make_module()
    optimizer, schedule = optimizer_and_schedule(module)
    model, optimizer = fabric.setup(module.model, optimizer)
    fabric.call("on_train_start", fabric=fabric, model=model, optimizer=optimizer)
    rank, size = fabric.global_rank, fabric.world_size
    for batch in itertools.islice(iter(train_loader(text)), 6):
        mine = {k: v[rank::size] for k, v in batch.items()}  # this rank's rows
        fabric.backward(transformers_loss(model, mine))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        fabric.call("on_train_batch_end", fabric=fabric, model=model, batch=mine)
    fabric.call("on_train_end", fabric=fabric)
    path = os.path.join(args.out, "state.ckpt")
    fabric.save(path, {"model": model, "optimizer": optimizer, "monitor": mon})
    fresh = monitor(text, args.out)
    fabric.load(path, {"monitor": fresh})
    with open(os.path.join(args.out, f"history_rank{rank}.json"), "w") as f:
        json.dump({"history": mon.history, "loaded": fresh.history, "tokens": fresh.tokens}, f)


if __name__ == "__main__":
    main()
