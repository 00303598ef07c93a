"""``flopwise coding experiment`` at smoke size: every dataset decodes, M2 rows are consistent."""

from __future__ import annotations

import json

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
