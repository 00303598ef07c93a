"""Probability models the coder drives: a tiny protocol, a static unigram model, an LM adapter.

The protocol (:class:`ProbabilityModel`) is what the stream coder calls once per step:

* ``vocab_size: int`` - symbols 0..V-1,
* ``context_len: int`` - L, how many previous symbols a prediction sees (0: none),
* ``frequencies(context: [B, L] int64, cfg: CoderConfig) -> [B, V] int64`` - integer
  frequencies summing to ``2^cfg.precision``; ``context`` holds the last L symbols of each
  stream, left-padded with :attr:`pad_id` where fewer exist (always exactly L columns, so the
  model sees the same shapes in the encoder and the decoder).

Determinism: the decoder recomputes the frequencies from the symbols it has decoded so far;
they must equal the encoder's bit for bit. :class:`ModuleModel` therefore evaluates its
module in micro-batches of exactly ``batch_rows`` rows of exactly ``context_len`` tokens
(padding the last micro-batch), so every call has the same shape whatever the number of
streams; a row's logits then depend on that row alone for row-wise kernels (embedding,
matmul, causal attention). What must match between encoding and decoding: the weights,
``context_len``, ``batch_rows``, ``pad_id``, the device type and model, the dtype, and the
torch / CUDA / Triton versions (kernel choice and reduction order). Kernels that mix rows
(non-causal top-k routing such as MoD or expert-choice MoE in training mode) break this:
evaluate such models in a causal eval mode.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import torch

from .rangecoder import CoderConfig, quantize_logits

__all__ = ["ProbabilityModel", "StaticModel", "ModuleModel", "file_sha256"]


@runtime_checkable
class ProbabilityModel(Protocol):
    vocab_size: int
    context_len: int
    pad_id: int

    def frequencies(self, context: torch.Tensor, cfg: CoderConfig) -> torch.Tensor: ...


class StaticModel:
    """A unigram model: one integer frequency table for every position (StaticAC).

    ``freqs [V] int64`` is stored exactly (quantised once), so decoding needs no floats.
    """

    context_len = 0
    pad_id = 0

    def __init__(self, freqs: torch.Tensor, cfg: CoderConfig = CoderConfig()):
        if not isinstance(freqs, torch.Tensor) or freqs.dim() != 1 or freqs.dtype != torch.int64:
            raise TypeError("freqs must be an int64 tensor [V]")
        cfg.check_vocab(freqs.numel())
        if int(freqs.sum()) != cfg.total or bool((freqs < cfg.min_freq).any()):
            raise ValueError(f"freqs must sum to 2^{cfg.precision} with every entry >= {cfg.min_freq}")
        self.freqs = freqs
        self.cfg = cfg
        self.vocab_size = freqs.numel()

    @classmethod
    def fit(cls, data: bytes | torch.Tensor, vocab_size: int = 256, cfg: CoderConfig = CoderConfig(),
            smoothing: float = 0.5) -> "StaticModel":
        """Estimate byte (symbol) frequencies from training data: counts + ``smoothing``,
        normalised and quantised (every symbol >= ``cfg.min_freq``)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            sym = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if len(data) else torch.zeros(0, dtype=torch.long)
        elif isinstance(data, torch.Tensor):
            sym = data.reshape(-1).long()
        else:
            raise TypeError("data must be bytes or a tensor of symbols")
        if sym.numel() and (int(sym.min()) < 0 or int(sym.max()) >= vocab_size):
            raise ValueError(f"data symbols must be in [0, {vocab_size})")
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        counts = torch.bincount(sym, minlength=vocab_size).double() + smoothing
        if float(counts.sum()) == 0:
            counts = torch.ones(vocab_size, dtype=torch.float64)
        from .rangecoder import quantize_probs

        return cls(quantize_probs(counts / counts.sum(), cfg), cfg)

    def frequencies(self, context: torch.Tensor, cfg: CoderConfig) -> torch.Tensor:
        if cfg != self.cfg:
            raise ValueError(f"StaticModel was quantised with {self.cfg}, asked for {cfg}")
        return self.freqs.to(context.device).expand(context.shape[0], -1)

    def probabilities(self) -> torch.Tensor:
        return self.freqs.double() / self.cfg.total


class ModuleModel:
    """Adapter: any ``torch.nn.Module`` mapping tokens ``[B, L]`` to logits ``[B, L, V']``
    (or a tuple / NamedTuple whose first item is that, like ``Transformer``'s ``ModelOutput``)
    becomes a :class:`ProbabilityModel` predicting the next symbol from the last position.

    Args:
        module: the LM (put in ``eval()`` mode here; no gradients are taken).
        context_len: L, tokens per row (e.g. M1's 1024, or a window cap for EqualInfoAC).
        vocab_size: symbols coded (default 256: bytes); logits are sliced to this many.
        pad_id: left-padding token for rows with fewer than L previous symbols (default 0;
            a model with a spare token, e.g. vocabulary 257, can pass 256).
        batch_rows: every module call has exactly this many rows (fixed shapes; see the
            module docstring).
        dtype: autocast dtype on CUDA (None: the module's own dtype).
    """

    def __init__(self, module: torch.nn.Module, context_len: int, *, vocab_size: int = 256, pad_id: int = 0,
                 batch_rows: int = 64, dtype: torch.dtype | None = None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        for name, v in (("context_len", context_len), ("batch_rows", batch_rows), ("vocab_size", vocab_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not 0 <= pad_id:
            raise ValueError(f"pad_id must be >= 0, got {pad_id}")
        self.module = module.eval()
        self.context_len = context_len
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.batch_rows = batch_rows
        self.dtype = dtype

    @torch.no_grad()
    def logits(self, context: torch.Tensor) -> torch.Tensor:
        """``context [B, L]`` -> float32 logits ``[B, V]`` of the next symbol."""
        if context.dim() != 2 or context.shape[1] != self.context_len:
            raise ValueError(f"context must be [B, {self.context_len}], got {tuple(context.shape)}")
        B, R = context.shape[0], self.batch_rows
        pad = (-B) % R
        if pad:
            filler = torch.full((pad, self.context_len), self.pad_id, dtype=context.dtype, device=context.device)
            context = torch.cat([context, filler])
        outs = []
        for i in range(0, context.shape[0], R):
            with torch.autocast(context.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                out = self.module(context[i : i + R])
            if isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out[:, -1, : self.vocab_size].float())
        return torch.cat(outs)[:B]

    def frequencies(self, context: torch.Tensor, cfg: CoderConfig) -> torch.Tensor:
        return quantize_logits(self.logits(context), cfg)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
