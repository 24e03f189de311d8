"""``save_weights`` (the non-Lightning front ends' best snapshot) under FSDP2 on 2 CPU ranks.

Each rank shards the same model with ``fully_shard`` (gloo); rank 0 then checks
that the file holds the whole tensors, equal to the model before sharding, and
writes ``ok`` or what differs to ``--out``. Run by tests/test_fabric_strategies.py
in a subprocess with a timeout.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_overtrain.core.keeping import save_weights
from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.collectives import Collectives


def run(rank: int, init: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    whole = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    backup = ModelBackup(model)
    backup.save()
    path = os.path.join(os.path.dirname(out), "best.ckpt")
    error = save_weights(model, Collectives.from_torch(), path, backup, False, "key", {})
    if rank == 0:
        saved = torch.load(path, weights_only=True)["state_dict"]
        # A plain tensor each (a DTensor holds only this rank's shard, and needs
        # the run's process group to be read), equal to the whole weights.
        wrong = [
            f"{k}: {type(saved.get(k)).__name__}"
            for k, v in whole.items()
            if type(saved.get(k)) is not torch.Tensor or not torch.equal(saved[k], v)
        ]
        with open(out, "w") as f:
            f.write("ok" if error is None and not wrong else f"error={error} wrong={wrong}")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init = "file://" + os.path.join(os.path.dirname(os.path.abspath(args.out)), "pg")
    mp.spawn(run, args=(init, os.path.abspath(args.out)), nprocs=2)
