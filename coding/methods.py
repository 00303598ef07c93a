"""The paper's compression methods as corpus -> token-array builders (and their inverses).

Every method cuts the corpus into chunks of ``chunk_bytes`` (the last one shorter), codes each
chunk as one independent stream (chunks of a batch advance together in the vectorised coder)
and turns the bits into N-bit tokens (:mod:`flopwise.coding.tokens`):

* :class:`GZip` - ``zlib.compress`` at the default level, header and footer kept.
* :class:`StaticAC` - arithmetic coding under a unigram byte model fitted on training data.
* :class:`ArithmeticCoding` - arithmetic coding under an LM (M1) conditioned on the previous
  bytes of the chunk (up to the model's ``context_len``).
* :class:`EqualInfoAC` - chunks cut into windows of exactly ``window_bits`` bits; coder and
  model context reset per window; windows decode in parallel.

:meth:`compress` returns a :class:`Compressed`: the tokens plus the small side arrays a decoder
needs (bits and bytes per stream, or bytes per window). ``ideal_bits`` is -sum log2 p of the
coded symbols under the coder's own integer frequencies (0 for GZip).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import streams as st
from .models import ProbabilityModel, StaticModel
from .rangecoder import CoderConfig, CorruptStreamError
from .tokens import bits_to_tokens, n_tokens, token_dtype, tokens_to_bytes

__all__ = ["Compressed", "GZip", "StaticAC", "ArithmeticCoding", "EqualInfoAC", "METHODS"]

METHODS = ("gzip", "static", "ac", "equalinfo")
Progress = Callable[[int, int], None] | None


@dataclass
class Compressed:
    """``tokens [T]`` (uint8 for N=8, uint16 for N=16); ``arrays`` the side arrays (name ->
    int64 numpy array); ``coded_bits`` bits before token padding; ``ideal_bits``;
    ``n_streams``; ``n_windows`` (EqualInfoAC)."""

    tokens: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    coded_bits: int = 0
    ideal_bits: float = 0.0
    n_streams: int = 0
    n_windows: int = 0


def _check_common(token_bits: int, chunk_bytes: int) -> None:
    token_dtype(token_bits)  # validates
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be an int >= 1, got {chunk_bytes!r}")


_check_count = st._check_count


def _check_data(data) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return bytes(data)


def _side_array(comp: Compressed, name: str) -> np.ndarray:
    """The side array ``name`` of ``comp`` as a 1-D int64 array: missing, not integers or not
    1-D raise :class:`CorruptStreamError` naming it (a cast would truncate floats)."""
    if not isinstance(comp.arrays, dict) or name not in comp.arrays:
        raise CorruptStreamError(f"the side array {name} is missing (it is needed to decode)")
    arr = np.asarray(comp.arrays[name])
    if not np.issubdtype(arr.dtype, np.integer):
        raise CorruptStreamError(f"the side array {name} holds {arr.dtype}, expected integers")
    if arr.ndim != 1:
        raise CorruptStreamError(f"the side array {name} has shape {arr.shape}, expected a 1-D array")
    return arr.astype(np.int64, copy=False)


def _chunks(data: bytes, chunk_bytes: int) -> list[bytes]:
    return [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]


def _pack(chunks: list[bytes], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte chunks -> ``symbols [B, S] int64`` (zero padded), ``lengths [B]``."""
    S = max((len(c) for c in chunks), default=0)
    arr = np.zeros((len(chunks), S), dtype=np.uint8)
    for i, c in enumerate(chunks):
        arr[i, : len(c)] = np.frombuffer(c, dtype=np.uint8)
    lengths = torch.tensor([len(c) for c in chunks], dtype=torch.long)
    return torch.from_numpy(arr).long().to(device), lengths.to(device)


class GZip:
    """zlib (default level, header and footer kept) per chunk, bytes -> N-bit tokens."""

    name = "gzip"

    def __init__(self, token_bits: int = 8, chunk_bytes: int = 4096):
        _check_common(token_bits, chunk_bytes)
        self.token_bits, self.chunk_bytes = token_bits, chunk_bytes

    def options(self) -> dict:
        return {"token_bits": self.token_bits, "chunk_bytes": self.chunk_bytes, "zlib_level": -1}

    def compress(self, data: bytes, progress: Progress = None) -> Compressed:
        chunks = _chunks(_check_data(data), self.chunk_bytes)
        toks, nbytes = [], []
        for i, c in enumerate(chunks):
            z = zlib.compress(c)
            nbytes.append(len(z))
            toks.append(bits_to_tokens(z, 8 * len(z), self.token_bits))
            if progress:
                progress(i + 1, len(chunks))
        tokens = np.concatenate(toks) if toks else np.zeros(0, dtype=token_dtype(self.token_bits))
        return Compressed(tokens=tokens, arrays={"stream_nbytes": np.array(nbytes, dtype=np.int64)},
                          coded_bits=8 * sum(nbytes), n_streams=len(chunks))

    def decompress(self, comp: Compressed) -> bytes:
        nbytes = _side_array(comp, "stream_nbytes")
        raw = tokens_to_bytes(comp.tokens, self.token_bits)
        out, pos = [], 0
        step = self.token_bits // 8
        for i, n in enumerate(nbytes.tolist()):
            if n < 0 or pos + n > len(raw):
                raise CorruptStreamError("gzip stream lengths exceed the token data (truncated input)")
            # a stream must end exactly at its recorded length: zlib.decompress alone ignores
            # bytes after the end of a stream, so a wrong length could still decode
            z = zlib.decompressobj()
            try:
                piece = z.decompress(raw[pos : pos + n])
            except zlib.error as exc:
                raise CorruptStreamError(f"corrupt gzip stream {i}: {exc}") from None
            if not z.eof or z.unused_data:
                raise CorruptStreamError(f"gzip stream {i} does not end at its recorded length of {n} bytes")
            out.append(piece)
            end = pos + -(-n // step) * step
            if any(raw[pos + n : end]):
                raise CorruptStreamError(f"gzip stream {i}: the padding to a whole token is not zero")
            pos = end
        if pos != len(raw):
            raise CorruptStreamError(f"{len(raw) - pos} bytes of token data left over after the last stream")
        return b"".join(out)


class _StreamAC:
    """Shared by StaticAC and ArithmeticCoding: chunks -> streams -> tokens."""

    def __init__(self, model: ProbabilityModel, cfg: CoderConfig, token_bits: int, chunk_bytes: int,
                 streams_per_batch: int, device):
        _check_common(token_bits, chunk_bytes)
        _check_count("streams_per_batch", streams_per_batch)
        if model.vocab_size != 256:
            raise ValueError(f"byte coding needs a 256-symbol model, got vocab_size={model.vocab_size}")
        cfg.check_vocab(model.vocab_size)  # precision too low for 256 symbols: now, not at compress()
        self.model, self.cfg = model, cfg
        self.token_bits, self.chunk_bytes, self.streams_per_batch = token_bits, chunk_bytes, streams_per_batch
        self.device = torch.device(device)

    def options(self) -> dict:
        return {"token_bits": self.token_bits, "chunk_bytes": self.chunk_bytes, "precision": self.cfg.precision,
                "min_freq": self.cfg.min_freq, "streams_per_batch": self.streams_per_batch}

    def compress(self, data: bytes, progress: Progress = None) -> Compressed:
        chunks = _chunks(_check_data(data), self.chunk_bytes)
        toks, nbits, nsym = [], [], []
        ideal = 0.0
        done = 0
        total = len(data)
        for i in range(0, len(chunks), self.streams_per_batch):
            group = chunks[i : i + self.streams_per_batch]
            sym, lengths = _pack(group, self.device)
            base = done
            cb = (lambda t, S, base=base, n=len(group): progress(min(total, base + t * n), total)) if progress else None
            enc = st.encode_streams(sym, lengths, self.model, self.cfg, progress=cb)
            data_np = enc.data.cpu().numpy()
            for b, nb in enumerate(enc.nbits.tolist()):
                toks.append(bits_to_tokens(data_np[b], nb, self.token_bits))
                nbits.append(nb)
            nsym.extend(len(c) for c in group)
            ideal += float(enc.ideal_bits.sum())
            done += sum(len(c) for c in group)
        tokens = np.concatenate(toks) if toks else np.zeros(0, dtype=token_dtype(self.token_bits))
        return Compressed(tokens=tokens, arrays={"stream_bits": np.array(nbits, dtype=np.int64),
                                                 "stream_bytes": np.array(nsym, dtype=np.int64)},
                          coded_bits=sum(nbits), ideal_bits=ideal, n_streams=len(chunks))

    def decompress(self, comp: Compressed, progress: Progress = None) -> bytes:
        nbits = _side_array(comp, "stream_bits")
        nsym = _side_array(comp, "stream_bytes")
        if nbits.shape != nsym.shape or (nbits < 0).any() or (nsym < 0).any():
            raise CorruptStreamError("stream_bits / stream_bytes are inconsistent")
        # compress cut the input into chunks of chunk_bytes, the last one shorter: any other
        # length is corruption (and would make the decoder run that many model steps)
        if nsym.size and ((nsym[:-1] != self.chunk_bytes).any() or not 1 <= nsym[-1] <= self.chunk_bytes):
            raise CorruptStreamError(f"stream byte counts must be chunk_bytes = {self.chunk_bytes} for every "
                                     f"stream but the last, and 1..{self.chunk_bytes} for the last")
        ntok = np.array([n_tokens(b, self.token_bits) for b in nbits.tolist()], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(ntok)])
        if offsets[-1] != comp.tokens.size:
            raise CorruptStreamError(f"expected {offsets[-1]} tokens from the stream lengths, found {comp.tokens.size}")
        out = []
        for i in range(0, len(nbits), self.streams_per_batch):
            idx = range(i, min(i + self.streams_per_batch, len(nbits)))
            raws = [tokens_to_bytes(comp.tokens[offsets[j] : offsets[j + 1]], self.token_bits) for j in idx]
            C = max((len(r) for r in raws), default=0)
            arr = np.zeros((len(raws), C), dtype=np.uint8)
            for r, raw in enumerate(raws):
                arr[r, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            sym = st.decode_streams(torch.from_numpy(arr).to(self.device), torch.from_numpy(nbits[i : i + len(raws)]),
                                    torch.from_numpy(nsym[i : i + len(raws)]), self.model, self.cfg, ids=list(idx))
            sym = sym.to(torch.uint8).cpu().numpy()
            out.extend(sym[r, : nsym[j]].tobytes() for r, j in enumerate(idx))
            if progress:
                progress(idx[-1] + 1, len(nbits))
        return b"".join(out)


class StaticAC(_StreamAC):
    """Arithmetic coding under a unigram byte model (:class:`StaticModel`)."""

    name = "static"

    def __init__(self, model: StaticModel, token_bits: int = 8, chunk_bytes: int = 4096,
                 streams_per_batch: int = 4096, device="cpu"):
        if not isinstance(model, StaticModel):
            raise TypeError("model must be a StaticModel (StaticModel.fit(training_bytes))")
        super().__init__(model, model.cfg, token_bits, chunk_bytes, streams_per_batch, device)

    @classmethod
    def fit(cls, train: bytes, precision: int = 24, **kwargs) -> "StaticAC":
        return cls(StaticModel.fit(train, cfg=CoderConfig(precision=precision)), **kwargs)


class ArithmeticCoding(_StreamAC):
    """Arithmetic coding under an LM (e.g. M1 through :class:`~flopwise.coding.models.ModuleModel`),
    each byte conditioned on the previous bytes of its chunk (the last ``context_len``)."""

    name = "ac"

    def __init__(self, model: ProbabilityModel, token_bits: int = 8, chunk_bytes: int = 4096,
                 precision: int = 24, streams_per_batch: int = 256, device="cpu"):
        super().__init__(model, CoderConfig(precision=precision), token_bits, chunk_bytes, streams_per_batch, device)


class EqualInfoAC:
    """EqualInfoAC[b]: windows of exactly ``window_bits`` bits, ``window_bits / N`` tokens each.

    The model's frequencies are floored at :func:`~flopwise.coding.streams.equal_info_min_freq`
    so every byte fits an empty window; a window also ends after ``max_window_bytes``.
    """

    name = "equalinfo"

    @staticmethod
    def context_len(max_window_bytes: int) -> int:
        """The longest context an EqualInfoAC window gives its model: the start symbol and
        the window's bytes (the context restarts at every window, so a cached model needs
        no more slots than this)."""
        return max_window_bytes + 1

    def __init__(self, model: ProbabilityModel, window_bits: int = 16, token_bits: int = 8,
                 chunk_bytes: int = 4096, precision: int = 24, max_window_bytes: int = 64,
                 streams_per_batch: int = 256, batch_windows: int = 4096, device="cpu"):
        _check_common(token_bits, chunk_bytes)
        if isinstance(window_bits, bool) or not isinstance(window_bits, int) or window_bits % token_bits or window_bits < 16:
            # an empty 8-bit window cannot hold every byte: 256 symbols would each need
            # frequency >= 2^(precision - 8), the whole total
            raise ValueError(f"window_bits must be a multiple of token_bits={token_bits} and >= 16 (an 8-bit "
                             f"window cannot hold every byte), got {window_bits!r}")
        if window_bits > 512:
            raise ValueError(f"window_bits must be <= 512, got {window_bits}")
        for name, v in (("max_window_bytes", max_window_bytes), ("streams_per_batch", streams_per_batch),
                        ("batch_windows", batch_windows)):
            _check_count(name, v)
        if isinstance(model, StaticModel):
            raise TypeError("EqualInfoAC re-quantises the model per window; wrap an LM with ModuleModel")
        if model.vocab_size != 256:
            raise ValueError(f"byte coding needs a 256-symbol model, got vocab_size={model.vocab_size}")
        self.model = model
        self.cfg = CoderConfig(precision=precision, min_freq=st.equal_info_min_freq(window_bits, precision))
        self.cfg.check_vocab(256)
        self.window_bits, self.token_bits, self.chunk_bytes = window_bits, token_bits, chunk_bytes
        self.max_window_bytes, self.streams_per_batch, self.batch_windows = max_window_bytes, streams_per_batch, batch_windows
        self.device = torch.device(device)

    def options(self) -> dict:
        return {"window_bits": self.window_bits, "token_bits": self.token_bits, "chunk_bytes": self.chunk_bytes,
                "precision": self.cfg.precision, "min_freq": self.cfg.min_freq,
                "max_window_bytes": self.max_window_bytes, "streams_per_batch": self.streams_per_batch,
                "batch_windows": self.batch_windows}

    def compress(self, data: bytes, progress: Progress = None) -> Compressed:
        chunks = _chunks(_check_data(data), self.chunk_bytes)
        wins, counts, used = [], [], []
        ideal = 0.0
        done, total = 0, len(data)
        for i in range(0, len(chunks), self.streams_per_batch):
            group = chunks[i : i + self.streams_per_batch]
            sym, lengths = _pack(group, self.device)
            base = done
            cb = (lambda a, b, base=base: progress(min(total, base + a), total)) if progress else None
            enc = st.encode_equal_info(sym, lengths, self.model, self.cfg, self.window_bits,
                                       self.max_window_bytes, progress=cb)
            wins.append(enc.windows.cpu().numpy())
            counts.append(enc.counts.cpu().numpy())
            used.append(enc.used_bits.cpu().numpy())
            ideal += float(enc.ideal_bits.sum())
            done += sum(len(c) for c in group)
        wb = self.window_bits // 8
        windows = np.concatenate(wins) if wins else np.zeros((0, wb), dtype=np.uint8)
        raw = windows.reshape(-1).tobytes()
        tokens = bits_to_tokens(raw, 8 * len(raw), self.token_bits)
        cnt = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, dtype=np.int64)
        used_bits = np.concatenate(used).astype(np.int64) if used else np.zeros(0, dtype=np.int64)
        return Compressed(tokens=tokens, arrays={"window_bytes": cnt}, coded_bits=int(used_bits.sum()),
                          ideal_bits=ideal, n_streams=len(chunks), n_windows=int(cnt.size))

    def decompress(self, comp: Compressed, progress: Progress = None) -> bytes:
        cnt = _side_array(comp, "window_bytes")
        wb = self.window_bits // 8
        raw = np.frombuffer(tokens_to_bytes(comp.tokens, self.token_bits), dtype=np.uint8)
        if raw.size != cnt.size * wb:
            raise CorruptStreamError(f"expected {cnt.size} windows of {self.window_bits} bits, "
                                     f"found {raw.size * 8} bits of tokens")
        if cnt.size and (cnt.min() < 1 or cnt.max() > self.max_window_bytes):
            raise CorruptStreamError(f"window byte counts must be in [1, {self.max_window_bytes}]")
        windows = torch.from_numpy(raw.reshape(-1, wb).copy()).to(self.device)
        pieces = st.decode_equal_info(windows, torch.from_numpy(cnt), self.model, self.cfg, self.window_bits,
                                      max_window_symbols=self.max_window_bytes, batch_windows=self.batch_windows)
        return b"".join(p.to(torch.uint8).cpu().numpy().tobytes() for p in pieces)
