"""CachedLM: the KV-cached M1 against the full forward pass, and coding with it."""

from __future__ import annotations

import pytest
import torch

from flopwise.coding import ArithmeticCoding, CachedLM, CoderConfig, EqualInfoAC, ModuleModel
from flopwise.coding import streams as st
from flopwise.models.transformer import ModelConfig, Transformer


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
    args.update(kw)
    return Transformer(ModelConfig.preset("tiny", **args)).eval()


@pytest.mark.parametrize("parallel", [False, True])
def test_logits_match_full_forward_with_restarts_and_wrap(parallel):
    net = _net(parallel_block=parallel)
    L = 6
    lm = CachedLM(net, context_len=L, batch_rows=4)
    B, T = 5, 17
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, 256, (B, T), generator=g)
    append = torch.rand(B, T, generator=g) < 0.8
    restart = ~append & (torch.rand(B, T, generator=g) < 0.5)
    state = lm.begin(B, "cpu")
    hist = [[0] for _ in range(B)]  # each row's context as the full forward sees it
    checked = wraps = 0
    for t in range(T):
        for b in range(B):
            ref = net(torch.tensor([hist[b]])).logits[0, -1, :256]
            torch.testing.assert_close(state.logits[b], ref, rtol=1e-5, atol=1e-5)
            checked += 1
        state.update(seq[:, t], append[:, t], restart[:, t])
        for b in range(B):
            if append[b, t]:
                wraps += len(hist[b]) == L
                hist[b] = hist[b] + [int(seq[b, t])] if len(hist[b]) < L else [0, int(seq[b, t])]
            elif restart[b, t]:
                hist[b] = [0]
    assert checked == B * T and wraps > 0 and bool(restart.any())
    # the wrap rule: a symbol that does not fit restarts the context as (bos, symbol)
    s = lm.begin(1, "cpu")
    for t in range(L):
        s.update(seq[:1, t], torch.tensor([True]))
    ref = net(torch.tensor([[0, int(seq[0, L - 1])]])).logits[0, -1]
    torch.testing.assert_close(s.logits[0], ref, rtol=1e-5, atol=1e-5)


def test_rows_independent_of_batch_composition():
    lm = CachedLM(_net(), context_len=8, batch_rows=4)
    seq = torch.randint(0, 256, (7, 5), generator=torch.Generator().manual_seed(2))
    a, b = lm.begin(7, "cpu"), lm.begin(2, "cpu")
    for t in range(5):
        a.update(seq[:, t], torch.ones(7, dtype=torch.bool))
        b.update(seq[[5, 3], t], torch.ones(2, dtype=torch.bool))
    assert torch.equal(a.logits[[5, 3]], b.logits[:2])  # bit for bit, whatever the batch


def test_validation():
    with pytest.raises(TypeError, match="Transformer"):
        CachedLM(torch.nn.Linear(2, 2), context_len=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        CachedLM(_net(), context_len=64)
    with pytest.raises(ValueError, match="context_len"):
        CachedLM(_net(), context_len=1)  # bos and one symbol at least
    torch.manual_seed(0)
    mod = Transformer(ModelConfig.preset("tiny", d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
                                         mod="every_other"))
    with pytest.raises(ValueError, match="dense"):
        CachedLM(mod, context_len=8)


def test_arithmetic_coding_roundtrip_and_agreement_with_window_model(prose):
    net = _net(max_seq_len=64)
    cached = CachedLM(net, context_len=24, batch_rows=8)
    text = prose[3000:9000]
    ac = ArithmeticCoding(cached, chunk_bytes=250, streams_per_batch=11)  # chunks wrap the context
    comp = ac.compress(text)
    assert ac.decompress(comp) == text
    assert comp.coded_bits <= 1.005 * comp.ideal_bits + 32 * comp.n_streams
    # the same streams under the window model cost about the same bits (same net, similar context)
    win = ArithmeticCoding(ModuleModel(net, context_len=24, batch_rows=8), chunk_bytes=250, streams_per_batch=11)
    ideal_w = win.compress(text[:1500]).ideal_bits
    ideal_c = ac.compress(text[:1500]).ideal_bits
    assert abs(ideal_c / ideal_w - 1) < 0.05
    # lengths 0 and 1 and an odd number of streams
    sym = torch.frombuffer(bytearray(text[:600]), dtype=torch.uint8).long().reshape(5, 120)
    lengths = torch.tensor([0, 1, 120, 57, 119])
    enc = st.encode_streams(sym, lengths, cached, CoderConfig())
    out = st.decode_streams(enc.data, enc.nbits, enc.lengths, cached, CoderConfig())
    mask = torch.arange(120)[None, :] < lengths[:, None]
    assert torch.equal(out, torch.where(mask, sym, 0)[:, : out.shape[1]])


@pytest.mark.parametrize("token_bits", [8, 16])
def test_equal_info_roundtrip_windows_decoded_in_other_batches(prose, token_bits):
    net = _net(max_seq_len=64)
    cached = CachedLM(net, context_len=20, batch_rows=8)
    text = prose[20_000:24_000]
    eq = EqualInfoAC(cached, window_bits=16, token_bits=token_bits, chunk_bytes=700, max_window_bytes=19,
                     streams_per_batch=3, batch_windows=29)
    comp = eq.compress(text)
    assert comp.n_windows > 100 and comp.tokens.size == comp.n_windows * 16 // token_bits
    assert eq.decompress(comp) == text


def test_equal_info_bench_schedules_agree():
    from flopwise.coding.bench import _equal_info_cases

    (case,) = _equal_info_cases(3, 40, "cpu")
    ref = case.providers["reference"]()
    assert ref.size == 120 and case.check(case.providers["parallel"](), ref) is None


def test_idle_micro_batches_are_skipped_without_changing_bits():
    net = _net()
    calls = []
    lm = CachedLM(net, context_len=8, batch_rows=2)
    state = lm.begin(6, "cpu")
    forward = state._forward
    state._forward = lambda sl, *a: calls.append(sl.start) or forward(sl, *a)
    seq = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(0))
    append = torch.tensor([True, False, False, False, False, True])
    before = state.logits.clone()
    state.update(seq, append)
    assert calls == [0, 4]  # rows 2-3 idle: their micro-batch is not run
    assert torch.equal(state.logits[1:5], before[1:5])
    full = lm.begin(6, "cpu")
    full.update(seq, torch.ones(6, dtype=torch.bool))
    assert torch.equal(full.logits[[0, 5]], state.logits[[0, 5]])


def test_every_row_bitwise_equal_to_its_own_run_in_a_mixed_batch():
    """Streams at different positions and histories share micro-batches (as in an EqualInfoAC
    encoder) and still compute exactly what each computes alone (as in its decoder). With
    ``F.scaled_dot_product_attention`` in place of ``_row_attention`` this fails (torch 2.13,
    CPU, 4 threads: rows differ by ~1e-6)."""
    # several threads split a batch's work between them (the suite otherwise runs on one)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        _mixed_batch_check()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
def test_rows_bitwise_independent_and_equal_info_roundtrip_on_cuda(prose):
    _mixed_batch_check("cuda")
    net = _net(max_seq_len=64).cuda()
    eq = EqualInfoAC(CachedLM(net, context_len=33, batch_rows=64), window_bits=16, chunk_bytes=500,
                     max_window_bytes=32, streams_per_batch=16, batch_windows=333, device="cuda")
    text = prose[40_000:48_000]
    assert eq.decompress(eq.compress(text)) == text


def _mixed_batch_check(device="cpu"):
    net = _net(d_model=64, n_layers=1, n_heads=2, d_ff=128, max_seq_len=40).to(device)
    lm = CachedLM(net, context_len=40, batch_rows=16)
    B, T = 48, 12
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, 256, (B, T), generator=g).to(device)
    start = torch.randint(0, 6, (B,), generator=g).to(device)  # rows begin at different steps
    state = lm.begin(B, device)
    hist = {b: [] for b in range(B)}
    for t in range(T):
        state.update(seq[:, t], t >= start)
        for b in range(B):
            if t >= start[b]:
                hist[b].append(t)
    for b in range(B):
        alone = lm.begin(1, device)
        for t in hist[b]:
            alone.update(seq[b : b + 1, t], torch.tensor([True], device=device))
        assert torch.equal(alone.logits[0], state.logits[b]), b


def test_cache_bytes_is_what_begin_allocates_and_too_little_memory_is_refused(monkeypatch):
    import flopwise.coding.models as cm

    lm = CachedLM(_net(), context_len=8, batch_rows=4)
    state = lm.begin(6, "cpu")  # 6 streams -> 8 rows
    allocated = sum(t.numel() * t.element_size() for t in state.k + state.v)
    assert lm.cache_bytes(6) == allocated
    monkeypatch.setattr(cm, "_free_bytes", lambda device: allocated - 1)
    with pytest.raises(MemoryError, match="KV caches of 6 streams need"):
        lm.begin(6, "cpu")
    monkeypatch.setattr(cm, "_free_bytes", lambda device: allocated)
    lm.begin(6, "cpu")
