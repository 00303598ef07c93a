"""Probability models the coder drives: a tiny protocol, a static unigram model, an LM adapter.

The protocol (:class:`ProbabilityModel`) is what the stream coder calls once per step:

* ``vocab_size: int`` - symbols 0..V-1,
* ``context_len: int`` - L, how many previous symbols a prediction sees (0: none),
* ``frequencies(context: [B, L] int64, cfg: CoderConfig) -> [B, V] int64`` - integer
  frequencies summing to ``2^cfg.precision``, each at least ``cfg.min_freq`` (the stream
  coder checks every table and raises ``ValueError`` otherwise); ``context`` holds the last
  L symbols of each stream, left-padded with :attr:`pad_id` where fewer exist (always
  exactly L columns, so the model sees the same shapes in the encoder and the decoder).

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
import math
import numbers
from typing import Protocol, runtime_checkable

import torch

from .rangecoder import CoderConfig, quantize_logits

__all__ = ["ProbabilityModel", "IncrementalModel", "StaticModel", "ModuleModel", "CachedLM", "file_sha256"]


@runtime_checkable
class ProbabilityModel(Protocol):
    vocab_size: int
    context_len: int
    pad_id: int

    def frequencies(self, context: torch.Tensor, cfg: CoderConfig) -> torch.Tensor: ...


@runtime_checkable
class IncrementalModel(Protocol):
    """A model that keeps per-stream state instead of re-reading a context window.

    ``begin(batch, device)`` returns a state with ``frequencies(cfg) -> [batch, V] int64`` (the
    next symbol's frequencies of every stream) and ``update(symbols [batch], append [batch]
    bool, restart [batch] bool | None)``: streams where ``append`` take ``symbols`` into their
    context, streams where ``restart`` start an empty context, the others keep their state.
    A stream's frequencies may depend only on its own history (its appends since its last
    restart), so the encoder and the decoder, which batch streams differently, agree.
    """

    vocab_size: int

    def begin(self, batch: int, device): ...


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
        if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real):
            raise TypeError(f"smoothing must be a number, got {type(smoothing).__name__}")
        if not (math.isfinite(smoothing) and smoothing >= 0):
            raise ValueError(f"smoothing must be finite and >= 0, got {smoothing}")
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


class CachedLM:
    """Incremental (KV-cached) evaluation of a dense flopwise ``Transformer``: one new token per
    stream per step instead of a full window, so coding costs one token's forward pass per
    symbol (about ``context_len`` times less than :class:`ModuleModel`).

    Each stream's context starts with ``bos_id`` at position 0 and holds at most
    ``context_len`` tokens; a symbol that would not fit restarts the context (bos, then that
    symbol at position 1), so ``context_len - 1`` bounds how far back a prediction looks, in
    blocks rather than sliding like :class:`ModuleModel`'s window.

    Determinism: every module call has exactly ``batch_rows`` rows of one token against a
    cache of exactly ``context_len`` slots (restarted rows are zeroed, unused slots masked), so a
    stream's logits depend only on its own history, not on which other streams share its
    batch. As for :class:`ModuleModel`, the weights, ``context_len``, ``batch_rows``,
    ``bos_id``, device type, dtype, number of CPU threads and library versions must match
    between encoding and decoding.

    Args:
        module: a ``flopwise.models.transformer.Transformer`` whose layers are all dense
            (no MoD, no MoE).
        context_len: cache slots per stream (at most the model's ``max_seq_len``).
        vocab_size: symbols coded (default 256); logits are sliced to this many.
        bos_id: the token that starts every context (default 0).
        batch_rows: rows per module call (fixed shapes).
    """

    def __init__(self, module: torch.nn.Module, context_len: int, *, vocab_size: int = 256, bos_id: int = 0,
                 batch_rows: int = 64):
        from flopwise.models.transformer import Block, Transformer

        if not isinstance(module, Transformer):
            raise TypeError(f"module must be a flopwise Transformer, got {type(module).__name__}; "
                            "use ModuleModel for other modules")
        if not all(isinstance(layer, Block) and not layer.is_moe for layer in module.layers):
            raise ValueError("CachedLM needs a dense Transformer (no MoD or MoE layers); use ModuleModel")
        for name, v, lo in (("context_len", context_len, 2), ("batch_rows", batch_rows, 1),
                             ("vocab_size", vocab_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if context_len > module.cfg.max_seq_len:
            raise ValueError(f"context_len {context_len} exceeds the model's max_seq_len {module.cfg.max_seq_len}")
        if vocab_size > module.cfg.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} exceeds the model's {module.cfg.vocab_size}")
        if not 0 <= bos_id < module.cfg.vocab_size:
            raise ValueError(f"bos_id must be in [0, {module.cfg.vocab_size}), got {bos_id}")
        self.module = module.eval()
        self.context_len, self.vocab_size, self.bos_id, self.batch_rows = context_len, vocab_size, bos_id, batch_rows
        self.pad_id = bos_id

    def begin(self, batch: int, device) -> "_CachedState":
        return _CachedState(self, batch, torch.device(device))

    def cache_bytes(self, batch: int) -> int:
        """Bytes the key and value caches of ``batch`` streams take (rows padded to a multiple
        of ``batch_rows``); :meth:`begin` checks them against the device's free memory."""
        m, R = self.module, self.batch_rows
        rows = max(R, -(-batch // R) * R)
        elem = next(m.parameters()).element_size()
        return 2 * len(m.layers) * rows * m.cfg.n_heads * self.context_len * m.cfg.head_dim * elem


def _free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


class _CachedState:
    """Per-stream KV caches of a :class:`CachedLM` (rows padded to a multiple of batch_rows)."""

    def __init__(self, lm: CachedLM, batch: int, device: torch.device):
        m = lm.module
        R = lm.batch_rows
        self.lm, self.B = lm, batch
        self.Bp = max(R, -(-batch // R) * R)
        need, free = lm.cache_bytes(batch), _free_bytes(device)
        if free is not None and need > free:
            raise MemoryError(
                f"CachedLM: the KV caches of {batch} streams need {need / 2**30:.2f} GiB but {device} has "
                f"{free / 2**30:.2f} GiB free; code fewer streams at once (streams_per_batch, batch_windows) "
                f"or use a shorter context_len")
        H, Dh = m.cfg.n_heads, m.cfg.head_dim
        dtype = next(m.parameters()).dtype
        shape = (self.Bp, H, lm.context_len, Dh)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in m.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in m.layers]
        self.pos = torch.zeros(self.Bp, dtype=torch.long, device=device)
        self.logits = torch.zeros(self.Bp, lm.vocab_size, dtype=torch.float32, device=device)
        self.slots = torch.arange(lm.context_len, device=device)
        everyone = torch.ones(batch, dtype=torch.bool, device=device)
        self.update(torch.zeros(batch, dtype=torch.long, device=device), ~everyone, everyone)

    def frequencies(self, cfg: CoderConfig) -> torch.Tensor:
        return quantize_logits(self.logits[: self.B], cfg)

    def _pad(self, x: torch.Tensor, fill) -> torch.Tensor:
        if self.Bp == self.B:
            return x
        return torch.cat([x, x.new_full((self.Bp - self.B,), fill)])

    @torch.no_grad()
    def update(self, symbols: torch.Tensor, append: torch.Tensor, restart: torch.Tensor | None = None) -> None:
        lm = self.lm
        append = self._pad(append.bool(), False)
        restart = self._pad(restart.bool(), False) if restart is not None else torch.zeros_like(append)
        restart = restart & ~append
        full = append & (self.pos >= lm.context_len)
        if bool(full.any()):
            # a full context starts again from bos (one extra step for those rows), then
            # takes the symbol at position 1
            self._step(torch.full_like(self.pos, lm.bos_id), full, full)
        self._step(torch.where(restart, lm.bos_id, self._pad(symbols.long(), 0)), append | restart, restart)

    def _step(self, tokens: torch.Tensor, active: torch.Tensor, clear: torch.Tensor) -> None:
        """Feed ``tokens [Bp]`` to the rows where ``active``; rows in ``clear`` first empty
        their context and take their token at position 0."""
        lm = self.lm
        if not bool(active.any()):
            return
        # inactive rows keep their state; they only need an in-range (unused) slot index
        write = torch.where(clear, 0, self.pos).clamp(max=lm.context_len - 1)
        if bool(clear.any()):
            rows = clear.nonzero()[:, 0]
            for i in range(len(self.k)):
                self.k[i].index_fill_(0, rows, 0)
                self.v[i].index_fill_(0, rows, 0)
        R = lm.batch_rows
        new = self.logits.clone()
        # micro-batches without an active row are skipped (same shapes for the others, so the
        # same bits); streams sorted by length leave whole micro-batches idle
        busy = active.view(-1, R).any(1).tolist()
        for m, r0 in enumerate(range(0, self.Bp, R)):
            if busy[m]:
                sl = slice(r0, r0 + R)
                new[sl] = self._forward(sl, tokens[sl], write[sl], active[sl])
        self.logits = torch.where(active[:, None], new, self.logits)
        self.pos = torch.where(active, write + 1, self.pos)

    def _forward(self, sl: slice, tokens: torch.Tensor, write: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        from flopwise.models.transformer import apply_rope

        m = self.lm.module
        R = tokens.shape[0]
        rows = torch.arange(R, device=tokens.device)
        mask = self.slots[None, :] <= write[:, None]  # [R, L]
        x = m.embed(tokens)[:, None, :]  # [R, 1, D]
        for i, block in enumerate(m.layers):
            attn = block.attn
            normed = block.norm1(x)
            q, k, v = attn.wqkv(normed).view(R, 1, 3, attn.n_heads, attn.head_dim).unbind(2)
            cos, sin = attn.rope_cos[write][:, None], attn.rope_sin[write][:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kc, vc = self.k[i][sl], self.v[i][sl]
            keep = ~active[:, None, None]
            kc[rows, :, write] = torch.where(keep, kc[rows, :, write], k[:, 0])
            vc[rows, :, write] = torch.where(keep, vc[rows, :, write], v[:, 0])
            out = _row_attention(q[:, 0], kc, vc, mask)  # [R, H, Dh]
            a = attn.wo(out.reshape(R, 1, -1))
            mlp = block.mlp(normed) if block.parallel else block.mlp(block.norm2(x + a))
            x = x + (a + mlp)
        return m.head(m.norm(x))[:, 0, : self.lm.vocab_size].float()


def _row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row against that row's cache: ``q [R, H, Dh]``, ``k, v [R, H, L, Dh]``,
    ``mask [R, L]`` (True = attend) -> ``[R, H, Dh]``.

    Written with elementwise products and reductions over fixed dimensions so that a row's
    result is a function of that row alone. ``F.scaled_dot_product_attention`` is not: on CPU
    with several threads its output for a row changes (by ~1e-6) with the other rows of the
    batch, enough to make a decoder's frequencies differ from the encoder's (an EqualInfoAC
    window then fails to decode; ``tests/coding/test_cached_lm.py`` shows it).
    """
    scale = q.shape[-1] ** -0.5
    scores = (q[:, :, None, :].float() * k.float()).sum(-1) * scale  # [R, H, L]
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return (p[..., None] * v.float()).sum(-2).to(q.dtype)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
