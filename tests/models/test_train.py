"""Trainer, schedule, clipping, accumulation, checkpoints, exact resume, bpb, data, CLI.

Text: Python's reference-manual topics shipped with the standard library (real English),
through :func:`flopwise.models.data.embedded_corpus`. Models are tiny and run the PyTorch
references (``FLOPWISE_BACKEND=reference``): these tests are about the training loop, the
kernels have their own.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from flopwise._files import check_writable
from flopwise.models import ModelConfig
from flopwise.models.checkpoint import load_checkpoint, load_model
from flopwise.models.data import (ByteData, TextCorpus, bits_per_byte, decode, embedded_corpus, encode, load_corpus,
                                  split_text)
from flopwise.models.train import TrainConfig, Trainer, active_params, load_run_config, lr_at

from .train_fixtures import TINY, _reference_backend, _tc, assert_exact_resume, corpus  # noqa: F401  (fixtures)


# ------------------------------------------------------------------ schedule and config
def test_lr_schedule_values():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)                      # cosine starts at the peak
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.45)               # half-way: mid of peak and floor
    assert lr_at(14, cfg) == pytest.approx(0.1) == lr_at(100, cfg)  # floor at and after max_steps
    vals = [lr_at(s, cfg) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, cfg)


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("batch_size", 0), ("grad_accum", 0), ("dtype", "fp8"),
                                         ("min_lr_ratio", 2.0), ("warmup_steps", -1), ("eval_tokens", 0)])
def test_train_config_rejects(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        TrainConfig(**{field: value})


def test_train_config_round_trip_and_unknown_keys():
    cfg = _tc(grad_accum=3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.tokens_per_step == 32 * 4 * 3
    with pytest.raises(ValueError, match="lr_max"):
        TrainConfig.from_dict({"lr_max": 1.0})


def test_model_config_dict_round_trip():
    cfg = ModelConfig.preset("tiny", mod="every_other", mlp=["dense", "moe"], moe_n_experts=4)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="d_modle"):
        ModelConfig.from_dict({**d, "d_modle": 3})


def test_load_run_config(tmp_path):
    mc, tc = load_run_config("tiny")
    assert mc == ModelConfig.preset("tiny") and tc.seq_len <= mc.max_seq_len
    p = tmp_path / "run.json"
    p.write_text(json.dumps({"model": {"preset": "tiny", "mod": "every_other"}, "train": {"max_steps": 7}}))
    mc, tc = load_run_config(p)
    assert mc.routing == ("all", "mod") and tc.max_steps == 7
    t = tmp_path / "run.toml"
    t.write_text('model = "m1"\n[train]\nlr = 0.001\nseq_len = 128\n')
    mc, tc = load_run_config(t)
    assert mc.d_model == 256 and tc.lr == 0.001 and tc.seq_len == 128
    p.write_text(json.dumps({"model": "tiny", "optim": {}}))
    with pytest.raises(ValueError, match="optim"):
        load_run_config(p)
    with pytest.raises(ValueError, match="unknown preset"):
        load_run_config("no-such-preset")


# ------------------------------------------------------------------ data and bpb
def test_bits_per_byte_known_logits():
    uniform = torch.zeros(3, 5, 256)
    assert bits_per_byte(uniform, torch.randint(0, 256, (3, 5))) == pytest.approx(8.0)
    # Two equally likely bytes, the target one of them: exactly one bit.
    logits = torch.full((4, 256), -1e4)
    logits[:, 65] = logits[:, 66] = 3.0
    assert bits_per_byte(logits, torch.full((4,), 66)) == pytest.approx(1.0)
    # Two bytes per token halves the bits per byte.
    assert bits_per_byte(logits, torch.full((4,), 66), bytes_per_token=2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="match"):
        bits_per_byte(uniform, torch.zeros(3, 4, dtype=torch.long))


def test_split_is_fixed_and_disjoint(corpus):
    from pydoc_data.topics import topics

    text = topics["if"] + "\n\n" + topics["while"] + "\n\n" + topics["for"]
    train, val = split_text(text, section_bytes=256, val_every=4)
    assert (train, val) == split_text(text, section_bytes=256, val_every=4)
    paras = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    tr = [p for p in train.split("\n\n") if p.strip()]
    va = [p for p in val.split("\n\n") if p.strip()]
    assert sorted(p.strip("\n") for p in tr + va) == sorted(paras)
    assert va and tr
    frac = len(corpus.val) / (len(corpus.train) + len(corpus.val))
    assert 0.03 < frac < 0.08, frac
    assert corpus.val.decode("utf-8") not in corpus.train.decode("utf-8")


def test_byte_batches_are_a_function_of_step(corpus):
    data = ByteData(corpus, seed=3)
    x1, y1 = data.batch(5, 1, 4, 16)
    x2, y2 = data.batch(5, 1, 4, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(x1, data.batch(6, 1, 4, 16)[0])
    assert not torch.equal(x1, data.batch(5, 0, 4, 16)[0])
    wins = list(data.eval_windows(16, 3, max_tokens=100))
    assert sum(w[0].shape[0] for w in wins) == 6  # 100 // 16 windows
    assert decode(encode("naïve café")) == "naïve café"


def test_load_corpus_paths(tmp_path, corpus):
    assert load_corpus("embedded").sha256 == corpus.sha256
    f = tmp_path / "doc.txt"
    f.write_text(corpus.train[:100000].decode("utf-8", errors="ignore"))  # holds a validation section
    c = load_corpus(f)
    assert c.train and c.val
    d = tmp_path / "corp"
    d.mkdir()
    (d / "train.txt").write_bytes(corpus.train[:5000])
    (d / "val.txt").write_bytes(corpus.val[:1000])
    assert load_corpus(d).val == corpus.val[:1000]
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing")


# ------------------------------------------------------------------ trainer
def test_trainer_loss_goes_down(corpus):
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=12), corpus, progress=False)
    res = t.fit()
    assert res.steps == 12 and t.step == 12 and res.tokens == 12 * 128
    assert sum(res.losses[-3:]) / 3 < res.losses[0] - 0.5
    assert res.val_bpb is not None and math.isfinite(res.val_bpb) and res.val_bpb < 8.0
    assert res.mfu is None  # no peak for a CPU
    assert res.flops == pytest.approx(12 * 128 * ModelConfig(**TINY).flops_per_token(32))


def test_trainer_skips_the_id_check_only_for_its_own_data_classes(corpus, monkeypatch):
    """ByteData/TokenData check their ids when built; a subclass may make its own batches."""
    from flopwise.models.transformer import Transformer

    calls = []
    real = Transformer._check_ids
    monkeypatch.setattr(Transformer, "_check_ids", lambda self, *a: calls.append(a) or real(self, *a))
    data = ByteData(corpus)
    Trainer(ModelConfig(**TINY), _tc(max_steps=2, eval_tokens=64), data, progress=False).fit()
    assert calls == []

    class Shifted(ByteData):
        def batch(self, *a):
            x, y = super().batch(*a)
            return x, y + 256  # outside the model's vocabulary

    t = Trainer(ModelConfig(**TINY), _tc(max_steps=2, eval_tokens=64), Shifted(corpus), progress=False)
    with pytest.raises(ValueError, match="targets must be ids"):
        t.train_step()
    assert calls


def test_time_budget_stops_between_steps_but_not_before_min_steps(corpus):
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=12, time_budget_s=1e-9, min_steps=3), corpus, progress=False)
    res = t.fit()
    assert res.steps == 3 and res.stopped_early
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=12, time_budget_s=1e-9), corpus, progress=False)
    assert t.fit().steps == 0  # checked before every step, the first included
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=4, time_budget_s=1e-9, min_steps=10), corpus, progress=False)
    res = t.fit()
    assert res.steps == 4 and not res.stopped_early


def test_gradient_clipping(corpus):
    t = Trainer(ModelConfig(**TINY), _tc(grad_clip=1e-3), corpus, progress=False)
    seen = []
    step = t.optimizer.step

    def spy(*a, **k):
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.model.parameters()
                                                                if p.grad is not None]))))
        return step(*a, **k)

    t.optimizer.step = spy
    m = t.train_step()
    assert m["grad_norm"] > 1e-2          # reported: the norm before clipping
    assert seen[0] == pytest.approx(1e-3, rel=1e-4)


class _FixedBatches(ByteData):
    """Micro-batch m of size b is rows [m*b, (m+1)*b) of one fixed batch."""

    def __init__(self, corpus, rows):
        super().__init__(corpus)
        self.x, self.y = super().batch(0, 0, rows, 32)

    def batch(self, step, micro, batch_size, seq_len):
        s = slice(micro * batch_size, (micro + 1) * batch_size)
        return self.x[s], self.y[s]


def test_gradient_accumulation_matches_big_batch(corpus):
    """accum a x batch b == 1 x batch a*b: loss, and the gradients the optimizer sees (the
    updated weights are not compared: Adam's first step is ~sign(grad), which turns a
    rounding-level difference in a near-zero gradient into a full-size one)."""
    data = _FixedBatches(corpus, 8)
    runs = []
    for bs, accum in ((8, 1), (4, 2), (2, 4)):
        t = Trainer(ModelConfig(**TINY), _tc(batch_size=bs, grad_accum=accum, grad_clip=0.0), data, progress=False)
        grads = {}
        step = t.optimizer.step

        def spy(*a, _t=t, _g=grads, _s=step, **k):
            _g.update({n: p.grad.clone() for n, p in _t.model.named_parameters()})
            return _s(*a, **k)

        t.optimizer.step = spy
        runs.append((t.train_step(), grads))
    m0, g0 = runs[0]
    for m, g in runs[1:]:
        assert m["loss"] == pytest.approx(m0["loss"], rel=1e-5)
        assert m["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
        for k in g0:
            torch.testing.assert_close(g[k], g0[k], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip(tmp_path, corpus):
    cfg = ModelConfig(**TINY, routing="every_other", mlp=["moe", "dense"], moe_n_experts=4)
    t = Trainer(cfg, _tc(max_steps=3), corpus, progress=False)
    for _ in range(2):
        t.train_step()
    path = t.save(tmp_path / "ck")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                        "trainer_state.json"]
    assert not [p for p in os.listdir(tmp_path) if p != "ck"]  # no temporary folders left
    ck = load_checkpoint(path)
    assert ck.config == cfg
    for k, v in t.model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    names = dict(t.model.named_parameters())
    assert set(ck.optimizer) == {"step"} | {f"{m}.{n}" for n in names for m in ("exp_avg", "exp_avg_sq")}
    assert float(ck.optimizer["step"]) == 2.0
    for n, p in names.items():
        assert torch.equal(ck.optimizer[f"exp_avg_sq.{n}"], t.optimizer.state[p]["exp_avg_sq"])
    from safetensors import safe_open

    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"
    st = ck.trainer_state
    assert st["step"] == 2 and st["data"]["sha256"] == corpus.sha256 and "torch" in st["rng"]
    # Saving again replaces the folder atomically.
    t.train_step()
    t.save(path)
    assert load_checkpoint(path).trainer_state["step"] == 3


def test_dense_checkpoint_is_an_upcycling_source(tmp_path, corpus):
    from flopwise.models.hf_formats import describe_source

    t = Trainer(ModelConfig(**TINY), _tc(), corpus, progress=False)
    t.train_step()
    src = describe_source(str(t.save(tmp_path / "dense")))
    assert src.arch == "flopwise" and src.n_layers == 2


@pytest.mark.parametrize("variant", ["dense", "mod+moe", "moe-bias"])
def test_exact_resume(tmp_path, corpus, variant):
    """N steps straight == N/2, save, load in a fresh trainer, N/2 more: identical losses
    (with auxiliary-loss-free balancing: its biases too)."""
    extra = {"dense": {}, "mod+moe": dict(routing="every_other", mlp="moe", moe_n_experts=4),
             "moe-bias": dict(mlp="moe", moe_n_experts=4, moe_score="sigmoid", moe_load_balance_coef=0.0,
                              moe_bias_update_rate=0.05)}[variant]
    assert_exact_resume(tmp_path, ModelConfig(**TINY, **extra), _tc(max_steps=6, grad_accum=2), corpus, corpus, 6)


def test_resume_keeps_the_runs_data_seed(tmp_path, corpus):
    """A run on ByteData(seed=7) with TrainConfig.seed 0: resuming from the bare corpus replays
    seed 7's batches; data with another seed is refused."""
    from flopwise.models.data import ByteData

    tc = _tc(max_steps=4)
    assert_exact_resume(tmp_path, ModelConfig(**TINY), tc, ByteData(corpus, seed=7), corpus, 4)
    with pytest.raises(ValueError, match="data seed 7"):
        Trainer.resume(tmp_path / "ck", ByteData(corpus, seed=0), progress=False)


def test_resume_refuses_another_corpus(tmp_path, corpus):
    t = Trainer(ModelConfig(**TINY), _tc(), corpus, progress=False)
    t.train_step()
    t.save(tmp_path / "ck")
    other = TextCorpus("other", corpus.train[:4000], corpus.val[:1000], "a slice")
    with pytest.raises(ValueError, match="corpus"):
        Trainer.resume(tmp_path / "ck", other, progress=False)


def test_fit_writes_checkpoints_and_resumes(tmp_path, corpus):
    out = tmp_path / "run"
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=4, save_every=2, out_dir=str(out)), corpus, progress=False)
    t.fit(steps=2)
    assert load_checkpoint(out / "last").trainer_state["step"] == 2
    r = Trainer.resume(out / "last", corpus, progress=False)
    res = r.fit()
    assert res.steps == 2 and r.step == 4
    assert load_checkpoint(out / "last").trainer_state["step"] == 4


def test_upcycled_checkpoint_resumes_in_its_own_folder(tmp_path, corpus):
    """An upcycled (sharded) run resumes into the upcycled folder, never over the dense run."""
    from flopwise.models.upcycle import UpcycleOptions, upcycle

    run = tmp_path / "run"
    Trainer(ModelConfig(**TINY), _tc(max_steps=4, out_dir=str(run)), corpus, progress=False).fit(steps=2)
    moe = tmp_path / "moe"
    upcycle(str(run / "last"), str(moe), UpcycleOptions(n_experts=2, top_k=1, max_shard_bytes=20_000))
    assert (moe / "model.safetensors.index.json").exists() and (moe / "optimizer.safetensors.index.json").exists()
    state = json.loads((moe / "trainer_state.json").read_text())
    assert state["train_config"]["out_dir"] is None
    assert state["model_config"] == json.loads((moe / "config.json").read_text())  # the MoE's, not the dense run's
    ck = load_checkpoint(moe)  # sharded model and optimizer
    assert ck.config.mlp == ("moe", "moe") and float(ck.optimizer["step"]) == 2.0
    dense_before = (run / "last" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="another model"):  # the dense run's folder is refused
        Trainer.resume(moe, corpus, progress=False, out_dir=str(run))
    t = Trainer.resume(moe, corpus, progress=False)
    t.fit(steps=1)
    assert (run / "last" / "model.safetensors").read_bytes() == dense_before
    assert load_checkpoint(moe / "last").config.mlp == ("moe", "moe") and t.step == 3


@pytest.mark.parametrize("damage, pattern", [
    ("truncate_model", r"corrupt safetensors file .*model\.safetensors"),
    ("empty_optimizer", r"corrupt safetensors file .*optimizer\.safetensors"),
    ("config_d_ff", r"tensor 'layers\.0\.mlp\.w_in\.weight' has shape .*config\.json"),
    ("trainer_state", r"corrupt .*trainer_state\.json"),
    ("nan_weight", r"tensor 'norm\.weight' in .*model\.safetensors holds inf/NaN"),
])
def test_load_checkpoint_names_the_damaged_file(tmp_path, corpus, damage, pattern):
    t = Trainer(ModelConfig(**TINY), _tc(), corpus, progress=False)
    t.train_step()
    path = t.save(tmp_path / "ck")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's private 0700
    if damage == "truncate_model":
        os.truncate(path / "model.safetensors", os.path.getsize(path / "model.safetensors") - 100)
    elif damage == "empty_optimizer":
        (path / "optimizer.safetensors").write_bytes(b"")
    elif damage == "config_d_ff":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "d_ff": 96}))
    elif damage == "nan_weight":
        from safetensors.torch import load_file, save_file

        sd = load_file(path / "model.safetensors")
        sd["norm.weight"][1] = float("nan")
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    else:
        (path / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(path)


def test_active_params():
    from flopwise.models import Transformer

    dense = Transformer(ModelConfig(**TINY))
    assert active_params(dense) == dense.num_parameters()
    moe = Transformer(ModelConfig(**TINY, mlp="moe", moe_n_experts=4, moe_top_k=1))
    expert = 3 * 32 * 64  # one expert's gate, up and down
    assert active_params(moe) == pytest.approx(moe.num_parameters() - 2 * 3 * expert)


def test_moe_fields_reach_the_layers_and_the_flop_count():
    from flopwise.models import Transformer

    cfg = ModelConfig(**TINY, mlp=["moe", "dense"], moe_n_experts=4, moe_score="sigmoid", moe_normalize_topk=False,
                      moe_shared_d_ff=40, moe_load_balance_coef=0.0, moe_z_loss_coef=0.5, moe_bias_update_rate=1e-3,
                      moe_n_group=2, moe_topk_group=1, moe_group_score="max", moe_route_scale=2.5,
                      moe_load_balance_scope="sequence", pad_to_multiple_of=16)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    mc = Transformer(cfg).layers[0].mlp.config
    assert (mc.score, mc.normalize_topk, mc.shared_d_ff, mc.load_balance_coef, mc.z_loss_coef,
            mc.bias_update_rate) == ("sigmoid", False, 48, 0.0, 0.5, 1e-3)
    assert (mc.n_group, mc.topk_group, mc.group_score, mc.route_scale, mc.load_balance_scope) == (
        2, 1, "max", 2.5, "sequence")
    plain = cfg.replace(moe_shared_d_ff=0)
    assert cfg.forward_flops_per_token(16) - plain.forward_flops_per_token(16) == 2 * 3 * 32 * 48
    model = Transformer(cfg)
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared." in n)
    assert shared == 3 * 32 * 48
    assert active_params(model) - active_params(Transformer(plain)) == shared


@pytest.mark.parametrize("kw,exc,match", [
    (dict(moe_score="relu"), ValueError, "moe_score must be"),
    (dict(moe_normalize_topk="no"), TypeError, "moe_normalize_topk must be a bool"),
    (dict(moe_shared_d_ff=-1), ValueError, "moe_shared_d_ff must be an int >= 0"),
    (dict(moe_z_loss_coef="0.1"), TypeError, "moe_z_loss_coef must be a number"),
    (dict(moe_load_balance_coef=-0.1), ValueError, "moe_load_balance_coef must be >= 0"),
    (dict(moe_bias_update_rate=float("nan")), ValueError, "moe_bias_update_rate must be a finite number"),
    (dict(moe_router="expert_choice", moe_bias_update_rate=1e-3), ValueError, "balances token-choice routing"),
    (dict(moe_n_group=3), ValueError, "moe_n_group must divide the number of experts E = 8"),
    (dict(moe_n_group=4, moe_topk_group=1, moe_top_k=3), ValueError,
     r"moe_top_k = 3 exceeds the experts of the kept groups: moe_topk_group"),
    (dict(moe_n_group=2, moe_topk_group="1"), TypeError, "moe_topk_group must be None or an int"),
    (dict(moe_n_group=2, moe_topk_group=np.int64(1)), TypeError, "moe_topk_group must be None or an int"),
    (dict(moe_n_group=2, moe_topk_group=1, moe_group_score="mean"), ValueError, "moe_group_score must be one of"),
    (dict(moe_router="expert_choice", moe_n_group=2, moe_topk_group=1), ValueError, "moe_n_group/moe_topk_group"),
    (dict(moe_route_scale=-1.0), ValueError, "moe_route_scale must be > 0"),
    (dict(moe_load_balance_scope="token"), ValueError, "moe_load_balance_scope must be 'batch' or 'sequence'"),
])
def test_moe_fields_are_checked_by_name(kw, exc, match):
    with pytest.raises(exc, match=match):
        ModelConfig(**TINY, mlp="moe", **kw)


def test_trainer_updates_the_biases_once_per_step_from_all_micro_batches(corpus):
    cfg = ModelConfig(**TINY, mlp=["moe", "dense"], moe_n_experts=4, moe_top_k=2, moe_bias_update_rate=0.01)
    t = Trainer(cfg, _tc(batch_size=2, grad_accum=3), corpus, progress=False)
    moe = t.model.layers[0].mlp
    seen = []
    real = moe.update_bias

    def spy(group=None):
        seen.append(moe.expert_load.clone())
        return real(group)

    moe.update_bias = spy
    m = t.train_step()
    assert len(seen) == 1 and int(seen[0].sum()) == 3 * 2 * 32 * 2, "3 micro-batches of 2 x 32 tokens, top-2"
    load = seen[0].double()
    torch.testing.assert_close(moe.expert_bias, (0.01 * torch.sign(load.mean() - load)).float())
    assert moe.expert_load.sum() == 0
    assert m["moe_max_violation"] >= 0
    t.evaluate(max_tokens=64)
    assert moe.expert_load.sum() == 0, "evaluation counts nothing"
    bias = moe.expert_bias.clone()
    with torch.no_grad():
        t.model.head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="training diverged"):
        t.train_step()
    assert moe.expert_load.sum() == 0 and torch.equal(moe.expert_bias, bias), "a diverged step's loads are dropped"


# ------------------------------------------------------------------ CLI
def _cli(argv: list[str]) -> str:
    from flopwise import _cli_models

    parser = argparse.ArgumentParser(prog="flopwise")
    _cli_models.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert args.func(args) == 0
    return buf.getvalue()


def test_train_and_generate_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOPWISE_DATA", str(tmp_path / "nodata"))  # no fetched corpus: the embedded text
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": {**TINY, "routing": "every_other"},
                               "train": {"seq_len": 32, "batch_size": 4, "max_steps": 3, "eval_tokens": 256}}))
    out = _cli(["train", str(cfg), "--out", str(tmp_path / "run"), "--json"])
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["checkpoint"].endswith("last")
    ck = tmp_path / "run" / "last"
    text = _cli(["generate", str(ck), "--prompt", "The if statement", "--max-new-tokens", "12"])
    assert text.startswith("The if statement") and len(text.encode()) >= len("The if statement") + 1
    # The KV-cache path (MoD layers route causally) equals recomputing the whole sequence.
    assert text == _cli(["generate", str(ck), "--prompt", "The if statement", "--max-new-tokens", "12",
                         "--no-cache"])
    sampled = _cli(["generate", str(ck), "--prompt", "The", "--max-new-tokens", "8", "--temperature", "1.0",
                    "--top-k", "5", "--seed", "1"])
    assert sampled.startswith("The")
    model = load_model(ck)
    assert model.cfg.routing == ("all", "mod")
    assert json.loads((ck / "trainer_state.json").read_text())["data"]["bos"] is None
    # an M1 for the coders: every window starts from the empty context (bos), kept on resume
    _cli(["train", str(cfg), "--out", str(tmp_path / "m1"), "--bos", "0", "--json"])
    assert json.loads((tmp_path / "m1" / "last" / "trainer_state.json").read_text())["data"]["bos"] == 0
    _cli(["train", "--resume", str(tmp_path / "m1" / "last"), "--steps", "4", "--json"])
    assert json.loads((tmp_path / "m1" / "last" / "trainer_state.json").read_text())["data"]["bos"] == 0


def test_data_info_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOPWISE_DATA", str(tmp_path))
    info = json.loads(_cli(["data", "info", "--json"]))
    assert info["name"] == "python-docs" and info["source"] == "embedded"
    assert str(tmp_path / "corpus") in info["fetched"]
    assert info["sha256"] == embedded_corpus().sha256
    # an explicit corpus names itself, not the fetch folder
    info = json.loads(_cli(["data", "info", "--corpus", "embedded", "--json"]))
    assert info["source"] == "embedded" and "fetched" not in info
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train.txt").write_text("Some real words for training.\n")
    (folder / "val.txt").write_text("Some held-out words.\n")
    info = json.loads(_cli(["data", "info", "--corpus", str(folder), "--json"]))
    assert info["source"] == str(folder.resolve()) and info["train_bytes"] == 30


def _main(argv: list[str]) -> int:
    from flopwise.cli import main

    return main(argv)


# ------------------------------------------------------------------ never lose a user's files or a run
def test_save_checkpoint_replaces_only_a_checkpoint(tmp_path):
    from flopwise.models import Transformer
    from flopwise.models.checkpoint import save_checkpoint

    model = Transformer(ModelConfig(**TINY))
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"user.*notes\.txt"):
        save_checkpoint(user, model)
    assert (user / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_checkpoint(tmp_path / "file", model)
    with pytest.raises(FileExistsError, match="is a file"):
        save_checkpoint(tmp_path / "file" / "ck", model)
    ck = save_checkpoint(tmp_path / "ck", model)
    save_checkpoint(ck, model)  # an earlier checkpoint is replaced
    assert sorted(os.listdir(ck)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("stop_after", [1, 2])
def test_save_checkpoint_stopped_mid_swap_keeps_a_checkpoint(tmp_path, monkeypatch, stop_after):
    """Ctrl-C or SIGTERM (raised as an exception by the CLI) between moving the old checkpoint
    aside and renaming the new one in place used to delete the new one and leave no `last`."""
    from flopwise.models import Transformer
    from flopwise.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ck = save_checkpoint(tmp_path / "last", Transformer(ModelConfig(**TINY)))
    before = (ck / "model.safetensors").read_bytes()
    torch.manual_seed(1)
    newer = Transformer(ModelConfig(**TINY))
    real, renames = os.rename, []

    def rename(src, dst):
        real(src, dst)
        renames.append(dst)
        if len(renames) == stop_after:  # 1: the old one moved aside; 2: the new one in place
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ck, newer)
    monkeypatch.undo()
    after = (ck / "model.safetensors").read_bytes()
    assert after == before if stop_after == 1 else after != before
    assert os.listdir(tmp_path) == ["last"]  # no temporary or old copies left


def test_new_run_refuses_an_existing_last(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    Trainer(ModelConfig(**TINY), _tc(max_steps=1, out_dir=str(run)), corpus, progress=False).fit()
    before = (run / "last" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"step 1.*--resume.*--force"):
        Trainer(ModelConfig(**TINY), _tc(max_steps=1, seed=3, out_dir=str(run)), corpus, progress=False)
    assert (run / "last" / "model.safetensors").read_bytes() == before
    Trainer(ModelConfig(**TINY), _tc(max_steps=1, seed=3, out_dir=str(run)), corpus, progress=False,
            force=True).fit()
    assert (run / "last" / "model.safetensors").read_bytes() != before
    # a user's folder is never replaced, --force or not, and nothing trains first
    user = tmp_path / "userdir"
    (user / "last").mkdir(parents=True)
    (user / "last" / "notes.txt").write_text("precious")
    args = ["train", "tiny", "--corpus", "embedded", "--steps", "1", "--seq-len", "32", "--batch-size", "2",
            "--out", str(user)]
    for extra in ([], ["--force"]):
        assert _main(args + extra) == 2
        assert "notes.txt" in capsys.readouterr().err
    assert (user / "last" / "notes.txt").read_text() == "precious"


def test_resume_replaces_only_this_runs_checkpoint(tmp_path, corpus):
    run = tmp_path / "run"
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=4, out_dir=str(run)), corpus, progress=False)
    t.fit(steps=1)
    t.save(tmp_path / "at1")
    t.fit(steps=1)  # run/last at step 2
    with pytest.raises(ValueError, match="step 2, further"):
        Trainer.resume(tmp_path / "at1", corpus, progress=False, out_dir=str(run))
    other = tmp_path / "other"
    Trainer(ModelConfig(**TINY), _tc(max_steps=1, seed=5, out_dir=str(other)), ByteData(corpus, seed=5),
            progress=False).fit()
    with pytest.raises(ValueError, match="other data"):
        Trainer.resume(tmp_path / "at1", corpus, progress=False, out_dir=str(other))
    r = Trainer.resume(tmp_path / "at1", corpus, progress=False, out_dir=str(other), force=True)
    r.fit(steps=1)
    assert load_checkpoint(other / "last").trainer_state["step"] == 2


def test_resume_without_out_dir_continues_in_the_checkpoint_folder(tmp_path, corpus):
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=3), corpus, progress=False)  # no out_dir, like the demo's
    t.fit(steps=1)
    t.save(tmp_path / "dense")
    r = Trainer.resume(tmp_path / "dense", corpus, progress=False)
    assert r.cfg.out_dir == str(tmp_path / "dense")
    r.fit()
    assert load_checkpoint(tmp_path / "dense" / "last").trainer_state["step"] == 3
    assert load_checkpoint(tmp_path / "dense").trainer_state["step"] == 1  # the start stays
    quiet = Trainer.resume(tmp_path / "dense", corpus, progress=False, out_dir=None)  # explicit: write nothing
    assert quiet.cfg.out_dir is None


# ------------------------------------------------------------------ problems found before training
def test_bad_data_and_out_dir_fail_before_training(tmp_path, corpus):
    small = tmp_path / "small.txt"
    small.write_text(corpus.train[:40000].decode("utf-8", errors="ignore"))
    with pytest.raises(ValueError, match=r"small\.txt \([\d,]+ B\) is too small"):
        load_corpus(small)
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"text \xff\xfe\x00 more")
    with pytest.raises(ValueError, match=r"bin\.dat is not UTF-8"):
        load_corpus(binary)
    short_val = TextCorpus("short", corpus.train[:5000], b"tiny val\n", "a slice")
    with pytest.raises(ValueError, match=r"validation text of 'short' \(9 B\) is shorter than one window"):
        Trainer(ModelConfig(**TINY), _tc(), short_val, progress=False)
    with pytest.raises(TypeError, match="eval_tokens"):
        _tc(eval_tokens=4096.0)
    (tmp_path / "file.txt").write_text("x")
    for bad in ("file.txt", "file.txt/sub"):
        with pytest.raises(ValueError, match=f"out_dir {tmp_path / bad}.*not a folder"):
            Trainer(ModelConfig(**TINY), _tc(out_dir=str(tmp_path / bad)), corpus, progress=False)
    # a folder where no file can be made: os.access says yes to root, the first save said no
    if os.path.isdir("/proc/self"):
        with pytest.raises(ValueError, match="out_dir /proc/flopwise-nope/run: cannot write in /proc/flopwise-nope/run"):
            Trainer(ModelConfig(**TINY), _tc(out_dir="/proc/flopwise-nope/run"), corpus, progress=False)
    # the check makes and removes what it needs: nothing is left before the first save
    Trainer(ModelConfig(**TINY), _tc(out_dir=str(tmp_path / "new" / "run")), corpus, progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "keep").mkdir()
    check_writable(tmp_path / "keep" / "a" / "b", "x")
    assert os.listdir(tmp_path / "keep") == []
    with pytest.raises(ValueError, match=r"^out: cannot write in .*file\.txt/sub \(.*\): try another$"):
        check_writable(tmp_path / "file.txt" / "sub", "out", "try another")
    # jobs started together under one missing parent (a sweep): none may refuse another's folder
    import threading

    for trial in range(40):
        errors = []

        def job(i, root=tmp_path / f"sweep{trial}"):
            try:
                check_writable(root / f"job_{i}", "out")
            except ValueError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=job, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


def test_fit_saves_before_the_final_evaluation(tmp_path, corpus, monkeypatch):
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=2, out_dir=str(tmp_path / "run")), corpus, progress=False)

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(t, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        t.fit()
    assert load_checkpoint(tmp_path / "run" / "last").trainer_state["step"] == 2


def test_relative_out_dir_is_stored_resolved(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = Trainer(ModelConfig(**TINY), _tc(out_dir="rel"), corpus, progress=False)
    assert t.cfg.out_dir == str(tmp_path / "rel")


# ------------------------------------------------------------------ labels and field checks
@pytest.mark.parametrize("kw, label", [
    ({}, ""), ({"routing": "every_other"}, "causal routing"),
    ({"routing": "every_other", "mod_causal": "none"}, "non-causal routing"),
    ({"mlp": "moe", "moe_n_experts": 2, "moe_router": "expert_choice"}, "non-causal routing"),
])
def test_final_eval_names_its_routing(corpus, capsys, kw, label):
    t = Trainer(ModelConfig(**TINY, **kw), _tc(max_steps=1, eval_tokens=64), corpus, progress=True)
    t.fit()
    line = [s for s in capsys.readouterr().err.splitlines() if "val bpb" in s and "step 1:" in s][-1]
    assert t.eval_routing.startswith(label) and ("routing" in line) == bool(label)
    if label:
        assert f", {label}" in line and (("non-causal" in line) == label.startswith("non"))


@pytest.mark.parametrize("field, value, exc", [
    ("lr", "0.1", TypeError), ("time_budget_s", "5", TypeError), ("eval_tokens", 4096.0, TypeError),
    ("compile", "false", ValueError), ("beta1", float("nan"), ValueError), ("out_dir", 3, TypeError),
    ("weight_decay", float("inf"), ValueError), ("eps", float("inf"), ValueError),
    ("grad_clip", float("inf"), ValueError), ("seed", 10**10 * 2, ValueError),
])
def test_train_config_names_bad_fields(field, value, exc):
    with pytest.raises(exc, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_run_config_and_cli_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLOPWISE_DATA", str(tmp_path / "nodata"))
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": "tiny", "train": None}))
    with pytest.raises(TypeError, match="'train' must be an object"):
        load_run_config(f)
    # --bos outside a byte: argparse's usage error naming the flag (exit 2)
    with pytest.raises(SystemExit) as exc:
        _main(["train", "tiny", "--corpus", "embedded", "--steps", "3", "--bos", "256"])
    assert exc.value.code == 2 and "argument --bos: must be a byte value in [0, 256): '256'" in capsys.readouterr().err
    # divergence: one line, no traceback
    assert _main(["train", "tiny", "--corpus", "embedded", "--steps", "3", "--seq-len", "32", "--batch-size", "2",
                  "--lr", "1e9"]) == 1
    assert "diverged" in capsys.readouterr().err
    # resuming with --steps at or below the checkpoint's step trains nothing: an error, not silence
    run = tmp_path / "run"
    assert _main(["train", "tiny", "--corpus", "embedded", "--steps", "2", "--seq-len", "32", "--batch-size", "2",
                  "--out", str(run), "--warmup-steps", "1"]) == 0
    capsys.readouterr()
    assert _main(["train", "--resume", str(run / "last"), "--corpus", "embedded", "--steps", "2"]) == 2
    assert "nothing to train" in capsys.readouterr().err
    # CONFIG names a new run's model: with --resume it would be silently ignored
    assert _main(["train", "small", "--resume", str(run / "last"), "--corpus", "embedded", "--steps", "4"]) == 2
    assert "applies to a new run" in capsys.readouterr().err
    # the usual slips get a message that names the fix
    assert _main(["train", str(run / "last"), "--corpus", "embedded", "--steps", "4"]) == 2
    assert f"continue it with --resume {run / 'last'}" in capsys.readouterr().err
    assert _main(["train", "--resume", str(run), "--corpus", "embedded", "--steps", "4"]) == 2
    assert f"the run's checkpoint is {run / 'last'}" in capsys.readouterr().err
    assert _main(["generate", str(run / "last" / "model.safetensors"), "--prompt", "a"]) == 2
    assert "is a file, not a checkpoint folder" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="warmup_steps"):
        Trainer(ModelConfig(**TINY), _tc(max_steps=1, warmup_steps=5), load_corpus("embedded"), progress=False)


def test_peak_flops_matches_exact_device_names(monkeypatch):
    from flopwise.models.train import peak_flops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", None),
                       ("NVIDIA A10G", None), ("NVIDIA A10", 125e12), ("NVIDIA H200", 989e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert peak_flops("cuda") == peak, name


def test_moved_or_copied_run_resumes_in_its_new_place(tmp_path, corpus):
    """The absolute out_dir saved in the checkpoint must not pull a copied run back into the original."""
    import shutil

    run = tmp_path / "run"
    Trainer(ModelConfig(**TINY), _tc(max_steps=4, out_dir=str(run)), corpus, progress=False).fit(steps=2)
    original = (run / "last" / "model.safetensors").read_bytes()
    shutil.copytree(run, tmp_path / "copy")
    r = Trainer.resume(tmp_path / "copy" / "last", corpus, progress=False)
    assert r.cfg.out_dir == str(tmp_path / "copy")
    r.fit(steps=1)
    assert load_checkpoint(tmp_path / "copy" / "last").trainer_state["step"] == 3
    assert (run / "last" / "model.safetensors").read_bytes() == original  # the original run is untouched
    shutil.move(run, tmp_path / "moved")
    r = Trainer.resume(tmp_path / "moved" / "last", corpus, progress=False)
    r.fit(steps=1)
    assert not run.exists()  # not recreated
    assert load_checkpoint(tmp_path / "moved" / "last").trainer_state["step"] == 3
    # a run's own last in its place still continues there; an explicit out_dir still wins
    assert Trainer.resume(tmp_path / "moved" / "last", corpus, progress=False).cfg.out_dir == str(tmp_path / "moved")
    r = Trainer.resume(tmp_path / "moved" / "last", corpus, progress=False, out_dir=str(tmp_path / "elsewhere"))
    assert r.cfg.out_dir == str(tmp_path / "elsewhere")


def test_cli_interrupt_and_warnings_are_one_line(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    from flopwise.models import train as train_mod

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.Trainer, "fit", interrupted)
    try:
        rc = _main(["train", "tiny", "--corpus", "embedded", "--steps", "2", "--seq-len", "32"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C reached the user as a traceback")
    assert rc == 130
    assert capsys.readouterr().err.strip().endswith("flopwise: interrupted")
    monkeypatch.undo()
    # the command itself prints a warning as one line, without the source line that raised it
    r = subprocess.run([sys.executable, "-m", "flopwise", "train", "tiny", "--corpus", "embedded", "--steps", "1",
                        "--seq-len", "32", "--batch-size", "2", "--warmup-steps", "5", "--eval-every", "1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "warmup_steps (5)" in ln]
    assert warn and all(ln.startswith("flopwise: warning: ") for ln in warn), r.stderr
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr, r.stderr


# ------------------------------------------------------------------ divergence, resume settings, evaluation
def test_divergence_stops_before_the_update_and_keeps_a_finite_checkpoint(tmp_path, corpus):
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=30, lr=1e4, warmup_steps=1, save_every=1, out_dir=str(tmp_path)),
                corpus, progress=False)
    with pytest.raises(FloatingPointError, match="diverged"):
        t.fit()
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())  # never stepped on inf/NaN
    for st in t.optimizer.state.values():
        assert all(bool(torch.isfinite(v).all()) for v in st.values())
    saved = load_model(tmp_path / "last")
    assert all(bool(torch.isfinite(p).all()) for p in saved.parameters())
    # and nothing saves weights that are not finite
    with torch.no_grad():
        next(t.model.parameters())[0].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="inf/NaN"):
        t.save(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_resume_drops_the_time_budget_unless_passed(tmp_path, corpus):
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=2, time_budget_s=1e-9, min_steps=2), corpus, progress=False)
    t.fit()
    t.save(tmp_path / "ck")
    r = Trainer.resume(tmp_path / "ck", corpus, progress=False, max_steps=4, out_dir=None)
    assert r.cfg.time_budget_s is None and r.cfg.min_steps == 0
    res = r.fit()
    assert res.steps == 2 and not res.stopped_early
    r = Trainer.resume(tmp_path / "ck", corpus, progress=False, max_steps=4, out_dir=None, time_budget_s=1e-9)
    res = r.fit()
    assert res.steps == 0 and res.stopped_early


def test_cli_resume_time_budget_and_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOPWISE_DATA", str(tmp_path / "nodata"))
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": TINY, "train": {"seq_len": 32, "batch_size": 2, "max_steps": 2,
                                                       "eval_tokens": 64, "warmup_steps": 1, "time_budget_s": 1e-9,
                                                       "min_steps": 2}}))
    summary = json.loads(_cli(["train", str(cfg), "--out", str(tmp_path / "run"), "--json"]).splitlines()[-1])
    assert summary["steps"] == 2 and summary["stopped_early"] is False
    last = str(tmp_path / "run" / "last")
    summary = json.loads(_cli(["train", "--resume", last, "--steps", "3", "--json"]).splitlines()[-1])
    assert summary["steps"] == 3 and summary["stopped_early"] is False  # the old budget does not cap it
    summary = json.loads(_cli(["train", "--resume", last, "--steps", "6", "--time-budget", "1e-9",
                               "--json"]).splitlines()[-1])
    assert summary["steps"] == 3 and summary["stopped_early"] is True
    text = _cli(["train", "--resume", last, "--steps", "6", "--time-budget", "1e-9"])
    assert "stopped early on the time budget" in text
    # a seed cannot change a resumed run's data order: refused, not silently ignored
    assert _main(["train", "--resume", last, "--steps", "6", "--seed", "5"]) == 2
    assert "--seed applies to a new run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seed=5"):
        Trainer.resume(last, load_corpus("embedded"), progress=False, seed=5)


def test_noncausal_evaluate_has_no_dropout_and_keeps_the_rng(corpus):
    t = Trainer(ModelConfig(**TINY, routing="every_other", dropout=0.3), _tc(max_steps=2, eval_tokens=256),
                corpus, progress=False)
    t.fit()
    s0 = torch.get_rng_state()
    vals = [t.evaluate(causal=False)["val_bpb"] for _ in range(3)]
    assert vals[0] == vals[1] == vals[2]
    assert torch.equal(s0, torch.get_rng_state())
    assert t.evaluate(causal=False)["val_bpb"] != t.evaluate()["val_bpb"]  # still top-k routing, not causal
    t.model.train()
    t.evaluate(causal=False)
    assert t.model.training and all(m.training for m in t.model.modules())  # mode restored


def test_largest_seed_accepted_seeds_every_batch(corpus):
    top = ((2**64 - 1 - 2) // 1_009 - 4) // 1_000_003
    cfg = TrainConfig(seed=top, max_steps=5, grad_accum=3)
    with pytest.raises(ValueError, match="TrainConfig.seed must be at most"):
        TrainConfig(seed=top + 1, max_steps=5, grad_accum=3)
    x, _ = ByteData(corpus, seed=cfg.seed).batch(cfg.max_steps - 1, cfg.grad_accum - 1, 2, 16)
    assert x.shape == (2, 16)


@pytest.mark.parametrize("call", [dict(steps=2.5), dict(steps=True), dict(steps=-1), dict(steps="3")])
def test_fit_refuses_bad_steps(corpus, call):
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=4), corpus, progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        t.fit(**call)
    assert t.step == 0


@pytest.mark.parametrize("max_tokens", [-5, 0, 2.5, True])
def test_evaluate_refuses_bad_max_tokens(corpus, max_tokens):
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=4), corpus, progress=False)
    with pytest.raises(ValueError, match="max_tokens must be"):
        t.evaluate(max_tokens)


def test_generate_cli_starts_from_the_runs_bos_and_refuses_bad_options(tmp_path, corpus, monkeypatch, capsys):
    from flopwise.models import Transformer

    t = Trainer(ModelConfig(**TINY), _tc(max_steps=1, warmup_steps=1), ByteData(corpus, bos=0), progress=False)
    t.fit()
    t.save(tmp_path / "ck")
    seen = []
    generate = Transformer.generate

    def spy(self, prompt, *a, **k):
        seen.append(prompt.clone())
        return generate(self, prompt, *a, **k)

    monkeypatch.setattr(Transformer, "generate", spy)
    text = _cli(["generate", str(tmp_path / "ck"), "--prompt", "The", "--max-new-tokens", "5"])
    assert seen[-1].tolist() == [[0, *b"The"]]                  # the run's bos byte first, as in training
    expect = decode(generate(t.model.eval(), seen[-1], 5)[0, 4:])
    assert text == "The" + expect + "\n"                          # and not printed
    # without trainer state (no bos recorded), the prompt alone
    (tmp_path / "ck" / "trainer_state.json").unlink()
    _cli(["generate", str(tmp_path / "ck"), "--prompt", "The", "--max-new-tokens", "2"])
    assert seen[-1].tolist() == [list(b"The")]
    for argv, msg in ((["--top-k", "5"], "--top-k applies to sampling"),
                      (["--device", "meta"], "--device meta"),
                      (["--seed", str(2**64)], "--seed must be in")):
        assert _main(["generate", str(tmp_path / "ck"), "--prompt", "a", *argv]) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: d.pop("train_config"), r"missing \['train_config'\]"),
    (lambda d: d.pop("rng"), r"missing \['rng'\]"),
    (lambda d: d["rng"].__setitem__("torch", "AAAA"), "unusable RNG state"),
    (lambda d: d["rng"].pop("numpy"), "unusable RNG state"),
    (lambda d: d.__setitem__("step", -5), "step must be an int >= 0"),
    (lambda d: d.__setitem__("data", []), "data must be an object"),
])
def test_resume_names_a_corrupt_trainer_state(tmp_path, corpus, damage, pattern):
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=1, warmup_steps=1), corpus, progress=False)
    t.train_step()
    t.save(tmp_path / "ck")
    f = tmp_path / "ck" / "trainer_state.json"
    d = json.loads(f.read_text())
    damage(d)
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=pattern) as info:
        Trainer.resume(tmp_path / "ck", corpus, progress=False, out_dir=None)
    assert "trainer_state.json" in str(info.value)


def test_resume_refuses_an_edited_config_unless_allowed(tmp_path, corpus, monkeypatch, capsys):
    """config.json edited after the save (same weight shapes, another model): refused by name;
    allowed on request, after which the record follows the edited model."""
    t = Trainer(ModelConfig(**TINY), _tc(max_steps=3, warmup_steps=1), corpus, progress=False)
    t.train_step()
    ck = tmp_path / "ck"
    t.save(ck)
    state = json.loads((ck / "trainer_state.json").read_text())
    assert ModelConfig.from_dict(state["model_config"]) == t.model.cfg
    f = ck / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "rope_theta": 500000.0, "norm_eps": 1e-5}))
    with pytest.raises(ValueError, match=r"differs from the model this run trained: rope_theta: 10000.0 -> 500000.0; "
                                         r"norm_eps: 1e-06 -> 1e-05\. Resuming"):
        Trainer.resume(ck, corpus, progress=False, out_dir=None)
    monkeypatch.setenv("FLOPWISE_DATA", str(tmp_path / "nodata"))
    argv = ["train", "--resume", str(ck), "--corpus", "embedded", "--steps", "2"]
    assert _main(argv) == 2 and "--allow-config-change" in capsys.readouterr().err
    assert _main(["train", "tiny", "--allow-config-change"]) == 2
    assert "--allow-config-change applies to --resume" in capsys.readouterr().err
    r = Trainer.resume(ck, corpus, progress=False, out_dir=str(tmp_path / "run"), allow_config_change=True)
    assert r.model.cfg.rope_theta == 500000.0 and r.step == 1
    r.train_step()
    r.save(tmp_path / "ck2")
    assert Trainer.resume(tmp_path / "ck2", corpus, progress=False, out_dir=None).step == 2
    # a checkpoint from before the record: nothing to compare, it resumes
    state.pop("model_config")
    (ck / "trainer_state.json").write_text(json.dumps(state))
    assert Trainer.resume(ck, corpus, progress=False, out_dir=None).model.cfg.rope_theta == 500000.0
    state["model_config"] = {"d_model": "wide"}
    (ck / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="corrupt .*trainer_state.json: its model_config is no ModelConfig"):
        Trainer.resume(ck, corpus, progress=False, out_dir=None)


def test_checkpoint_files_get_the_usual_mode(tmp_path, corpus):
    old = os.umask(0o027)
    try:
        t = Trainer(ModelConfig(**TINY), _tc(max_steps=1, warmup_steps=1), corpus, progress=False)
        t.save(tmp_path / "ck")
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "ck").iterdir()}
    assert set(modes) == {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"}
    assert set(modes.values()) == {0o640}, modes
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o750


def test_cli_resume_names_overrides_that_change_the_schedule(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOPWISE_DATA", str(tmp_path / "nodata"))
    base = ["--corpus", "embedded", "--seq-len", "32", "--batch-size", "2", "--warmup-steps", "1"]
    assert _main(["train", "tiny", *base, "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    last = str(tmp_path / "run" / "last")
    assert _main(["train", "--resume", last, "--corpus", "embedded", "--steps", "3", "--lr", "1e-3",
                  "--batch-size", "2"]) == 0
    notes = [s for s in capsys.readouterr().err.splitlines() if s.startswith("note:")]
    assert len(notes) == 1 and "--lr, --steps change the checkpoint's batches" in notes[0]  # not --batch-size: same
    assert _main(["train", "--resume", last, "--corpus", "embedded", "--steps", "4", "--eval-every", "0"]) == 0
    assert "note:" in capsys.readouterr().err  # --steps: the cosine ends elsewhere
