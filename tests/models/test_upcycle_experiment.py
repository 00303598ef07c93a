"""The continued-training experiment after upcycling runs end to end and starts from equality."""

from __future__ import annotations

import pytest

from flopwise.models.upcycle_experiment import run_upcycle_experiment


def test_upcycled_moe_starts_equal_and_both_continue(tmp_path):
    exp = run_upcycle_experiment("embedded", dense_steps=2, continue_steps=2, eval_every=1, preset="smoke",
                                 out_dir=str(tmp_path))
    assert exp.verify_max_abs_diff <= 1e-4
    steps = [s for s, _, _ in exp.rows]
    assert steps == [2, 3, 4]
    _, dense0, moe0 = exp.rows[0]
    assert moe0 == pytest.approx(dense0, abs=1e-4)  # the upcycled MoE reproduces the dense model
    assert exp.moe_params > exp.dense_params
    assert (tmp_path / "upcycled" / "trainer_state.json").is_file()  # resumes the dense run's schedule
    assert "MoE - dense" in exp.table()


def test_rejects_empty_runs():
    with pytest.raises(ValueError, match="dense_steps and continue_steps"):
        run_upcycle_experiment("embedded", dense_steps=0)
