"""TokenData: arbitrary token ids (e.g. compressed text) for the Trainer, with the batches of
ByteData and validation in bits per original byte.

Tiny models on the PyTorch references (``FLOPWISE_BACKEND=reference``), CPU only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flopwise.models import ModelConfig
from flopwise.models.data import ByteData, TextCorpus, TokenData, embedded_corpus
from flopwise.models.train import TrainConfig, Trainer

from .train_fixtures import TINY, _reference_backend, _tc, assert_exact_resume, corpus  # noqa: F401  (fixtures)


def _pairs(text: bytes) -> np.ndarray:
    """A stand-in for a 16-bit tokenizer: byte pairs as uint16 ids (2 bytes per token)."""
    a = np.frombuffer(text[: len(text) // 2 * 2], dtype=np.uint8).astype(np.uint16)
    return a[0::2] * 256 + a[1::2]


@pytest.fixture(scope="module")
def pair_data(corpus) -> TokenData:
    train, val = _pairs(corpus.train[:60_000]), _pairs(corpus.val[:2_000])
    return TokenData(train, val, vocab_size=65536, val_bytes=2 * len(val), name="pairs", seed=1,
                     train_bytes=2 * len(train))


# ------------------------------------------------------------------ construction
def test_attributes_and_dtypes():
    ids = np.arange(100, dtype=np.uint16) * 600
    d = TokenData(ids, torch.arange(50, dtype=torch.int64), vocab_size=65536, val_bytes=120, name="x",
                  train_bytes=300)
    assert d.train.dtype == d.val.dtype == torch.int32
    assert d.train.tolist() == ids.astype(np.int64).tolist()
    assert (d.vocab_size, d.val_bytes, d.train_bytes, d.seed) == (65536, 120, 300, 0)
    assert d.bytes_per_token == 120 / 50
    assert d.corpus.name == "x" and len(d.corpus.sha256) == 64
    # The checksum covers the ids, not the dtype they came in; it changes with the ids and vocab.
    same = TokenData(ids.astype(np.int64), np.arange(50, dtype=np.int32), vocab_size=65536, val_bytes=1, name="y")
    assert same.corpus.sha256 == d.corpus.sha256
    other = ids.copy()
    other[7] += 1
    assert TokenData(other, np.arange(50), vocab_size=65536, val_bytes=1, name="x").corpus.sha256 != d.corpus.sha256
    assert TokenData(ids, np.arange(50), vocab_size=65537, val_bytes=1, name="x").corpus.sha256 != d.corpus.sha256
    # Train/val boundary is part of the checksum.
    both = np.arange(60)
    assert (TokenData(both[:30], both[30:], vocab_size=64, val_bytes=1, name="x").corpus.sha256
            != TokenData(both[:31], both[31:], vocab_size=64, val_bytes=1, name="x").corpus.sha256)
    # The data owns its copy.
    src = np.arange(10, dtype=np.int32)
    d2 = TokenData(src, src, vocab_size=16, val_bytes=10, name="z")
    src[0] = 9
    assert d2.train[0] == 0
    for dt in (np.uint8, np.int32, np.int64):
        assert TokenData(np.arange(10, dtype=dt), np.arange(5, dtype=dt), vocab_size=256, val_bytes=5,
                         name="d").train.dtype == torch.int32


def test_byte_data_has_token_attributes(corpus):
    d = ByteData(corpus)
    assert d.vocab_size == 256 and d.bytes_per_token == 1.0
    assert d.val_bytes == len(corpus.val) and d.train_bytes == len(corpus.train)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(train=np.zeros((4, 4), np.int64)), ValueError, "train must be 1-D"),
    (dict(val=torch.zeros(2, 3, dtype=torch.int64)), ValueError, "val must be 1-D"),
    (dict(train=np.zeros(10, np.float32)), TypeError, "train must hold integer"),
    (dict(val=torch.zeros(10)), TypeError, "val must hold integer"),
    (dict(train=np.zeros(10, bool)), TypeError, "train must hold integer"),
    (dict(train=[1, 2, 3]), TypeError, "train must be a 1-D integer numpy array or torch tensor"),
    (dict(train=np.array([0, 5, 256])), ValueError, r"train holds token ids in \[0, 256\].*vocab_size=256"),
    (dict(val=np.array([3, -1, 2])), ValueError, r"val holds token ids in \[-1, 3\]"),
    (dict(val=np.array([3])), ValueError, "val must hold at least 2 tokens"),
    (dict(vocab_size=1), ValueError, "vocab_size must be an int >= 2"),
    (dict(vocab_size=256.0), ValueError, "vocab_size must be an int >= 2"),
    (dict(val_bytes=0), ValueError, "val_bytes must be an int >= 1"),
    (dict(val_bytes=2.5), ValueError, "val_bytes must be an int >= 1"),
    (dict(train_bytes=0), ValueError, "train_bytes must be None or an int >= 1"),
    (dict(name=""), TypeError, "name"),
])
def test_validation_errors(kw, exc, match):
    args = dict(train=np.arange(100) % 256, val=np.arange(20), vocab_size=256, val_bytes=20, name="t")
    args.update(kw)
    with pytest.raises(exc, match=match):
        TokenData(args.pop("train"), args.pop("val"), **args)


# ------------------------------------------------------------------ batches
def test_batches_are_deterministic(pair_data):
    x1, y1 = pair_data.batch(5, 1, 4, 16)
    x2, y2 = pair_data.batch(5, 1, 4, 16)
    assert x1.dtype == y1.dtype == torch.int64 and x1.shape == (4, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert int(x1.max()) > 255  # real 16-bit ids
    assert not torch.equal(x1, pair_data.batch(6, 1, 4, 16)[0])
    assert not torch.equal(x1, pair_data.batch(5, 0, 4, 16)[0])
    wins = list(pair_data.eval_windows(16, 3, max_tokens=100))
    assert sum(w[0].shape[0] for w in wins) == 6  # 100 // 16 windows
    assert all(x.dtype == torch.int64 for w in wins for x in w)
    allw = list(pair_data.eval_windows(16, 7))
    xs = torch.cat([w[0] for w in allw])
    assert xs.shape[0] == (pair_data.val.numel() - 1) // 16
    assert torch.equal(xs.reshape(-1), pair_data.val[: xs.numel()].long())  # consecutive, non-overlapping
    with pytest.raises(ValueError, match="shorter than seq_len"):
        next(TokenData(np.arange(8), np.arange(8), vocab_size=8, val_bytes=8, name="s").eval_windows(16, 1))
    with pytest.raises(ValueError, match="shorter than seq_len"):
        TokenData(np.arange(8), np.arange(8), vocab_size=8, val_bytes=8, name="s").batch(0, 0, 1, 16)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_same_windows_as_byte_data(corpus, as_tensor):
    """Bytes given as tokens with vocabulary 256 give exactly ByteData's batches and windows."""
    bd = ByteData(corpus, seed=3)
    train, val = np.frombuffer(corpus.train, np.uint8), np.frombuffer(corpus.val, np.uint8)
    if as_tensor:
        train, val = torch.from_numpy(train.copy()), torch.from_numpy(val.copy())
    td = TokenData(train, val, vocab_size=256, val_bytes=len(corpus.val), name="bytes", seed=3)
    assert td.bytes_per_token == 1.0
    for step, micro in [(0, 0), (5, 1), (1234, 3)]:
        for a, b in zip(bd.batch(step, micro, 4, 32), td.batch(step, micro, 4, 32)):
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    for mt in (100, None):
        wa, wb = list(bd.eval_windows(32, 5, mt)), list(td.eval_windows(32, 5, mt))
        assert len(wa) == len(wb)
        for (xa, ya), (xb, yb) in zip(wa, wb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ------------------------------------------------------------------ training
def test_trainer_on_65536_tokens(pair_data):
    cfg = ModelConfig.preset("tiny", vocab_size=65536, max_seq_len=64)
    t = Trainer(cfg, _tc(max_steps=4), pair_data, progress=False)
    assert t.data is pair_data
    losses = [t.train_step()["loss"] for _ in range(4)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(65536), rel=0.1)  # near-uniform at init
    ev = t.evaluate(max_tokens=None)
    assert ev["val_tokens"] == (pair_data.val.numel() - 1) // 32 * 32
    assert ev["val_bits_per_token"] == pytest.approx(ev["val_loss"] / math.log(2))
    assert pair_data.bytes_per_token == 2.0
    assert ev["val_bpb"] == pytest.approx(ev["val_bits_per_token"] / pair_data.bytes_per_token)
    res = t.fit(steps=0)  # no steps left to run: still evaluates (no evals yet in this call)
    assert res.val_bpb == pytest.approx(t.evaluate()["val_bpb"])


def test_byte_evaluate_bpb_is_bits_per_token(corpus):
    t = Trainer(ModelConfig(**TINY), _tc(), corpus, progress=False)
    t.train_step()
    ev = t.evaluate()
    assert ev["val_bpb"] == ev["val_bits_per_token"] == pytest.approx(ev["val_loss"] / math.log(2))


def test_refuses_model_vocab_smaller_than_data(pair_data, corpus):
    with pytest.raises(ValueError, match=r"vocab_size \(256\).*vocab_size \(65536\)"):
        Trainer(ModelConfig(**TINY), _tc(), pair_data, progress=False)
    with pytest.raises(ValueError, match=r"vocab_size \(100\).*vocab_size \(256\)"):
        Trainer(ModelConfig(**{**TINY, "vocab_size": 100}), _tc(), corpus, progress=False)
    # A small vocabulary needs only a small model vocabulary.
    small = TokenData(np.arange(4000) % 17, np.arange(400) % 17, vocab_size=17, val_bytes=1000, name="mod17")
    t = Trainer(ModelConfig(**{**TINY, "vocab_size": 17}), _tc(), small, progress=False)
    t.train_step()
    assert t.evaluate()["val_bpb"] == pytest.approx(t.evaluate()["val_bits_per_token"] / 2.5)


def test_exact_resume_on_tokens(tmp_path, pair_data):
    """N steps straight == N/2, save, resume on the same TokenData, N/2 more: identical losses."""
    cfg, tc = ModelConfig.preset("tiny", vocab_size=65536, max_seq_len=64), _tc(max_steps=4, grad_accum=2)
    again = TokenData(pair_data.train.numpy().astype(np.uint16), pair_data.val.numpy().astype(np.uint16),
                      vocab_size=65536, val_bytes=pair_data.val_bytes, name="pairs", seed=1)
    assert_exact_resume(tmp_path, cfg, tc, pair_data, again, 4)


def test_resume_refuses_other_tokens(tmp_path, pair_data, corpus):
    cfg = ModelConfig.preset("tiny", vocab_size=65536, max_seq_len=64)
    t = Trainer(cfg, _tc(), pair_data, progress=False)
    t.train_step()
    t.save(tmp_path / "ck")
    other = TokenData(pair_data.train[:-1], pair_data.val, vocab_size=65536, val_bytes=10, name="pairs")
    with pytest.raises(ValueError, match="corpus"):
        Trainer.resume(tmp_path / "ck", other, progress=False)
    with pytest.raises(ValueError, match="corpus"):
        Trainer.resume(tmp_path / "ck", corpus, progress=False)


def test_byte_data_bos_replaces_first_input_only():
    corpus = embedded_corpus()
    plain, bos = ByteData(corpus, seed=3), ByteData(corpus, seed=3, bos=0)
    x0, y0 = plain.batch(5, 0, 4, 16)
    x1, y1 = bos.batch(5, 0, 4, 16)
    assert torch.equal(y0, y1) and torch.equal(x0[:, 1:], x1[:, 1:])
    assert bool((x1[:, 0] == 0).all()) and bool((x0[:, 0] != 0).all())
    (ex0, ey0), (ex1, ey1) = next(plain.eval_windows(16, 4)), next(bos.eval_windows(16, 4))
    assert torch.equal(ey0, ey1) and bool((ex1[:, 0] == 0).all()) and torch.equal(ex0[:, 1:], ex1[:, 1:])
    for bad in (256, -1, True, 1.0):
        with pytest.raises(ValueError, match="bos"):
            ByteData(corpus, bos=bad)


def test_resume_keeps_bos(tmp_path):
    corpus = embedded_corpus()
    cfg = ModelConfig.preset("tiny", max_seq_len=64)
    t = Trainer(cfg, _tc(), ByteData(corpus, seed=0, bos=0), progress=False)
    t.train_step()
    t.save(tmp_path / "ck")
    resumed = Trainer.resume(tmp_path / "ck", corpus, progress=False)
    assert resumed.data.bos == 0 and resumed.data.seed == t.data.seed
    with pytest.raises(ValueError, match="bos"):
        Trainer.resume(tmp_path / "ck", ByteData(corpus, seed=0), progress=False)


def test_a_training_array_of_exactly_one_window_is_enough():
    data = TokenData(np.arange(9), np.arange(9), vocab_size=16, val_bytes=9, name="one-window")
    x, y = data.batch(0, 0, 2, 8)
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[1], torch.arange(1, 9))
    data.check_lengths(8)
    with pytest.raises(ValueError, match=r"training tokens of 'one-window' \(9 tokens\)"):
        data.check_lengths(9)
