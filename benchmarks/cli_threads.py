"""``probe`` of 8 small checkpoints on a CPU: one torch thread against torch's default.

Writes 8 distributed checkpoints (torchtitan layout, ``step-N/``) of the test suite's
TinyCausalLM (2 layers, d=32, context 32), then times ``lightning-overtrain probe``
on them (8 reference batches of 8 x 32 bytes, gammas 0.5 and 1, 2 pairs) with
``--threads 1`` and with ``--threads`` torch's default (one per core), interleaved,
``--repeats`` times, each in a fresh process; checks the histories are identical.

Usage: python benchmarks/cli_threads.py [--repeats 2]
Writes benchmarks/results/cli_threads.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FACTORY = """from lightning_overtrain.testing.demo import TinyCausalLM


def make():
    return TinyCausalLM(n_layer=2, n_embd=32, n_head=2, context=32)
"""


def write_series(directory: str) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from lightning_overtrain.testing.demo import TinyCausalLM, stdlib_code

    for step in range(1, 9):
        torch.manual_seed(step)
        model = TinyCausalLM(n_layer=2, n_embd=32, n_head=2, context=32)
        path = os.path.join(directory, "run", f"step-{step}")
        dcp.save(dict(model.state_dict()), checkpoint_id=path, no_dist=True)
    with open(os.path.join(directory, "ref.bin"), "wb") as f:
        f.write(stdlib_code(max_bytes=200_000)[-20_000:])
    with open(os.path.join(directory, "factory.py"), "w") as f:
        f.write(FACTORY)


def probe(directory: str, threads: int, out: str) -> float:
    command = [sys.executable, "-m", "lightning_overtrain.cli", "probe", "run", "--out", out]
    command += ["--module-class", "factory.py:make", "--init-std", "0.02"]
    command += ["--tokens-per-step", "1000", "--reference-text", "ref.bin", "--tokenizer"]
    command += ["bytes", "--context", "32", "--batch-size", "8", "--reference-batches", "8"]
    command += ["--gammas", "0.5", "1", "--pairs", "2", "--device", "cpu"]
    command += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = ROOT
    start = time.perf_counter()
    subprocess.run(command, cwd=directory, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def history(path: str) -> list[dict]:
    with open(os.path.join(path, "history.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k != "probe_seconds"} for r in records]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    default = torch.get_num_threads()
    seconds: dict[int, list[float]] = {1: [], default: []}
    with tempfile.TemporaryDirectory() as tmp:
        write_series(tmp)
        for rep in range(args.repeats):
            for threads in seconds:
                out = os.path.join(tmp, f"out_{threads}_{rep}")
                seconds[threads].append(probe(tmp, threads, out))
        same = history(os.path.join(tmp, "out_1_0")) == history(
            os.path.join(tmp, f"out_{default}_0")
        )
    result = {
        "machine": f"{os.cpu_count()} CPU cores shared with other jobs (load average"
        f" {os.getloadavg()[0]:.1f} at the end)",
        "seconds": {str(t): s for t, s in seconds.items()},
        "identical_histories": same,
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "cli_threads.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "`probe` of 8 small DCP checkpoints (benchmarks/cli_threads.py), seconds per run,"
        f" {args.repeats} interleaved runs each. Machine: {result['machine']}.",
        "",
        "| --threads | min | median | max |",
        "|---|---|---|---|",
    ]
    for threads, values in seconds.items():
        row = (min(values), statistics.median(values), max(values))
        lines.append(f"| {threads} | " + " | ".join(f"{v:.0f}" for v in row) + " |")
    lines += ["", f"Histories identical: {same}."]
    with open(os.path.join(HERE, "results", "cli_threads.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
