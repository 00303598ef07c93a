"""``flopwise bench coding``: our coders must write the reference coder's streams bit for
bit (an encoder writing garbage of the right size is refused), decoders must return the
coded symbols exactly, and constriction (different streams, the same size) still passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flopwise.coding import bench as coding_bench
from flopwise.coding import rangecoder as rc
from flopwise.coding import triton_coder
from flopwise.kernels.bench import run_case

B, S = 32, 16


def _statuses(case) -> dict[str, str]:
    return {r.provider: r.status for r in run_case(case, gpu=False, budget_ms=1)}


def _cases(**kw):
    return coding_bench._cases_for(B, S, "cpu", with_constriction=True, triton=True, **kw)


def test_real_providers_pass():
    enc, dec = _cases()
    assert set(enc.providers) == set(dec.providers) == {"reference", "triton", "constriction"}
    for case in (enc, dec):
        assert set(_statuses(case).values()) == {"ok"}, case.mode


def test_triton_coder_streams_equal_the_reference_at_the_cpu_suite_shape():
    """Bit-identical streams at the CPU suite's shape (the interpreter; the GPU suite's
    4096 x 32 streams were checked the same way by hand)."""
    _, sym, cdf = coding_bench._work(512, 32, 256, "cpu")
    data, nbits = rc.encode(sym, cdf)
    data_t, nbits_t = triton_coder.encode_triton(sym, cdf, validate=False)
    assert torch.equal(nbits_t, nbits) and torch.equal(data_t, data)


def _garbage(real, mode: str):
    """An encoder with the real one's bit counts (so its total size is right) but wrong bytes."""

    def encode(sym, cdf, *args, **kw):
        data, nbits = real(sym, cdf, *args, **kw)
        g = torch.Generator().manual_seed(1)
        data = data.clone()
        if mode == "random":
            n = (nbits + 7) // 8  # the stream's own bytes, trailing zeros kept
            keep = torch.arange(data.shape[1])[None, :] < n[:, None]
            data[keep] = torch.randint(0, 256, (int(keep.sum()),), generator=g, dtype=torch.uint8)
        else:  # one bit flipped in one stream
            data[3, 2] ^= 1
        return data, nbits

    return encode


@pytest.mark.parametrize("mode", ["random", "one bit"])
def test_garbage_encoder_of_the_right_size_is_refused(monkeypatch, mode):
    monkeypatch.setattr(triton_coder, "encode_triton", _garbage(triton_coder.encode_triton, mode))
    enc, _ = _cases()
    status = _statuses(enc)
    assert status["reference"] == status["constriction"] == "ok"
    assert status["triton-interp"].startswith("WRONG") and "bytes differ" in status["triton-interp"], status


def test_wrong_bit_counts_are_refused(monkeypatch):
    def off_by_one(sym, cdf, *args, **kw):
        data, nbits = triton_coder_encode(sym, cdf, *args, **kw)
        return data, nbits + (torch.arange(len(nbits)) == 5).long()  # one stream, one bit

    triton_coder_encode = triton_coder.encode_triton
    monkeypatch.setattr(triton_coder, "encode_triton", off_by_one)
    enc, _ = _cases()
    assert "bit counts differ" in _statuses(enc)["triton-interp"]


def test_external_coder_is_held_to_the_size_and_bare_counts_are_refused():
    enc, _ = _cases()
    ref = enc.providers["reference"]()
    total = int(ref[1].sum())
    assert enc.check(coding_bench._ExternalSize(total + 32 * B), ref) is None  # constriction's slack
    assert enc.check(coding_bench._ExternalSize(total + int(0.01 * total) + 64 * B + 1), ref) is not None
    assert "expected (data, nbits)" in enc.check(total, ref)  # a bare total is not our coder's output


def test_decode_check_is_exact():
    _, dec = _cases()
    ref = dec.providers["reference"]()
    assert dec.check(ref.copy(), ref) is None
    wrong = ref.copy()
    wrong[7, 3] = (wrong[7, 3] + 1) % 256
    assert "differ" in dec.check(wrong, ref)
    assert "reference decodes other symbols" in dec.check(ref, wrong)
    assert dec.check(ref[:, :-1], ref) is not None
    assert dec.check(np.zeros_like(ref), ref) is not None
