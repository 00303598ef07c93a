"""A vectorised integer range coder: many independent streams advance one symbol per step.

Precision (the numbers every encoder and decoder must share):

* **State**: ``low`` and ``range`` are 48-bit integers held in torch ``int64`` (all products
  stay below 2^63). ``range`` is kept in ``[2^40, 2^48]`` by byte-wise renormalisation.
* **Frequencies**: every distribution is a table of positive integers summing to exactly
  ``2^precision`` (``precision`` <= 24, default 24), so vocabularies 2..65536 all fit with
  every symbol at frequency >= 1. One step: ``r = range >> precision``,
  ``low += r * cum[s]``, ``range = r * freq[s]``; ``r >= 2^16`` bounds the truncation loss by
  ``log2(1 + 2^-16) < 2.3e-5`` bits per symbol.
* **Renormalisation**: after a step ``range >= 2^(40 - precision + 16) >= 2^16``, so at most
  3 bytes leave per step; a fixed 3-slot masked write keeps the step branch-free.
* **Carries**: ``low`` may overflow 2^48 at most once between two byte shifts. The carry is
  added to the last byte already written (buffers are ``int16``, a byte may read 256), and
  :func:`resolve_carries` propagates all of them at once at the end with a suffix scan. The
  code value never exceeds 1 (initial ``low + range = 2^48``), so no carry leaves the front.
* **Termination**: the encoder emits the fewest bits ``k`` that pin a point of the final
  interval (a multiple of ``2^(48-k)`` in ``[low, low + range)``); the decoder reads zeros past
  the end. A stream's length is therefore given in **bits** (``8 * bytes + k``); the overhead
  over the ideal code length is at most ~2 bits per stream plus the truncation loss.

The decoder mirrors the encoder (``code = value - low`` in the same 48-bit frame). It also
tracks ``low`` so that after the last symbol it can check that the stream ends exactly where
the encoder would have ended it; anything else (an out-of-range target, a wrong length, a
wrong tail, nonzero padding) marks the stream as corrupt. Decoding always runs a fixed number
of steps, so corrupt input can never loop. An arithmetic code has no redundancy, so a flipped
bit inside a stream often still decodes to *some* symbols and passes this check; the dataset
format (:mod:`flopwise.coding.dataset`) therefore verifies a SHA-256 of the decoded bytes.

Shapes: ``B`` streams, ``V`` symbols, ``C`` buffer bytes. Everything is plain torch and runs on
CPU or CUDA; :mod:`flopwise.coding.triton_coder` has a fused multi-step kernel for given
frequency tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "STATE_BITS",
    "MAX_PRECISION",
    "CoderConfig",
    "quantize_logits",
    "quantize_probs",
    "cdf_from_freqs",
    "EncoderState",
    "DecoderState",
    "encode_step",
    "encode_finish",
    "decode_step",
    "decode_finish",
    "final_bits",
    "resolve_carries",
    "encode",
    "decode",
    "check_encode_args",
    "check_decode_args",
    "CorruptStreamError",
]

STATE_BITS = 48
MAX_PRECISION = 24
_MASK = (1 << STATE_BITS) - 1
_BOTTOM = 1 << (STATE_BITS - 8)  # renormalise while range < 2^40
_MAX_SHIFT = 3  # bytes per step at most (range >= 2^16 after a step)
_LEAD = STATE_BITS // 8  # the decoder primes its window with 6 bytes


class CorruptStreamError(ValueError):
    """A compressed stream is corrupt or truncated (the message names the streams)."""


@dataclass(frozen=True)
class CoderConfig:
    """How probabilities become integer frequencies.

    Attributes:
        precision: frequencies sum to ``2^precision`` (1..24; default 24).
        min_freq: every symbol's frequency is at least this (>= 1), so every symbol is
            codable; EqualInfoAC raises it so a single byte always fits a window.
    """

    precision: int = 24
    min_freq: int = 1

    def __post_init__(self):
        if isinstance(self.precision, bool) or not isinstance(self.precision, int):
            raise TypeError(f"precision must be an int, got {type(self.precision).__name__}")
        if not 1 <= self.precision <= MAX_PRECISION:
            raise ValueError(f"precision must be in [1, {MAX_PRECISION}], got {self.precision}")
        if isinstance(self.min_freq, bool) or not isinstance(self.min_freq, int) or self.min_freq < 1:
            raise ValueError(f"min_freq must be an int >= 1, got {self.min_freq!r}")

    @property
    def total(self) -> int:
        return 1 << self.precision

    def check_vocab(self, vocab_size: int) -> None:
        if not 2 <= vocab_size <= 65536:
            raise ValueError(f"vocab_size must be in [2, 65536], got {vocab_size}")
        if vocab_size * self.min_freq >= self.total:
            raise ValueError(
                f"vocab_size * min_freq = {vocab_size * self.min_freq} must be < 2^precision = {self.total}"
            )


# ----------------------------------------------------------------------------------------
# Probabilities -> integer frequencies
# ----------------------------------------------------------------------------------------


def quantize_probs(probs: torch.Tensor, cfg: CoderConfig = CoderConfig()) -> torch.Tensor:
    """Probabilities ``[..., V]`` (float, summing to ~1) -> int64 frequencies summing to ``2^precision``.

    Each row is divided by its sum in float64, then ``f = min_freq + floor(p * (2^precision -
    V * min_freq))``; the remainder (a few units) goes to the most probable symbol (lowest
    index on ties). Deterministic for identical inputs on the same device. Probabilities that
    are not finite, negative, or whose rows do not sum to 1 within ``eps(bfloat16) + V *
    eps(float32)`` (the rounding of a softmax computed in any precision down to bfloat16,
    whatever dtype it is passed in; see :func:`_sum_tolerance`) raise ``ValueError``.
    """
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
        raise TypeError("probs must be a floating-point tensor [..., V]")
    if probs.dim() == 0:
        raise ValueError("probs must be a tensor [..., V], got a 0-d tensor")
    p = probs.double()
    if p.numel():
        tol = _sum_tolerance(p.shape[-1])
        total = p.sum(-1, keepdim=True)
        ok = torch.isfinite(p).all() & (p >= 0).all() & ((total - 1).abs() <= tol).all()
        if not bool(ok):
            raise ValueError(f"probs must be finite, non-negative and sum to 1 (within {tol:.3g} for rows of "
                             f"{p.shape[-1]}) in every row [..., V]")
        # normalised, the floors sum to at most the spare total: no remainder is taken from the
        # most probable symbol, so every symbol keeps at least min_freq
        p = p / total
    return _quantize(p, cfg)


def _sum_tolerance(V: int) -> float:
    """How far from 1 a row of ``V`` probabilities may sum: a softmax computed in float32 or
    better and rounded to bfloat16 (the coarsest dtype a model runs in) moves the sum by at
    most ``eps(bfloat16) / 2``, whatever dtype the rounded rows are then passed in; the
    softmax's own float32 accumulation and the rounding of float16 subnormals add less than
    ``V * eps(float32)`` (measured on CPU: float32 rows of 65536 off by 4e-5, bfloat16 rows of
    3 by 2.9e-3). Rows that are not distributions are off by far more (unnormalised counts,
    all zeros)."""
    return torch.finfo(torch.bfloat16).eps + V * torch.finfo(torch.float32).eps


def _quantize(p: torch.Tensor, cfg: CoderConfig) -> torch.Tensor:
    """:func:`quantize_probs` without its input check (for a softmax, valid by construction)."""
    V = p.shape[-1]
    cfg.check_vocab(V)
    spare = cfg.total - V * cfg.min_freq
    f = torch.floor(p.clamp(0.0, 1.0) * spare).long() + cfg.min_freq
    rest = cfg.total - f.sum(-1, keepdim=True)
    top = p.argmax(-1, keepdim=True)
    f.scatter_add_(-1, top, rest)
    return f


def quantize_logits(logits: torch.Tensor, cfg: CoderConfig = CoderConfig()) -> torch.Tensor:
    """Logits ``[..., V]`` -> int64 frequencies ``[..., V]`` summing to ``2^precision``
    (float64 softmax, then :func:`quantize_probs`). NaN/inf logits raise ``ValueError``."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor [..., V]")
    if logits.dim() == 0:
        raise ValueError("logits must be a tensor [..., V], got a 0-d tensor")
    if not torch.isfinite(logits).all():
        raise ValueError("logits must be finite")
    return _quantize(torch.softmax(logits.double(), dim=-1), cfg)


def cdf_from_freqs(freqs: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` frequencies -> ``[..., V + 1]`` int64 cumulative table starting at 0."""
    if not isinstance(freqs, torch.Tensor) or freqs.dtype.is_floating_point or freqs.dtype.is_complex \
            or freqs.dtype == torch.bool:
        raise TypeError("freqs must be an integer tensor [..., V] (a cast would truncate floats)")
    if freqs.dim() == 0:
        raise ValueError("freqs must be a tensor [..., V], got a 0-d tensor")
    zero = torch.zeros(*freqs.shape[:-1], 1, dtype=torch.int64, device=freqs.device)
    return torch.cat([zero, freqs.long().cumsum(-1)], dim=-1)


# ----------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------


@dataclass
class EncoderState:
    """Per-stream encoder state. ``low, rng, nbytes: [B] int64``; ``buf: [B, C] int16``
    (bytes written so far, a byte may hold 256 until :func:`resolve_carries`)."""

    low: torch.Tensor
    rng: torch.Tensor
    nbytes: torch.Tensor
    buf: torch.Tensor

    @classmethod
    def new(cls, batch: int, capacity: int, device="cpu") -> "EncoderState":
        z = torch.zeros(batch, dtype=torch.int64, device=device)
        # one spare column: masked writes land there
        buf = torch.zeros(batch, capacity + 1, dtype=torch.int16, device=device)
        return cls(low=z.clone(), rng=torch.full_like(z, 1 << STATE_BITS), nbytes=z.clone(), buf=buf)

    @property
    def capacity(self) -> int:
        return self.buf.shape[1] - 1

    def reset(self, mask: torch.Tensor) -> None:
        """Restart the streams where ``mask`` (``[B] bool``) is set, clearing their buffers."""
        self.low = torch.where(mask, 0, self.low)
        self.rng = torch.where(mask, 1 << STATE_BITS, self.rng)
        self.nbytes = torch.where(mask, 0, self.nbytes)
        self.buf.masked_fill_(mask[:, None], 0)


def _advance(low, rng, cum_lo, freq, precision: int):
    """One coding step without writing: returns (low', rng', carry, shifts, bytes [B, 3])."""
    r = rng >> precision
    low = low + r * cum_lo
    rng = r * freq
    carry = low >> STATE_BITS
    low = low & _MASK
    shifts = (rng < _BOTTOM).long() + (rng < (_BOTTOM >> 8)).long() + (rng < (_BOTTOM >> 16)).long()
    j = torch.arange(_MAX_SHIFT, device=low.device)
    out = (low[:, None] >> (STATE_BITS - 8 - 8 * j)) & 0xFF  # [B, 3] the top bytes of low
    low = (low << (8 * shifts)) & _MASK
    rng = rng << (8 * shifts)
    return low, rng, carry, shifts, out


def _commit(st: EncoderState, low, rng, carry, shifts, out, mask: torch.Tensor | None) -> None:
    """Write a step computed by :func:`_advance` into the streams where ``mask``."""
    C = st.capacity
    if mask is not None:
        carry = carry * mask
        shifts = shifts * mask
    # carry into the last byte written (nbytes >= 1 whenever a carry can happen)
    last = (st.nbytes - 1).clamp(min=0)
    cidx = torch.where(carry > 0, last, C)[:, None]
    st.buf.scatter_add_(1, cidx, carry[:, None].to(torch.int16))
    j = torch.arange(_MAX_SHIFT, device=low.device)
    pos = st.nbytes[:, None] + j
    # writes past the capacity land in the spare column; encode_finish raises on them
    valid = (j[None, :] < shifts[:, None]) & (pos < C)
    st.buf.scatter_(1, torch.where(valid, pos, C), out.to(torch.int16))
    if mask is None:
        st.low, st.rng = low, rng
    else:
        st.low = torch.where(mask, low, st.low)
        st.rng = torch.where(mask, rng, st.rng)
    st.nbytes = st.nbytes + shifts


def encode_step(st: EncoderState, symbols: torch.Tensor, cdf: torch.Tensor, precision: int,
                mask: torch.Tensor | None = None) -> None:
    """Encode ``symbols [B]`` (int64) under ``cdf [B, V+1]`` (or ``[V+1]`` shared) into every
    stream where ``mask [B]`` (all when None)."""
    if cdf.dim() == 1:
        cum_lo, cum_hi = cdf[symbols], cdf[symbols + 1]
    else:
        s = symbols[:, None]
        cum_lo, cum_hi = cdf.gather(1, s)[:, 0], cdf.gather(1, s + 1)[:, 0]
    _commit(st, *_advance(st.low, st.rng, cum_lo, cum_hi - cum_lo, precision), mask)


def final_bits(low: torch.Tensor, rng: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fewest bits ``k [B]`` (0..48) such that a multiple ``v`` of ``2^(48-k)`` lies in
    ``[low, low + rng)``, and that ``v [B]`` (may equal or exceed 2^48: a carry)."""
    k = torch.arange(STATE_BITS + 1, device=low.device)
    unit = (1 << (STATE_BITS - k))[None, :]  # [1, 49]
    v = ((low[:, None] + unit - 1) // unit) * unit
    ok = v < (low + rng)[:, None]  # k = 48 always fits (rng >= 1)
    kmin = ok.long().argmax(1)
    return kmin, v.gather(1, kmin[:, None])[:, 0]


def encode_finish(st: EncoderState) -> tuple[torch.Tensor, torch.Tensor]:
    """Terminate every stream: returns ``(bytes [B, C'] uint8, nbits [B] int64)``, trailing
    bits zero. The state is not reusable afterwards."""
    k, v = final_bits(st.low, st.rng)
    zero = torch.zeros_like(k)
    ones = torch.ones_like(k)
    shifts = (k + 7) // 8
    j = torch.arange(_MAX_SHIFT, device=k.device)
    # the tail may need up to 6 bytes: write it in two 3-byte slots
    vm = v & _MASK
    out1 = (vm[:, None] >> (STATE_BITS - 8 - 8 * j)) & 0xFF
    out2 = (vm[:, None] >> (STATE_BITS - 32 - 8 * j)) & 0xFF
    nb = st.nbytes
    if nb.numel() and int(nb.max()) > st.capacity:
        raise ValueError(f"encoder buffer capacity {st.capacity} bytes exceeded; pass a larger capacity")
    need = int((nb + shifts).max()) if nb.numel() else 0
    if need > st.capacity:
        grow = torch.zeros(st.buf.shape[0], need - st.capacity, dtype=st.buf.dtype, device=st.buf.device)
        st.buf = torch.cat([st.buf[:, :-1], grow, st.buf[:, -1:]], dim=1)
    _commit(st, st.low, st.rng, v >> STATE_BITS, shifts.clamp(max=3), out1, None)
    _commit(st, st.low, st.rng, zero, (shifts - 3).clamp(min=0), out2, ones.bool())
    nbits = 8 * nb + k
    data = resolve_carries(st.buf[:, :-1])
    return data, nbits


def resolve_carries(buf: torch.Tensor) -> torch.Tensor:
    """Propagate carries through big-endian byte rows ``[B, C]`` (values 0..256) -> uint8.

    Position ``i`` receives a carry iff the first position right of it whose value is not 255
    holds 256 (a suffix scan; no sequential loop).
    """
    a = buf.long()
    B, C = a.shape
    if C == 0:
        return a.to(torch.uint8)
    idx = torch.arange(C, device=a.device).expand(B, C)
    stop = torch.where(a != 255, idx, C)  # positions that do not propagate
    # nearest stopping position strictly to the right: suffix min of stop shifted by one
    nxt = torch.cat([stop[:, 1:], torch.full((B, 1), C, device=a.device, dtype=torch.long)], 1)
    nxt = torch.flip(torch.cummin(torch.flip(nxt, [1]), 1).values, [1])
    padded = torch.cat([a, torch.zeros(B, 1, dtype=a.dtype, device=a.device)], 1)
    carry_in = (padded.gather(1, nxt) == 256).long()
    return ((a + carry_in) & 0xFF).to(torch.uint8)


# ----------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------


@dataclass
class DecoderState:
    """Per-stream decoder state. ``code`` = stream window - ``low`` (both 48-bit frame),
    ``pos`` = next byte to read, ``bad`` marks streams found corrupt. ``data: [B, C+8] int64``
    (zero padded)."""

    code: torch.Tensor
    low: torch.Tensor
    rng: torch.Tensor
    pos: torch.Tensor
    bad: torch.Tensor
    data: torch.Tensor

    @classmethod
    def new(cls, data: torch.Tensor) -> "DecoderState":
        """``data [B, C]`` uint8 streams (bits past each stream's end must be zero)."""
        if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.uint8:
            raise TypeError("data must be a uint8 tensor [B, C]")
        B = data.shape[0]
        d = torch.cat([data.long(), torch.zeros(B, _LEAD + _MAX_SHIFT, dtype=torch.long, device=data.device)], 1)
        code = torch.zeros(B, dtype=torch.int64, device=data.device)
        for i in range(_LEAD):
            code = (code << 8) | d[:, i]
        z = torch.zeros_like(code)
        return cls(code=code, low=z.clone(), rng=torch.full_like(z, 1 << STATE_BITS),
                   pos=torch.full_like(z, _LEAD), bad=torch.zeros(B, dtype=torch.bool, device=data.device), data=d)

    def restart(self, data: torch.Tensor) -> None:
        fresh = DecoderState.new(data)
        self.__dict__.update(fresh.__dict__)


def decode_step(st: DecoderState, cdf: torch.Tensor, precision: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decode one symbol per stream under ``cdf [B, V+1]`` (or ``[V+1]``); streams outside
    ``mask`` keep their state (their returned symbol is meaningless). Returns ``[B] int64``."""
    r = st.rng >> precision
    target = st.code // r
    total = 1 << precision
    bad = (target >= total) | (target < 0)
    target = target.clamp(0, total - 1)
    if cdf.dim() == 1:
        sym = torch.searchsorted(cdf[1:].contiguous(), target, right=True)
        cum_lo, cum_hi = cdf[sym], cdf[sym + 1]
    else:
        sym = torch.searchsorted(cdf[:, 1:].contiguous(), target[:, None], right=True)[:, 0]
        cum_lo = cdf.gather(1, sym[:, None])[:, 0]
        cum_hi = cdf.gather(1, sym[:, None] + 1)[:, 0]
    code = st.code - r * cum_lo
    low = st.low + r * cum_lo
    rng = r * (cum_hi - cum_lo)
    low = low & _MASK
    shifts = (rng < _BOTTOM).long() + (rng < (_BOTTOM >> 8)).long() + (rng < (_BOTTOM >> 16)).long()
    j = torch.arange(_MAX_SHIFT, device=code.device)
    idx = (st.pos[:, None] + j).clamp(max=st.data.shape[1] - 1)
    nxt = st.data.gather(1, idx)  # [B, 3]
    inbits = torch.zeros_like(code)
    for i in range(_MAX_SHIFT):
        take = shifts > i
        inbits = torch.where(take, (inbits << 8) | nxt[:, i], inbits)
    code = (code << (8 * shifts)) | inbits
    low = (low << (8 * shifts)) & _MASK
    rng = rng << (8 * shifts)
    # keep corrupt streams bounded so they can never overflow
    code = torch.where(bad, 0, code)
    if mask is None:
        st.code, st.low, st.rng, st.pos = code, low, rng, st.pos + shifts
        st.bad = st.bad | bad
    else:
        st.code = torch.where(mask, code, st.code)
        st.low = torch.where(mask, low, st.low)
        st.rng = torch.where(mask, rng, st.rng)
        st.pos = st.pos + shifts * mask
        st.bad = st.bad | (bad & mask)
    return sym


def decode_finish(st: DecoderState, nbits: torch.Tensor | None = None,
                  max_bits: torch.Tensor | int | None = None) -> torch.Tensor:
    """Check that every stream ends where its encoder ended it; returns ``ok [B] bool``.

    The terminating bits recomputed from the decoder's state must (a) equal ``nbits`` when
    given, or be at most ``max_bits`` (EqualInfoAC windows padded to b bits), and (b) equal the
    stream's tail; every bit after the end must be zero.
    """
    k, v = final_bits(st.low, st.rng)
    end = 8 * (st.pos - _LEAD) + k
    ok = ~st.bad
    ok &= ((st.low + st.code) & _MASK) == (v & _MASK)
    if nbits is not None:
        ok &= end == nbits
    if max_bits is not None:
        ok &= end <= max_bits
    # nothing but zeros after the end: bits in the window past k are covered above; whole
    # bytes after the window must be zero
    C = st.data.shape[1]
    after = torch.arange(C, device=end.device)[None, :] >= (st.pos + 0)[:, None]
    ok &= ~((st.data != 0) & after).any(1)
    return ok


# ----------------------------------------------------------------------------------------
# Whole streams with given frequency tables
# ----------------------------------------------------------------------------------------


def _check_precision(precision) -> int:
    if isinstance(precision, bool) or not isinstance(precision, int):
        raise TypeError(f"precision must be an int, got {type(precision).__name__}")
    # the state keeps range >= 2^40 before a step and the step needs range >> precision >= 2^16
    if not 1 <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be in [1, {MAX_PRECISION}], got {precision}")
    return precision


def _check_cdf(cdf: torch.Tensor, precision: int, batch: int) -> None:
    """A shared table ``[V+1]`` or per-step tables ``[batch, S', V+1]``: int64, starting at 0,
    non-decreasing, ending at ``2^precision`` (one device sync for all of it)."""
    _check_precision(precision)
    if not isinstance(cdf, torch.Tensor) or cdf.dtype != torch.int64:
        raise TypeError("cdf must be an int64 tensor [V+1] (shared) or [B, S, V+1] (per step)")
    if cdf.dim() not in (1, 3):
        raise ValueError(f"cdf must be [V+1] (shared) or [B, S, V+1] (per step), got shape {tuple(cdf.shape)}")
    if cdf.shape[-1] < 3:
        raise ValueError("cdf must describe at least 2 symbols")
    if cdf.dim() == 3 and cdf.shape[0] != batch:
        raise ValueError(f"cdf has {cdf.shape[0]} streams, the data {batch}")
    if cdf.numel():
        ok = ((cdf[..., 0] == 0).all() & (cdf[..., -1] == (1 << precision)).all()
              & (cdf[..., 1:] >= cdf[..., :-1]).all())
        if not bool(ok):
            raise ValueError(f"every cdf table must start at 0, be non-decreasing and end at 2^precision = "
                             f"{1 << precision}")


def _check_lengths(lengths, batch: int, device, most: int | None, what: str) -> torch.Tensor:
    """``lengths``: an int (every stream) or an integer tensor ``[batch]`` in ``[0, most]``."""
    if isinstance(lengths, int) and not isinstance(lengths, bool):
        lengths = torch.full((batch,), lengths, dtype=torch.long, device=device)
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype.is_complex \
            or lengths.dtype == torch.bool:
        raise TypeError("lengths must be an int or an integer tensor [B]")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
    lengths = lengths.long().to(device)
    if batch:
        lo, hi = torch.aminmax(lengths)
        lo, hi = int(lo), int(hi)
        if lo < 0:
            raise ValueError(f"lengths must be >= 0, got {lo}")
        if most is not None and hi > most:
            raise ValueError(f"lengths must be <= {most} ({what}), got {hi}")
    return lengths


def _check_symbols_type(symbols) -> None:
    if not isinstance(symbols, torch.Tensor) or symbols.dim() != 2:
        raise TypeError("symbols must be a tensor [B, S]")
    if symbols.dtype.is_floating_point or symbols.dtype.is_complex or symbols.dtype == torch.bool:
        raise TypeError(f"symbols must be an integer tensor, got {symbols.dtype}")


def _check_data_type(data) -> None:
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 2:
        raise TypeError("data must be a uint8 tensor [B, C]")


def _check_nbits_type(nbits) -> None:
    if not isinstance(nbits, torch.Tensor) or nbits.dtype.is_floating_point or nbits.dtype.is_complex \
            or nbits.dtype == torch.bool:
        raise TypeError("nbits must be an integer tensor [B]")


def _bits_per_symbol(max_freq, precision: int):
    """The fewest bits a symbol of frequency at most ``max_freq`` (an int or a tensor) adds to
    a stream: ``-log2(max_freq / 2^precision)`` (0 when one symbol takes the whole total)."""
    if isinstance(max_freq, torch.Tensor):
        return torch.log2((1 << precision) / max_freq.double())
    return math.log2((1 << precision) / max_freq)


def _named(positions: torch.Tensor, ids) -> list[int]:
    """``positions`` (indices into a batch) as the indices an error names: ``ids[positions]``
    when ``ids`` is given (a caller decoding part of a larger set)."""
    positions = positions.cpu()
    return (positions if ids is None else torch.as_tensor(ids).cpu()[positions]).tolist()


def _check_length_bound(lengths: torch.Tensor, bits: torch.Tensor, per_symbol, ids=None) -> None:
    """Raise :class:`CorruptStreamError` for streams that claim more symbols than ``bits`` bits
    can hold when every symbol costs at least ``per_symbol`` bits (a float or a 0-d tensor).

    After ``n`` symbols the coded interval is at most ``p_max^n`` wide, and at least
    ``2^(-8 - 8 * bytes)`` (``range >= 2^40`` after a step), so ``n * per_symbol <= nbits + 8``.
    A corrupt length would otherwise make the decoder run (and allocate) that many steps."""
    if not lengths.numel():
        return
    most = (bits.clamp(min=0).double() + 8) / per_symbol + 1
    over = lengths > most
    if bool(over.any()):
        bad = _named(torch.nonzero(over)[:, 0], ids)
        raise CorruptStreamError(f"streams {bad[:10]} claim more symbols than their bits can hold "
                                 f"(corrupt lengths or bit counts)")


def check_encode_args(symbols, cdf, lengths, precision: int) -> torch.Tensor:
    """Validate :func:`encode`'s arguments; returns ``lengths`` as an int64 tensor ``[B]``.

    Every coded symbol (``t < lengths[b]``) must lie in ``[0, V)`` with a nonzero frequency in
    its table: another one would code an interval the decoder can never return to."""
    _check_symbols_type(symbols)
    B, S = symbols.shape
    _check_cdf(cdf, precision, B)
    if cdf.dim() == 3 and cdf.shape[1] < S:
        raise ValueError(f"cdf has {cdf.shape[1]} steps, symbols have {S}")
    lengths = _check_lengths(S if lengths is None else lengths, B, symbols.device, S, "the symbols' columns")
    if symbols.numel():
        V = cdf.shape[-1] - 1
        s = symbols.long()
        inside = (s >= 0) & (s < V)
        sc = torch.where(inside, s, 0)
        if cdf.dim() == 1:
            freq = cdf[sc + 1] - cdf[sc]
        else:
            c = cdf[:, :S]
            freq = (c.gather(2, (sc + 1)[..., None]) - c.gather(2, sc[..., None]))[..., 0]
        active = torch.arange(S, device=s.device)[None, :] < lengths[:, None]
        bad = active & ~(inside & (freq > 0))
        if bool(bad.any()):
            b, t = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"symbols[{b}, {t}] = {int(s[b, t])}: every coded symbol must lie in [0, {V}) and "
                             f"have a nonzero frequency in its cdf table")
    return lengths


def check_decode_args(data, nbits, cdf, lengths, precision: int) -> torch.Tensor:
    """Validate :func:`decode`'s arguments (the data's own checks follow in the decoder);
    returns ``lengths`` as an int64 tensor ``[B]``.

    With a shared table, ``lengths`` beyond what ``nbits`` bits can hold under that table's most
    probable symbol raise :class:`CorruptStreamError` (per-step tables bound them by their steps)."""
    _check_data_type(data)
    _check_nbits_type(nbits)
    B = data.shape[0]
    if nbits.shape != (B,):
        raise ValueError(f"nbits must have shape [{B}], got {tuple(nbits.shape)}")
    _check_cdf(cdf, precision, B)
    most = cdf.shape[1] if cdf.dim() == 3 else None
    lengths = _check_lengths(lengths, B, data.device, most, f"cdf has {most} steps" if most is not None else "")
    if cdf.dim() == 1:
        per_symbol = _bits_per_symbol((cdf[1:] - cdf[:-1]).max(), precision)
        _check_length_bound(lengths, nbits.to(data.device), per_symbol)
    return lengths


def _trusted_lengths(lengths, batch: int, device, default: int) -> torch.Tensor:
    """``lengths`` as an int64 tensor ``[batch]``, unchecked (``validate=False``)."""
    if lengths is None:
        lengths = default
    if isinstance(lengths, int):
        return torch.full((batch,), lengths, dtype=torch.long, device=device)
    return lengths.long().to(device)


def encode(symbols: torch.Tensor, cdf: torch.Tensor, lengths: torch.Tensor | None = None, *,
           precision: int = 24, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``symbols [B, S]`` (int64) with per-step tables ``cdf [B, S, V+1]`` or one shared
    table ``[V+1]``; stream ``b`` codes its first ``lengths[b]`` symbols (all when None).

    Returns ``(data [B, C] uint8, nbits [B] int64)``. Each table must total ``2^precision``
    (``precision`` in 1..24) and every coded symbol have frequency >= 1; ``ValueError``
    otherwise (see :func:`check_encode_args`). The checks read every table once and wait for
    the device; ``validate=False`` skips them, for tables valid by construction (those of
    :func:`quantize_logits` and :func:`quantize_probs`, which the dataset builders use): an
    invalid table then codes a stream that does not decode, or decodes to other symbols.
    """
    lengths = (check_encode_args(symbols, cdf, lengths, precision) if validate
               else _trusted_lengths(lengths, symbols.shape[0], symbols.device, symbols.shape[1]))
    B, S = symbols.shape
    # entries past a stream's length are never coded and may hold anything: the steps still
    # look them up in the tables, so they become symbol 0
    symbols = torch.where(torch.arange(S, device=symbols.device)[None, :] < lengths[:, None], symbols.long(), 0)
    st = EncoderState.new(B, 3 * S + 8, symbols.device)
    for t in range(S):
        table = cdf if cdf.dim() == 1 else cdf[:, t]
        encode_step(st, symbols[:, t], table, precision, mask=t < lengths)
    return encode_finish(st)


def decode(data: torch.Tensor, nbits: torch.Tensor, cdf: torch.Tensor, lengths: torch.Tensor | int, *,
           precision: int = 24, validate: bool = True) -> torch.Tensor:
    """Invert :func:`encode`: ``data [B, C] uint8``, ``nbits [B]``, tables as for encoding,
    ``lengths [B]`` symbols per stream. Returns ``symbols [B, S]`` (zeros past each length).
    Raises :class:`CorruptStreamError` naming the streams that do not decode exactly, or (with
    a shared table) claim more symbols than their bits can hold (see :func:`check_decode_args`).
    ``validate``: as for :func:`encode`."""
    lengths = (check_decode_args(data, nbits, cdf, lengths, precision) if validate
               else _trusted_lengths(lengths, data.shape[0], data.device, 0))
    B = data.shape[0]
    S = int(lengths.max()) if B else 0
    st = DecoderState.new(_clip_to_bits(data, nbits))
    out = torch.zeros(B, S, dtype=torch.long, device=data.device)
    for t in range(S):
        table = cdf if cdf.dim() == 1 else cdf[:, t]
        active = t < lengths
        out[:, t] = torch.where(active, decode_step(st, table, precision, mask=active), 0)
    ok = decode_finish(st, nbits=nbits)
    raise_if_bad(ok)
    return out


def _clip_to_bits(data: torch.Tensor, nbits: torch.Tensor, ids=None) -> torch.Tensor:
    """Streams whose buffers are shorter than their declared bit length are truncated:
    raise. Buffers may be longer (zero padded); nonzero bits past the end are caught later.
    ``ids``: the indices the error names (default ``0..B-1``)."""
    _check_data_type(data)
    if nbits.shape != (data.shape[0],):
        raise ValueError(f"nbits must have shape [{data.shape[0]}], got {tuple(nbits.shape)}")
    if bool(((nbits + 7) // 8 > data.shape[1]).any()) or bool((nbits < 0).any()):
        bad = _named(torch.nonzero(((nbits + 7) // 8 > data.shape[1]) | (nbits < 0))[:, 0], ids)
        raise CorruptStreamError(f"streams {bad[:10]} are truncated: fewer bytes than their declared bit length")
    return data


def raise_if_bad(ok: torch.Tensor, ids=None, what: str = "stream") -> None:
    """Raise :class:`CorruptStreamError` naming the entries where ``ok [B]`` is False, as
    ``ids[b]`` when given (a caller decoding part of a larger set), else as ``b``."""
    if not bool(ok.all()):
        bad = _named(torch.nonzero(~ok)[:, 0], ids)
        raise CorruptStreamError(
            f"{len(bad)} {what}(s) did not decode exactly (corrupt or truncated input): indices {bad[:10]}"
            + (" ..." if len(bad) > 10 else "")
        )
