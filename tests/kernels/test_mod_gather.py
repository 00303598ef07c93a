"""Mixture-of-Depths token movement (gather, scatter-add, RMSNorm-gather) against the references:
outputs and every gradient, odd shapes, bad inputs, custom-op checks, torch.compile."""

from __future__ import annotations

import pytest
import torch

from ..conftest import rel_err
from flopwise.kernels import mod_gather as M
from flopwise.kernels.mod_gather import (
    gather_tokens,
    gather_tokens_reference,
    rmsnorm_gather_tokens,
    rmsnorm_gather_tokens_reference,
    scatter_tokens,
    scatter_tokens_reference,
)

# (B, S, D, K): odd D, D=1, k=1, k=S, B=1, S=1. Interpreter shapes stay small (S<=64, D<=130).
SHAPES = {
    "B2-S16-D100-K5": (2, 16, 100, 5),
    "B2-S8-D1-K3": (2, 8, 1, 3),
    "B2-S16-D64-K1": (2, 16, 64, 1),
    "B2-S12-D32-K12": (2, 12, 32, 12),
    "B1-S33-D130-K7": (1, 33, 130, 7),
    "B3-S1-D16-K1": (3, 1, 16, 1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IDX_DTYPES = {"i32": torch.int32, "i64": torch.int64}


def make_idx(B, S, K, dtype=torch.int64, device="cpu", sort=True):
    """MoD-style selection: K distinct positions per row (increasing unless sort=False)."""
    idx = torch.rand(B, S, device=device).topk(K, dim=1).indices
    if sort:
        idx = idx.sort(dim=1).values
    return idx.to(dtype)


def assert_match(out, ref, dtype, what):
    out, ref = out.detach(), ref.detach()
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN (an element was never written)"
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
    else:
        # relative error, with an absolute floor for results that are ~0 everywhere
        # (e.g. RMSNorm's d x at D=1, where x / rms(x) is constant)
        err = rel_err(out, ref)
        assert err < 1e-2 or (out.double() - ref.double()).abs().max() < 1e-3, f"{what}: relative error {err:.2e}"


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def run_gather(device, B, S, D, K, dtype, idx_dtype, sort=True):
    x = torch.randn(B, S, D, device=device, dtype=dtype)
    idx = make_idx(B, S, K, idx_dtype, device, sort)
    x1, x2 = leaf(x), leaf(x)
    out, ref = gather_tokens(x1, idx), gather_tokens_reference(x2, idx)
    assert torch.equal(out, ref), "gather is a copy: bit-exact"
    go = torch.randn_like(ref)
    out.backward(go)
    ref.backward(go)
    assert torch.equal(x1.grad, x2.grad), "gather backward is a copy into zeros: bit-exact"


def run_scatter(device, B, S, D, K, dtype, idx_dtype, sort=True):
    res = torch.randn(B, S, D, device=device, dtype=dtype)
    y = torch.randn(B, K, D, device=device, dtype=dtype)
    w = torch.rand(B, K, device=device)
    idx = make_idx(B, S, K, idx_dtype, device, sort)
    a = [leaf(t) for t in (res, y, w)]
    b = [leaf(t) for t in (res, y, w)]
    out = scatter_tokens(a[0], a[1], idx, a[2])
    ref = scatter_tokens_reference(b[0], b[1], idx, b[2])
    assert_match(out, ref, dtype, "scatter out")
    go = torch.randn_like(ref)
    out.backward(go)
    ref.backward(go)
    for name, p, q in zip(("d residual", "d y", "d weight"), a, b):
        assert_match(p.grad, q.grad, dtype, name)
    # in place, outside autograd: same values, same tensor returned
    buf = res.clone()
    ret = scatter_tokens(buf, y, idx, w, inplace=True)
    assert ret is buf
    assert_match(buf, scatter_tokens_reference(res, y, idx, w), dtype, "scatter in place")


def run_rmsnorm(device, B, S, D, K, dtype, idx_dtype, sort=True, eps=1e-6):
    x = torch.randn(B, S, D, device=device, dtype=dtype)
    gamma = (torch.rand(D, device=device) + 0.5).to(dtype)
    idx = make_idx(B, S, K, idx_dtype, device, sort)
    x1, g1, x2, g2 = leaf(x), leaf(gamma), leaf(x), leaf(gamma)
    out = rmsnorm_gather_tokens(x1, idx, g1, eps)
    ref = rmsnorm_gather_tokens_reference(x2, idx, g2, eps)
    assert_match(out, ref, dtype, "rmsnorm-gather out")
    go = torch.randn_like(ref)
    out.backward(go)
    ref.backward(go)
    assert_match(x1.grad, x2.grad, dtype, "d x")
    assert_match(g1.grad, g2.grad, dtype, "d gamma")


RUNNERS = {"gather": run_gather, "scatter": run_scatter, "rmsnorm": run_rmsnorm}


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES.values(), ids=IDX_DTYPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("op", RUNNERS)
def test_matches_reference(op, shape, dtype, idx_dtype, device):
    RUNNERS[op](device, *shape, dtype, idx_dtype)


@pytest.mark.parametrize("op", RUNNERS)
def test_unsorted_distinct_indices(op, device):
    """Nothing relies on increasing order, only on distinctness."""
    RUNNERS[op](device, 2, 16, 24, 9, torch.float32, torch.int64, sort=False)


@pytest.mark.parametrize("op", RUNNERS)
def test_reference_backend(op, device, monkeypatch):
    """FLOPWISE_BACKEND=reference: the custom ops' plain-PyTorch forward and backward paths."""
    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
    RUNNERS[op](device, 2, 16, 100, 5, torch.float32, torch.int32)


def test_kernels_actually_run(monkeypatch):
    """Under the interpreter (or on CUDA) the public ops reach the Triton launchers."""
    calls = []
    for name in ("_gather_tokens_fwd", "_scatter_tokens_fwd", "_scatter_tokens_inplace", "_rmsnorm_gather_tokens_fwd"):
        fn = getattr(M, name)
        monkeypatch.setattr(M, name, lambda *a, _fn=fn, _n=name: (calls.append(_n), _fn(*a))[1])
    x, y, w, idx = torch.randn(1, 8, 4), torch.randn(1, 2, 4), torch.rand(1, 2), torch.tensor([[1, 5]])
    gather_tokens(x, idx)
    scatter_tokens(x, y, idx, w)
    scatter_tokens(x.clone(), y, idx, w, inplace=True)
    rmsnorm_gather_tokens(x, idx, torch.ones(4))
    assert len(calls) == 4, calls


@pytest.mark.parametrize("B,S,K,sort", [(1, 1, 1, True), (2, 5, 5, False), (3, 100, 13, False),
                                         (2, 3000, 1500, True), (1, 2048, 1, True)],
                         ids=["S1", "K=S", "unsorted", "S-over-one-block", "K1"])
def test_inverse_index_matches_torch(B, S, K, sort):
    """The one-launch inverse map (a NaN/INT_MIN-poisoned output, so an unwritten entry
    fails) against the torch formulation."""
    idx = make_idx(B, S, K, dtype=torch.int32, sort=sort)
    assert torch.equal(M._inverse_index(idx, S), M._inverse_index_reference(idx, S))


def test_inverse_index_never_writes_outside_its_row():
    idx = torch.tensor([[0, -1, 7], [8, 2, 3]], dtype=torch.int32)  # -1 and S=8 are out of range
    inv = M._inverse_index(idx, 8)
    want = torch.full((2, 8), -1, dtype=torch.int32)
    want[0, 0], want[0, 7], want[1, 2], want[1, 3] = 0, 2, 1, 2
    assert torch.equal(inv, want)


def test_calls_without_a_graph_match_calls_with_one(device):
    """Without autograd (inference, eval) the ops launch their kernels directly, skipping
    the autograd Function: the same outputs, bit for bit."""
    B, S, D, K = 2, 16, 24, 5
    x, y, w = torch.randn(B, S, D, device=device), torch.randn(B, K, D, device=device), torch.rand(B, K, device=device)
    gamma, idx = torch.rand(D, device=device) + 0.5, make_idx(B, S, K, device=device)
    with torch.no_grad():
        plain = [gather_tokens(x, idx), scatter_tokens(x, y, idx, w), rmsnorm_gather_tokens(x, idx, gamma)]
    xg = x.clone().requires_grad_(True)
    graphed = [gather_tokens(xg, idx), scatter_tokens(xg, y, idx, w), rmsnorm_gather_tokens(xg, idx, gamma)]
    for a, b in zip(plain, graphed):
        assert b.requires_grad and not a.requires_grad
        assert torch.equal(a, b.detach())


def test_forward_mode_ad_is_refused_not_dropped(device):
    """Under forward-mode AD the Triton path has no jvp: it raises, where a bare launch would
    silently drop the tangent (the reference path computes it)."""
    import torch.autograd.forward_ad as fwAD

    B, S, D, K = 2, 8, 16, 3
    x, t = torch.randn(B, S, D, device=device), torch.randn(B, S, D, device=device)
    y, w = torch.randn(B, K, D, device=device), torch.rand(B, K, device=device)
    idx = make_idx(B, S, K, device=device)
    for call in (lambda d: gather_tokens(d, idx), lambda d: scatter_tokens(d, y, idx, w),
                 lambda d: rmsnorm_gather_tokens(d, idx, torch.ones(D, device=device))):
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match="no forward-mode AD.*FLOPWISE_BACKEND=reference"):
                call(fwAD.make_dual(x, t))


def test_expanded_grad_and_partial_requires_grad(device):
    """sum() hands the backward a stride-0 grad; only some inputs need grad."""
    B, S, D, K = 2, 16, 20, 4
    x = torch.randn(B, S, D, device=device)
    idx = make_idx(B, S, K, device=device)
    y, w, gamma = torch.randn(B, K, D, device=device), torch.rand(B, K, device=device), torch.rand(D, device=device)

    x1, x2 = leaf(x), leaf(x)
    gather_tokens(x1, idx).sum().backward()
    gather_tokens_reference(x2, idx).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)

    w1, w2 = leaf(w), leaf(w)  # only the router weight needs grad
    scatter_tokens(x, y, idx, w1).sum().backward()
    scatter_tokens_reference(x, y, idx, w2).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)

    g1, g2 = leaf(gamma), leaf(gamma)  # only gamma needs grad
    rmsnorm_gather_tokens(x, idx, g1).sum().backward()
    rmsnorm_gather_tokens_reference(x, idx, g2).sum().backward()
    torch.testing.assert_close(g1.grad, g2.grad)


def test_noncontiguous_inputs(device):
    """Strided x / idx / y / weight / gamma: the launchers make them contiguous."""
    B, S, D, K = 2, 16, 24, 4
    x = torch.randn(B, D, S, device=device).transpose(1, 2)
    idx = make_idx(B, S, 2 * K, device=device)[:, ::2]
    y = torch.randn(B, D, K, device=device).transpose(1, 2)
    w = torch.rand(K, B, device=device).t()
    gamma = torch.rand(2 * D, device=device)[::2]
    assert not any(t.is_contiguous() for t in (x, idx, y, w, gamma))
    torch.testing.assert_close(gather_tokens(x, idx), gather_tokens_reference(x, idx))
    torch.testing.assert_close(scatter_tokens(x, y, idx, w), scatter_tokens_reference(x, y, idx, w))
    torch.testing.assert_close(rmsnorm_gather_tokens(x, idx, gamma), rmsnorm_gather_tokens_reference(x, idx, gamma))


def test_rmsnorm_eps_and_zero_rows(device):
    x = torch.randn(2, 8, 12, device=device)
    x[0, 3] = 0.0  # a zero row: finite output thanks to eps
    idx = torch.tensor([[1, 3], [0, 7]], device=device)
    gamma = torch.rand(12, device=device)
    for eps in (1e-6, 0.5):
        out = rmsnorm_gather_tokens(x, idx, gamma, eps)
        torch.testing.assert_close(out, rmsnorm_gather_tokens_reference(x, idx, gamma, eps))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rmsnorm_eps_zero(device, backend, monkeypatch):
    """eps = 0 is allowed: rows of nonzero x stay finite, and so does gamma's gradient (the
    kernel's backward once summed 0 * rsqrt(0) = NaN from the rows past the end of its grid),
    and a position outside [0, S) is still a zero row with no gradient."""
    monkeypatch.setenv("FLOPWISE_BACKEND", backend)
    x = leaf(torch.randn(2, 6, 8, device=device))
    gamma = leaf(torch.rand(8, device=device) + 0.5)
    for idx in ([[0, 3, 5], [1, 2, 5]], [[0, 3, 9], [-1, 2, 5]]):
        idx = torch.tensor(idx, device=device)
        ok = ((idx >= 0) & (idx < 6))[..., None]
        x.grad = gamma.grad = None
        out = rmsnorm_gather_tokens(x, idx, gamma, 0.0)
        safe = torch.where(ok[..., 0], idx, 0)
        xs = x.detach()[torch.arange(2)[:, None], safe]
        want = xs * torch.rsqrt(xs.square().mean(-1, keepdim=True)) * gamma.detach() * ok
        torch.testing.assert_close(out, want)
        out.backward(torch.ones_like(out))
        assert torch.isfinite(x.grad).all() and torch.isfinite(gamma.grad).all()
        torch.testing.assert_close(gamma.grad, (xs * torch.rsqrt(xs.square().mean(-1, keepdim=True)) * ok).sum((0, 1)))


def test_empty_selection(device):
    x = torch.randn(2, 8, 4, device=device)
    idx = torch.empty(2, 0, dtype=torch.int64, device=device)
    assert gather_tokens(x, idx).shape == (2, 0, 4)
    out = scatter_tokens(x, torch.empty(2, 0, 4, device=device), idx, torch.empty(2, 0, device=device))
    torch.testing.assert_close(out, x)


# ------------------------------------------------------------------------------ bad inputs

def _bad_cases():
    x = torch.randn(2, 8, 4)
    idx = torch.tensor([[0, 3], [1, 2]])
    y, w, g = torch.randn(2, 2, 4), torch.rand(2, 2), torch.ones(4)
    return {
        "gather-x-not-tensor": (lambda: gather_tokens(x.numpy(), idx), TypeError, "x"),
        "gather-x-2d": (lambda: gather_tokens(x[0], idx), ValueError, "x"),
        "gather-x-int": (lambda: gather_tokens(x.long(), idx), TypeError, "x"),
        "gather-idx-float": (lambda: gather_tokens(x, idx.float()), TypeError, "idx"),
        "gather-idx-int16": (lambda: gather_tokens(x, idx.short()), TypeError, "idx"),
        "gather-idx-1d": (lambda: gather_tokens(x, idx[0]), ValueError, "idx"),
        "gather-idx-batch": (lambda: gather_tokens(x, idx[:1]), ValueError, "idx"),
        "gather-idx-k-gt-S": (lambda: gather_tokens(x, torch.zeros(2, 9, dtype=torch.long)), ValueError, "idx"),
        "scatter-y-shape": (lambda: scatter_tokens(x, y[:, :1], idx, w), ValueError, "y"),
        "scatter-y-dtype": (lambda: scatter_tokens(x, y.double(), idx, w), TypeError, "y"),
        "scatter-weight-shape": (lambda: scatter_tokens(x, y, idx, w[:, :1]), ValueError, "weight"),
        "scatter-weight-int": (lambda: scatter_tokens(x, y, idx, w.long()), TypeError, "weight"),
        "scatter-residual-1d": (lambda: scatter_tokens(x[0, 0], y, idx, w), ValueError, "residual"),
        "scatter-inplace-grad": (lambda: scatter_tokens(leaf(x), y, idx, w, inplace=True), ValueError, "inplace"),
        "scatter-inplace-grad-y": (lambda: scatter_tokens(x.clone(), leaf(y), idx, w, inplace=True), ValueError,
                                   "inplace"),
        "scatter-inplace-noncontig": (lambda: scatter_tokens(x.clone().transpose(1, 2).contiguous().transpose(1, 2),
                                                             y, idx, w, inplace=True), ValueError, "contiguous"),
        "rmsnorm-gamma-shape": (lambda: rmsnorm_gather_tokens(x, idx, torch.ones(5)), ValueError, "gamma"),
        "rmsnorm-gamma-2d": (lambda: rmsnorm_gather_tokens(x, idx, torch.ones(1, 4)), ValueError, "gamma"),
        "rmsnorm-eps-negative": (lambda: rmsnorm_gather_tokens(x, idx, g, -1.0), ValueError, "eps"),
        "rmsnorm-eps-str": (lambda: rmsnorm_gather_tokens(x, idx, g, "1e-6"), TypeError, "eps"),
        "check-range": (lambda: gather_tokens(x, torch.tensor([[0, 8], [1, 2]]), check_indices=True),
                        ValueError, "idx"),
        "check-negative": (lambda: scatter_tokens(x, y, torch.tensor([[0, -1], [1, 2]]), w, check_indices=True),
                           ValueError, "idx"),
        "check-repeated": (lambda: rmsnorm_gather_tokens(x, torch.tensor([[3, 3], [1, 2]]), g, check_indices=True),
                           ValueError, "repeated"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs(case):
    fn, exc, word = case
    with pytest.raises(exc, match=word):
        fn()


def test_check_indices_accepts_valid(device):
    x = torch.randn(2, 8, 4, device=device)
    idx = torch.tensor([[7, 0, 3], [1, 2, 5]], device=device)  # distinct, any order
    torch.testing.assert_close(gather_tokens(x, idx, check_indices=True), gather_tokens_reference(x, idx))


def test_inplace_allowed_under_no_grad(device):
    res = leaf(torch.randn(2, 8, 4, device=device))
    y, w, idx = torch.randn(2, 2, 4, device=device), torch.rand(2, 2, device=device), torch.tensor([[0, 3], [1, 2]])
    expected = scatter_tokens_reference(res.detach(), y, idx, w)
    with torch.no_grad():
        scatter_tokens(res, y, idx, w, inplace=True)
    torch.testing.assert_close(res.detach(), expected)


# Positions outside [0, S): -1 in the first and in the last sequence (no wrap-around, no read of
# the neighbouring sequence or of memory before the tensor), S itself, and a far one.
OUT_OF_RANGE = torch.tensor([[-1, 2, 5], [0, 6, -7], [1, 3, 1 << 40]])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_positions_outside_the_sequence_select_nothing(device, backend, monkeypatch):
    monkeypatch.setenv("FLOPWISE_BACKEND", backend)
    B, S, D = 3, 6, 5
    idx = OUT_OF_RANGE.to(device)
    ok = ((idx >= 0) & (idx < S))[..., None]
    # the tensors sit inside larger buffers, so a write before or after them would show
    buf = torch.randn(B + 2, S, D, device=device)
    x = leaf(buf[1:-1])
    gamma = leaf(torch.rand(D, device=device) + 0.5)
    y, w = leaf(torch.randn(B, 3, D, device=device)), leaf(torch.rand(B, 3, device=device))
    safe = torch.where(ok[..., 0], idx, 0)

    out = gather_tokens(x, idx)
    expected = torch.where(ok, x.detach()[torch.arange(B)[:, None], safe], 0.0)
    assert torch.equal(out, expected)
    out.backward(torch.ones_like(out))
    dx = torch.zeros(B, S, D, device=device)
    dx[torch.arange(B)[:, None].expand_as(idx)[ok[..., 0]], idx[ok[..., 0]]] = 1.0
    assert torch.equal(x.grad, dx), "only rows inside the sequence get a gradient"

    x.grad = None
    out = rmsnorm_gather_tokens(x, idx, gamma)
    torch.testing.assert_close(out, rmsnorm_gather_tokens_reference(x.detach(), safe, gamma.detach()) * ok)
    out.backward(torch.randn_like(out))
    assert not x.grad.isnan().any() and (x.grad[dx == 0] == 0).all()

    out = scatter_tokens(x, y, idx, w)
    expected = x.detach().clone()
    for b, j in ok[..., 0].nonzero().tolist():
        expected[b, idx[b, j]] += w[b, j].detach() * y[b, j].detach()
    torch.testing.assert_close(out, expected)
    go = torch.randn_like(out)
    out.backward(go)
    assert (y.grad[~ok[..., 0]] == 0).all() and (w.grad[~ok[..., 0]] == 0).all()

    before = buf.clone()
    with torch.no_grad():
        scatter_tokens(buf[1:-1], y.detach(), idx, w.detach(), inplace=True)
    torch.testing.assert_close(buf[1:-1], expected)
    assert torch.equal(buf[0], before[0]) and torch.equal(buf[-1], before[-1]), "wrote outside residual"


def test_references_make_no_host_sync():
    """The references mask positions outside [0, S) by value: dynamo traces each one whole
    (a data-dependent ``bool(tensor)`` would break the graph, and on CUDA wait for the device)."""
    B, S, D = 3, 6, 5
    x, y, w, gamma = torch.randn(B, S, D), torch.randn(B, 3, D), torch.rand(B, 3), torch.rand(D) + 0.5
    idx = OUT_OF_RANGE
    calls = [
        (M.gather_tokens_reference, (x, idx)),
        (M.scatter_tokens_reference, (x, y, idx, w)),
        (M.rmsnorm_gather_tokens_reference, (x, idx, gamma)),
        (M._gather_tokens_bwd_reference, (y, idx, S)),
        (M._scatter_tokens_bwd_reference, (y, y, idx, w)),
        (M._rmsnorm_gather_tokens_bwd_reference, (y, x, idx, gamma, 1e-6)),
    ]
    for fn, args in calls:
        torch._dynamo.reset()
        traced = torch.compile(fn, backend="eager", fullgraph=True)(*args)
        plain = fn(*args)
        for a, b in zip(traced if isinstance(traced, tuple) else (traced,), plain if isinstance(plain, tuple) else (plain,)):
            assert torch.equal(a, b), fn.__name__


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_inplace_scatter_invalidates_a_graph_that_saved_residual(device, backend, monkeypatch):
    """residual needs no grad, but a graph saved it: its backward must refuse the changed value."""
    monkeypatch.setenv("FLOPWISE_BACKEND", backend)
    h = torch.randn(1, 4, 3, device=device)
    p = torch.ones(3, device=device, requires_grad=True)
    z = (h * p).sum()  # saves h for dz/dp
    scatter_tokens(h, torch.ones(1, 2, 3, device=device), torch.tensor([[1, 3]], device=device),
                   torch.ones(1, 2, device=device), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(z, p)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_inplace_scatter_of_a_view_of_residual(device, backend, monkeypatch):
    """y (and weight) read from residual's own memory: updates land as if read beforehand."""
    monkeypatch.setenv("FLOPWISE_BACKEND", backend)
    # D=2048 puts two rows in a program, so rows 2..5 are written by programs that run after
    # (or, on a GPU, beside) those reading rows 0..3
    h0 = torch.randn(1, 8, 2048, device=device)
    h = h0.clone()
    idx = torch.tensor([[2, 3, 4, 5]], device=device)
    w = h.view(-1)[:4].view(1, 4)  # the weights are residual's first four values
    expected = scatter_tokens_reference(h0, h0[:, 0:4], idx, h0.view(-1)[:4].view(1, 4))
    scatter_tokens(h, h[:, 0:4], idx, w, inplace=True)
    assert torch.equal(h, expected)


# ------------------------------------------------------------------------------ custom ops, compile

def _op_samples():
    B, S, D, K = 2, 8, 12, 3
    x = torch.randn(B, S, D)
    idx = torch.tensor([[0, 4, 7], [1, 2, 6]])
    y, w, gamma = torch.randn(B, K, D), torch.rand(B, K), torch.rand(D) + 0.5
    gk = torch.randn(B, K, D)
    return {
        "mod_gather": (torch.ops.flopwise.mod_gather, (leaf(x), idx)),
        "mod_gather_bwd": (torch.ops.flopwise.mod_gather_bwd, (gk, idx, S)),
        "mod_scatter": (torch.ops.flopwise.mod_scatter, (leaf(x), leaf(y), idx, leaf(w))),
        "mod_scatter_": (torch.ops.flopwise.mod_scatter_, (x.clone(), y, idx, w)),
        "mod_scatter_bwd": (torch.ops.flopwise.mod_scatter_bwd, (x, y, idx, w)),
        "mod_rmsnorm_gather": (torch.ops.flopwise.mod_rmsnorm_gather, (leaf(x), idx, leaf(gamma), 1e-6)),
        "mod_rmsnorm_gather_bwd": (torch.ops.flopwise.mod_rmsnorm_gather_bwd, (gk, x, idx, gamma, 1e-6)),
    }


OPS = _op_samples()


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    op, args = OPS[name]
    torch.library.opcheck(op, args)


def _mod_block(x, idx, w, gamma):
    """A MoD block with a stand-in for attention+MLP: norm-gather, transform, weighted scatter."""
    h = rmsnorm_gather_tokens(x, idx, gamma)
    y = torch.tanh(h) + gather_tokens(x, idx)
    return scatter_tokens(x, y, idx, w)


@pytest.mark.parametrize("backend_name", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend_name):
    B, S, D, K = 2, 16, 20, 5
    x, gamma, w = torch.randn(B, S, D), torch.rand(D) + 0.5, torch.rand(B, K)
    idx = make_idx(B, S, K)
    compiled = torch.compile(_mod_block, backend=backend_name, fullgraph=True)
    a = [leaf(t) for t in (x, w, gamma)]
    b = [leaf(t) for t in (x, w, gamma)]
    out = compiled(a[0], idx, a[1], a[2])
    ref = _mod_block(b[0], idx, b[1], b[2])
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_torch_compile_inplace():
    def step(res, y, idx, w):
        scatter_tokens(res, y, idx, w, inplace=True)
        return res * 2

    res, y, w = torch.randn(2, 8, 4), torch.randn(2, 3, 4), torch.rand(2, 3)
    idx = torch.tensor([[0, 4, 7], [1, 2, 6]])
    r1, r2 = res.clone(), res.clone()
    with torch.no_grad():
        out = torch.compile(step, backend="aot_eager", fullgraph=True)(r1, y, idx, w)
        ref = step(r2, y, idx, w)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(r1, r2)


# ------------------------------------------------------------------------------ GPU (scripts/gpu_check.sh)

GPU_SHAPES = {"B2-S1024-D4096-K128": (2, 1024, 4096, 128), "B2-S512-D1000-K64": (2, 512, 1000, 64),
              "B1-S256-D8192-K256": (1, 256, 8192, 256)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
@pytest.mark.parametrize("op", RUNNERS)
def test_gpu_matches_reference(op, shape, dtype):
    RUNNERS[op]("cuda", *shape, dtype, torch.int32)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """B*S*D past 2**31 elements: row offsets must be computed in int64."""
    D = 4096
    S = 2**31 // D + 64
    x = torch.zeros(1, S, D, device="cuda", dtype=torch.bfloat16)
    x[0, -64:] = torch.randn(64, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.arange(S - 64, S, device="cuda", dtype=torch.int32)[None]
    torch.testing.assert_close(gather_tokens(x, idx), x[:, -64:], rtol=0, atol=0)
    y, w = torch.randn(1, 64, D, device="cuda", dtype=torch.bfloat16), torch.rand(1, 64, device="cuda")
    expected = (x[:, -64:].float() + w[..., None] * y.float()).to(torch.bfloat16)
    scatter_tokens(x, y, idx, w, inplace=True)
    # The GPU fuses w*y + x into one FMA (one fp32 rounding, torch rounds twice), so a few
    # elements land one bf16 step apart; a wrong row offset would be off by O(1) everywhere.
    torch.testing.assert_close(x[:, -64:], expected, rtol=2**-7, atol=1e-5)


@pytest.mark.gpu
def test_gpu_deterministic_backward():
    B, S, D, K = 4, 1024, 2048, 128
    x = torch.randn(B, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gamma = torch.rand(D, device="cuda", requires_grad=True)
    idx = make_idx(B, S, K, device="cuda")
    go = torch.randn(B, K, D, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        x.grad = gamma.grad = None
        rmsnorm_gather_tokens(x, idx, gamma).backward(go)
        grads.append((x.grad.clone(), gamma.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_float64_keeps_its_precision_and_passes_gradcheck():
    """float64 runs the reference, in float64: an unselected row keeps bits that float32 would
    round away, and every op passes gradcheck."""
    res = torch.full((1, 4, 2), 1 + 2**-40, dtype=torch.float64)
    y = torch.ones(1, 1, 2, dtype=torch.float64)
    w = torch.full((1, 1), 2**-41, dtype=torch.float64)
    out = scatter_tokens(res, y, torch.tensor([[2]]), w)
    assert (out[0, 0] == 1 + 2**-40).all() and (out[0, 2] == 1 + 2**-40 + 2**-41).all()
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    yy = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    ww = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    idx = make_idx(2, 6, 3)
    assert torch.autograd.gradcheck(lambda x: gather_tokens(x, idx), (x,))
    assert torch.autograd.gradcheck(lambda x, y, w: scatter_tokens(x, y, idx, w), (x, yy, ww))
    assert torch.autograd.gradcheck(lambda x, g: rmsnorm_gather_tokens(x, idx, g), (x, gamma))
