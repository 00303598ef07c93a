"""Fused multi-step range coder kernels (Triton) for given frequency tables.

One program owns ``BLOCK`` streams and loops over all ``S`` steps with the state in
registers, so a call is one launch instead of ~30 torch ops per step. Bit-identical to
:func:`flopwise.coding.rangecoder.encode` / ``decode`` (same arithmetic, same carry
bookkeeping; termination and carry resolution reuse the torch code).

Shapes: ``symbols [B, S]`` int64, ``cdf [B, S, V+1]`` (or one shared ``[V+1]``) int64,
``lengths [B]`` int64. Arguments are validated as by the torch coder (symbols inside ``[0, V)``
with nonzero frequency, tables totalling ``2^precision``, lengths within the steps): the
kernels index memory with them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flopwise.kernels._dispatch import cdiv
from flopwise.kernels._launch import launch

from . import rangecoder as rc

__all__ = ["encode_triton", "decode_triton"]

_MASK = (1 << rc.STATE_BITS) - 1
_BOTTOM = 1 << (rc.STATE_BITS - 8)
_MAX_BLOCK = 1024  # streams per program: the state of each lives in registers


@triton.jit
def _encode_kernel(sym_ptr, cdf_ptr, len_ptr, buf_ptr, low_ptr, rng_ptr, nb_ptr, B, S, V1, SB, SS, C, CAP,
                   PREC: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < B
    rows64 = rows.to(tl.int64)
    n = tl.load(len_ptr + rows64, mask=m, other=0)
    low = tl.load(low_ptr + rows64, mask=m, other=0)
    rng = tl.load(rng_ptr + rows64, mask=m, other=281474976710656)
    nb = tl.load(nb_ptr + rows64, mask=m, other=0)
    for t in range(S):
        a = m & (t < n)
        s = tl.load(sym_ptr + rows64 * S + t, mask=a, other=0)
        base = rows64 * SB + (rows64 * 0 + t) * SS  # int64 (S * (V+1) may pass 2^31); strides 0: a shared table
        lo = tl.load(cdf_ptr + base + s, mask=a, other=0)
        hi = tl.load(cdf_ptr + base + s + 1, mask=a, other=1)
        r = rng >> PREC
        new_low = low + r * lo
        new_rng = r * (hi - lo)
        carry = new_low >> 48
        new_low = new_low & 0xFFFFFFFFFFFF
        cm = a & (carry > 0)
        cptr = buf_ptr + rows64 * C + nb - 1
        prev = tl.load(cptr, mask=cm, other=0)
        tl.store(cptr, prev + 1, mask=cm)
        low = tl.where(a, new_low, low)
        rng = tl.where(a, new_rng, rng)
        for _j in tl.static_range(3):
            sh = a & (rng < 0x10000000000)
            byte = (low >> 40) & 0xFF
            tl.store(buf_ptr + rows64 * C + nb, byte.to(tl.int16), mask=sh & (nb < CAP))
            low = tl.where(sh, (low << 8) & 0xFFFFFFFFFFFF, low)
            rng = tl.where(sh, rng << 8, rng)
            nb = tl.where(sh, nb + 1, nb)
    tl.store(low_ptr + rows64, low, mask=m)
    tl.store(rng_ptr + rows64, rng, mask=m)
    tl.store(nb_ptr + rows64, nb, mask=m)


@triton.jit
def _decode_kernel(data_ptr, cdf_ptr, len_ptr, out_ptr, code_ptr, low_ptr, rng_ptr, pos_ptr, bad_ptr,
                   B, S, V1, SB, SS, D, PREC: tl.constexpr, LOGV: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < B
    rows64 = rows.to(tl.int64)
    n = tl.load(len_ptr + rows64, mask=m, other=0)
    code = tl.load(code_ptr + rows64, mask=m, other=0)
    low = tl.load(low_ptr + rows64, mask=m, other=0)
    rng = tl.load(rng_ptr + rows64, mask=m, other=281474976710656)
    pos = tl.load(pos_ptr + rows64, mask=m, other=0)
    bad = tl.load(bad_ptr + rows64, mask=m, other=0)
    total = 1 << PREC
    for t in range(S):
        a = m & (t < n)
        base = rows64 * SB + (rows64 * 0 + t) * SS  # int64 (S * (V+1) may pass 2^31); strides 0: a shared table
        r = rng >> PREC
        target = code // r
        oob = (target >= total) | (target < 0)
        target = tl.minimum(tl.maximum(target, 0), total - 1)
        # largest s with cdf[s] <= target, s in [0, V-1]  (cdf[V] = total > target)
        lo_i = tl.zeros_like(target)
        hi_i = tl.zeros_like(target) + (V1 - 1)
        for _k in tl.static_range(LOGV):
            mid = (lo_i + hi_i) // 2
            c = tl.load(cdf_ptr + base + mid, mask=a, other=0)
            go = c <= target
            lo_i = tl.where(go, mid, lo_i)
            hi_i = tl.where(go, hi_i, mid)
        s = lo_i
        clo = tl.load(cdf_ptr + base + s, mask=a, other=0)
        chi = tl.load(cdf_ptr + base + s + 1, mask=a, other=1)
        tl.store(out_ptr + rows64 * S + t, s, mask=a)
        new_code = code - r * clo
        new_low = (low + r * clo) & 0xFFFFFFFFFFFF
        new_rng = r * (chi - clo)
        for _j in tl.static_range(3):
            sh = a & (new_rng < 0x10000000000)
            byte = tl.load(data_ptr + rows64 * D + tl.minimum(pos, D - 1), mask=sh, other=0)
            new_code = tl.where(sh, (new_code << 8) | byte, new_code)
            new_low = tl.where(sh, (new_low << 8) & 0xFFFFFFFFFFFF, new_low)
            new_rng = tl.where(sh, new_rng << 8, new_rng)
            pos = tl.where(sh, pos + 1, pos)
        new_code = tl.where(oob, 0, new_code)
        code = tl.where(a, new_code, code)
        low = tl.where(a, new_low, low)
        rng = tl.where(a, new_rng, rng)
        bad = tl.where(a & oob, 1, bad)
    tl.store(code_ptr + rows64, code, mask=m)
    tl.store(low_ptr + rows64, low, mask=m)
    tl.store(rng_ptr + rows64, rng, mask=m)
    tl.store(pos_ptr + rows64, pos, mask=m)
    tl.store(bad_ptr + rows64, bad, mask=m)


def _check_block(block) -> int:
    """Streams per program: a power of two (``tl.arange``) in ``[1, 1024]``."""
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block must be an int, got {type(block).__name__}")
    if not 1 <= block <= _MAX_BLOCK or block & (block - 1):
        raise ValueError(f"block must be a power of two in [1, {_MAX_BLOCK}] (streams per program), got {block}")
    return block


def _table_strides(cdf: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``cdf`` with a contiguous last dimension and its (stream, step) strides in elements."""
    if cdf.dim() == 1:
        return cdf.contiguous(), 0, 0
    cdf = cdf.contiguous()
    return cdf, cdf.stride(0), cdf.stride(1)


def encode_triton(symbols: torch.Tensor, cdf: torch.Tensor, lengths: torch.Tensor | None = None, *,
                  precision: int = 24, block: int = 128, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`flopwise.coding.rangecoder.encode` (per-step ``cdf [B, S, V+1]`` or a shared
    ``[V+1]``), in one launch; the same argument checks (``validate=False``: none, as there).
    ``block``: streams per program, a power of two in [1, 1024]."""
    _check_block(block)
    lengths = (rc.check_encode_args(symbols, cdf, lengths, precision) if validate
               else rc._trusted_lengths(lengths, symbols.shape[0], symbols.device, symbols.shape[1]))
    B, S = symbols.shape
    dev = symbols.device
    st = rc.EncoderState.new(B, 3 * S + 8, dev)
    C = st.buf.shape[1]
    table, sb, ss = _table_strides(cdf)
    grid = (cdiv(B, block),)
    launch(_encode_kernel, grid, symbols.long().contiguous(), table, lengths, st.buf, st.low, st.rng,
           st.nbytes, B, S, table.shape[-1], sb, ss, C, C - 1, PREC=precision, BLOCK=block)
    return rc.encode_finish(st)


def decode_triton(data: torch.Tensor, nbits: torch.Tensor, cdf: torch.Tensor, lengths: torch.Tensor | int, *,
                  precision: int = 24, block: int = 128, validate: bool = True) -> torch.Tensor:
    """As :func:`flopwise.coding.rangecoder.decode` (per-step ``cdf [B, S, V+1]`` or a shared
    ``[V+1]``), in one launch; the same argument checks (``validate=False``: none, as there).
    ``block``: as for :func:`encode_triton`."""
    _check_block(block)
    lengths = (rc.check_decode_args(data, nbits, cdf, lengths, precision) if validate
               else rc._trusted_lengths(lengths, data.shape[0], data.device, 0))
    B = data.shape[0]
    S = int(lengths.max()) if B else 0
    st = rc.DecoderState.new(rc._clip_to_bits(data, nbits))
    out = torch.zeros(B, S, dtype=torch.long, device=data.device)
    bad = st.bad.to(torch.int64)
    table, sb, ss = _table_strides(cdf)
    V1 = table.shape[-1]
    logv = max(1, (V1 - 2).bit_length())
    grid = (cdiv(B, block),)
    launch(_decode_kernel, grid, st.data, table, lengths, out, st.code, st.low, st.rng, st.pos, bad,
           B, S, V1, sb, ss, st.data.shape[1], PREC=precision, LOGV=logv, BLOCK=block)
    st.bad = bad.bool()
    rc.raise_if_bad(rc.decode_finish(st, nbits=nbits))
    mask = torch.arange(S, device=data.device)[None, :] < lengths[:, None]
    return torch.where(mask, out, 0)
