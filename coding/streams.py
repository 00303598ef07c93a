"""Model-driven coding of many streams at once, and EqualInfoAC windows.

* :func:`encode_streams` / :func:`decode_streams`: stream ``b`` codes ``lengths[b]`` symbols;
  at every step one call of ``model.frequencies`` on the contexts ``[B, L]`` of all streams
  (streams that have ended keep a frozen context, so the encoder and decoder make the very
  same calls) and one vectorised coder step.
* :func:`encode_equal_info`: each stream is cut into windows that each compress to at most
  ``window_bits`` bits and are zero-padded to exactly that; the coder and the model's
  context restart at every window. A window ends when the next symbol would not fit (or when
  it holds ``max_window_symbols``). Symbol counts per window are returned: they are what a
  decoder needs besides the bits (the paper had no end marker and lost 0.6% of sequences).
* :func:`decode_equal_info`: windows are independent, so all windows of a batch decode in
  parallel as separate streams.

Shapes: ``B`` streams, ``S`` symbols per stream (padded), ``L`` context, ``W`` windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import rangecoder as rc
from .models import IncrementalModel, ProbabilityModel
from .rangecoder import CoderConfig

__all__ = [
    "Encoded",
    "EqualInfoEncoded",
    "encode_streams",
    "decode_streams",
    "encode_equal_info",
    "decode_equal_info",
    "equal_info_min_freq",
]


@dataclass
class Encoded:
    """``data [B, C] uint8`` (zero padded), ``nbits [B]``, ``lengths [B]`` symbols per stream,
    ``ideal_bits [B] float64`` = -sum log2(freq/2^precision) of the coded symbols."""

    data: torch.Tensor
    nbits: torch.Tensor
    lengths: torch.Tensor
    ideal_bits: torch.Tensor


@dataclass
class EqualInfoEncoded:
    """``windows [W, window_bits/8] uint8`` in stream order, ``counts [W]`` symbols per window,
    ``stream_windows [B]`` windows per stream, ``used_bits [W]`` bits before padding,
    ``ideal_bits [W]``."""

    windows: torch.Tensor
    counts: torch.Tensor
    stream_windows: torch.Tensor
    used_bits: torch.Tensor
    ideal_bits: torch.Tensor
    window_bits: int


def _check_model(model, cfg: CoderConfig) -> None:
    if not isinstance(model, (ProbabilityModel, IncrementalModel)):
        raise TypeError("model must provide vocab_size, context_len, pad_id and frequencies(context, cfg) "
                        "(ProbabilityModel) or vocab_size and begin(batch, device) (IncrementalModel)")
    if not isinstance(cfg, CoderConfig):
        raise TypeError("cfg must be a CoderConfig")
    cfg.check_vocab(model.vocab_size)


def _check_symbols(symbols, lengths, vocab: int):
    if not isinstance(symbols, torch.Tensor) or symbols.dim() != 2:
        raise TypeError("symbols must be an integer tensor [B, S]")
    B, S = symbols.shape
    if lengths is None:
        lengths = torch.full((B,), S, dtype=torch.long, device=symbols.device)
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,):
        raise ValueError(f"lengths must be a tensor [{B}]")
    lengths = lengths.long().to(symbols.device)
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > S):
        raise ValueError(f"lengths must be in [0, {S}]")
    symbols = symbols.long()
    valid = torch.arange(S, device=symbols.device)[None, :] < lengths[:, None]
    if bool(((symbols < 0) | (symbols >= vocab))[valid].any()):
        raise ValueError(f"symbols must be in [0, {vocab})")
    return symbols, lengths


class _WindowContext:
    """The last ``context_len`` symbols of every stream, left-padded with ``pad_id``: the
    state of a :class:`ProbabilityModel` (same interface as an :class:`IncrementalModel`'s)."""

    def __init__(self, model: ProbabilityModel, batch: int, device):
        self.model = model
        self.ctx = torch.full((batch, model.context_len), model.pad_id, dtype=torch.long, device=device)

    def frequencies(self, cfg: CoderConfig) -> torch.Tensor:
        return self.model.frequencies(self.ctx, cfg)

    def update(self, sym: torch.Tensor, append: torch.Tensor, restart: torch.Tensor | None = None) -> None:
        if self.ctx.shape[1] == 0:
            return
        new = torch.cat([self.ctx[:, 1:], sym[:, None].to(self.ctx.dtype)], 1)
        self.ctx = torch.where(append[:, None], new, self.ctx)
        if restart is not None:
            self.ctx = torch.where(restart[:, None], self.model.pad_id, self.ctx)


def _context(model, batch: int, device):
    if isinstance(model, IncrementalModel) and not isinstance(model, ProbabilityModel):
        return model.begin(batch, device)
    return _WindowContext(model, batch, device)


def _freq_step(model, ctx, cfg: CoderConfig, batch: int) -> torch.Tensor:
    f = ctx.frequencies(cfg)
    if f.dtype != torch.int64 or f.shape != (batch, model.vocab_size):
        raise ValueError(f"model frequencies must be int64 [{batch}, {model.vocab_size}], got {f.dtype} {tuple(f.shape)}")
    return f


def _log2_prob(freqs: torch.Tensor, sym: torch.Tensor, cfg: CoderConfig) -> torch.Tensor:
    return torch.log2(freqs.gather(1, sym[:, None])[:, 0].double()) - cfg.precision


def encode_streams(symbols: torch.Tensor, lengths: torch.Tensor | None, model: ProbabilityModel,
                   cfg: CoderConfig = CoderConfig(), progress: Callable[[int, int], None] | None = None) -> Encoded:
    """Encode ``symbols [B, S]`` (stream ``b`` codes ``lengths[b]``) under ``model``."""
    _check_model(model, cfg)
    symbols, lengths = _check_symbols(symbols, lengths, model.vocab_size)
    B, S = symbols.shape
    dev = symbols.device
    st = rc.EncoderState.new(B, 3 * S + 8, dev)
    ctx = _context(model, B, dev)
    ideal = torch.zeros(B, dtype=torch.float64, device=dev)
    for t in range(S):
        active = t < lengths
        freqs = _freq_step(model, ctx, cfg, B)
        cdf = rc.cdf_from_freqs(freqs)
        sym = symbols[:, t]
        rc.encode_step(st, sym, cdf, cfg.precision, mask=active)
        ideal -= torch.where(active, _log2_prob(freqs, sym, cfg), 0.0)
        if t + 1 < S:
            ctx.update(sym, active)
        if progress is not None:
            progress(t + 1, S)
    data, nbits = rc.encode_finish(st)
    return Encoded(data=data, nbits=nbits, lengths=lengths, ideal_bits=ideal)


def decode_streams(data: torch.Tensor, nbits: torch.Tensor, lengths: torch.Tensor, model: ProbabilityModel,
                   cfg: CoderConfig = CoderConfig(), *, max_bits: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Invert :func:`encode_streams`. ``nbits`` may be None when ``max_bits`` bounds every
    stream instead (EqualInfoAC windows). Returns ``symbols [B, max(lengths)]`` (zeros past
    each length); raises :class:`~flopwise.coding.rangecoder.CorruptStreamError`."""
    _check_model(model, cfg)
    B = data.shape[0] if isinstance(data, torch.Tensor) else 0
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,):
        raise ValueError(f"lengths must be a tensor [{B}]")
    lengths = lengths.long().to(data.device)
    if B and int(lengths.min()) < 0:
        raise ValueError("lengths must be >= 0")
    if nbits is not None:
        data = rc._clip_to_bits(data, nbits.long().to(data.device))
    S = int(lengths.max()) if B else 0
    st = rc.DecoderState.new(data)
    ctx = _context(model, B, data.device)
    out = torch.zeros(B, S, dtype=torch.long, device=data.device)
    for t in range(S):
        active = t < lengths
        cdf = rc.cdf_from_freqs(_freq_step(model, ctx, cfg, B))
        sym = rc.decode_step(st, cdf, cfg.precision, mask=active)
        out[:, t] = torch.where(active, sym, 0)
        if t + 1 < S:
            ctx.update(sym, active)
        if progress is not None:
            progress(t + 1, S)
    ok = rc.decode_finish(st, nbits=None if nbits is None else nbits.long().to(data.device), max_bits=max_bits)
    rc.raise_if_bad(ok)
    return out


# ----------------------------------------------------------------------------------------
# EqualInfoAC
# ----------------------------------------------------------------------------------------


def equal_info_min_freq(window_bits: int, precision: int) -> int:
    """Smallest frequency floor that lets any single symbol fit an empty window: a symbol of
    frequency ``f`` narrows the fresh interval to ``f / 2^precision``, which always holds a
    multiple of ``2^-k`` for ``k = ceil(precision - log2 f)``; ``k <= window_bits`` needs
    ``f >= 2^(precision - window_bits)``."""
    return 1 << max(0, precision - window_bits)


def encode_equal_info(symbols: torch.Tensor, lengths: torch.Tensor | None, model: ProbabilityModel,
                      cfg: CoderConfig, window_bits: int, max_window_symbols: int = 64,
                      progress: Callable[[int, int], None] | None = None) -> EqualInfoEncoded:
    """Cut each stream into windows of exactly ``window_bits`` bits (a multiple of 8).

    ``cfg.min_freq`` must be at least :func:`equal_info_min_freq` so every symbol fits an
    empty window. Each loop iteration either commits one symbol or closes one window per
    stream, so it ends after at most ``S + windows`` iterations.
    """
    _check_model(model, cfg)
    if isinstance(window_bits, bool) or not isinstance(window_bits, int) or window_bits < 8 or window_bits % 8:
        raise ValueError(f"window_bits must be a positive multiple of 8, got {window_bits!r}")
    if window_bits > 8 * 64:
        raise ValueError(f"window_bits must be <= 512, got {window_bits}")
    if isinstance(max_window_symbols, bool) or not isinstance(max_window_symbols, int) or max_window_symbols < 1:
        raise ValueError(f"max_window_symbols must be an int >= 1, got {max_window_symbols!r}")
    need_floor = equal_info_min_freq(window_bits, cfg.precision)
    if cfg.min_freq < need_floor:
        raise ValueError(f"cfg.min_freq must be >= {need_floor} for window_bits={window_bits} "
                         f"(precision {cfg.precision}); see equal_info_min_freq")
    symbols, lengths = _check_symbols(symbols, lengths, model.vocab_size)
    B, S = symbols.shape
    dev = symbols.device
    wbytes = window_bits // 8
    st = rc.EncoderState.new(B, wbytes + 8, dev)
    ctx = _context(model, B, dev)
    cursor = torch.zeros(B, dtype=torch.long, device=dev)
    wcount = torch.zeros(B, dtype=torch.long, device=dev)
    widx = torch.zeros(B, dtype=torch.long, device=dev)
    wideal = torch.zeros(B, dtype=torch.float64, device=dev)
    # at most one window per symbol: [B, S + 1] slots, the last a trash slot for masked writes
    out = torch.zeros(B, S + 1, wbytes, dtype=torch.uint8, device=dev)
    out_count = torch.zeros(B, S + 1, dtype=torch.long, device=dev)
    out_used = torch.zeros(B, S + 1, dtype=torch.long, device=dev)
    out_ideal = torch.zeros(B, S + 1, dtype=torch.float64, device=dev)
    rows = torch.arange(B, device=dev)
    it = 0
    while True:
        at_end = cursor >= lengths
        done = at_end & (wcount == 0)
        if it % 16 == 0 and bool(done.all()):
            break
        it += 1
        sym = symbols.gather(1, cursor.clamp(max=max(S - 1, 0))[:, None])[:, 0] if S else cursor * 0
        freqs = _freq_step(model, ctx, cfg, B)
        cdf = rc.cdf_from_freqs(freqs)
        cum_lo = cdf.gather(1, sym[:, None])[:, 0]
        freq = cdf.gather(1, sym[:, None] + 1)[:, 0] - cum_lo
        low, rng, carry, shifts, outb = rc._advance(st.low, st.rng, cum_lo, freq, cfg.precision)
        k, _ = rc.final_bits(low, rng)
        needed = 8 * (st.nbytes + shifts) + k
        fits = ~at_end & (needed <= window_bits) & (wcount < max_window_symbols)
        close = ~done & ~fits & (wcount > 0)
        stuck = ~at_end & ~fits & (wcount == 0)
        if bool(stuck.any()):  # cannot happen with min_freq >= equal_info_min_freq
            raise RuntimeError("a symbol does not fit an empty window")
        # close windows from the committed state (before this symbol)
        fin = rc.EncoderState(low=st.low.clone(), rng=st.rng.clone(), nbytes=st.nbytes.clone(), buf=st.buf.clone())
        wdata, wbits = rc.encode_finish(fin)
        slot = torch.where(close, widx, S)
        out[rows, slot] = wdata[:, :wbytes]
        out_count[rows, slot] = wcount
        out_used[rows, slot] = wbits
        out_ideal[rows, slot] = wideal
        # commit the symbol where it fits
        rc._commit(st, low, rng, carry, shifts, outb, fits)
        wideal = wideal - torch.where(fits, _log2_prob(freqs, sym, cfg), 0.0)
        # the model takes the committed symbol, or starts a closed window's successor afresh
        ctx.update(sym, fits, close)
        cursor = cursor + fits
        wcount = wcount + fits
        # restart closed windows
        st.reset(close)
        wcount = torch.where(close, 0, wcount)
        wideal = torch.where(close, 0.0, wideal)
        widx = widx + close
        if progress is not None and it % 64 == 0:
            progress(int(cursor.sum()), int(lengths.sum()))
    keep = torch.arange(S + 1, device=dev)[None, :] < widx[:, None]
    return EqualInfoEncoded(windows=out[keep], counts=out_count[keep], stream_windows=widx,
                            used_bits=out_used[keep], ideal_bits=out_ideal[keep], window_bits=window_bits)


def decode_equal_info(windows: torch.Tensor, counts: torch.Tensor, model: ProbabilityModel, cfg: CoderConfig,
                      window_bits: int, *, batch_windows: int = 4096) -> list[torch.Tensor]:
    """Decode windows ``[W, window_bits/8] uint8`` holding ``counts [W]`` symbols each, all
    windows of a batch in parallel (batches of windows of similar length). Returns one
    ``[counts[w]]`` int64 tensor per window, in the given order."""
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.uint8 or windows.dim() != 2:
        raise TypeError("windows must be a uint8 tensor [W, window_bits/8]")
    if windows.shape[1] * 8 != window_bits:
        raise ValueError(f"windows have {windows.shape[1] * 8} bits, window_bits is {window_bits}")
    W = windows.shape[0]
    if not isinstance(counts, torch.Tensor) or counts.shape != (W,):
        raise ValueError(f"counts must be a tensor [{W}]")
    if W and int(counts.min()) < 1:
        raise rc.CorruptStreamError("every window holds at least one symbol; found a count < 1")
    # A batch runs as many steps as its longest window: batches of windows sorted by length
    # waste (almost) no steps. The pieces go back to stream order at the end.
    order = torch.sort(counts.long().cpu(), stable=True).indices
    pieces: list[torch.Tensor | None] = [None] * W
    for i in range(0, W, batch_windows):
        idx = order[i : i + batch_windows]
        c = counts.long().cpu()[idx].to(windows.device)
        sym = decode_streams(windows[idx.to(windows.device)], None, c, model, cfg, max_bits=window_bits)
        for j, (w, n) in enumerate(zip(idx.tolist(), c.tolist())):
            pieces[w] = sym[j, :n]
    return pieces
