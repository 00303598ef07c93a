"""Fixtures and sizes shared by the trainer tests (test_train.py, test_token_data.py)."""

from __future__ import annotations

import pytest

from flopwise.models.data import TextCorpus, embedded_corpus
from flopwise.models.train import TrainConfig

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
