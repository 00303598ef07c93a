"""Grouped matmul and fused MoE MLP kernels against their references: outputs and every gradient."""

from __future__ import annotations

import importlib

import pytest
import torch

from flopwise.kernels import (
    expert_choice_route,
    expert_choice_route_reference,
    grouped_mm,
    grouped_mm_reference,
    moe_mlp,
    moe_mlp_reference,
    topk_route,
    topk_route_reference,
)
from flopwise.kernels._dispatch import deterministic_algorithms

# the function flopwise.kernels.grouped_mm shadows the module attribute of the same name
G = importlib.import_module("flopwise.kernels.grouped_mm")

from ..conftest import rel_err


def _logits(T, E, case):
    logits = torch.randn(T, E)
    if case == "empty_expert":
        logits[:, -1] -= 100.0
    elif case == "one_expert":
        logits[:, 1] += 100.0  # every token's first choice is expert 1
    return logits


CASES = [
    pytest.param(1, 1, 1, "plain", id="T1-E1-k1"),
    pytest.param(1, 4, 2, "plain", id="T1-E4-k2"),
    pytest.param(37, 5, 2, "empty_expert", id="T37-empty-expert"),
    pytest.param(33, 4, 1, "one_expert", id="T33-all-to-one"),
    pytest.param(20, 3, 3, "plain", id="k=E"),
    pytest.param(50, 6, 2, "plain", id="T50-E6"),
]


def _run_moe(fn, route, x, logits, ws, gy):
    xx = x.clone().requires_grad_(True)
    lg = logits.clone().requires_grad_(True)
    wp = [w.clone().requires_grad_(True) for w in ws]
    plan = route(lg)
    y = fn(xx, plan, *wp)
    (y.float() * gy).sum().backward()
    return [y, xx.grad, lg.grad] + [w.grad for w in wp]


@pytest.fixture
def row_launches(monkeypatch):
    """Records (epilogue, dw_partial) of every row-kernel launch."""
    seen = []
    real = G._launch_rows

    def spy(*args, **kw):
        seen.append((kw["epilogue"], kw.get("dw_partial", False)))
        return real(*args, **kw)

    monkeypatch.setattr(G, "_launch_rows", spy)
    return seen


_ATOMIC_FREE = {(G._SWIGLU, False), (G._STORE, False), (G._SWIGLU_BWD, True)}
_ATOMIC = {(G._SCALE_SCATTER, False), (G._SCATTER, False), (G._SWIGLU_BWD, False)}
MODES = ["default", "deterministic"]


@pytest.fixture
def mode(request, row_launches):
    """The test's determinism mode (``torch.use_deterministic_algorithms``), restored after;
    at the end, checks the row-kernel launches used only the mode's epilogues: atomic
    scatters by default, none under the flag (per-row stores summed per token in a fixed
    order, and the combine weights' gradient from per-column-tile shares)."""
    with deterministic_algorithms(request.param == "deterministic"):
        yield request.param
    allowed = _ATOMIC_FREE if request.param == "deterministic" else {(G._SWIGLU, False), (G._STORE, False)} | _ATOMIC
    assert row_launches and set(row_launches) <= allowed, row_launches


@pytest.mark.parametrize("mode", MODES, indirect=True)
@pytest.mark.parametrize("T,E,k,case", CASES)
@pytest.mark.parametrize("D,Fh", [(24, 40), (16, 300)], ids=["D24-F40", "D16-F300"])  # F300: 3 column tiles
def test_moe_mlp_matches_reference_fp32(mode, T, E, k, case, D, Fh):
    x = torch.randn(T, D)
    logits = _logits(T, E, case)
    ws = [torch.randn(E, D, Fh) / 4, torch.randn(E, D, Fh) / 4, torch.randn(E, Fh, D) / 4]
    gy = torch.randn(T, D)
    got = _run_moe(moe_mlp, lambda lg: topk_route(lg, k, renormalize=True, block_m=16), x, logits, ws, gy)
    ref = _run_moe(moe_mlp_reference, lambda lg: topk_route_reference(lg, k, renormalize=True, block_m=16),
                   x, logits, ws, gy)
    for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=name)
    if case == "empty_expert":
        assert (got[5][-1] == 0).all() and (got[3][-1] == 0).all(), "an expert with no rows gets zero gradient"


@pytest.mark.parametrize("mode", MODES, indirect=True)
@pytest.mark.parametrize("cf", [0.5, 2.0, 8.0], ids=["cf0.5", "cf2", "C=T"])
def test_moe_mlp_expert_choice_plan(mode, cf):
    """Expert choice gives tokens anywhere from no rows (zeros) to E rows."""
    T, E, D, Fh = 30, 4, 16, 32
    x, logits = torch.randn(T, D), torch.randn(T, E)
    ws = [torch.randn(E, D, Fh) / 4, torch.randn(E, D, Fh) / 4, torch.randn(E, Fh, D) / 4]
    gy = torch.randn(T, D)
    route = lambda lg: expert_choice_route_reference(lg, cf, block_m=16)  # noqa: E731
    got = _run_moe(moe_mlp, route, x, logits, ws, gy)
    ref = _run_moe(moe_mlp_reference, route, x, logits, ws, gy)
    for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=name)


@pytest.mark.parametrize("mode", MODES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_mlp_half_precision(mode, dtype):
    T, E, k, D, Fh = 40, 4, 2, 32, 200
    x = torch.randn(T, D).to(dtype)
    logits = torch.randn(T, E)
    ws = [(torch.randn(E, D, Fh) / 4).to(dtype), (torch.randn(E, D, Fh) / 4).to(dtype),
          (torch.randn(E, Fh, D) / 4).to(dtype)]
    gy = torch.randn(T, D)
    route = lambda lg: topk_route_reference(lg, k, renormalize=True, block_m=16)  # noqa: E731
    got = _run_moe(moe_mlp, route, x, logits, ws, gy)
    ref = _run_moe(moe_mlp_reference, route, x.float(), logits, [w.float() for w in ws], gy)
    for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], got, ref):
        assert a.dtype == (torch.float32 if name == "dlogits" else dtype), name
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


def test_moe_mlp_without_grad_saves_nothing_and_matches():
    T, E, D, Fh = 25, 3, 16, 16
    x, logits = torch.randn(T, D), torch.randn(T, E)
    ws = [torch.randn(E, D, Fh), torch.randn(E, D, Fh), torch.randn(E, Fh, D)]
    plan = topk_route(logits, 2, block_m=16)
    with torch.no_grad():
        y = moe_mlp(x, plan, *ws)
    torch.testing.assert_close(y, moe_mlp_reference(x, plan, *ws), atol=1e-4, rtol=1e-4)


def _moe_leaves(T=40, E=4, D=24, Fh=40, k=2):
    x, logits = torch.randn(T, D), torch.randn(T, E)
    ws = [torch.randn(E, D, Fh) / 4, torch.randn(E, D, Fh) / 4, torch.randn(E, Fh, D) / 4]
    leaves = [t.clone().requires_grad_(True) for t in (x, logits, *ws)]
    return leaves, k


def test_moe_mlp_backward_writes_over_saved_activations_once():
    (x, lg, *ws), k = _moe_leaves()
    gy = torch.randn(x.shape)
    ref = torch.autograd.grad(moe_mlp_reference(x, topk_route_reference(lg, k, block_m=16), *ws), [x, lg, *ws], gy)
    y = moe_mlp(x, topk_route(lg, k, block_m=16), *ws)
    got = torch.autograd.grad(y, [x, lg, *ws], gy, retain_graph=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)
    # the saved pre-activations now hold dG and dU: a second backward must refuse, not be wrong
    with pytest.raises(RuntimeError, match="retain_activations=True"):
        torch.autograd.grad(y, [x, lg, *ws], gy)


def test_moe_mlp_retain_activations_allows_repeated_backward():
    (x, lg, *ws), k = _moe_leaves()
    gy = torch.randn(x.shape)
    y = moe_mlp(x, topk_route(lg, k, block_m=16), *ws, retain_activations=True)
    first = torch.autograd.grad(y, [x, lg, *ws], gy, retain_graph=True)
    second = torch.autograd.grad(y, [x, lg, *ws], gy)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_moe_backward_reuse_matches_fresh_buffers():
    """The in-place backward (dG, dU over g, u) gives what separate buffers give."""
    T, E, D, Fh, k = 45, 5, 17, 33, 2
    x = torch.randn(T, D)
    plan = topk_route(torch.randn(T, E), k, renormalize=True, block_m=16)
    ws = [torch.randn(E, D, Fh) / 4, torch.randn(E, D, Fh) / 4, torch.randn(E, Fh, D) / 4]
    meta = (plan.token_idx, plan.expert_offsets, plan.block_expert, plan.block_row, plan.block_m)
    _, g, u = G._moe_fwd(x, plan.weights, *ws, *meta, G._SAVE)
    dy = torch.randn(T, D)
    fresh = G._moe_bwd(dy, x, g.clone(), u.clone(), plan.weights, *ws, *meta)
    reused = G._moe_bwd(dy, x, g, u, plan.weights, *ws, *meta, reuse=True)
    for a, b in zip(fresh, reused):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "sorted-rows"])
@pytest.mark.parametrize("T,E,k,case", CASES[:4])
def test_grouped_mm_matches_reference(gather, T, E, k, case):
    K_, N_ = 20, 36
    plan = topk_route(_logits(T, E, case), k, block_m=16)
    a = torch.randn(T if gather else T * k, K_, requires_grad=True)
    w = torch.randn(E, K_, N_, requires_grad=True)
    out = grouped_mm(a, w, plan, gather=gather)
    go = torch.randn_like(out)
    (out * go).sum().backward()
    a2, w2 = a.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = grouped_mm_reference(a2, w2, plan, gather=gather)
    (ref * go).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.grad, a2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, p, w: moe_mlp(x[:, :5], p, *w), ValueError, r"w_gate has shape .*dim 1 must be 5 \(x's last dim"),
    (lambda x, p, w: moe_mlp(x[:-1], p, *w), ValueError, "made for T = 10"),
    (lambda x, p, w: moe_mlp(x.double(), p, *w), TypeError, "dtype"),
    (lambda x, p, w: moe_mlp(x, "plan", *w), TypeError, "RoutingPlan"),
    (lambda x, p, w: moe_mlp(x, p, w[0][:2], w[1], w[2]), ValueError, "experts"),
    (lambda x, p, w: moe_mlp(x, p, w[0], w[1], w[2][:, :3]), ValueError, r"w_down has shape .*\(w_gate's dim 2\)"),
    (lambda x, p, w: grouped_mm(x, w[0], p, gather=False), ValueError, "N = 20"),
    (lambda x, p, w: moe_mlp(x[0], p, *w), ValueError, "2-D"),
    # integer tokens: refused on every backend (the reference would truncate silu's output)
    (lambda x, p, w: moe_mlp(x.long(), p, *(t.long() for t in w)), TypeError, "x must be a floating-point"),
    (lambda x, p, w: grouped_mm(x.long(), w[0].long(), p), TypeError, "a must be a floating-point"),
])
def test_bad_input_raises(call, exc, match):
    x = torch.randn(10, 8)
    plan = topk_route(torch.randn(10, 4), 2, block_m=16)
    ws = [torch.randn(4, 8, 12), torch.randn(4, 8, 12), torch.randn(4, 12, 8)]
    with pytest.raises(exc, match=match):
        call(x, plan, ws)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_custom_ops_pass_opcheck(deterministic):
    T, E, D, Fh = 6, 3, 16, 16
    plan = topk_route(torch.randn(T, E), 2, block_m=16)
    args = (torch.randn(T, D, requires_grad=True), plan.weights.detach().clone().requires_grad_(True),
            torch.randn(E, D, Fh, requires_grad=True), torch.randn(E, D, Fh, requires_grad=True),
            torch.randn(E, Fh, D, requires_grad=True), plan.token_idx, plan.expert_offsets, plan.block_expert,
            plan.block_row, plan.block_m, G._SAVE, deterministic)
    torch.library.opcheck(G._moe_mlp_op, args)
    torch.library.opcheck(G._gmm_op, (torch.randn(T, D, requires_grad=True), torch.randn(E, D, Fh, requires_grad=True),
                                      plan.token_idx, plan.expert_offsets, plan.block_expert, plan.block_row,
                                      plan.block_m, True))


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("T,D,Fh,E,k", [(2048, 1024, 512, 128, 8), (2048, 2048, 1024, 64, 8), (1024, 4096, 1792, 8, 2),
                                        (333, 200, 120, 7, 3)])
def test_gpu_moe_mlp_bf16(T, D, Fh, E, k):
    _check_gpu_moe_mlp_bf16(T, D, Fh, E, k)


def _gpu_moe_case(T, D, Fh, E, k):
    """bf16 inputs on the card: (route, x, logits, expert weights, output gradient)."""
    dt, dev = torch.bfloat16, "cuda"
    x = torch.randn(T, D, device=dev, dtype=dt)
    logits = torch.randn(T, E, device=dev)
    ws = [(torch.randn(E, D, Fh, device=dev) / D**0.5).to(dt), (torch.randn(E, D, Fh, device=dev) / D**0.5).to(dt),
          (torch.randn(E, Fh, D, device=dev) / Fh**0.5).to(dt)]
    return lambda lg: topk_route(lg, k, renormalize=True), x, logits, ws, torch.randn(T, D, device=dev)


def _check_gpu_moe_mlp_bf16(T, D, Fh, E, k):
    """The layer in bf16 on the card, forward and every gradient, against the fp32 reference."""
    route, x, logits, ws, gy = _gpu_moe_case(T, D, Fh, E, k)
    got = _run_moe(moe_mlp, route, x, logits, ws, gy)
    ref = _run_moe(moe_mlp_reference, route, x.float(), logits, [w.float() for w in ws], gy)
    for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], got, ref):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


def test_launch_falls_back_to_fewer_stages_when_shared_memory_runs_out():
    import importlib

    G = importlib.import_module("flopwise.kernels.grouped_mm")  # the module, not the function
    tried = []

    def launch(stages):
        tried.append(stages)
        if stages > 1:
            raise G.OutOfResources(200_000, 100_000, "shared memory")

    key = ("test-variant",)
    G._STAGES.pop(key, None)
    G._launch_fitting(launch, key, 3)
    assert tried == [3, 2, 1] and G._STAGES[key] == 1
    G._launch_fitting(launch, key, 3)  # remembered: no failing launch again
    assert tried == [3, 2, 1, 1]

    def never_fits(stages):
        raise G.OutOfResources(200_000, 100_000, "shared memory")

    with pytest.raises(G.OutOfResources):
        G._launch_fitting(never_fits, ("other",), 2)


def test_moe_mlp_backward_that_failed_part_way_is_not_retried(monkeypatch):
    """The first launch has overwritten g and u when a later one fails (out of memory, say):
    a retry must refuse instead of computing from dG and dU."""
    (x, lg, *ws), k = _moe_leaves()
    y = moe_mlp(x, topk_route(lg, k, block_m=16), *ws)
    real = G._launch_dw

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(G, "_launch_dw", real)
        raise MemoryError("simulated")

    monkeypatch.setattr(G, "_launch_dw", fail_once)
    with pytest.raises(MemoryError):
        y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_activations=True"):
        y.sum().backward()


def test_float64_takes_the_reference_and_passes_gradcheck():
    """float64 (gradcheck) runs the reference at float64 precision (a forced triton backend refuses it)."""
    torch.manual_seed(0)
    T, E, D, Fh = 5, 3, 6, 7
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    lg = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    ws = [(torch.randn(E, D, Fh, dtype=torch.float64) / 2).requires_grad_(),
          (torch.randn(E, D, Fh, dtype=torch.float64) / 2).requires_grad_(),
          (torch.randn(E, Fh, D, dtype=torch.float64) / 2).requires_grad_()]
    assert torch.autograd.gradcheck(lambda x, lg, *w: moe_mlp(x, topk_route(lg, 2, block_m=16), *w),
                                    (x, lg, *ws))
    assert torch.autograd.gradcheck(lambda x, w: grouped_mm(x, w, topk_route(lg.detach(), 2, block_m=16)),
                                    (x, ws[0]))


def test_strided_plan_tensors_are_read_correctly():
    """A plan built from strided views (plan_from_counts, or a RoutingPlan made by hand)."""
    import dataclasses

    from flopwise.kernels import plan_from_counts

    torch.manual_seed(0)
    T, E, D, Fh = 6, 2, 16, 16
    x = torch.randn(T, D)
    ws = [torch.randn(E, D, Fh) / 4, torch.randn(E, D, Fh) / 4, torch.randn(E, Fh, D) / 4]
    tok = torch.stack([torch.tensor([0, 2, 5, 1, 3, 4]), torch.zeros(6, dtype=torch.long)], 1).reshape(-1)[::2]
    w = torch.rand(12)[::2]
    plan = plan_from_counts(tok, w, torch.tensor([3, 3]), T, block_m=16)
    torch.testing.assert_close(moe_mlp(x, plan, *ws), moe_mlp_reference(x, plan, *ws), atol=1e-5, rtol=1e-5)
    hand = dataclasses.replace(plan, token_idx=torch.stack([plan.token_idx] * 2, 1)[:, 0],
                               weights=torch.stack([plan.weights] * 2, 1)[:, 1])
    assert not hand.token_idx.is_contiguous()
    torch.testing.assert_close(grouped_mm(x, ws[0], hand), grouped_mm_reference(x, ws[0], plan), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe_mlp(x, hand, *ws), moe_mlp_reference(x, plan, *ws), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("counts, tok, match", [
    ([3, 4], [0, 1, 2, 3, 4, 5], "sum to N = 6"),
    ([7, -1], [0, 1, 2, 3, 4, 5], ">= 0"),
    ([3, 3], [0, 1, 2, 3, 4, -1], r"token_idx must lie in \[0, num_tokens = 6\)"),  # no wrap-around
    ([3, 3], [0, 1, 2, 3, 4, 6], r"token_idx must lie in \[0, num_tokens = 6\)"),  # past the tokens
])
def test_plan_from_counts_checks_counts(counts, tok, match):
    from flopwise.kernels import plan_from_counts

    with pytest.raises(RuntimeError, match=match):
        plan_from_counts(torch.tensor(tok), torch.rand(6), torch.tensor(counts), 6)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: __import__("flopwise.kernels", fromlist=["x"]).plan_from_counts(torch.arange(6), torch.rand(6),
                                                                            torch.tensor([3, 3]), 6, block_m=48),
     ValueError, "block_m must be a power of two"),
    (lambda: topk_route(torch.randn(4, 3), 2, block_m=24), ValueError, "block_m must be a power of two"),
    (lambda: topk_route(torch.randn(4, 3), 2, renormalize="no"), TypeError, "renormalize must be a bool"),
    (lambda: moe_mlp(torch.randn(4, 8), topk_route(torch.randn(4, 3), 2, block_m=16), "w", None, None),
     TypeError, "w_gate must be a torch.Tensor"),
    (lambda: moe_mlp(torch.randn(4, 8), topk_route(torch.randn(4, 3), 2, block_m=16), torch.randn(3, 8), None, None),
     ValueError, r"w_gate must have shape \[E, in, out\]"),
    (lambda: grouped_mm([[1.0]], torch.randn(3, 1, 2), topk_route(torch.randn(1, 3), 2, block_m=16)),
     TypeError, "a must be a torch.Tensor"),
])
def test_argument_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------ persistent row kernel
TUNE = importlib.import_module("flopwise.kernels._tune")
_ROW_FAMILIES = ("rows", "rows_dual", "rows_swiglu_bwd")
# programs per launch: fewer than the tiles (each program loops over several, with a stride
# that divides no tile count here), or more than the tiles (some programs find none)
_PROGRAMS = [pytest.param(3, id="3-programs"), pytest.param(1000, id="1000-programs")]


def _force_persistent(monkeypatch, programs: int, **cfg):
    """Every row-kernel launch runs persistent, with ``programs`` programs (one per "SM")."""
    monkeypatch.setattr(G, "_OVERRIDE", {f: dict(cfg, PERSISTENT=1) for f in _ROW_FAMILIES})
    monkeypatch.setattr(TUNE, "device_sm_count", lambda device: programs)


@pytest.mark.parametrize("programs", _PROGRAMS)
@pytest.mark.parametrize("T,E,k,case", CASES)
def test_persistent_moe_mlp_matches_reference_fp32(monkeypatch, programs, T, E, k, case):
    """Every epilogue of the row kernel (gate/up + SwiGLU, down + combine weights, the SwiGLU
    backward, dX scatter) through the persistent loop: a tile it skips leaves NaN or a missing
    sum, a tile it repeats doubles an atomic sum."""
    D, Fh = 17, 33
    x = torch.randn(T, D)
    logits = _logits(T, E, case)
    ws = [torch.randn(E, D, Fh) / 4, torch.randn(E, D, Fh) / 4, torch.randn(E, Fh, D) / 4]
    gy = torch.randn(T, D)
    ref = _run_moe(moe_mlp_reference, lambda lg: topk_route_reference(lg, k, renormalize=True, block_m=16),
                   x, logits, ws, gy)
    _force_persistent(monkeypatch, programs)
    got = _run_moe(moe_mlp, lambda lg: topk_route(lg, k, renormalize=True, block_m=16), x, logits, ws, gy)
    for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_persistent_moe_mlp_is_bit_equal_to_the_default(monkeypatch, dtype, router):
    """The persistent kernel computes each tile as the default does (same K loop, same
    epilogue), so outputs and gradients are the same bits. Only the order of the tiles
    changes, and with it the order of the fp32 atomic sums: with top-2 routing each token's
    sums have two terms (and the combine-weight gradients two column tiles), which commute
    exactly; expert choice may give a token more experts, whose fp32 sum can then differ in
    the last bit (as between any two GPU runs), which the 16-bit outputs round away here."""
    T, E, k, D, Fh = 33, 4, 2, 24, 136  # Fh: two column tiles of 128
    route = (lambda lg: topk_route(lg, k, renormalize=True, block_m=16)) if router == "topk" else \
        (lambda lg: expert_choice_route(lg, 1.5, block_m=16))
    x = torch.randn(T, D).to(dtype)
    logits = torch.randn(T, E)
    ws = [(torch.randn(E, D, Fh) / 4).to(dtype), (torch.randn(E, D, Fh) / 4).to(dtype),
          (torch.randn(E, Fh, D) / 4).to(dtype)]
    gy = torch.randn(T, D)
    names = ["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"]
    base = _run_moe(moe_mlp, route, x, logits, ws, gy)
    ref = _run_moe(moe_mlp_reference, route, x.float(), logits, [w.float() for w in ws], gy)
    for name, a, b in zip(names, base, ref):
        assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 3e-2), (name, rel_err(a, b))
    for programs in (3, 1000):
        _force_persistent(monkeypatch, programs)
        for name, a, b in zip(names, _run_moe(moe_mlp, route, x, logits, ws, gy), base):
            if router == "expert_choice" and dtype == torch.float32 and name in ("y", "dx"):
                assert rel_err(a, b) < 1e-6, (programs, name, rel_err(a, b))
            else:
                assert torch.equal(a, b), (programs, name, rel_err(a, b))


@pytest.mark.parametrize("programs", _PROGRAMS)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "sorted-rows"])
@pytest.mark.parametrize("T,E,k,case", CASES[:4])
def test_persistent_grouped_mm_matches_reference(monkeypatch, programs, gather, T, E, k, case):
    """The store epilogue and grouped_mm's backward (dA by a transposed store or scatter)."""
    K_, N_ = 20, 36
    plan = topk_route(_logits(T, E, case), k, block_m=16)
    a = torch.randn(T if gather else T * k, K_)
    w = torch.randn(E, K_, N_)
    go = torch.randn(T * k, N_)
    aa, ww = a.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = grouped_mm_reference(aa, ww, plan, gather=gather)
    want = [ref, *torch.autograd.grad(ref, (aa, ww), go)]
    _force_persistent(monkeypatch, programs)
    aa, ww = a.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = grouped_mm(aa, ww, plan, gather=gather)
    for name, x, y in zip(("out", "da", "dw"), [out, *torch.autograd.grad(out, (aa, ww), go)], want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=name)


def test_persistent_kernel_reads_the_block_count_of_many_experts(monkeypatch):
    """More than 128 experts: the kernel sums the row blocks over the expert offsets in
    chunks of 128; experts past the first chunk (here 128 and 129 take most rows) count too."""
    T, E, k, K_, N_ = 40, 130, 2, 16, 24
    logits = torch.randn(T, E)
    logits[: T // 2, 128] += 100.0
    logits[T // 2:, 129] += 100.0
    plan = topk_route(logits, k, block_m=16)
    a, w = torch.randn(T, K_), torch.randn(E, K_, N_)
    _force_persistent(monkeypatch, 3)
    torch.testing.assert_close(grouped_mm(a, w, plan), grouped_mm_reference(a, w, plan), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [dict(PERSISTENT=1), dict(BLOCK_N=64, num_warps=4, PERSISTENT=2)],
                         ids=["1-per-SM", "2-per-SM"])
@pytest.mark.parametrize("T,D,Fh,E,k", [(2048, 1024, 512, 128, 8), (333, 200, 120, 7, 3)])
def test_gpu_persistent_moe_mlp_bf16(monkeypatch, cfg, T, D, Fh, E, k):
    """The persistent row kernel on the card (its SM count), every launch of the layer."""
    monkeypatch.setattr(G, "_OVERRIDE", {f: dict(cfg) for f in ("rows", "rows_dual")} |
                        {"rows_swiglu_bwd": dict(PERSISTENT=1)})
    _check_gpu_moe_mlp_bf16(T, D, Fh, E, k)


# ------------------------------------------------------------------------------ deterministic mode


@pytest.mark.parametrize("mode", ["deterministic"], indirect=True)
@pytest.mark.parametrize("programs", _PROGRAMS)
def test_deterministic_moe_mlp_persistent(mode, monkeypatch, programs):
    """The per-column-tile shares of the combine weights' gradient from the persistent loop."""
    T, E, k, D, Fh = 37, 5, 2, 16, 300
    x, logits = torch.randn(T, D), _logits(T, E, "empty_expert")
    ws = [torch.randn(E, D, Fh) / 4, torch.randn(E, D, Fh) / 4, torch.randn(E, Fh, D) / 4]
    gy = torch.randn(T, D)
    ref = _run_moe(moe_mlp_reference, lambda lg: topk_route_reference(lg, k, block_m=16), x, logits, ws, gy)
    _force_persistent(monkeypatch, programs)
    got = _run_moe(moe_mlp, lambda lg: topk_route(lg, k, block_m=16), x, logits, ws, gy)
    for name, a, b in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=name)


@pytest.mark.parametrize("mode", ["deterministic"], indirect=True)
@pytest.mark.parametrize("T,E,k,case", CASES[:4])
def test_deterministic_grouped_mm_backward(mode, row_launches, T, E, k, case):
    K_, N_ = 20, 36
    plan = topk_route(_logits(T, E, case), k, block_m=16)
    a, w = torch.randn(T, K_, requires_grad=True), torch.randn(E, K_, N_, requires_grad=True)
    out = grouped_mm(a, w, plan)
    go = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (a, w), go)]
    ref = grouped_mm_reference(a, w, plan)
    for name, x, y in zip(("out", "da", "dw"), got, [ref, *torch.autograd.grad(ref, (a, w), go)]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=name)
    assert set(row_launches) == {(G._STORE, False)}, row_launches


def test_combine_rows_sums_each_tokens_rows_in_expert_order():
    """The combine on its own: tokens with no rows get zeros, a token with many rows gets
    their weighted sum; every output element is written (outputs start as NaN)."""
    T, N, D = 9, 23, 37
    token_idx = torch.randint(0, T - 2, (N,), dtype=torch.int32)  # tokens T-2, T-1 get none
    token_idx[:7] = 3  # one token with many rows
    rows, w = torch.randn(N, D), torch.rand(N)
    for weights in (w, None):
        got = G._combine_rows(rows, weights, token_idx, T, torch.float32)
        scaled = rows * (1.0 if weights is None else weights[:, None])
        want = torch.zeros(T, D).index_add(0, token_idx.long(), scaled)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got[T - 2:] == 0).all()
    order, starts = G._token_rows(token_idx, T)
    assert torch.equal(token_idx[order.long()], token_idx.sort(stable=True).values)
    assert starts[0] == 0 and starts[-1] == N and bool((starts[1:] >= starts[:-1]).all())



@pytest.mark.gpu
@pytest.mark.parametrize("T,D,Fh,E,k", [(2048, 1024, 512, 128, 8), (1024, 2048, 1792, 8, 2)])
def test_gpu_deterministic_moe_mlp_is_bit_reproducible(T, D, Fh, E, k):
    """On the card, where the default path's atomic sums may differ in their last bits from
    run to run, deterministic mode gives the same bits twice, close to the fp32 reference."""
    route, x, logits, ws, gy = _gpu_moe_case(T, D, Fh, E, k)
    with deterministic_algorithms(warn_only=True):
        runs = [_run_moe(moe_mlp, route, x, logits, ws, gy) for _ in range(2)]
    ref = _run_moe(moe_mlp_reference, route, x.float(), logits, [w.float() for w in ws], gy)
    for name, a, b, r in zip(["y", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"], *runs, ref):
        assert torch.equal(a, b), name
        assert rel_err(a, r) < 2e-2, (name, rel_err(a, r))


def test_meta_inputs_give_shapes():
    """Meta inputs go through the custom ops' fake implementations (the reference would read offsets)."""
    m = lambda *s: torch.randn(*s, device="meta")  # noqa: E731
    plan = topk_route(m(6, 4), 2)
    x = m(6, 8).requires_grad_()
    y = moe_mlp(x, plan, m(4, 8, 5), m(4, 8, 5), m(4, 5, 8))
    assert y.shape == (6, 8) and y.is_meta
    y.sum().backward()
    assert x.grad.shape == (6, 8)
    assert grouped_mm(m(6, 8), m(4, 8, 5), plan).shape == (12, 5)
    assert grouped_mm(m(12, 8), m(4, 8, 5), plan, gather=False).shape == (12, 5)
