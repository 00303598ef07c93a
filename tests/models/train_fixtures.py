"""Fixtures and sizes shared by the trainer tests (test_train.py, test_token_data.py)."""

from __future__ import annotations

import pytest
import torch

from flopwise.models.data import TextCorpus, embedded_corpus
from flopwise.models.train import TrainConfig, Trainer

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
    yield


@pytest.fixture(scope="module")
def corpus() -> TextCorpus:
    return embedded_corpus()


def _tc(**kw) -> TrainConfig:
    base = dict(seq_len=32, batch_size=4, max_steps=8, lr=1e-2, warmup_steps=2, eval_tokens=512, log_every=100)
    return TrainConfig(**{**base, **kw})


def assert_exact_resume(tmp_path, cfg, tc: TrainConfig, data, resume_data, steps: int) -> None:
    """``steps`` steps straight == ``steps / 2``, save, resume on ``resume_data`` in a fresh
    trainer, ``steps / 2`` more: identical losses and weights (bitwise)."""
    straight = Trainer(cfg, tc, data, progress=False)
    full = [straight.train_step()["total_loss"] for _ in range(steps)]

    first = Trainer(cfg, tc, data, progress=False)
    half = [first.train_step()["total_loss"] for _ in range(steps // 2)]
    first.save(tmp_path / "ck")
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    resumed = Trainer.resume(tmp_path / "ck", resume_data, progress=False)
    assert resumed.step == steps // 2
    rest = [resumed.train_step()["total_loss"] for _ in range(steps - steps // 2)]
    assert half + rest == full  # bitwise: same data, weights, moments, schedule
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
