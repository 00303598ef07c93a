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
from typing import Callable, Sequence

import torch

from . import rangecoder as rc
from .models import IncrementalModel, ProbabilityModel, StaticModel
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


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_window_bits(window_bits) -> int:
    if isinstance(window_bits, bool) or not isinstance(window_bits, int) or window_bits < 8 or window_bits % 8:
        raise ValueError(f"window_bits must be a positive multiple of 8, got {window_bits!r}")
    if window_bits > 8 * 64:
        raise ValueError(f"window_bits must be <= 512, got {window_bits}")
    return window_bits


def _check_symbols(symbols, lengths, vocab: int):
    """Symbols and lengths as :func:`~flopwise.coding.rangecoder.encode` takes them; entries
    past a stream's length are never coded and may hold anything: they become symbol 0 (the
    steps still look them up in the tables)."""
    rc._check_symbols_type(symbols)
    B, S = symbols.shape
    lengths = rc._check_lengths(S if lengths is None else lengths, B, symbols.device, S, "the symbols' columns")
    symbols = symbols.long()
    valid = torch.arange(S, device=symbols.device)[None, :] < lengths[:, None]
    bad = valid & ((symbols < 0) | (symbols >= vocab))
    if bool(bad.any()):
        b, t = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"symbols must be in [0, {vocab}) up to each stream's length; symbols[{b}, {t}] = "
                         f"{int(symbols[b, t])}")
    return torch.where(valid, symbols, 0), lengths


def _max_freq(vocab: int, cfg: CoderConfig) -> int:
    """The largest frequency a valid table of ``vocab`` symbols can give one symbol."""
    return cfg.total - (vocab - 1) * cfg.min_freq


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


class _Tables:
    """The model's frequency tables step by step (one ``[B, V]`` call each), checked on the
    device: a row that does not sum to ``2^precision`` with every entry in
    ``[min_freq, 2^precision]`` marks the call and is replaced by a valid table, so the coder's
    arithmetic and lookups stay in range; :meth:`check` raises once, after the loop (no host
    sync per step)."""

    def __init__(self, model, ctx, cfg: CoderConfig, batch: int, device):
        self.model, self.ctx, self.cfg, self.batch = model, ctx, cfg, batch
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        V = model.vocab_size
        self.fallback = torch.full((V,), cfg.min_freq, dtype=torch.int64, device=device)
        self.fallback[0] = _max_freq(V, cfg)
        # A StaticModel returns its one table every step: checked once here (a [V] tensor, one
        # sync a call), not per step.
        self.static = type(model) is StaticModel
        if self.static:
            f = model.freqs
            self.static_ok = bool(((f >= cfg.min_freq) & (f <= cfg.total)).all() & (f.sum() == cfg.total))
            if not self.static_ok:
                self.ok.fill_(False)

    def next(self) -> torch.Tensor:
        f = self.ctx.frequencies(self.cfg)
        V = self.model.vocab_size
        if not isinstance(f, torch.Tensor) or f.dtype != torch.int64 or f.shape != (self.batch, V):
            got = f"{f.dtype} {tuple(f.shape)}" if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"model frequencies must be int64 [{self.batch}, {V}], got {got}")
        cfg = self.cfg
        if self.static:
            return f if self.static_ok else self.fallback.expand(self.batch, -1)
        # entries <= 2^precision: the row sums cannot overflow
        valid = ((f >= cfg.min_freq) & (f <= cfg.total)).all(-1) & (f.sum(-1) == cfg.total)
        self.ok &= valid.all()
        return torch.where(valid[:, None], f, self.fallback)

    def check(self) -> None:
        if not bool(self.ok):
            raise ValueError(f"model.frequencies must return rows summing to 2^precision = {self.cfg.total} with "
                             f"every entry >= cfg.min_freq = {self.cfg.min_freq}; {type(self.model).__name__} "
                             f"returned others")


def _log2_prob(freqs: torch.Tensor, sym: torch.Tensor, cfg: CoderConfig) -> torch.Tensor:
    return torch.log2(freqs.gather(1, sym[:, None])[:, 0].double()) - cfg.precision


def encode_streams(symbols: torch.Tensor, lengths: torch.Tensor | int | None, model: ProbabilityModel,
                   cfg: CoderConfig = CoderConfig(), progress: Callable[[int, int], None] | None = None) -> Encoded:
    """Encode ``symbols [B, S]`` (stream ``b`` codes ``lengths[b]``) under ``model``."""
    _check_model(model, cfg)
    symbols, lengths = _check_symbols(symbols, lengths, model.vocab_size)
    B, S = symbols.shape
    dev = symbols.device
    st = rc.EncoderState.new(B, 3 * S + 8, dev)
    ctx = _context(model, B, dev)
    tables = _Tables(model, ctx, cfg, B, dev)
    ideal = torch.zeros(B, dtype=torch.float64, device=dev)
    for t in range(S):
        active = t < lengths
        freqs = tables.next()
        cdf = rc.cdf_from_freqs(freqs)
        sym = symbols[:, t]
        rc.encode_step(st, sym, cdf, cfg.precision, mask=active)
        ideal -= torch.where(active, _log2_prob(freqs, sym, cfg), 0.0)
        if t + 1 < S:
            ctx.update(sym, active)
        if progress is not None:
            progress(t + 1, S)
    tables.check()
    data, nbits = rc.encode_finish(st)
    return Encoded(data=data, nbits=nbits, lengths=lengths, ideal_bits=ideal)


def decode_streams(data: torch.Tensor, nbits: torch.Tensor | None, lengths: torch.Tensor | int,
                   model: ProbabilityModel, cfg: CoderConfig = CoderConfig(), *, max_bits: int | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Invert :func:`encode_streams`. ``nbits`` may be None when ``max_bits`` bounds every
    stream instead (EqualInfoAC windows). Returns ``symbols [B, max(lengths)]`` (zeros past
    each length); raises :class:`~flopwise.coding.rangecoder.CorruptStreamError`, naming
    stream ``b`` as ``ids[b]`` when given (a caller decoding part of a larger set).

    ``lengths`` beyond what a stream's bits can hold (each symbol costs at least
    ``-log2(max_freq / 2^precision)`` bits, ``max_freq = 2^precision - (V - 1) * min_freq``)
    are corrupt: they raise before any step runs."""
    return _decode_streams(data, nbits, lengths, model, cfg, max_bits, progress, ids, "stream")


def _decode_streams(data, nbits, lengths, model, cfg: CoderConfig, max_bits, progress, ids, what: str):
    _check_model(model, cfg)
    rc._check_data_type(data)
    B, C = data.shape
    dev = data.device
    if max_bits is not None and (isinstance(max_bits, bool) or not isinstance(max_bits, int) or max_bits < 0):
        raise ValueError(f"max_bits must be an int >= 0, got {max_bits!r}")
    if nbits is not None:
        rc._check_nbits_type(nbits)
        nbits = nbits.long().to(dev)
        data = rc._clip_to_bits(data, nbits, ids)
    lengths = rc._check_lengths(lengths, B, dev, None, "")
    if nbits is not None:
        bits = nbits
    else:
        bits = torch.full((B,), 8 * C if max_bits is None else max_bits, dtype=torch.long, device=dev)
    rc._check_length_bound(lengths, bits, rc._bits_per_symbol(_max_freq(model.vocab_size, cfg), cfg.precision), ids)
    S = int(lengths.max()) if B else 0
    st = rc.DecoderState.new(data)
    ctx = _context(model, B, dev)
    tables = _Tables(model, ctx, cfg, B, dev)
    out = torch.zeros(B, S, dtype=torch.long, device=dev)
    for t in range(S):
        active = t < lengths
        cdf = rc.cdf_from_freqs(tables.next())
        sym = rc.decode_step(st, cdf, cfg.precision, mask=active)
        out[:, t] = torch.where(active, sym, 0)
        if t + 1 < S:
            ctx.update(sym, active)
        if progress is not None:
            progress(t + 1, S)
    tables.check()
    ok = rc.decode_finish(st, nbits=nbits, max_bits=max_bits)
    rc.raise_if_bad(ok, ids, what)
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


def encode_equal_info(symbols: torch.Tensor, lengths: torch.Tensor | int | None, model: ProbabilityModel,
                      cfg: CoderConfig, window_bits: int, max_window_symbols: int = 64,
                      progress: Callable[[int, int], None] | None = None) -> EqualInfoEncoded:
    """Cut each stream into windows of exactly ``window_bits`` bits (a multiple of 8).

    ``cfg.min_freq`` must be at least :func:`equal_info_min_freq` so every symbol fits an
    empty window. Each loop iteration either commits one symbol or closes one window per
    stream, so it ends after at most ``S + windows`` iterations.
    """
    _check_model(model, cfg)
    _check_window_bits(window_bits)
    _check_count("max_window_symbols", max_window_symbols)
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
    tables = _Tables(model, ctx, cfg, B, dev)
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
        freqs = tables.next()
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
    tables.check()
    keep = torch.arange(S + 1, device=dev)[None, :] < widx[:, None]
    return EqualInfoEncoded(windows=out[keep], counts=out_count[keep], stream_windows=widx,
                            used_bits=out_used[keep], ideal_bits=out_ideal[keep], window_bits=window_bits)


def decode_equal_info(windows: torch.Tensor, counts: torch.Tensor, model: ProbabilityModel, cfg: CoderConfig,
                      window_bits: int, *, max_window_symbols: int = 64,
                      batch_windows: int = 4096) -> list[torch.Tensor]:
    """Decode windows ``[W, window_bits/8] uint8`` holding ``counts [W]`` symbols each, all
    windows of a batch in parallel (batches of windows of similar length). Returns one
    ``[counts[w]]`` int64 tensor per window, in the given order.

    ``max_window_symbols``: the encoder's (:func:`encode_equal_info`). A count outside
    ``[1, max_window_symbols]``, or above what ``window_bits`` bits can hold (see
    :func:`decode_streams`), raises :class:`~flopwise.coding.rangecoder.CorruptStreamError`
    before any step runs; so does a window that does not decode exactly (named by its index)."""
    _check_model(model, cfg)
    _check_window_bits(window_bits)
    _check_count("max_window_symbols", max_window_symbols)
    _check_count("batch_windows", batch_windows)
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.uint8 or windows.dim() != 2:
        raise TypeError("windows must be a uint8 tensor [W, window_bits/8]")
    if windows.shape[1] * 8 != window_bits:
        raise ValueError(f"windows have {windows.shape[1] * 8} bits, window_bits is {window_bits}")
    W = windows.shape[0]
    if not isinstance(counts, torch.Tensor) or counts.dtype.is_floating_point or counts.dtype.is_complex \
            or counts.dtype == torch.bool:
        raise TypeError(f"counts must be an integer tensor [{W}]")
    if counts.shape != (W,):
        raise ValueError(f"counts must have shape [{W}], got {tuple(counts.shape)}")
    counts = counts.long().cpu()
    fit = int((window_bits + 8) / rc._bits_per_symbol(_max_freq(model.vocab_size, cfg), cfg.precision)) + 1
    most = min(max_window_symbols, fit)
    bad = torch.nonzero((counts < 1) | (counts > most))[:, 0]
    if bad.numel():
        raise rc.CorruptStreamError(f"windows {bad[:10].tolist()} hold {counts[bad[:10]].tolist()} symbols: a window "
                                    f"holds 1..{most} (max_window_symbols = {max_window_symbols}; at most {fit} "
                                    f"fit {window_bits} bits)")
    # A batch runs as many steps as its longest window: batches of windows sorted by length
    # waste (almost) no steps. The pieces go back to stream order at the end.
    order = torch.sort(counts, stable=True).indices
    pieces: list[torch.Tensor | None] = [None] * W
    for i in range(0, W, batch_windows):
        idx = order[i : i + batch_windows]
        c = counts[idx].to(windows.device)
        sym = _decode_streams(windows[idx.to(windows.device)], None, c, model, cfg, window_bits, None, idx, "window")
        for j, (w, n) in enumerate(zip(idx.tolist(), c.tolist())):
            pieces[w] = sym[j, :n]
    return pieces
