"""The script to run first on a lent GPU machine must keep working without one: its --smoke mode runs every step
at tiny size on CPU and prints the one table."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout
    assert table.startswith("step | status | seconds | figures")
    for step in ("kernels.bench (interpreter) | ok", "train step tiny | ok", "generate tiny | ok"):
        assert step in table, table
    assert "tokens/s" in table and "s/step (CFG)" in table and "fused: fwd" in table
    for name in ("kernels.json", "train.json", "generate.json"):
        assert (tmp_path / name).is_file()


def test_gpu_check_refuses_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "no CUDA GPU is visible" in done.stderr
