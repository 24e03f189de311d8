"""A real 2-process FSDP2 Lightning run (``ModelParallelStrategy``, gloo on CPU) writes its
checkpoints and the monitor's ``best.ckpt`` as distributed checkpoint directories:
``probe`` reads both, in one process, at the monitor's own tokens and numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONTEXT

from lightning_overtrain import keys
from lightning_overtrain.cli.main import main
from lightning_overtrain.history import read_history

SCRIPT = os.path.join(os.path.dirname(__file__), "cli_models.py")
MODULE_CLASS = "lightning_overtrain.testing.demo:TinyCausalLM"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(SCRIPT).parent.parent), env.get("PYTHONPATH", "")]
    )
    command = [sys.executable, SCRIPT, "fsdp", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    return out


def probe_args(run: Path, out: Path, *paths: str, code: bytes) -> list[str]:
    ref = out.parent / "ref.bin"
    ref.write_bytes(code)
    return [
        "probe", *paths, "--out", str(out), "--module-class", MODULE_CLASS,
        "--reference-text", str(ref), "--tokenizer", "bytes", "--context", str(CONTEXT),
        "--batch-size", "4", "--gammas", "1.0", "--pairs", "1", "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow
def test_fsdp2_checkpoints_and_best_snapshot_are_probed_in_one_process(
    fsdp_run, tmp_path, code_text
):
    ckpt_dir, best = fsdp_run / "ckpt", fsdp_run / "monitor" / "best.ckpt"
    assert sorted(os.listdir(ckpt_dir)) == ["step=2.ckpt", "step=4.ckpt"]
    assert (ckpt_dir / "step=4.ckpt" / ".metadata").is_file() and best.is_dir()
    live = json.loads((fsdp_run / "history.json").read_text())["history"]
    # The monitor's reference set: the last 2 batches of 4 windows of the text it was given.
    code = code_text[-CONTEXT * 4 * 2 :]
    out = tmp_path / "series"
    assert main(probe_args(fsdp_run, out, str(ckpt_dir), code=code)) == 0
    probed = read_history(str(out / "history.jsonl"))
    assert [r[keys.TOKENS] for r in probed] == [r[keys.TOKENS] for r in live]
    for got, want in zip(probed, live):
        for key in (keys.REFERENCE_LOSS, "noise/gamma=1/delta"):
            assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-6), key
    out = tmp_path / "best"
    assert main(probe_args(fsdp_run, out, str(best), code=code)) == 0
    (record,) = read_history(str(out / "history.jsonl"))
    assert record[keys.TOKENS] == live[-1]["best/tokens"]
    (at,) = [r for r in live if r[keys.TOKENS] == record[keys.TOKENS]]
    assert math.isclose(record[keys.REFERENCE_LOSS], at[keys.REFERENCE_LOSS], rel_tol=1e-4)
