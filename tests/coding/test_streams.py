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


class _TableModel:
    """A ProbabilityModel returning ``table`` (from ``make(cfg)``) for every context; counts its calls."""

    context_len, pad_id = 0, 0

    def __init__(self, make, vocab_size: int = 4):
        self.make, self.vocab_size, self.calls = make, vocab_size, 0

    def frequencies(self, context, cfg):
        self.calls += 1
        return self.make(cfg).expand(context.shape[0], -1)


def _uniform(cfg, V=4):
    f = torch.full((1, V), cfg.total // V, dtype=torch.long)
    f[0, 0] += cfg.total - int(f.sum())
    return f


@pytest.mark.parametrize("case", ["sum-twice", "zero-for-a-coded-symbol", "negative"])
def test_model_frequencies_are_checked(case):
    """A table the model returns is checked like rc.encode checks one (once per call): an
    invalid one would code silently and decode to other symbols."""
    tables = {"sum-twice": lambda cfg: torch.full((1, 4), cfg.total // 2),
              "zero-for-a-coded-symbol": lambda cfg: torch.tensor([[cfg.total // 2, 0, cfg.total // 2, 0]]),
              "negative": lambda cfg: torch.tensor([[cfg.total, 1, -1, 0]])}
    bad = _TableModel(tables[case])
    cfg = CoderConfig()
    sym = torch.tensor([[1, 2, 3, 0, 1, 2], [3, 3, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"model\.frequencies must return rows summing to 2\^precision") as exc:
        st.encode_streams(sym, torch.tensor([6, 3]), bad, cfg)
    assert not isinstance(exc.value, CorruptStreamError)
    # the decoder, given a valid stream, refuses the invalid model's tables the same way
    enc = st.encode_streams(sym, torch.tensor([6, 3]), _TableModel(_uniform), cfg)
    with pytest.raises(ValueError, match=r"model\.frequencies must return") as exc:
        st.decode_streams(enc.data, enc.nbits, enc.lengths, bad, cfg)
    assert not isinstance(exc.value, CorruptStreamError)


def test_static_model_table_is_checked_once_per_call():
    """A StaticModel's one table is checked when the call starts, not every step; one
    changed after it was built is refused like any other model's."""
    from flopwise.coding.models import StaticModel

    cfg = CoderConfig()
    model = StaticModel.fit(b"abracadabra", cfg=cfg)
    sym = torch.tensor([[97, 98, 114, 97], [99, 97, 100, 0]])
    enc = st.encode_streams(sym, torch.tensor([4, 3]), model, cfg)
    assert torch.equal(st.decode_streams(enc.data, enc.nbits, enc.lengths, model, cfg)[1, :3], sym[1, :3])
    model.freqs[97] += 5  # no longer sums to the total
    with pytest.raises(ValueError, match=r"model\.frequencies must return rows summing to 2\^precision .* StaticModel"):
        st.encode_streams(sym, torch.tensor([4, 3]), model, cfg)
    with pytest.raises(ValueError, match=r"model\.frequencies must return"):
        st.decode_streams(enc.data, enc.nbits, enc.lengths, model, cfg)


def test_equal_info_model_ignoring_min_freq_is_named():
    wb = 16
    cfg = CoderConfig(min_freq=st.equal_info_min_freq(wb, 24))
    good = _TableModel(_uniform)
    sym = torch.tensor([[1, 2, 3, 0, 1, 2, 3, 3]])
    enc = st.encode_equal_info(sym, None, good, cfg, wb)
    # frequencies below cfg.min_freq: such a symbol may not fit an empty window
    ignores = _TableModel(lambda cfg: torch.tensor([[cfg.total - 3, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"model\.frequencies .* >= cfg\.min_freq = 256; _TableModel"):
        st.encode_equal_info(sym, None, ignores, cfg, wb)
    with pytest.raises(ValueError, match=r"model\.frequencies .* >= cfg\.min_freq = 256"):
        st.decode_equal_info(enc.windows, enc.counts, ignores, cfg, wb)


def test_padding_past_lengths_may_hold_anything():
    """As for rc.encode: entries past a stream's length are never coded (not even looked up)."""
    m = StaticModel.fit(bytes(range(256)))
    sym = torch.tensor([[104, 105, 0, 0], [111, 107, 33, 10]])
    lengths = torch.tensor([2, 4])
    ref = st.encode_streams(sym, lengths, m, m.cfg)
    eq_model = _TableModel(lambda cfg: _uniform(cfg, 256), vocab_size=256)
    eq_cfg = CoderConfig(min_freq=st.equal_info_min_freq(16, 24))
    eq_ref = st.encode_equal_info(sym, lengths, eq_model, eq_cfg, 16)
    for pad in (-1, 256, 10**6):
        padded = sym.clone()
        padded[0, 2:] = pad
        enc = st.encode_streams(padded, lengths, m, m.cfg)
        assert torch.equal(enc.data, ref.data) and torch.equal(enc.nbits, ref.nbits)
        eq = st.encode_equal_info(padded, lengths, eq_model, eq_cfg, 16)
        assert torch.equal(eq.windows, eq_ref.windows) and torch.equal(eq.counts, eq_ref.counts)
    with pytest.raises(ValueError, match=r"symbols\[0, 1\] = -1"):
        st.encode_streams(torch.tensor([[104, -1, 0]]), torch.tensor([2]), m, m.cfg)


def test_stream_arguments_are_checked_like_the_range_coder():
    m = StaticModel.fit(bytes(range(256)))
    cfg = m.cfg
    with pytest.raises(TypeError, match="symbols must be an integer tensor"):
        st.encode_streams(torch.tensor([[65.9, 66.5]]), None, m, cfg)
    with pytest.raises(TypeError, match="symbols must be an integer tensor"):
        st.encode_streams(torch.tensor([[True]]), None, m, cfg)
    with pytest.raises(TypeError, match="lengths must be an int or an integer tensor"):
        st.encode_streams(torch.tensor([[65, 66]]), torch.tensor([1.7]), m, cfg)
    # an int length means every stream, as for rc.encode
    a = st.encode_streams(torch.tensor([[65, 66], [67, 68]]), 1, m, cfg)
    b = st.encode_streams(torch.tensor([[65, 66], [67, 68]]), torch.tensor([1, 1]), m, cfg)
    assert torch.equal(a.data, b.data) and torch.equal(a.nbits, b.nbits)
    assert st.decode_streams(a.data, a.nbits, 1, m, cfg).tolist() == [[65], [67]]
    with pytest.raises(TypeError, match="data must be a uint8 tensor"):
        st.decode_streams([[1]], a.nbits, a.lengths, m, cfg)
    for nbits in ([8, 8], a.nbits.double() + 0.9, a.nbits > 0):
        with pytest.raises(TypeError, match="nbits must be an integer tensor"):
            st.decode_streams(a.data, nbits, a.lengths, m, cfg)
    with pytest.raises(TypeError, match="lengths must be an int or an integer tensor"):
        st.decode_streams(a.data, a.nbits, a.lengths.double() + 0.2, m, cfg)


def _equal_info_case():
    model = _TableModel(lambda cfg: _uniform(cfg, 256), vocab_size=256)
    cfg = CoderConfig(min_freq=st.equal_info_min_freq(16, 24))
    enc = st.encode_equal_info(torch.tensor([list(b"hello there")]), None, model, cfg, 16)
    return model, cfg, enc


def test_decode_equal_info_arguments():
    model, cfg, enc = _equal_info_case()
    for bw in (-1, 0, True, 2.0):
        with pytest.raises(ValueError, match="batch_windows must be an int >= 1"):
            st.decode_equal_info(enc.windows, enc.counts, model, cfg, 16, batch_windows=bw)
    with pytest.raises(ValueError, match="max_window_symbols must be an int >= 1"):
        st.decode_equal_info(enc.windows, enc.counts, model, cfg, 16, max_window_symbols=0)
    with pytest.raises(TypeError, match="counts must be an integer tensor"):
        st.decode_equal_info(enc.windows, enc.counts.double() + 0.5, model, cfg, 16)
    with pytest.raises(ValueError, match="window_bits must be a positive multiple of 8"):
        st.decode_equal_info(enc.windows, enc.counts, model, cfg, 16.0)
    pieces = st.decode_equal_info(enc.windows, enc.counts, model, cfg, 16, batch_windows=1)
    assert bytes(torch.cat(pieces).tolist()) == b"hello there"


def test_corrupt_counts_and_lengths_raise_before_decoding():
    """A corrupt count or length would make the decoder run (and allocate) that many steps."""
    model, cfg, enc = _equal_info_case()
    # above the encoder's max_window_symbols (64 by default), below 1, above what 16 bits can hold
    # (each symbol costs at least -log2(1 - 255 * 256 / 2^24) bits: at most 4268 fit)
    for c, kw, match in ((65, {}, r"hold \[65\] symbols: a window holds 1\.\.64"),
                         (0, {}, r"hold \[0\] symbols"),
                         (4269, {"max_window_symbols": 10**6}, r"hold \[4269\] symbols: .*at most 4268 fit 16 bits")):
        counts = enc.counts.clone()
        counts[1] = c
        model.calls = 0
        with pytest.raises(CorruptStreamError, match=r"windows \[1\] " + match):
            st.decode_equal_info(enc.windows, counts, model, cfg, 16, **kw)
        assert model.calls == 0
    # decode_streams: with V = 4 and min_freq = 512 of 2^12 a symbol costs >= 0.678 bits
    small = CoderConfig(precision=12, min_freq=512)
    m4 = _TableModel(_uniform)
    e = st.encode_streams(torch.tensor([[1, 2, 3, 0, 1], [3, 3, 3, 3, 3]]), None, m4, small)
    assert st.decode_streams(e.data, e.nbits, e.lengths, m4, small).shape == (2, 5)
    m4.calls = 0
    with pytest.raises(CorruptStreamError, match=r"streams \[1\] claim more symbols than their bits can hold"):
        st.decode_streams(e.data, e.nbits, torch.tensor([5, 100]), m4, small)
    assert m4.calls == 0


def test_corrupt_window_is_named_by_its_index():
    """Windows decode in batches sorted by count: the error names the window's own index."""
    class Skew(_TableModel):
        def __init__(self):
            super().__init__(None, 256)

        def frequencies(self, context, cfg):
            from flopwise.coding import quantize_logits
            return quantize_logits(-torch.arange(256.0)[None].expand(context.shape[0], 256) / 20, cfg)

    m, wb = Skew(), 32
    cfg = CoderConfig(min_freq=st.equal_info_min_freq(wb, 24))
    enc = st.encode_equal_info(torch.tensor([[1, 2, 3, 4, 5, 100, 200, 7, 9, 250, 1, 1, 2]]), None, m, cfg, wb)
    assert enc.counts.tolist() == [6, 3, 3, 1]  # window 3 sorts first
    bad = enc.windows.clone()
    bad[3, -1] |= 0x01  # a padding bit of window 3
    with pytest.raises(CorruptStreamError, match=r"1 window\(s\) did not decode .*indices \[3\]"):
        st.decode_equal_info(bad, enc.counts, m, cfg, wb, batch_windows=2)


def test_static_model_smoothing_is_checked():
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="smoothing must be finite and >= 0"):
            StaticModel.fit(b"abc", smoothing=bad)
    with pytest.raises(TypeError, match="smoothing must be a number"):
        StaticModel.fit(b"abc", smoothing="1")
