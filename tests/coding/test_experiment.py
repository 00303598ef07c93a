"""``flopwise coding experiment`` at smoke size: every dataset decodes, M2 rows are consistent."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from flopwise.coding.experiment import ExperimentPreset, parse_runs, run_experiment


def test_parse_runs():
    assert parse_runs("bytes,ac,equalinfo:16") == ("bytes", "ac:8", "equalinfo:16")
    assert parse_runs(["gzip:16", "gzip:16"]) == ("gzip:16",)
    with pytest.raises(ValueError, match="unknown run"):
        parse_runs("ac:12")
    with pytest.raises(ValueError, match="unknown experiment preset"):
        ExperimentPreset.preset("huge")


def test_smoke_experiment(tmp_path):
    lines = []
    res = run_experiment("embedded", preset="smoke", runs="bytes,static,equalinfo", out_dir=str(tmp_path),
                         device="cpu", progress=False, log=lines.append)
    coded = {(r.method, r.token_bits): r for r in res.coding}
    assert set(coded) == {("gzip", 8), ("static", 8), ("ac", 8), ("equalinfo", 8)}
    # EqualInfoAC b=16, N=8: exactly two tokens per window, so bytes/token = bytes per window / 2
    assert [r.run for r in res.m2] == ["bytes", "static:8", "equalinfo:8"]
    p = ExperimentPreset.preset("smoke")
    for r in res.m2:
        assert r.steps == p.m2_steps and r.tokens_trained == p.m2_steps * p.m2_batch * p.m2_seq_len
        assert np.isfinite(r.val_bpb) and r.val_bpb > 0
        assert r.val_bpb == pytest.approx(r.val_bits_per_token / r.bytes_per_token)
        if r.run != "bytes":  # the uniform cost of a run is its method's coded size
            assert r.compressed_bpb == pytest.approx(coded[(r.run.split(":")[0], 8)].bits_per_byte)
    assert res.m2[0].compressed_bpb == 8.0
    assert len({r.train_flops for r in res.m2}) == 1  # same model, steps and tokens: matched compute
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["m2"][2]["val_bpb"] == res.m2[2].val_bpb and saved["complete"] is True
    val = np.load(tmp_path / "data" / "equalinfo-8" / "val.npy")
    assert val.dtype == np.uint8 and val.size == coded[("equalinfo", 8)].tokens
    assert (tmp_path / "m1" / "config.json").is_file()
    assert any("EqualInfoAC[b=16] v=256" in line for line in lines)


def test_given_m1_is_checked_and_bad_devices_refused(tmp_path):
    from flopwise.models.data import ByteData, embedded_corpus
    from flopwise.models.train import TrainConfig, Trainer
    from flopwise.models.transformer import ModelConfig

    p = ExperimentPreset.preset("smoke")
    corpus = embedded_corpus()
    tc = TrainConfig(seq_len=32, batch_size=2, max_steps=1, eval_tokens=64, device="cpu")
    t = Trainer(ModelConfig(**p.m1), tc, ByteData(corpus), progress=False)  # no bos
    t.train_step()
    t.save(tmp_path / "m1")
    res = run_experiment(corpus, preset="smoke", runs="bytes", m1=str(tmp_path / "m1"), device="cpu",
                         progress=False, log=lambda s: None)
    assert any("bos=0" in n for n in res.notes) and res.m1["val_bpb"] is None
    mod = Trainer(ModelConfig(**{**p.m1, "n_layers": 2, "routing": "every_other"}), tc, corpus, progress=False)
    mod.save(tmp_path / "mod")
    with pytest.raises(ValueError, match="dense"):
        run_experiment(corpus, preset="smoke", runs="bytes", m1=str(tmp_path / "mod"), device="cpu",
                       progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="device"):
        run_experiment(corpus, preset="smoke", device="cdua", progress=False, log=lambda s: None)


def test_a_wrong_decode_stops_the_experiment(monkeypatch):
    """Every validation set is decoded again and compared; a coder that returns other bytes
    stops the run instead of reporting a table."""
    from flopwise.coding.methods import GZip
    from flopwise.coding.rangecoder import CorruptStreamError

    real = GZip.decompress
    monkeypatch.setattr(GZip, "decompress", lambda self, comp: real(self, comp)[:-1] + b"?")
    with pytest.raises(CorruptStreamError, match="gzip .* did not decode"):
        run_experiment("embedded", preset="smoke", runs="bytes", device="cpu", progress=False, log=lambda s: None)


def test_a_stopped_run_keeps_what_it_finished(tmp_path):
    """results.json is rewritten after the coding table and after each M2 run, so a run
    stopped by a time limit (here: an interrupt as the second M2 run starts) keeps them."""

    def log(line):
        if line.startswith("coded M2 training text"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment("embedded", preset="smoke", runs="bytes,static", out_dir=str(tmp_path), device="cpu",
                       progress=False, log=log)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False and [r["run"] for r in saved["m2"]] == ["bytes"]
    assert {(r["method"], r["token_bits"]) for r in saved["coding"]} == {("gzip", 8), ("static", 8), ("ac", 8),
                                                                        ("equalinfo", 8)}
    assert not (tmp_path / "results.json.tmp").exists()
    assert ExperimentPreset.preset("gpu-fit").runs[0] == "bytes"


def _tree(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_is_checked_first_and_replaced_only_whole_with_force(tmp_path, monkeypatch):
    """An --out holding an earlier run survives a failing call, is replaced only with force and
    then as a whole (no token arrays of runs the new call did not repeat), and a folder of
    someone else's files is never used. Progress labels show the full method name."""
    from flopwise.models import train

    labels = []

    class Recording(train.Trainer):
        def __init__(self, *args, label="", **kwargs):
            labels.append(label)
            super().__init__(*args, label=label, **kwargs)

    monkeypatch.setattr(train, "Trainer", Recording)
    quiet = dict(preset="smoke", device="cpu", progress=False, log=lambda s: None, m2_steps=1)
    exp = tmp_path / "exp1"
    run_experiment("embedded", runs="bytes,equalinfo", out_dir=str(exp), **quiet)
    before = _tree(exp)
    assert json.loads(before["results.json"])["complete"] is True and "data/equalinfo-8/val.npy" in before
    # a bad argument fails before OUT is touched, with or without force
    for force in ({}, {"force": True}):
        with pytest.raises(Exception, match="nope"):
            run_experiment("embedded", runs="bytes", m1=str(tmp_path / "nope"), out_dir=str(exp), **force, **quiet)
        assert _tree(exp) == before
    with pytest.raises(FileExistsError, match="force"):
        run_experiment("embedded", runs="bytes", out_dir=str(exp), **quiet)
    assert _tree(exp) == before
    # the M1 a run is given may not live in the folder that run would replace
    with pytest.raises(ValueError, match="contains the M1 checkpoint"):
        run_experiment("embedded", runs="bytes", m1=str(exp / "m1"), out_dir=str(exp), force=True, **quiet)
    # someone else's folder: refused with or without force
    other = tmp_path / "otherdir"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="keep.txt"):
            run_experiment("embedded", runs="bytes", out_dir=str(other), force=force, **quiet)
    assert sorted(os.listdir(other)) == ["keep.txt"]
    # an earlier run with a file of the user's added is no longer the command's to replace
    (exp / "data" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        run_experiment("embedded", runs="bytes", out_dir=str(exp), force=True, **quiet)
    (exp / "data" / "notes.txt").unlink()

    # a forced run that is stopped part-way leaves the earlier run as it was
    def stop(line):
        if line.startswith("coded validation"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment("embedded", runs="bytes", out_dir=str(exp), force=True,
                       **{**quiet, "log": stop})
    assert _tree(exp) == before
    assert sorted(os.listdir(tmp_path)) == ["exp1", "otherdir"]  # no staging folder left
    # with force, a finished run replaces the earlier one as a whole
    res = run_experiment("embedded", runs="bytes", out_dir=str(exp), force=True, **quiet)
    after = _tree(exp)
    assert not [k for k in after if k.startswith("data/") and not k.startswith("data/bytes/")]
    assert json.loads(after["results.json"])["complete"] is True and [r.run for r in res.m2] == ["bytes"]
    assert res.m1["path"] == str(exp / "m1") and (exp / "m1" / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["exp1", "otherdir"]
    assert any(label.strip() == "EqualInfoAC[b=16] v=256" for label in labels)  # not cut to "EqualInfoAC["


def test_learned_column_prints_no_negative_zero():
    from flopwise.coding.experiment import ExperimentResult, M2Row, format_tables

    row = M2Row(run="gzip:8", label="GZip v=256", vocab_size=256, params=1000, steps=1, tokens_trained=10,
                train_tokens=10, epochs=1.0, train_flops=1.0, compressed_bpb=3.0, bytes_per_token=2.0,
                val_bpb=3.0001, val_bits_per_token=6.0, learned=-0.00003, seconds=0.1)
    text = format_tables(ExperimentResult("smoke", "x", "cpu", {}, [], [row], 0.0))
    assert "-0.0%" not in text and text.rstrip().endswith("0.0%")


def test_cli_json_path_checked_before_the_run_and_written_atomically(tmp_path, monkeypatch):
    from flopwise.coding import experiment

    from .test_dataset import _cli

    def no_run(*args, **kwargs):
        raise AssertionError("the experiment ran before --json was checked")

    monkeypatch.setattr(experiment, "run_experiment", no_run)
    with pytest.raises(FileNotFoundError, match="nodir"):
        _cli(["coding", "experiment", "--preset", "smoke", "--json", str(tmp_path / "nodir" / "r.json")])
    with pytest.raises(ValueError, match="is a folder"):
        _cli(["coding", "experiment", "--preset", "smoke", "--json", str(tmp_path)])
    if os.path.isdir("/proc/self"):  # a folder where os.access says yes to root and no file can be made
        with pytest.raises(ValueError, match="--json /proc/r.json: cannot write in /proc"):
            _cli(["coding", "experiment", "--preset", "smoke", "--json", "/proc/r.json"])
        monkeypatch.undo()
        with pytest.raises(ValueError, match="out /proc/flopwise-exp: cannot write in /proc"):
            experiment.run_experiment("embedded", preset="smoke", out_dir="/proc/flopwise-exp", progress=False,
                                      log=lambda s: None)
        monkeypatch.setattr(experiment, "run_experiment", no_run)

    class Done:
        def to_dict(self):
            return {"complete": True}

    calls = []
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: calls.append(k) or Done())
    (tmp_path / "r.json.tmp").write_text("someone else's")
    assert _cli(["coding", "experiment", "--preset", "smoke", "--json", str(tmp_path / "r.json"), "--quiet",
                 "--force"]) == 0
    assert json.loads((tmp_path / "r.json").read_text()) == {"complete": True} and calls[0]["force"] is True
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.json.tmp"]
    assert (tmp_path / "r.json.tmp").read_text() == "someone else's"
