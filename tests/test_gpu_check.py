"""The prepared GPU check imports and exits cleanly where there is no GPU."""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real check instead")
def test_the_gpu_check_skips_with_a_message_on_a_cpu_only_machine(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped, no CUDA device" in proc.stdout
    assert not (tmp_path / "gpu.json").exists()
