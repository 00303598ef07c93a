"""The grouped matmuls' autotuner: a timed pick per shape that never changes results."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from flopwise.kernels import (
    expert_choice_route,
    grouped_mm,
    grouped_mm_reference,
    moe_mlp,
    moe_mlp_reference,
    topk_route,
)
from flopwise.kernels._dispatch import deterministic_algorithms

from ..conftest import rel_err

G = importlib.import_module("flopwise.kernels.grouped_mm")
TUNE = importlib.import_module("flopwise.kernels._tune")


@pytest.fixture
def scripted_tuner(monkeypatch):
    """Tuning on (the CPU interpreter too) with a scripted clock: every candidate runs for
    real, and each one timed looks faster than the one before, so the last candidate of
    every key wins. Returns the list of timings taken."""
    monkeypatch.setattr(TUNE, "MODE", "1")
    monkeypatch.setattr(TUNE, "_CACHE", {})
    timed = []

    def measure(fn, device):
        fn()
        timed.append(1)
        return 1000.0 - len(timed)

    monkeypatch.setattr(TUNE, "_measure", measure)
    return timed


def _moe_case(T, D, Fh, E, *, k=2, route=None, dtype=torch.float32):
    """Inputs of one MoE layer call; ``run(fn, upcast=False, **kw)`` returns its output and
    every gradient (x, logits, the three expert weights). ``route`` defaults to top-k."""
    route = route or (lambda lg: topk_route(lg, k, renormalize=True, block_m=16))
    x = torch.randn(T, D).to(dtype)
    logits = torch.randn(T, E)
    ws = [(torch.randn(E, D, Fh) / 4).to(dtype), (torch.randn(E, D, Fh) / 4).to(dtype),
          (torch.randn(E, Fh, D) / 4).to(dtype)]
    gy = torch.randn(T, D)

    def run(fn, *, upcast=False, **kw):
        xx = (x.float() if upcast else x).clone().requires_grad_(True)
        lg = logits.clone().requires_grad_(True)
        wp = [(w.float() if upcast else w).clone().requires_grad_(True) for w in ws]
        y = fn(xx, route(lg), *wp, **kw)
        (y.float() * gy).sum().backward()
        return [y, xx.grad, lg.grad] + [w.grad for w in wp]

    return run


@pytest.fixture
def descriptors_built(monkeypatch):
    """Counts the tensor descriptors the launchers build (one per weight read through TMA)."""
    built = []
    real = G.TensorDescriptor
    monkeypatch.setattr(G, "TensorDescriptor", lambda *a, **kw: built.append(1) or real(*a, **kw))
    return built


@pytest.mark.parametrize("retain", [False, True], ids=["backward-over-saved", "retained"])
def test_tuning_runs_every_candidate_and_changes_no_result(scripted_tuner, retain):
    """The candidates really run during tuning (atomic scatters, the SwiGLU backward that
    writes dG, dU over the saved g, u), and still every output and gradient matches the
    reference: trials never touch what the real launch reads or accumulates into."""
    run = _moe_case(T=45, D=24, Fh=136, E=4, k=2)
    got = run(moe_mlp, retain_activations=retain)
    ref = run(moe_mlp_reference)
    for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], got, ref):
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))
    picks = TUNE.tuned()
    kinds = sorted(k[0] for k in picks)
    assert kinds == ["dw", "dw", "rows", "rows", "rows", "rows"], kinds  # the six launches of moe_mlp
    assert len(scripted_tuner) > 6  # more than one candidate per launch was timed
    # the last candidate won, and it is not the heuristic default for every key
    assert any(cfg["num_stages"] != G._tiles(k[8], k[9], torch.float32, k[3], k[5])["num_stages"]
               or cfg["BLOCK_N"] != G._tiles(k[8], k[9], torch.float32, k[3], k[5])["BLOCK_N"]
               for k, cfg in picks.items() if k[0] == "rows")
    n = len(scripted_tuner)
    again = run(moe_mlp, retain_activations=retain)  # remembered: nothing is timed again, same results
    assert len(scripted_tuner) == n
    for a, b in zip(again, got):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "plan-order"])
def test_tuned_grouped_mm_matches_reference(scripted_tuner, gather):
    T, D, Fh, E, k = 40, 24, 136, 5, 2
    plan = topk_route(torch.randn(T, E), k, block_m=16)
    a = torch.randn(T if gather else T * k, D, requires_grad=True)
    w = (torch.randn(E, D, Fh) / 4).requires_grad_(True)
    gout = torch.randn(T * k, Fh)
    got = grouped_mm(a, w, plan, gather=gather)
    da, dw = torch.autograd.grad(got, (a, w), gout)
    ref = grouped_mm_reference(a, w, plan, gather=gather)
    rda, rdw = torch.autograd.grad(ref, (a, w), gout)
    for name, x, y in (("out", got, ref), ("da", da, rda), ("dw", dw, rdw)):
        assert rel_err(x, y) < 1e-5, name
    assert len(TUNE.tuned()) == 3


def test_trials_of_an_atomic_launch_into_a_nonzero_output_use_scratch(scripted_tuner):
    """A caller that does not promise a zeroed accumulator gets its values kept: out ends
    as its old contents plus exactly one launch's contribution."""
    T, D, Fh, E = 30, 16, 40, 3
    plan = topk_route(torch.randn(T, E), 2, block_m=16)
    g = torch.randn(plan.num_rows, Fh)
    w = torch.randn(E, D, Fh)  # read transposed: [E, N=D, K=Fh]
    start = torch.randn(T, D)
    out = start.clone()
    G._launch_rows(g, w, plan, out, epilogue=G._SCATTER, gather=False, transpose_w=True)
    want = start.index_add(0, plan.token_idx.long(), grouped_mm_reference(g, w.transpose(1, 2), plan, gather=False))
    assert rel_err(out, want) < 1e-5
    assert len(scripted_tuner) > 1


def test_every_candidate_gives_the_same_result(monkeypatch):
    """Each kind of candidate alone (forced through the tuning script's override) reproduces
    the default's outputs and gradients bit for bit, the router's included: the candidates
    vary tiles, warps, pipelining and the persistent tile loop (4 programs off CUDA, so each
    loops over several tiles), never a reduction. A persistent loop changes the order of the
    fp32 atomic adds, which keeps bits only for sums of two terms: so this case has top-2
    routing and a SwiGLU backward of two column tiles (Fh = 136), and the half-precision
    test below covers longer sums. (Weights read through descriptors: to the last bits.)"""
    run = _moe_case(T=30, D=24, Fh=136, E=3, k=2)
    base = run(moe_mlp)
    for fam, opts in (("rows", [dict(BLOCK_N=64, num_warps=4), dict(BLOCK_N=128, num_stages=2), dict(B_TMA=True),
                                dict(BLOCK_N=64, B_TMA=True), dict(PERSISTENT=1),
                                dict(BLOCK_N=64, num_warps=4, num_stages=4, PERSISTENT=2),
                                dict(B_TMA=True, PERSISTENT=1)]),
                      ("rows_dual", [dict(BLOCK_N=64, num_warps=4), dict(B_TMA=True), dict(PERSISTENT=1),
                                     dict(BLOCK_N=64, num_warps=4, PERSISTENT=2), dict(B_TMA=True, PERSISTENT=1)]),
                      ("rows_swiglu_bwd", [dict(num_stages=2), dict(B_TMA=True), dict(PERSISTENT=1),
                                           dict(B_TMA=True, PERSISTENT=1)]),
                      ("dw", [dict(BLOCK_K=64, BLOCK_N=128), dict(BLOCK_K=128, BLOCK_N=64)])):
        for opt in opts:
            monkeypatch.setattr(G, "_OVERRIDE", {fam: opt, **({"dw_dual": opt} if fam == "dw" else {})})
            for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], run(moe_mlp), base):
                if opt.get("B_TMA"):
                    # the interpreter multiplies a descriptor's transposed tile (a strided
                    # numpy view) in another order than a pointer-loaded one: last-bit noise
                    assert rel_err(a, b) < 1e-6, (fam, opt, name, rel_err(a, b))
                else:
                    assert torch.equal(a, b), (fam, opt, name, rel_err(a, b))


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "plan-order"])
def test_grouped_mm_with_weights_through_descriptors(monkeypatch, descriptors_built, gather):
    """grouped_mm's store epilogue and its transposed backward with TMA weight tiles: the
    same results as pointer tiles."""
    T, D, Fh, E, k = 37, 24, 40, 5, 2
    plan = topk_route(torch.randn(T, E), k, block_m=16)
    a = torch.randn(T if gather else T * k, D)
    w = torch.randn(E, D, Fh) / 4
    gout = torch.randn(T * k, Fh)

    def run():
        aa, ww = a.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = grouped_mm(aa, ww, plan, gather=gather)
        return [out, *torch.autograd.grad(out, (aa, ww), gout)]

    base = run()
    monkeypatch.setattr(G, "_OVERRIDE", {"rows": dict(B_TMA=True)})
    for x, y in zip(run(), base):
        assert rel_err(x, y) < 1e-6  # (the interpreter's products on a transposed view: last bits)
    assert len(descriptors_built) == 2  # forward and dA


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_tuned_half_precision_is_bit_equal_to_untuned(scripted_tuner, monkeypatch, descriptors_built, dtype, router):
    """16-bit types also tune tensor-descriptor (TMA) and persistent candidates; the last one
    timed wins, so some launches read their weights through descriptors and loop over tiles.
    A persistent launch visits tiles in another order, so a sum of three or more fp32 atomic
    adds may round differently: a token's output and dx under expert choice (any number of
    experts per token) and the router's gradient (summed over column tiles). Those agree
    within one 16-bit rounding; every other output and gradient equals the untuned run's
    bit for bit (two atomic terms, a + b = b + a, so top-2's output and dx too); all match
    the fp32 reference."""
    route = (lambda lg: topk_route(lg, 2, renormalize=True, block_m=16)) if router == "topk" else \
        (lambda lg: expert_choice_route(lg, 1.5, block_m=16))
    run = _moe_case(T=33, D=24, Fh=136, E=4, route=route, dtype=dtype)
    monkeypatch.setattr(TUNE, "MODE", "0")
    untuned = run(moe_mlp)
    assert not descriptors_built
    monkeypatch.setattr(TUNE, "MODE", "1")
    tuned = run(moe_mlp)
    names = ["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"]
    exact = {"dw_gate", "dw_up", "dw_down"} | ({"y", "dx"} if router == "topk" else set())
    for name, a, b in zip(names, tuned, untuned):
        if name in exact:
            assert torch.equal(a, b), (name, rel_err(a, b))
        else:
            assert rel_err(a, b) < 2.0 ** -8, (name, rel_err(a, b))
    for name, a, b in zip(names, tuned, run(moe_mlp_reference, upcast=True)):
        assert rel_err(a, b) < 3e-2, (name, rel_err(a, b))
    assert any(cfg.get("B_TMA") for key, cfg in TUNE.tuned().items() if key[0] == "rows")
    assert any(cfg.get("PERSISTENT") for key, cfg in TUNE.tuned().items() if key[0] == "rows")
    assert descriptors_built  # descriptors were really used, in trials and in the chosen launches


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_deterministic_mode_gives_the_same_bits_whatever_the_pick(scripted_tuner, monkeypatch, descriptors_built,
                                                                  router):
    """Deterministic mode has no atomic sums, so not even a persistent pick's tile order can
    move a bit: every output and gradient equals the untuned run's, with expert choice (a
    token on up to E experts) and an expert width of three column tiles too. The picks are
    reported under their deterministic launches' names."""
    route = (lambda lg: topk_route(lg, 2, renormalize=True, block_m=16)) if router == "topk" else \
        (lambda lg: expert_choice_route(lg, 1.5, block_m=16))
    run = _moe_case(T=33, D=24, Fh=300, E=4, route=route, dtype=torch.bfloat16)
    with deterministic_algorithms():
        monkeypatch.setattr(TUNE, "MODE", "0")
        untuned = run(moe_mlp)
        monkeypatch.setattr(TUNE, "MODE", "1")
        tuned = run(moe_mlp)
    for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], tuned, untuned):
        assert torch.equal(a, b), (name, rel_err(a, b))
    assert any(cfg.get("PERSISTENT") for key, cfg in TUNE.tuned().items() if key[0] == "rows")
    names = sorted(t["launch"] for t in G.tuned_tiles() if "deterministic" in t["launch"])
    assert names == ["dX rows (deterministic)", "dY Wd^T + SwiGLU bwd (deterministic)",
                     "down rows (deterministic)"], names


def test_descriptor_choice_falls_back_for_weights_it_cannot_describe(monkeypatch, descriptors_built):
    """A descriptor configuration meets weights whose rows are not 16-byte aligned (D = 18
    fp32): the launch reads them through pointers instead and stays correct."""
    monkeypatch.setattr(G, "_OVERRIDE", {"rows": dict(B_TMA=True), "rows_dual": dict(B_TMA=True)})
    run = _moe_case(T=21, D=18, Fh=36, E=3, k=2)
    got = run(moe_mlp)
    ref = run(moe_mlp_reference)
    for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], got, ref):
        assert rel_err(a, b) < 1e-5, name
    assert not G._tma_ok(torch.zeros(3, 36, 18)) and G._tma_ok(torch.zeros(3, 18, 36))
    assert G._tma_ok(torch.zeros(3, 40, 40)[:, :, 4:])  # a strided view the descriptor's strides describe
    assert not G._tma_ok(torch.zeros(3, 40, 40)[:, :, 1:])  # base not 16-byte aligned
    odd = torch.zeros(40, 48, 1).permute(2, 0, 1)  # "contiguous", but its size-1 dimension has stride 1
    assert odd.is_contiguous() and not G._tma_ok(odd)
    assert not G._tma_ok(torch.zeros(1, 48, 48).expand(3, 48, 48))  # one expert broadcast: a zero stride
    # launches whose weights are aligned (the [E, 18, 36] ones) did use descriptors
    assert descriptors_built


def test_candidates_keep_the_reduction_and_the_caps():
    for epi in (G._STORE, G._SWIGLU, G._SCALE_SCATTER, G._SWIGLU_BWD, G._SCATTER):
        for dt in (torch.bfloat16, torch.float32):
            for K, N in ((4096, 14336), (1024, 40), (2048, 1024)):
                default = G._tiles(K, N, dt, epi, dual_a=False)
                cands = G._rows_candidates(default, N, dt, epi, tma=True)
                assert cands[0] == default and len(cands) == len({tuple(sorted(c.items())) for c in cands})
                # the default stays non-persistent; persistent ones are timed beside it
                assert not default.get("PERSISTENT") and any(c.get("PERSISTENT") for c in cands)
                assert all(c.get("PERSISTENT", 0) in (0, 1, 2) for c in cands)
                for c in cands:
                    assert c["BLOCK_K"] == default["BLOCK_K"]
                    assert c["BLOCK_N"] <= max(16, 1 << (N - 1).bit_length())
                    if epi in (G._SWIGLU, G._SWIGLU_BWD) or dt == torch.float32:
                        assert c["BLOCK_N"] <= 128
                    if epi == G._SWIGLU_BWD:  # its epilogue reduces over the tile
                        assert (c["BLOCK_N"], c["num_warps"]) == (default["BLOCK_N"], default["num_warps"])
                    if dt == torch.float32:
                        assert not c.get("B_TMA")
    for gather in (False, True):
        default = G._dw_tiles(4096, 14336, torch.bfloat16, dual=True, gather=gather)
        cands = G._dw_candidates(default, 4096, 14336, gather)
        assert cands[0] == default and all(c["BLOCK_R"] == default["BLOCK_R"] for c in cands)
        assert all(c["BLOCK_K"] <= 16 for c in G._dw_candidates(G._dw_tiles(9, 40, torch.float32, False, False), 9, 40,
                                                                  False))


def test_pick_leaves_out_candidates_that_do_not_compile(monkeypatch):
    monkeypatch.setattr(TUNE, "MODE", "1")
    monkeypatch.setattr(TUNE, "_CACHE", {})
    monkeypatch.setattr(TUNE, "_measure", lambda fn, device: fn() or {"a": 3.0, "b": 1.0, "c": 2.0}[ran[-1]])
    ran = []

    def trial(cfg):
        ran.append(cfg["name"])
        if cfg["name"] == "b":
            raise TUNE.OutOfResources(300_000, 200_000, "shared memory")

    cands = [dict(name="a"), dict(name="b"), dict(name="c")]
    assert TUNE.pick(("k",), cands, trial, torch.device("cpu")) == dict(name="c")
    assert TUNE.pick(("k",), cands, trial, torch.device("cpu")) == dict(name="c")  # remembered
    assert ran == ["a", "b", "c"]

    def never(cfg):
        raise TUNE.OutOfResources(300_000, 200_000, "shared memory")

    assert TUNE.pick(("none-compiles",), cands, never, torch.device("cpu")) is None  # the default path decides
    assert TUNE.tuned()[("none-compiles",)] is None  # and is not tuned again


def test_pick_leaves_out_alternatives_that_fail_to_build_but_not_the_default(monkeypatch):
    monkeypatch.setattr(TUNE, "MODE", "1")
    monkeypatch.setattr(TUNE, "_CACHE", {})
    monkeypatch.setattr(TUNE, "_measure", lambda fn, device: fn() or 1.0)

    def trial(cfg):
        if cfg["name"] == "broken":
            raise RuntimeError("ptxas error")

    with pytest.warns(RuntimeWarning, match="left out: RuntimeError: ptxas error"):
        assert TUNE.pick(("k",), [dict(name="ok"), dict(name="broken")], trial, torch.device("cpu")) == dict(name="ok")
    with pytest.raises(RuntimeError, match="ptxas"):
        TUNE.pick(("k2",), [dict(name="broken"), dict(name="ok")], trial, torch.device("cpu"))


def test_a_pick_that_no_longer_fits_falls_back_to_the_default(monkeypatch):
    """The pick compiled when it was timed; a later call that specialises differently and
    runs out of shared memory takes the default path (with its stage fallback) for good."""
    monkeypatch.setattr(TUNE, "MODE", "1")
    monkeypatch.setattr(TUNE, "_CACHE", {})
    monkeypatch.setattr(TUNE, "_measure", lambda fn, device: fn() or 1.0)
    monkeypatch.setattr(G, "_STAGES", {})
    default = dict(BLOCK_N=64, num_warps=4, num_stages=3)
    big = dict(BLOCK_N=256, num_warps=8, num_stages=4)
    launched, fits = [], [True]

    def launch(cfg):
        if cfg["BLOCK_N"] == 256 and not fits[0]:
            raise G.OutOfResources(250_000, 232_448, "shared memory")
        launched.append(cfg["BLOCK_N"])

    key = ("rows", "test-key")
    G._launch_tuned(key, default, [default, big], launch, launch, torch.device("cpu"))
    assert TUNE.tuned()[key]["BLOCK_N"] in (64, 256)
    TUNE._CACHE[key] = dict(big)  # say the wide tile won
    fits[0] = False
    launched.clear()
    G._launch_tuned(key, default, [default, big], launch, launch, torch.device("cpu"))
    assert launched == [64] and TUNE.tuned()[key] is None
    G._launch_tuned(key, default, [default, big], launch, launch, torch.device("cpu"))
    assert launched == [64, 64]
    # a pick that fails to build for another reason (a descriptor refused, say): the same
    TUNE._CACHE[key] = dict(big)
    fits[0] = True

    def refuses(cfg):
        if cfg["BLOCK_N"] == 256:
            raise AssertionError("strides must be 16-byte aligned")
        launched.append(cfg["BLOCK_N"])

    G._launch_tuned(key, default, [default, big], refuses, refuses, torch.device("cpu"))
    assert launched[-1] == 64 and TUNE.tuned()[key] is None

    def faults(cfg):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    TUNE._CACHE[key] = dict(big)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # a device fault is never hidden
        G._launch_tuned(key, default, [default, big], faults, faults, torch.device("cpu"))


def test_device_fault_tells_sticky_driver_errors_from_a_candidates_own(monkeypatch):
    """Triton's launcher words every driver error alike; a sticky one (the context is broken)
    must propagate, a candidate's own (no tensor map for it) must only drop that candidate."""
    from flopwise.kernels import _tune

    assert _tune.device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not _tune.device_fault(RuntimeError("out of resource: shared memory"))
    launch = RuntimeError("Triton Error [CUDA]: Failed to create tensor map descriptor: invalid argument")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    assert not _tune.device_fault(launch)

    def broken(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    assert _tune.device_fault(RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"))


def test_pick_without_memory_for_scratch_keeps_the_default(monkeypatch):
    monkeypatch.setattr(TUNE, "MODE", "1")
    monkeypatch.setattr(TUNE, "_CACHE", {})
    calls = []

    def trial(cfg):
        calls.append(cfg)
        raise torch.OutOfMemoryError("scratch")

    assert TUNE.pick(("big",), [dict(a=1), dict(a=2)], trial, torch.device("cpu")) is None
    assert TUNE.tuned() == {("big",): None}
    assert TUNE.pick(("big",), [dict(a=1), dict(a=2)], trial, torch.device("cpu")) is None
    assert len(calls) == 1  # not retried on every call


def test_tuning_off_and_override_time_nothing(monkeypatch):
    monkeypatch.setattr(TUNE, "_CACHE", {})
    monkeypatch.setattr(TUNE, "_measure", lambda fn, device: pytest.fail("timed with tuning off"))
    monkeypatch.setattr(TUNE, "MODE", "0")
    assert TUNE.pick(("k",), [dict(a=1)], lambda cfg: None, torch.device("cpu")) is None
    monkeypatch.setattr(TUNE, "MODE", "auto")  # auto: CUDA only
    assert TUNE.pick(("k",), [dict(a=1)], lambda cfg: None, torch.device("cpu")) is None
    monkeypatch.setattr(TUNE, "MODE", "1")
    monkeypatch.setattr(G, "_OVERRIDE", {"rows": dict(BLOCK_N=64)})  # the tuning script's explicit choice
    run = _moe_case(T=9, D=8, Fh=16, E=2, k=1)
    run(moe_mlp)
    assert TUNE.tuned() == {}


@pytest.mark.parametrize("value,mode", [(None, "auto"), ("", "auto"), ("AUTO", "auto"), ("1", "1"), ("on", "1"),
                                        ("0", "0"), ("off", "0")])
def test_mode_values(value, mode):
    assert TUNE._parse_mode(value) == mode


def test_bad_mode_names_the_variable():
    with pytest.raises(ValueError, match="FLOPWISE_AUTOTUNE"):
        TUNE._parse_mode("fast")
    r = subprocess.run([sys.executable, "-c", "import flopwise.kernels"], capture_output=True, text=True,
                       env={**__import__("os").environ, "FLOPWISE_AUTOTUNE": "fast"})
    assert r.returncode != 0 and "FLOPWISE_AUTOTUNE" in r.stderr


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_tuning_matches_reference_and_skips_capture(monkeypatch):
    """On the card: tuning with the real clock keeps results; a shape first seen inside a
    CUDA graph capture is not tuned there (no synchronisation in a capture) and replays
    correctly; its next eager call tunes it."""
    monkeypatch.setattr(TUNE, "_CACHE", {})
    monkeypatch.setattr(TUNE, "MODE", "auto")
    dev, dt = "cuda", torch.bfloat16
    T, D, Fh, E, k = 1000, 512, 384, 8, 2
    x = torch.randn(T, D, device=dev, dtype=dt)
    logits = torch.randn(T, E, device=dev)
    ws = [(torch.randn(E, D, Fh, device=dev) / D**0.5).to(dt), (torch.randn(E, D, Fh, device=dev) / D**0.5).to(dt),
          (torch.randn(E, Fh, D, device=dev) / Fh**0.5).to(dt)]
    plan = topk_route(logits, k, renormalize=True)
    ref = moe_mlp_reference(x.float(), plan, *[w.float() for w in ws])
    y = moe_mlp(x, plan, *ws)
    assert rel_err(y, ref) < 2e-2
    assert len(TUNE.tuned()) == 2
    x2 = torch.randn(T // 2, D, device=dev, dtype=dt)  # new shape key
    plan2 = topk_route(torch.randn(T // 2, E, device=dev), k, renormalize=True)
    # warm-up outside the capture with tuning off: the default kernels are built (a capture
    # must not compile), but nothing is tuned for this shape
    monkeypatch.setattr(TUNE, "MODE", "0")
    moe_mlp(x2, plan2, *ws)
    monkeypatch.setattr(TUNE, "MODE", "auto")
    TUNE.clear()
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        y2 = moe_mlp(x2, plan2, *ws)
    assert TUNE.tuned() == {}
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y2, moe_mlp_reference(x2.float(), plan2, *[w.float() for w in ws])) < 2e-2
    moe_mlp(x2, plan2, *ws)
    assert len(TUNE.tuned()) == 2
    # the backward's four launches, tuned on the card (their trials redirect dG, dU and
    # accumulate into a zeroed dX), against the reference's gradients
    gy = torch.randn(T, D, device=dev)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *ws)]
    got = torch.autograd.grad(moe_mlp(leaves[0], plan, *leaves[1:]), leaves, gy)
    rl = [t.detach().float().requires_grad_(True) for t in (x, *ws)]
    want = torch.autograd.grad(moe_mlp_reference(rl[0], plan, *rl[1:]), rl, gy.float())
    assert len(TUNE.tuned()) == 2 + 2 + 4  # x2's two; for x (cleared before), the forward's two and the backward's four
    for name, a, b in zip(["dx", "dw_gate", "dw_up", "dw_down"], got, want):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))
