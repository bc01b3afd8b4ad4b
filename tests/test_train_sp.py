"""DeepSpeed-Ulysses sequence parallelism: degree 2 (two gloo ranks) equals one process, forward and backward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_sp_worker.py")


@pytest.mark.slow
def test_sequence_parallel_degree_2_matches_one_process(tmp_path: Path):
    out = tmp_path / "sp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    command.append(str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cases = json.loads(out.read_text())
    assert set(cases) == {"refs_even", "odd_padded", "refs_checkpointed"}
    for name, case in cases.items():
        assert case["out"] <= 1e-5, (name, case)  # fp32: the same math on a different split
        assert case["grad_rel"] <= 1e-5, (name, case)
    # each rank really held half of the (padded) sequence
    assert cases["refs_even"] == {**cases["refs_even"], "tokens": 24, "local_tokens": 12}
    assert cases["odd_padded"]["tokens"] == 9 and cases["odd_padded"]["local_tokens"] == 5
