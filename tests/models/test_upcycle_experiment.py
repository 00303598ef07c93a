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


def test_checkpoint_saved_before_the_first_step_upcycles_without_moments(tmp_path):
    """No Adam moments yet: the MoE gets weights and config, and no trainer state it could not resume."""
    import os

    from flopwise.models.data import ByteData, load_corpus
    from flopwise.models.demo import DemoPreset
    from flopwise.models.train import Trainer, TrainConfig
    from flopwise.models.transformer import ModelConfig
    from flopwise.models.upcycle import UpcycleOptions, upcycle

    p = DemoPreset.preset("smoke")
    cfg = ModelConfig(**{**p.base, **p.variants["dense"]})
    t = Trainer(cfg, TrainConfig(seq_len=p.seq_len, batch_size=2, max_steps=2), ByteData(load_corpus("embedded")),
                progress=False)
    t.save(tmp_path / "dense")
    report = upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"),
                     UpcycleOptions(n_experts=2, top_k=1, layers="all", format="flopwise"), verify=True)
    assert report.verify.passed
    files = set(os.listdir(tmp_path / "moe"))
    assert {"config.json", "model.safetensors"} <= files
    assert "optimizer.safetensors" not in files and "trainer_state.json" not in files
