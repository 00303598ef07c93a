"""Bits <-> tokens: every ``N`` bits (N = 8 or 16) of a stream become one token.

A stream of ``nbits`` bits (big-endian: the first bit is the most significant bit of the
first byte) becomes ``ceil(nbits / N)`` tokens in ``[0, 2^N)``; the last token is padded with
zero bits. N = 8 gives vocabulary 256 (uint8), N = 16 vocabulary 65536 (uint16).
"""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["TOKEN_BITS", "bits_to_tokens", "tokens_to_bytes", "token_dtype", "n_tokens"]

TOKEN_BITS = (8, 16)


def _check_n(token_bits: int) -> None:
    if token_bits not in TOKEN_BITS:
        raise ValueError(f"token_bits must be one of {TOKEN_BITS}, got {token_bits!r}")


def _check_nbits(nbits) -> int:
    if isinstance(nbits, (bool, np.bool_)):
        raise TypeError("nbits must be an int, got bool")
    try:
        nbits = operator.index(nbits)
    except TypeError:
        raise TypeError(f"nbits must be an int, got {type(nbits).__name__}") from None
    if nbits < 0:
        raise ValueError(f"nbits must be >= 0, got {nbits}")
    return nbits


def _byte_array(data) -> np.ndarray:
    """``data`` as a 1-D uint8 array: bytes-like, or a 1-D integer array of values 0..255."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    if not isinstance(data, np.ndarray):
        raise TypeError(f"data must be bytes or a 1-D uint8 array, got {type(data).__name__}")
    if not np.issubdtype(data.dtype, np.integer):  # a cast would silently truncate floats
        raise TypeError(f"data must be bytes or a 1-D uint8 array, got dtype {data.dtype}")
    if data.ndim != 1:
        raise ValueError(f"data must be a 1-D array of bytes, got shape {data.shape}")
    if data.dtype != np.uint8 and data.size and (int(data.min()) < 0 or int(data.max()) > 255):
        raise ValueError("data must hold bytes (values 0..255); a cast to uint8 would wrap the others")
    return data.astype(np.uint8, copy=False)


def token_dtype(token_bits: int):
    _check_n(token_bits)
    return np.uint8 if token_bits == 8 else np.uint16


def n_tokens(nbits: int, token_bits: int) -> int:
    _check_n(token_bits)
    return -(-_check_nbits(nbits) // token_bits)


def bits_to_tokens(data: bytes | np.ndarray, nbits: int, token_bits: int) -> np.ndarray:
    """The first ``nbits`` bits of ``data`` -> ``[ceil(nbits / N)]`` tokens (uint8 / uint16).

    Bits past ``nbits`` inside the last byte must be zero (a coder's padding); the padding up
    to a whole token is zero too.
    """
    _check_n(token_bits)
    buf = _byte_array(data)
    nbits = _check_nbits(nbits)
    if (nbits + 7) // 8 > buf.size:
        raise ValueError(f"nbits={nbits} does not fit {buf.size} bytes")
    nb = n_tokens(nbits, token_bits) * (token_bits // 8)
    raw = np.zeros(nb, dtype=np.uint8)
    used = (nbits + 7) // 8
    raw[:used] = buf[:used]
    if nbits % 8:
        raw[used - 1] &= (0xFF << (8 - nbits % 8)) & 0xFF
    if token_bits == 8:
        return raw
    return (raw[0::2].astype(np.uint16) << 8) | raw[1::2]


def tokens_to_bytes(tokens: np.ndarray, token_bits: int) -> bytes:
    """Inverse of :func:`bits_to_tokens` up to padding: tokens -> the bytes they hold."""
    _check_n(token_bits)
    t = np.asarray(tokens)
    if not np.issubdtype(t.dtype, np.integer):  # a cast would silently truncate floats
        raise TypeError(f"tokens must be an integer array, got dtype {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {t.shape}")
    if t.size and (t.min() < 0 or int(t.max()) >= (1 << token_bits)):
        raise ValueError(f"tokens must be in [0, 2^{token_bits})")
    if token_bits == 8:
        return t.astype(np.uint8).tobytes()
    t = t.astype(np.uint16)
    out = np.empty(2 * t.size, dtype=np.uint8)
    out[0::2] = t >> 8
    out[1::2] = t & 0xFF
    return out.tobytes()
