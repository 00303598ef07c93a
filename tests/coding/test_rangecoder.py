"""The vectorised range coder: exact round trips, overhead, carries, corruption."""

from __future__ import annotations

import math
import random

import pytest
import torch

from flopwise.coding import rangecoder as rc
from flopwise.coding.rangecoder import CoderConfig, CorruptStreamError, cdf_from_freqs, quantize_logits, quantize_probs


def _roundtrip(sym, cdf, lengths=None, precision=24):
    data, nbits = rc.encode(sym, cdf, lengths, precision=precision)
    L = lengths if lengths is not None else torch.full((sym.shape[0],), sym.shape[1])
    out = rc.decode(data, nbits, cdf, L, precision=precision)
    mask = torch.arange(sym.shape[1])[None, :] < L[:, None]
    ref = torch.where(mask, sym, 0)[:, : out.shape[1]]
    assert torch.equal(out, ref)
    return data, nbits


def _ideal(sym, freqs, lengths, precision=24):
    p = freqs.gather(-1, sym[..., None])[..., 0].double()
    mask = torch.arange(sym.shape[1])[None, :] < lengths[:, None]
    return ((precision - torch.log2(p)) * mask).sum(1)


def test_quantize_properties():
    logits = torch.randn(50, 256) * torch.linspace(0.1, 40, 50)[:, None]
    f = quantize_logits(logits)
    assert f.dtype == torch.int64
    assert (f.sum(-1) == 2**24).all() and (f >= 1).all()
    assert torch.equal(f, quantize_logits(logits.clone()))  # deterministic
    # the most probable symbol keeps the largest frequency
    assert torch.equal(f.argmax(-1), logits.argmax(-1))
    cfg = CoderConfig(precision=16, min_freq=8)
    f = quantize_logits(logits, cfg)
    assert (f.sum(-1) == 2**16).all() and (f >= 8).all()
    with pytest.raises(ValueError, match="finite"):
        quantize_logits(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="vocab_size"):
        quantize_logits(torch.zeros(1, 65537))
    with pytest.raises(ValueError, match="precision"):
        CoderConfig(precision=25)


@pytest.mark.parametrize("probs", [
    pytest.param([[1.0, 1.0, 1.0, 1.0]], id="sum-4"),
    pytest.param([[float("nan"), 0.5, 0.5, 0.0]], id="nan"),
    pytest.param([[-0.1, 0.6, 0.5, 0.0]], id="negative"),
])
def test_quantize_probs_refuses_what_is_not_a_distribution(probs):
    with pytest.raises(ValueError, match="finite, non-negative and sum to 1"):
        quantize_probs(torch.tensor(probs))


def test_quantize_probs_takes_a_rounded_distribution():
    p = torch.softmax(torch.randn(3, 65536) * 4, -1)
    for q in (p, p.bfloat16(), p.half()):
        f = quantize_probs(q)
        assert (f.sum(-1) == 2**24).all() and (f >= 1).all()


def test_thousands_of_random_streams():
    g = torch.Generator().manual_seed(1)
    B, S, V = 3000, 40, 256
    logits = torch.randn(B, S, V, generator=g) * 4
    freqs = quantize_logits(logits)
    sym = torch.multinomial(freqs.reshape(-1, V).double(), 1, generator=g).reshape(B, S)
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    data, nbits = _roundtrip(sym, cdf_from_freqs(freqs), lengths)
    ideal = _ideal(sym, freqs, lengths)
    # per stream: at most 0.5% + 4 bytes over the ideal code length
    assert bool((nbits <= 1.005 * ideal + 32).all())
    assert float(nbits.sum()) <= 1.001 * float(ideal.sum()) + 2 * B
    assert int(nbits[lengths == 0].max()) == 0  # an empty stream costs nothing


@pytest.mark.parametrize("V", [2, 3, 256, 1000])
def test_vocab_sizes_and_random_lengths(V):
    g = torch.Generator().manual_seed(V)
    B, S = 64, 120
    freqs = quantize_logits(torch.randn(B, S, V, generator=g) * 3)
    sym = torch.multinomial(freqs.reshape(-1, V).double(), 1, generator=g).reshape(B, S)
    _roundtrip(sym, cdf_from_freqs(freqs), torch.randint(0, S + 1, (B,), generator=g))


def test_uniform_65536():
    V = 65536
    f = torch.full((V,), 2**24 // V, dtype=torch.long)
    sym = torch.randint(0, V, (8, 200))
    data, nbits = _roundtrip(sym, cdf_from_freqs(f))
    assert bool((nbits <= 16 * 200 + 2).all()) and bool((nbits >= 16 * 200 - 16).all())


def test_every_byte_value_single_byte_and_empty():
    f = quantize_logits(torch.randn(256))
    cdf = cdf_from_freqs(f)
    _roundtrip(torch.arange(256)[None, :], cdf)
    _roundtrip(torch.arange(256)[:, None], cdf)  # 256 streams of one byte each
    data, nbits = rc.encode(torch.zeros(3, 0, dtype=torch.long), cdf)
    assert nbits.tolist() == [0, 0, 0]


def test_near_deterministic_and_rarest_symbols():
    V = 256
    f = torch.ones(V, dtype=torch.long)
    f[7] = 2**24 - (V - 1)  # p(7) = 1 - 255 / 2^24
    cdf = cdf_from_freqs(f)
    run = torch.full((4, 5000), 7)
    data, nbits = _roundtrip(run, cdf)
    ideal = 5000 * -math.log2(f[7].item() / 2**24)
    assert bool((nbits <= ideal + 32).all())  # a long run costs almost nothing
    rare = torch.randint(0, V, (4, 300))  # mostly frequency-1 symbols: 24 bits each
    data, nbits = _roundtrip(rare, cdf)
    ideal = _ideal(rare, f.expand(4, 300, V), torch.full((4,), 300))
    assert bool((nbits <= 1.005 * ideal + 32).all())


def test_carry_resolution_matches_big_integers():
    rng = random.Random(0)
    rows = []
    for _ in range(200):
        n = rng.randint(1, 12)
        row = [rng.choice([255, 255, 255, 0, 7, 254]) for _ in range(n)]
        carries = [rng.random() < 0.3 for _ in range(n)]
        rows.append((row, carries))
    C = 12
    buf = torch.zeros(len(rows), C, dtype=torch.int16)
    for i, (row, carries) in enumerate(rows):
        for j, (v, c) in enumerate(zip(row, carries)):
            buf[i, j] = v + c
    got = rc.resolve_carries(buf)
    for i, (row, carries) in enumerate(rows):
        value = sum((v + c) * 256 ** (C - 1 - j) for j, (v, c) in enumerate(zip(row, carries)))
        want = (value % 256**C).to_bytes(C, "big")
        assert bytes(got[i].tolist()) == want


def test_carries_happen_and_decode():
    # symbols at the top of the table push low up: carries are frequent
    f = torch.tensor([1, 1, 2**23, 2**23 - 2], dtype=torch.long)
    sym = torch.randint(2, 4, (256, 400))
    cdf = cdf_from_freqs(f)
    st = rc.EncoderState.new(256, 3 * 400 + 8)
    for t in range(400):
        rc.encode_step(st, sym[:, t], cdf, 24)
    assert int((st.buf == 256).sum()) > 0  # at least one unresolved carry was recorded
    _roundtrip(sym, cdf)


def test_truncated_and_corrupt_input_raise():
    g = torch.Generator().manual_seed(3)
    B, S, V = 200, 60, 256
    freqs = quantize_logits(torch.randn(B, S, V, generator=g) * 2)
    cdf = cdf_from_freqs(freqs)
    sym = torch.multinomial(freqs.reshape(-1, V).double(), 1, generator=g).reshape(B, S)
    data, nbits = rc.encode(sym, cdf, precision=24)
    with pytest.raises(CorruptStreamError, match="truncated"):
        rc.decode(data[:, : int((nbits.max() + 7) // 8) - 1].contiguous(), nbits, cdf, S)
    with pytest.raises(CorruptStreamError):
        rc.decode(data, nbits - 1, cdf, S)  # a wrong length is detected
    # flip one bit per stream: an arithmetic code has no redundancy, so a flip usually still
    # decodes to *some* symbols; the end check catches a part of them, the dataset format's
    # SHA-256 catches the rest (tests/coding/test_dataset.py)
    flipped = data.clone()
    pos = (torch.rand(B, generator=g) * nbits.double()).long()
    flipped[torch.arange(B), pos // 8] ^= (128 >> (pos % 8)).to(torch.uint8)
    with pytest.raises(CorruptStreamError, match="did not decode"):
        rc.decode(flipped, nbits, cdf, S)
    # nonzero bits after a stream's end are rejected
    tail = data.clone()
    tail[torch.arange(B), (nbits + 7) // 8 + 1] = 1
    st = rc.DecoderState.new(tail)
    for t in range(S):
        rc.decode_step(st, cdf[:, t], 24)
    assert not bool(rc.decode_finish(st, nbits=nbits).any())


def test_garbage_never_loops():
    cdf = cdf_from_freqs(quantize_logits(torch.randn(256) * 5))
    junk = torch.randint(0, 256, (64, 40), dtype=torch.uint8)
    with pytest.raises(CorruptStreamError):
        rc.decode(junk, torch.full((64,), 320), cdf, 500)


def test_matches_constriction_sizes():
    constriction = pytest.importorskip("constriction", reason="constriction is the cross-check's reference coder")
    import numpy as np

    g = torch.Generator().manual_seed(5)
    S, V = 4000, 256
    freqs = quantize_logits(torch.randn(S, V, generator=g) * 3)
    sym = torch.multinomial(freqs.double(), 1, generator=g)[:, 0]
    data, nbits = rc.encode(sym[None, :], cdf_from_freqs(freqs)[None], precision=24)
    probs = (freqs.double() / 2**24).numpy()
    enc = constriction.stream.queue.RangeEncoder()
    family = constriction.stream.model.Categorical(perfect=False)
    enc.encode(sym.numpy().astype(np.int32), family, probs)
    theirs = 32 * enc.get_compressed().size  # 32-bit words
    ours = int(nbits[0])
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
    ideal = float(_ideal(sym[None], freqs[None], torch.tensor([S]))[0])
    assert ours <= 1.005 * ideal + 32


@pytest.mark.parametrize("probs", [[1.0, 1.0], [0.9, 0.9], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0],
                                   [0.5, 0.49]],
                         ids=["sum-2", "sum-1.8", "sum-1.2", "zeros", "sum-0.99"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_quantize_probs_refuses_rows_that_do_not_sum_to_1(probs, dtype):
    """Quantising such a row would code another distribution ([1, 1] -> [0, 1], zeros -> one-hot)."""
    with pytest.raises(ValueError, match="probs must be finite, non-negative and sum to 1"):
        quantize_probs(torch.tensor([[0.25, 0.25, 0.25, 0.25], probs + [0.0] * (4 - len(probs))], dtype=dtype))


def test_quantize_probs_takes_rounded_softmax_rows():
    """Rows rounded to the tensor's dtype sum to 1 only up to that rounding (bfloat16 [1/3] * 3 sums
    to 1.002); float32 softmax rows of 65536 entries are off by its accumulation."""
    third = torch.full((1, 3), 1 / 3)
    for q in (third.bfloat16(), third.half(), torch.softmax(torch.randn(4, 65536) * 0.1, -1),
              torch.softmax(torch.randn(4, 65536) * 0.1, -1).half()):
        f = quantize_probs(q)
        assert (f.sum(-1) == 2**24).all() and (f >= 1).all()
    assert abs(float(third.bfloat16().double().sum()) - 1) > 1.5e-3
    # low-precision rows passed in a wider dtype (a bf16 model's softmax, cast up) are as good
    g = torch.Generator().manual_seed(0)
    for q in (torch.softmax(torch.randn(8, 256, generator=g), -1).bfloat16().float(),
              torch.softmax(torch.randn(8, 3, generator=g), -1).half().double(),
              torch.full((2, 13050), 1 / 13050).bfloat16().float()):
        f = quantize_probs(q)
        assert (f.sum(-1) == 2**24).all() and (f >= 1).all()
    # near-uniform bfloat16 rows off by less than the tolerance keep every symbol's floor
    rows = torch.softmax(torch.randn(200, 13050, generator=g) * 0.01, -1).bfloat16()
    assert (quantize_probs(rows) >= 1).all()
    with pytest.raises(ValueError, match="probs must be a tensor"):
        quantize_probs(torch.tensor(1.0))
    with pytest.raises(ValueError, match="logits must be a tensor"):
        quantize_logits(torch.tensor(1.0))


def test_cdf_from_freqs_refuses_what_a_cast_would_change():
    with pytest.raises(TypeError, match="freqs must be an integer tensor"):
        cdf_from_freqs(torch.tensor([2.0**23 + 0.7, 2.0**23 - 0.7]))
    with pytest.raises(TypeError, match="freqs must be an integer tensor"):
        cdf_from_freqs(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="freqs must be a tensor"):
        cdf_from_freqs(torch.tensor(5))
    assert cdf_from_freqs(torch.tensor([3, 5], dtype=torch.int32)).tolist() == [0, 3, 8]


def test_lengths_beyond_what_the_bits_hold_are_corrupt():
    """With a shared table every symbol costs at least -log2(max_freq / 2^precision) bits: a
    length beyond ``(nbits + 8)`` over that is corrupt, and raises before the decoder runs."""
    cdf = cdf_from_freqs(quantize_logits(torch.zeros(4)))  # 2 bits per symbol
    sym = torch.tensor([[1, 2, 3, 0, 1], [3, 3, 3, 3, 3]])
    data, nbits = rc.encode(sym, cdf)
    assert torch.equal(rc.decode(data, nbits, cdf, 5), sym)
    with pytest.raises(CorruptStreamError, match=r"streams \[1\] claim more symbols than their bits can hold"):
        rc.decode(data, nbits, cdf, torch.tensor([5, 1000]))
    # the bound is tight: runs of the most probable symbol (p = 1/2) end exactly on it
    half = cdf_from_freqs(torch.tensor([2**23, 2**22, 2**22]))
    for n in (1, 8, 15, 100, 1000):
        run = torch.zeros(1, n, dtype=torch.long)
        d, nb = rc.encode(run, half)
        assert n <= int(nb[0]) + 8
        assert torch.equal(rc.decode(d, nb, half, n), run)
    # a table with a symbol of probability 1 codes any number of symbols in 0 bits: no bound
    sure = cdf_from_freqs(torch.tensor([2**24, 0]))
    d, nb = rc.encode(torch.zeros(1, 3000, dtype=torch.long), sure)
    assert int(nb[0]) == 0 and rc.decode(d, nb, sure, 3000).shape == (1, 3000)


def test_corrupt_streams_are_named_by_the_callers_indices():
    ok = torch.tensor([True, False, True, False])
    with pytest.raises(CorruptStreamError, match=r"2 stream\(s\) did not decode .*indices \[1, 3\]"):
        rc.raise_if_bad(ok)
    with pytest.raises(CorruptStreamError, match=r"2 window\(s\) did not decode .*indices \[11, 13\]"):
        rc.raise_if_bad(ok, torch.tensor([10, 11, 12, 13]), "window")
