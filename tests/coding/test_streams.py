"""Model-driven streams and EqualInfoAC windows."""

from __future__ import annotations

import pytest
import torch

from flopwise.coding import CoderConfig, ModuleModel, StaticModel, CorruptStreamError
from flopwise.coding import streams as st


def _text_streams(prose: bytes, B: int, S: int, offset: int = 0):
    raw = torch.frombuffer(bytearray(prose[offset : offset + B * S]), dtype=torch.uint8).long()
    return raw.reshape(B, S)


class ShapeRecorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.inner(x)


def test_module_model_fixed_shapes_and_row_independence(tiny_lm):
    rec = ShapeRecorder(tiny_lm)
    m = ModuleModel(rec, context_len=12, batch_rows=8)
    ctx = torch.randint(0, 256, (19, 12))
    a = m.logits(ctx)
    assert set(rec.shapes) == {(8, 12)} and len(rec.shapes) == 3
    b = m.logits(ctx[[5, 3]])  # other batch composition: same rows, same bits
    assert torch.equal(a[[5, 3]], b)
    with pytest.raises(ValueError, match="context"):
        m.logits(torch.zeros(2, 5, dtype=torch.long))


def test_model_driven_roundtrip_on_text(prose, tiny_lm):
    model = ModuleModel(tiny_lm, context_len=6, batch_rows=16)
    cfg = CoderConfig()
    sym = _text_streams(prose, 24, 150)
    lengths = torch.randint(0, 151, (24,))
    lengths[0], lengths[1] = 0, 1
    enc = st.encode_streams(sym, lengths, model, cfg)
    out = st.decode_streams(enc.data, enc.nbits, enc.lengths, model, cfg)
    mask = torch.arange(150)[None, :] < lengths[:, None]
    assert torch.equal(out, torch.where(mask, sym, 0)[:, : out.shape[1]])
    assert bool((enc.nbits <= 1.005 * enc.ideal_bits + 32).all())
    # a decoder with another model (different weights) cannot silently succeed here
    other = ModuleModel(type(tiny_lm)(seed=1), context_len=6, batch_rows=16)
    with pytest.raises(CorruptStreamError):
        st.decode_streams(enc.data, enc.nbits, enc.lengths, other, cfg)


def test_real_transformer_roundtrip(prose):
    from flopwise.models import transformer as tr
    torch.manual_seed(0)
    net = tr.Transformer(tr.ModelConfig.preset("tiny", max_seq_len=16, d_model=32, n_layers=1, d_ff=64))
    model = ModuleModel(net, context_len=16, batch_rows=8)
    sym = _text_streams(prose, 6, 40, offset=1000)
    enc = st.encode_streams(sym, None, model, CoderConfig())
    out = st.decode_streams(enc.data, enc.nbits, enc.lengths, model, CoderConfig())
    assert torch.equal(out, sym)


@pytest.mark.parametrize("window_bits", [16, 32])
def test_equal_info_windows(prose, window_bits):
    from .conftest import TinyByteLM  # sharper model: more bytes per window

    model = ModuleModel(TinyByteLM(sharp=3.0), context_len=8, batch_rows=16)
    cfg = CoderConfig(min_freq=st.equal_info_min_freq(window_bits, 24))
    B, S = 8, 120
    sym = _text_streams(prose, B, S, offset=5000)
    lengths = torch.tensor([0, 1, 2, 120, 77, 120, 5, 119])
    enc = st.encode_equal_info(sym, lengths, model, cfg, window_bits, max_window_symbols=10)
    assert int(enc.counts.sum()) == int(lengths.sum())
    assert enc.stream_windows.tolist()[0] == 0
    assert bool((enc.used_bits <= window_bits).all()) and bool((enc.counts >= 1).all())
    assert bool((enc.counts <= 10).all())
    pieces = st.decode_equal_info(enc.windows, enc.counts, model, cfg, window_bits, batch_windows=7)
    off = 0
    for b in range(B):
        n = int(enc.stream_windows[b])
        got = torch.cat(pieces[off : off + n]) if n else torch.zeros(0, dtype=torch.long)
        off += n
        assert torch.equal(got, sym[b, : lengths[b]])
    # windows are maximal: except where the cap stopped it, adding the next byte would overflow
    # b bits (checked by re-encoding window + next byte as one stream)
    full = enc.counts < 10
    starts = torch.cat([torch.zeros(1, dtype=torch.long), enc.counts.cumsum(0)[:-1]])
    flat = torch.cat([sym[b, : lengths[b]] for b in range(B)])
    ends = [int(starts[i] + enc.counts[i]) for i in range(len(enc.counts))]
    stream_end = set(torch.cumsum(lengths, 0).tolist())
    checked = 0
    for i in range(len(enc.counts)):
        if not bool(full[i]) or ends[i] in stream_end:
            continue
        piece = flat[int(starts[i]) : ends[i] + 1][None, :]
        e = st.encode_streams(piece, None, model, cfg)
        assert int(e.nbits[0]) > window_bits
        checked += 1
    assert checked > 0


def test_equal_info_needs_floor(tiny_lm):
    model = ModuleModel(tiny_lm, context_len=4, batch_rows=4)
    with pytest.raises(ValueError, match="min_freq"):
        st.encode_equal_info(torch.zeros(1, 3, dtype=torch.long), None, model, CoderConfig(), 16)


def test_precision_too_low_for_bytes_is_refused_when_built(tiny_lm):
    """precision 8 cannot give 256 symbols a frequency each: refused by the constructor, not by compress()."""
    from flopwise.coding import ArithmeticCoding

    model = ModuleModel(tiny_lm, context_len=4, batch_rows=4)
    with pytest.raises(ValueError, match="must be < 2\\^precision"):
        ArithmeticCoding(model, precision=8)
    coder = ArithmeticCoding(model, precision=9)
    assert coder.decompress(coder.compress(b"abc")) == b"abc"


def test_static_model_fit_and_validation(prose):
    m = StaticModel.fit(prose)
    assert int(m.freqs.sum()) == 2**24 and int(m.freqs.min()) >= 1
    assert int(m.freqs.argmax()) == ord(" ")
    with pytest.raises(ValueError):
        StaticModel(torch.ones(256, dtype=torch.long))
    with pytest.raises(TypeError):
        st.encode_streams(torch.zeros(1, 2, dtype=torch.long), None, object(), CoderConfig())
    with pytest.raises(ValueError, match="symbols"):
        st.encode_streams(torch.full((1, 2), 300), None, m, CoderConfig())
