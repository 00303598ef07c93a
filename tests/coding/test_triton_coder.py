"""The fused Triton coder (under the interpreter on CPU) is bit-identical to the torch coder."""

from __future__ import annotations

import pytest
import torch

from flopwise.coding import rangecoder as rc
from flopwise.coding.triton_coder import decode_triton, encode_triton


@pytest.mark.parametrize("V", [2, 256, 1000])
def test_triton_matches_torch(V, device):
    g = torch.Generator().manual_seed(V)
    B, S = 37, 25
    f = rc.quantize_logits(torch.randn(B, S, V, generator=g) * 4)
    cdf = rc.cdf_from_freqs(f).to(device)
    sym = torch.multinomial(f.reshape(-1, V).double(), 1, generator=g).reshape(B, S).to(device)
    lengths = torch.randint(0, S + 1, (B,), generator=g).to(device)
    d1, n1 = rc.encode(sym, cdf, lengths)
    d2, n2 = encode_triton(sym, cdf, lengths, block=16)
    assert torch.equal(n1, n2) and torch.equal(d1, d2)
    o1 = rc.decode(d1, n1, cdf, lengths)
    o2 = decode_triton(d1, n1, cdf, lengths, block=16)
    assert torch.equal(o1, o2)
    bad = d1.clone()
    bad[:, 0] ^= 0xFF
    with pytest.raises(rc.CorruptStreamError):
        decode_triton(bad, n1, cdf, lengths, block=16)


_ENCODERS = {"torch": rc.encode, "triton": lambda *a, **k: encode_triton(*a, block=4, **k)}
_DECODERS = {"torch": rc.decode, "triton": lambda *a, **k: decode_triton(*a, block=4, **k)}


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_coders_refuse_what_they_cannot_code(path):
    """Both coders check their inputs alike; the kernels would read out of bounds or return an
    undecodable stream otherwise."""
    enc, dec = _ENCODERS[path], _DECODERS[path]
    cdf = torch.tensor([0, 1 << 23, 1 << 23, 1 << 24])  # symbol 1 has frequency 0
    per_step = cdf.expand(2, 3, 4).contiguous()
    ok = torch.tensor([[0, 2, 0], [2, 2, 0]])
    for table in (cdf, per_step):
        for s, t in ((0, 1), (1, 2), (1, 0)):
            bad_sym = ok.clone()
            bad_sym[s, t] = (1, 3, -1)[t]  # zero frequency, == V, negative
            with pytest.raises(ValueError, match=rf"symbols\[{s}, {t}\]"):
                enc(bad_sym, table)
    with pytest.raises(ValueError, match="lengths must be <= 3"):
        enc(ok, per_step, torch.tensor([3, 5]))
    for bad in (ok.tolist(), ok[None]):  # not a tensor; three dimensions
        with pytest.raises(TypeError, match=r"symbols must be a tensor \[B, S\]"):
            enc(bad, cdf)
    with pytest.raises(ValueError, match="precision must be in"):
        enc(ok, torch.tensor([0, 1 << 46, 1 << 47]), precision=47)
    with pytest.raises(ValueError, match="end at 2"):
        enc(ok, torch.tensor([0, 100, 1 << 20]))  # totals 2^20, precision 24
    data, nbits = rc.encode(ok, per_step)
    with pytest.raises(ValueError, match="cdf has 3 steps"):
        dec(data, nbits, per_step, torch.tensor([3, 5]))
    # past the last coded symbol anything may fill the symbols (they are never read)
    padded = ok.clone()
    padded[1, 2] = 99
    assert torch.equal(enc(padded, cdf, torch.tensor([3, 2]))[0], rc.encode(ok, cdf, torch.tensor([3, 2]))[0])
    # a shared table bounds the symbols a stream's bits hold (here 1 bit each at least)
    data, nbits = rc.encode(ok, cdf)
    with pytest.raises(rc.CorruptStreamError, match=r"streams \[0\] claim more symbols"):
        dec(data, nbits, cdf, torch.tensor([int(nbits[0]) + 10, 3]))


def test_triton_takes_a_shared_table_like_torch():
    g = torch.Generator().manual_seed(3)
    cdf = rc.cdf_from_freqs(rc.quantize_logits(torch.randn(300, generator=g) * 3))
    sym = torch.randint(0, 300, (5, 9), generator=g)
    lengths = torch.tensor([9, 0, 4, 9, 1])
    d1, n1 = rc.encode(sym, cdf, lengths)
    d2, n2 = encode_triton(sym, cdf, lengths, block=4)
    assert torch.equal(d1, d2) and torch.equal(n1, n2)
    assert torch.equal(decode_triton(d1, n1, cdf, lengths, block=4), rc.decode(d1, n1, cdf, lengths))


def test_block_is_checked():
    """``block`` is the kernels' ``tl.arange`` length: a power of two, else an empty result
    (negative), a division by zero or an interpreter error."""
    cdf = rc.cdf_from_freqs(rc.quantize_logits(torch.zeros(4)))
    sym = torch.tensor([[1, 2, 3, 0, 1], [3, 3, 3, 3, 3]])
    d, n = rc.encode(sym, cdf)
    for bad in (-4, 0, 3, 2048):
        with pytest.raises(ValueError, match=r"block must be a power of two in \[1, 1024\]"):
            encode_triton(sym, cdf, block=bad)
        with pytest.raises(ValueError, match=r"block must be a power of two in \[1, 1024\]"):
            decode_triton(d, n, cdf, 5, block=bad)
    for bad in (True, 4.0):
        with pytest.raises(TypeError, match="block must be an int"):
            encode_triton(sym, cdf, block=bad)
        with pytest.raises(TypeError, match="block must be an int"):
            decode_triton(d, n, cdf, 5, block=bad)
    for block in (1, 2):
        d2, n2 = encode_triton(sym, cdf, block=block)
        assert torch.equal(d2, d) and torch.equal(n2, n)
        assert torch.equal(decode_triton(d, n, cdf, 5, block=block), sym)
