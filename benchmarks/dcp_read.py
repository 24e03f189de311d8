"""The cost of reading one distributed checkpoint's model, as ``probe`` and ``watch`` do.

A Lightning ``ModelParallelStrategy``-layout checkpoint (``state_dict`` and an
AdamW-like optimizer state of 2 tensors per parameter, written with
``torch.distributed.checkpoint.save``) of a model of ``--params-m`` million fp32
parameters is read two ways, each in a fresh process:

* ``direct``: :func:`lightning_overtrain.cli.dcp.load_dcp_model` (``dcp.load`` of the
  model's tensors only, in place into the model built from its class);
* ``consolidate``: ``dcp_to_torch_save`` to a file, then ``torch.load`` and
  ``load_state_dict`` (what one does without a direct reader).

Measured per process: bytes read through ``read()`` (``rchar`` of
``/proc/self/io``, page cache included) and written (``wchar``); peak resident
memory above the resident memory before the read
in multiples of the parameter bytes (the kernel's ``VmHWM``, reset just before the
read through ``/proc/self/clear_refs``, minus ``VmRSS`` then: the model itself
counts as 1); the wall time of the read.

Usage: OMP_NUM_THREADS=1 python benchmarks/dcp_read.py [--params-m 25] [--repeats 3]
Writes benchmarks/results/dcp_read.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH = 1024  # Linear(WIDTH, WIDTH) blocks: 1.05M parameters each


class Stack:
    """The model's factory: ``Stack(blocks)()`` builds ``blocks`` square linear layers."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks

    def __call__(self):
        from torch import nn

        return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(self.blocks)))


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    """Reset the kernel's peak resident size (VmHWM) to the current one (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(method: str, path: str, blocks: int, warm: str) -> dict[str, float]:
    """Read the checkpoint at ``path`` one way, in this process; the figures of that read.

    A one-block checkpoint ``warm`` is read the same way first, so the code's own
    imports (bytes read, memory) are not counted as the checkpoint's.
    """
    import torch

    torch.set_num_threads(1)
    read(method, warm, Stack(1))
    _reset_peak()  # the imports' own peak is not the read's
    rss0, io0, start = _rss_kib(), _io(), time.perf_counter()
    model = read(method, path, Stack(blocks))
    seconds = time.perf_counter() - start
    io1 = _io()
    peak_kib = _rss_kib("VmHWM")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "seconds": seconds,
        "read_bytes": io1["rchar"] - io0["rchar"],
        "written_bytes": io1["wchar"] - io0["wchar"],
        "peak_extra_bytes": (peak_kib - rss0) * 1024,
        "param_bytes": param_bytes,
    }


def read(method: str, path: str, factory: Stack):
    """The model of the checkpoint at ``path``, read by ``method``."""
    import torch

    from lightning_overtrain.cli.dcp import load_dcp_model
    from lightning_overtrain.cli.series import DCP, Checkpoint

    if method == "direct":
        ckpt = Checkpoint(path, DCP, layout="lightning", dcp_dir=path)
        model = load_dcp_model(ckpt, factory)
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            target = os.path.join(tmp, "consolidated.pt")
            dcp_to_torch_save(path, target)
            full = torch.load(target, weights_only=True)
            model = factory()
            model.load_state_dict(full["state_dict"])
            del full
    return model


def write_checkpoint(path: str, blocks: int) -> dict[str, int]:
    import torch
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = Stack(blocks)().state_dict()
    optim = {f"state.{k}.{m}": torch.randn_like(v) for k, v in state.items() for m in ("m", "v")}
    dcp.save({"state_dict": state, "optimizer_0": optim}, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": 1, "hyper_parameters": {}}, os.path.join(path, "meta.pt"))
    on_disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    params = sum(v.numel() * v.element_size() for v in state.values())
    return {"param_bytes": params, "checkpoint_bytes": on_disk}


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=float, default=25.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", choices=("direct", "consolidate"))
    parser.add_argument("--ckpt")
    parser.add_argument("--warm")
    args = parser.parse_args()
    blocks = max(1, round(args.params_m * 1e6 / (WIDTH * WIDTH + WIDTH)))
    if args.measure:  # the child process
        print(json.dumps(measure(args.measure, args.ckpt, blocks, args.warm)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step=1.ckpt")
        sizes = write_checkpoint(path, blocks)
        warm = os.path.join(tmp, "warm.ckpt")
        write_checkpoint(warm, 1)
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "consolidate": []}
        for _ in range(args.repeats):
            for method in runs:  # interleaved: the machine's load falls on both alike
                child = [sys.executable, __file__, "--measure", method, "--ckpt", path]
                child += ["--params-m", str(args.params_m), "--warm", warm]
                out = subprocess.run(child, capture_output=True, text=True, env=env, check=True)
                runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    param = sizes["param_bytes"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs"
        f" (load average {os.getloadavg()[0]:.1f} at the end), OMP_NUM_THREADS=1",
        "params": blocks * (WIDTH * WIDTH + WIDTH),
        **sizes,
        "repeats": args.repeats,
        "methods": {
            method: {
                "read_x_params": _summary([r["read_bytes"] / param for r in rs]),
                "written_x_params": _summary([r["written_bytes"] / param for r in rs]),
                "peak_extra_x_params": _summary([r["peak_extra_bytes"] / param for r in rs]),
                "seconds": _summary([r["seconds"] for r in rs]),
            }
            for method, rs in runs.items()
        },
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "dcp_read.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(HERE, "results", "dcp_read.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    def cell(s: dict[str, float], fmt: str) -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    lines = [
        f"Reading one DCP checkpoint of {result['params'] / 1e6:.1f}M fp32 parameters"
        f" ({result['param_bytes'] / 2**20:.0f} MiB; {result['checkpoint_bytes'] / 2**20:.0f}"
        " MiB on disk with the optimizer state), median (min-max) of"
        f" {result['repeats']} fresh processes each. Machine: {result['machine']}.",
        "",
        "| method | bytes read / param bytes | bytes written / param bytes"
        " | peak extra host memory / param bytes | seconds |",
        "|---|---|---|---|---|",
    ]
    names = {
        "direct": "`probe`/`watch` (dcp.load of the model's tensors)",
        "consolidate": "dcp_to_torch_save + torch.load",
    }
    for method, m in result["methods"].items():
        lines.append(
            f"| {names[method]} | {cell(m['read_x_params'], '.2f')}"
            f" | {cell(m['written_x_params'], '.2f')} | {cell(m['peak_extra_x_params'], '.2f')}"
            f" | {cell(m['seconds'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
