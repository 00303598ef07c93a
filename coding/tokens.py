"""Bits <-> tokens: every ``N`` bits (N = 8 or 16) of a stream become one token.

A stream of ``nbits`` bits (big-endian: the first bit is the most significant bit of the
first byte) becomes ``ceil(nbits / N)`` tokens in ``[0, 2^N)``; the last token is padded with
zero bits. N = 8 gives vocabulary 256 (uint8), N = 16 vocabulary 65536 (uint16).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TOKEN_BITS", "bits_to_tokens", "tokens_to_bytes", "token_dtype", "n_tokens"]

TOKEN_BITS = (8, 16)


def _check_n(token_bits: int) -> None:
    if token_bits not in TOKEN_BITS:
        raise ValueError(f"token_bits must be one of {TOKEN_BITS}, got {token_bits!r}")


def token_dtype(token_bits: int):
    _check_n(token_bits)
    return np.uint8 if token_bits == 8 else np.uint16


def n_tokens(nbits: int, token_bits: int) -> int:
    _check_n(token_bits)
    return -(-int(nbits) // token_bits)


def bits_to_tokens(data: bytes | np.ndarray, nbits: int, token_bits: int) -> np.ndarray:
    """The first ``nbits`` bits of ``data`` -> ``[ceil(nbits / N)]`` tokens (uint8 / uint16).

    Bits past ``nbits`` inside the last byte must be zero (a coder's padding); the padding up
    to a whole token is zero too.
    """
    _check_n(token_bits)
    buf = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data.astype(np.uint8, copy=False)
    if nbits < 0 or (nbits + 7) // 8 > buf.size:
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
    if t.size and (t.min() < 0 or int(t.max()) >= (1 << token_bits)):
        raise ValueError(f"tokens must be in [0, 2^{token_bits})")
    if token_bits == 8:
        return t.astype(np.uint8).tobytes()
    t = t.astype(np.uint16)
    out = np.empty(2 * t.size, dtype=np.uint8)
    out[0::2] = t >> 8
    out[1::2] = t & 0xFF
    return out.tobytes()
