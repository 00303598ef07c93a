"""scripts/balance_experiment.py at a tiny length: it trains, and its table holds what it says."""

from __future__ import annotations

import importlib.util
import os

import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "balance_experiment.py")


def _script():
    spec = importlib.util.spec_from_file_location("balance_experiment", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_balance_experiment_table():
    # in a process of its own, on the torch reference path as the script runs on a CPU (this
    # suite runs the kernels in Triton's interpreter, far slower for whole training runs)
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FLOPWISE_BACKEND="reference", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--steps", "20", "--only", "1", "7"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = lines[0], lines[1:]
    assert "per-sequence MaxVio" in header and len(rows) == 2
    for row, name in zip(rows, ("no balancing", "bias 1e-2 + seq loss 1e-2")):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[0] == name
        first, last, worst, seq_last, bpb, spread = map(float, cells[1:])
        # the batch's busiest expert takes at most the sum of each sequence's busiest: per
        # sequence the imbalance is never smaller
        assert 0 <= last <= seq_last + 1e-6 <= 3 + 1e-6  # ceiling E / k - 1 = 3
        assert worst >= last - 1e-6 and 0 < bpb < 8
        assert (spread == 0) == (name == "no balancing")


def test_balance_experiment_rejects_bad_arguments():
    mod = _script()
    with pytest.raises(SystemExit):
        mod.main(["--only", "9"])
    with pytest.raises(SystemExit):
        mod.main(["--steps", "5"])
