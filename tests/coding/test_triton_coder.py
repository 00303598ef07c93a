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
