"""Per-rank peak extra memory of each probe, as multiples of the (local) parameter size.

Unsharded in one process, and under FSDP2 (``fully_shard`` on every block and the
root) on 2 CPU processes with gloo. How it is measured: on CPU no allocator
reports torch's peak, so the figures are a structural count of the tensors each
probe holds at its peak, taken from the live objects after a real probe step:

* noise: the backup (``ModelBackup.nbytes``; beside the weights, or in host
  memory with ``backup_device="cpu"``), plus the noise generator's largest block
  of temporaries (``min(largest local tensor, CHUNK)`` elements x 40 bytes);
* fine-tune, per optimizer: the backup, the gradients and the optimizer state
  after one real step (every tensor in ``optimizer.state``, local shards);
* cooldown: its copy of the live weights, the monitor's backup, the copy of the
  training optimizer's state (AdamW) and the gradients.

Usage: python benchmarks/memory.py   (spawns the 2 FSDP2 processes itself)
Writes benchmarks/results/memory.json and .md.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_overtrain.engine.backup import ModelBackup
from lightning_overtrain.engine.noise import CHUNK
from lightning_overtrain.engine.sharding import local_tensor
from lightning_overtrain.probes.cooldown import copy_optimizer
from lightning_overtrain.testing.demo import TinyCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3),
}


def nbytes(tensors) -> int:
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return nbytes(
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """One real training step; returns the gradients' bytes at their peak."""
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    model.model(input_ids=ids, labels=ids).loss.backward()
    grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grads


def measure(model: torch.nn.Module) -> dict[str, float]:
    params = list(model.parameters())
    local = nbytes(params)
    largest = max(local_tensor(p).numel() for p in params)
    block = min(largest, CHUNK) * 40
    backup = ModelBackup(model)
    host = ModelBackup(model, device="cpu")
    out = {
        "local_param_bytes": local,
        "noise": (backup.nbytes + block) / local,
        "noise_host_backup_accelerator": block / local,
        "noise_host_backup_host": host.nbytes / local,
    }
    for name, make in OPTIMIZERS.items():
        optimizer = make(params)
        grads = step(model, optimizer)
        out[f"finetune_{name}"] = (backup.nbytes + grads + state_bytes(optimizer)) / local
        out[f"finetune_{name}_host_backup_accelerator"] = (grads + state_bytes(optimizer)) / local
    training = torch.optim.AdamW(params, lr=1e-3)
    step(model, training)
    branch = copy_optimizer(training)
    grads = step(model, branch)
    out["cooldown_adamw"] = (2 * backup.nbytes + state_bytes(branch) + grads) / local
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def make_model() -> TinyCausalLM:
    torch.manual_seed(0)
    return TinyCausalLM(n_layer=2, n_embd=64, n_head=2, context=64)


def sharded_worker(rank: int, world: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model.model, mesh=mesh)
    result = measure(model)
    with open(f"{path}.rank{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    torch.set_num_threads(1)
    results = {"unsharded": measure(make_model())}
    path = os.path.join(HERE, "results", "memory_tmp")
    mp.spawn(sharded_worker, args=(2, path), nprocs=2, join=True)
    for rank in range(2):
        with open(f"{path}.rank{rank}") as f:
            results[f"fsdp2_rank{rank}"] = json.load(f)
        os.remove(f"{path}.rank{rank}")
    with open(os.path.join(HERE, "results", "memory.json"), "w") as f:
        json.dump(results, f, indent=2)
    columns = list(results)
    keys = [k for k in results["unsharded"] if k != "local_param_bytes"]
    lines = [
        "Peak extra memory per rank, in multiples of that rank's parameter bytes"
        " (structural count, see benchmarks/memory.py).",
        "",
        "| probe | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        "| local parameter bytes | "
        + " | ".join(f"{results[c]['local_param_bytes']:,}" for c in columns)
        + " |",
    ]
    lines += [
        f"| {k} | " + " | ".join(f"{results[c][k]:.2f}" for c in columns) + " |" for k in keys
    ]
    with open(os.path.join(HERE, "results", "memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
