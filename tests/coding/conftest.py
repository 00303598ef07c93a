"""Fixtures of the coding tests (one intra-op thread is set for every test in tests/conftest.py:
these tests run thousands of tiny torch ops per stream step)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def prose() -> bytes:
    """Real English prose shipped with CPython (~460 KB of documentation text)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


class TinyByteLM(torch.nn.Module):
    """A small randomly initialised byte model: embeddings of the last ``k`` bytes -> MLP ->
    logits, returned for every position as ``[B, L, 256]`` like an LM."""

    def __init__(self, k: int = 4, dim: int = 16, seed: int = 0, sharp: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.k = k
        self.embed = torch.nn.Embedding(256, dim)
        self.hidden = torch.nn.Linear(k * dim, 64)
        self.out = torch.nn.Linear(64, 256)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 * sharp)

    def forward(self, x):
        h = self.embed(x[:, -self.k :]).flatten(1)
        logits = self.out(torch.tanh(self.hidden(h)))
        return logits[:, None, :].expand(x.shape[0], x.shape[1], 256)


@pytest.fixture
def tiny_lm():
    return TinyByteLM()
