"""``scripts/host_overhead.py``: both modes run, and in ``--triton-dispatch`` mode every op goes
through Triton's own launch path (kernels compiled for sm_90, no GPU) the expected number of
times, so a change that adds a launch to an eager op shows here; the script itself fails
when flopwise's direct launches hand the C launcher anything else than Triton's dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "host_overhead.py"

# launches per call: gather forward; its backward adds the inverse map and the dense scatter;
# the out-of-place scatter's forward is the inverse map and the dense scatter, its backward one
# kernel; the token-choice plan is scores + top-k, the scan, the scatter; moe_mlp's forward is
# gate/up and down, its backward four more; a plan from given top-k ids is the ids' histogram,
# the scan, the scatter, and inside a transformers model the experts add moe_mlp's six
LAUNCHES = {"gather fwd": 1, "gather fwd+bwd": 3, "scatter fwd+bwd": 3, "token-choice plan fwd": 3,
            "moe_mlp fwd (plan given)": 2, "moe_mlp fwd+bwd": 6, "plan from top-k ids": 3,
            "HF experts fwd+bwd": 9}


def _rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        for name in LAUNCHES:
            if line.startswith(name + " ") and line[len(name):].split()[0].replace(".", "").isdigit():
                rows[name] = line[len(name):].split()
    return rows


@pytest.mark.parametrize("dispatch", [False, True])
def test_host_overhead_script(dispatch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, str(SCRIPT), "-n", "2", "--repeat", "1"] + (["--triton-dispatch"] if dispatch else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(proc.stdout)
    assert set(rows) == set(LAUNCHES), proc.stdout
    for name, cols in rows.items():
        if dispatch:  # Triton's dispatch, direct launches, launches per call, torch
            assert len(cols) == 4 and cols[2] == str(LAUNCHES[name]), (name, cols)
            cols = cols[:2] + cols[3:]
        assert len(cols) == (3 if dispatch else 2) and all(float(c) > 0 for c in cols), (name, cols)
