"""``flopwise demo`` smoke run: the table, matched FLOPs, falling losses, checkpoints that
``flopwise generate`` reads. Tiny preset on the embedded text (a few seconds)."""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout

import pytest
import torch

from flopwise.models.data import embedded_corpus
from flopwise.models.demo import DemoPreset, format_table, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FLOPWISE_BACKEND", "reference")
    lines: list[str] = []
    out = tmp_path_factory.mktemp("demo")
    try:
        result = run_demo(embedded_corpus(), preset="smoke", threads=1, out_dir=str(out), progress=False,
                          log=lines.append)
    finally:
        mp.undo()
    return result, "\n".join(lines), out


def test_demo_table(demo):
    result, text, _ = demo
    header = result.table.splitlines()[0].split()
    for col in ("model", "params", "active", "FLOPs/tok", "steps", "tok/s", "MFU", "val", "bpb", "MoD", "acc"):
        assert col in header
    assert [r.name for r in result.rows] == ["dense", "moe", "mod", "mod+moe"]
    assert result.table in text and "matched FLOPs" in text and "python-docs" in text
    assert result.corpus == "python-docs" and result.preset == "smoke"


def test_demo_rows(demo):
    result, _, _ = demo
    dense, moe, mod, mode = result.rows
    for r in result.rows:
        assert r.last_loss < r.first_loss - 0.5, r.name       # learned something
        assert r.flops == pytest.approx(dense.flops, rel=0.1)  # matched training FLOPs
        assert 0 < r.val_bpb < 8.0
        assert not r.cut
    assert moe.params > dense.params and moe.active_params < moe.params
    assert mod.flops_per_token < dense.flops_per_token and mod.steps > dense.steps
    assert mod.mod_predictor_acc is not None and 0 <= mod.mod_predictor_acc <= 1
    assert dense.mod_predictor_acc is None and dense.val_bpb_topk is None and mod.val_bpb_topk is not None
    assert all(r.mfu is None for r in result.rows)  # CPU: n/a


def test_demo_checkpoints_generate(demo):
    from flopwise import _cli_models

    _, _, out = demo
    parser = argparse.ArgumentParser()
    _cli_models.add_parser(parser.add_subparsers())
    for name in ("dense", "mod_moe"):
        args = parser.parse_args(["generate", str(out / name), "--prompt", "def ", "--max-new-tokens", "5"])
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert args.func(args) == 0
        assert buf.getvalue().startswith("def ")


def test_demo_validation():
    with pytest.raises(ValueError, match="preset"):
        DemoPreset.preset("huge")
    with pytest.raises(ValueError, match="budget_s"):
        run_demo(embedded_corpus(), preset="smoke", budget_s=0)
    with pytest.raises(ValueError, match="threads"):
        run_demo(embedded_corpus(), preset="smoke", threads=0)
    assert format_table([]).count("\n") == 1  # header and rule only


@pytest.mark.parametrize("name", ["cpu", "gpu", "smoke"], ids=lambda n: f"{n}-preset")
def test_demo_presets_build(name):
    """Every preset's variants are valid configs, MoE matches dense FLOPs per token and MoD
    is cheaper (the GPU preset is exercised here even without a GPU)."""
    from flopwise.models.demo import _model_cfg

    p = DemoPreset.preset(name)
    fpt = {n: _model_cfg(p, n).flops_per_token(p.seq_len) for n in p.variants}
    assert list(fpt) == ["dense", "moe", "mod", "mod+moe"]
    assert fpt["moe"] == pytest.approx(fpt["dense"], rel=0.02)
    assert fpt["mod"] < 0.7 * fpt["dense"]
    assert p.seq_len <= _model_cfg(p, "dense").max_seq_len


def test_gpu_preset_without_cuda_is_refused_unless_the_cpu_is_asked_for(monkeypatch, tmp_path):
    """A GPU preset on a machine without CUDA would train for hours: refused before anything
    runs, unless the CPU is asked for by name."""
    from flopwise.coding.experiment import run_experiment
    from flopwise.models.train import resolve_preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (lambda: run_demo(embedded_corpus(), preset="gpu"),
                 lambda: run_experiment(embedded_corpus(), preset="gpu-fit", out_dir=str(tmp_path / "x"))):
        with pytest.raises(ValueError, match=r"preset 'gpu(-fit)?' is sized for a GPU and torch sees no CUDA device"):
            call()
    assert not (tmp_path / "x").exists()
    assert resolve_preset("gpu", DemoPreset, torch.device("cpu"), "cpu").name == "gpu"
    assert resolve_preset(None, DemoPreset, torch.device("cpu")).name == "cpu"


def test_slow_machine_keeps_the_dense_floor_and_cuts_the_variants(monkeypatch):
    """When the budget cannot pay for the floor, the reference (dense) run still trains its
    floor of steps, uncut; the variants share what is left before the deadline and are
    marked as cut."""
    import dataclasses
    import itertools
    import time

    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
    # A machine where every clock reading is a second later than the one before: far too slow
    # for the budget, whatever the real speed of the machine running the test.
    clock = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    p = dataclasses.replace(DemoPreset.preset("smoke"), fixed_dense_steps=None, min_dense_steps=40,
                            max_dense_steps=80, sample_bytes=0)
    result = run_demo(embedded_corpus(), preset=p, budget_s=30, threads=1, progress=False, log=lambda s: None)
    dense, *variants = result.rows
    assert dense.steps == dense.planned_steps == 40 and not dense.cut
    assert all(r.cut and r.steps >= 1 for r in variants)


def test_a_cut_dense_run_rematches_the_variants(monkeypatch):
    """Dense planned above its floor and cut at the floor by a slow clock: the variants are
    planned for the FLOPs dense actually trained, not for its plan."""
    import dataclasses
    import itertools
    import time

    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
    clock = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    p = dataclasses.replace(DemoPreset.preset("smoke"), fixed_dense_steps=None, min_dense_steps=10,
                            max_dense_steps=80, sample_bytes=0)
    lines = []
    result = run_demo(embedded_corpus(), preset=p, dense_steps=30, budget_s=30, threads=1, progress=False,
                      log=lines.append)
    dense, moe, mod, _ = result.rows
    assert dense.steps == 10 and dense.planned_steps == 30 and dense.cut
    assert moe.planned_steps == 10 and mod.planned_steps == round(10 * dense.flops_per_token / mod.flops_per_token)
    assert any("dense stopped at 10 of 30 steps" in line for line in lines)


def test_demo_upcycles_and_codes(demo):
    """The demo grows the other results: the dense model upcycled to an MoE and both trained
    on, and the dense model as M1 of every compressed-text method (each decoded exactly)."""
    result, text, _ = demo
    assert [r["name"] for r in result.upcycle] == ["dense (continued)", "upcycled MoE"]
    dense, moe = result.upcycle
    assert result.upcycle_max_abs_diff < 1e-4  # the upcycled MoE starts as the dense model
    assert dense["val_bpb_start"] == pytest.approx(moe["val_bpb_start"], abs=1e-3)
    assert moe["params"] > dense["params"] and dense["steps"] == moe["steps"] == 3
    assert all(0 < r["val_bpb"] < 8 for r in result.upcycle)
    assert {r["method"] for r in result.coding} == {"GZip", "StaticAC", "AC", "EqualInfoAC[b=16]"}
    assert all(r["bits_per_byte"] > 0 and r["compression_ratio"] > 0 for r in result.coding)
    assert "sparse upcycling" in text and "compressed text" in text and "decoded back exactly" in text
    # the smoke preset codes 600 bytes: 3 streams of up to 256 (the line used to claim 32 of 256)
    assert "600 validation bytes" in text and "the coders in 3 streams of up to 256 bytes" in text


def test_demo_never_replaces_other_files(tmp_path):
    """Checked before any training: an existing OUT/<model> needs --force, and even then only
    an earlier checkpoint is replaced."""
    out = tmp_path / "demo_user"
    (out / "mod").mkdir(parents=True)
    (out / "mod" / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FileExistsError, match=r"mod.*(keep\.txt|force)"):
            run_demo(embedded_corpus(), preset="smoke", threads=1, out_dir=str(out), progress=False,
                     log=lambda s: None, force=force)
    assert (out / "mod" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="is a file"):
        run_demo(embedded_corpus(), preset="smoke", out_dir=str(out / "mod" / "keep.txt"), log=lambda s: None)


def test_demo_refuses_a_corpus_without_validation_text(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(embedded_corpus().train[:40000].decode("utf-8", errors="ignore"))
    with pytest.raises(ValueError, match="too small"):
        run_demo(str(small), preset="smoke", threads=1, progress=False, log=lambda s: None)
