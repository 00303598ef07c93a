"""plan_from_topk: a RoutingPlan from caller-made top-k choices. Kernel path against its
reference and against topk_route's own plan, plan invariants, gradients, bad inputs.

Interpreter cost is almost all in the shared scatter kernel's per-tile sort (about 0.25 s per
tile of 128 pairs, 3 s for one of 1024), so shapes keep few tiles and few pairs per tile."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flopwise.kernels import _dispatch
from flopwise.kernels import routing as R
from flopwise.kernels import plan_from_topk, plan_from_topk_reference, topk_route

from .test_routing import assert_block_map_valid

INT_FIELDS = ["token_idx", "expert_counts", "expert_offsets", "padded_offsets", "block_expert", "block_row",
              "topk_ids", "pair_idx", "inverse"]
FLOAT_FIELDS = ["weights", "topk_weights"]
SCALARS = ["num_tokens", "num_experts", "block_m", "top_k", "capacity"]


def assert_plans_identical(p: R.RoutingPlan, r: R.RoutingPlan, equal_nan: bool = False):
    """Every field equal, bit for bit, dtypes included (the weights are permuted copies, so
    no tolerance): a poisoned (INT_MIN / NaN) element the kernels never wrote fails."""
    for f in SCALARS:
        assert getattr(p, f) == getattr(r, f), f
    for f in INT_FIELDS + FLOAT_FIELDS:
        a, b = getattr(p, f), getattr(r, f)
        assert a.dtype == b.dtype, f"{f}: {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{f}: {tuple(a.shape)} vs {tuple(b.shape)}"
        if equal_nan:
            torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=f)
        else:
            assert torch.equal(a, b), f"{f} differs:\n{a}\n{b}"


def assert_plan_valid(plan: R.RoutingPlan, distinct: bool = True):
    """Invariants of a token-choice plan (``distinct``: no id repeats within a token's row)."""
    E, N, K = plan.num_experts, plan.num_rows, plan.top_k
    assert N == plan.num_tokens * K
    counts, offsets = plan.expert_counts.long(), plan.expert_offsets.long()
    assert (counts >= 0).all() and offsets[0] == 0 and torch.equal(offsets[1:], counts.cumsum(0))
    assert offsets[-1] == N
    pair = plan.pair_idx.long()
    assert torch.equal(torch.sort(pair).values, torch.arange(N)), "pair_idx is a bijection"
    assert torch.equal(plan.inverse.long()[pair], torch.arange(N)), "inverse undoes pair_idx"
    assert torch.equal(pair // K, plan.token_idx.long())
    assert torch.equal(plan.topk_ids.reshape(-1).long()[pair], torch.repeat_interleave(torch.arange(E), counts))
    for e in range(E):  # stable: pairs increase within an expert (so tokens do, strictly if distinct)
        seg, tok = pair[offsets[e]:offsets[e + 1]], plan.token_idx.long()[offsets[e]:offsets[e + 1]]
        assert (seg[1:] > seg[:-1]).all()
        if distinct:
            assert (tok[1:] > tok[:-1]).all()
    assert torch.equal(plan.weights, plan.topk_weights.reshape(-1)[pair]) or torch.isnan(plan.weights).any()
    assert_block_map_valid(plan)


def distinct_ids(T, E, K, dtype=torch.int64):
    """K distinct experts per token, in random order (a router's top-k)."""
    return torch.rand(T, E).topk(K, dim=1).indices.to(dtype)


def test_poison_is_on():
    """The comparisons below catch unwritten elements only because outputs start poisoned."""
    assert _dispatch.POISON, "tests/conftest.py sets FLOPWISE_POISON=1"
    assert _dispatch.use_triton(torch.zeros(1), op="plan_from_topk"), "the kernel path runs under the interpreter"


# (T, E, K, block_m): T=1, T=1000, E=1/3/64/128, K=1, K=E; block_m 1, 16, 64
SHAPES = [
    pytest.param(1, 1, 1, 64, id="T1-E1-K1"),
    pytest.param(37, 3, 3, 16, id="T37-E3-K=E"),
    pytest.param(1000, 3, 1, 64, id="T1000-E3-K1"),  # 8 tiles: scan carries across tiles
    pytest.param(100, 64, 2, 16, id="T100-E64-K2"),  # (K=8 at E=64: one 1024-pair sort, 3 s a call)
    pytest.param(20, 128, 2, 1, id="T20-E128-K2-bm1"),
    pytest.param(150, 128, 1, 16, id="T150-E128-K1"),  # 3 tiles of 64 tokens (wide E)
]


@pytest.mark.parametrize("T,E,K,block_m", SHAPES)
def test_matches_reference_and_topk_route(T, E, K, block_m):
    """Fed topk_route's own choice, the plan is topk_route's plan, field for field."""
    logits = torch.randn(T, E)
    route = topk_route(logits, K, renormalize=True, block_m=block_m)
    ids = route.topk_ids.long()  # as a Hugging Face router returns them
    plan = plan_from_topk(ids, route.topk_weights, E, block_m=block_m)
    ref = plan_from_topk_reference(ids, route.topk_weights, E, block_m=block_m)
    assert_plans_identical(plan, ref)
    assert_plans_identical(plan, route)
    assert_plan_valid(plan)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_id_and_weight_dtypes(idtype, wdtype):
    T, E, K = 20, 6, 2
    ids = distinct_ids(T, E, K, idtype)
    w = torch.rand(T, K).to(wdtype)
    plan = plan_from_topk(ids, w, E, block_m=16)
    ref = plan_from_topk_reference(ids, w, E, block_m=16)
    assert_plans_identical(plan, ref)
    assert_plan_valid(plan)
    want = torch.float64 if wdtype == torch.float64 else torch.float32
    assert plan.weights.dtype == want and plan.topk_weights.dtype == want
    assert torch.equal(plan.topk_weights, w.to(want)) and torch.equal(plan.topk_ids, ids.to(torch.int32))


def test_non_contiguous_inputs():
    T, E, K = 30, 7, 3
    ids = distinct_ids(T, E, K).t().contiguous().t()  # [T, K] with strides (1, T)
    w = torch.rand(K, T).t()
    assert not ids.is_contiguous() and not w.is_contiguous()
    plan = plan_from_topk(ids, w, E, block_m=16)
    assert_plans_identical(plan, plan_from_topk_reference(ids.contiguous(), w.contiguous(), E, block_m=16))
    assert_plan_valid(plan)


@pytest.mark.parametrize("block_m", [1, 64])
def test_all_tokens_to_one_expert_others_empty(block_m):
    T, E = 70, 8
    ids = torch.full((T, 1), 3)
    w = torch.rand(T, 1)
    plan = plan_from_topk(ids, w, E, block_m=block_m)
    assert_plans_identical(plan, plan_from_topk_reference(ids, w, E, block_m=block_m))
    assert_plan_valid(plan)
    assert plan.expert_counts.tolist() == [0, 0, 0, T, 0, 0, 0, 0]
    assert plan.token_idx.tolist() == list(range(T))
    assert plan.padded_offsets[-1] == (T + block_m - 1) // block_m * block_m
    # two experts in every row, the others empty; the same with the slots swapped on odd tokens
    ids2 = torch.tensor([[3, 6], [6, 3]]).repeat(T // 2, 1)
    w2 = torch.rand(T, 2)
    plan2 = plan_from_topk(ids2, w2, E, block_m=block_m)
    assert_plans_identical(plan2, plan_from_topk_reference(ids2, w2, E, block_m=block_m))
    assert_plan_valid(plan2)
    assert plan2.expert_counts.tolist() == [0, 0, 0, T, 0, 0, T, 0]


def test_duplicate_ids_within_a_row_give_one_row_per_slot():
    """Allowed: a token choosing expert e twice gets two rows of e, in slot order."""
    T, E, K = 30, 4, 3
    ids = torch.randint(0, E, (T, K))
    ids[5] = torch.tensor([2, 2, 2])
    ids[6] = torch.tensor([1, 0, 1])
    w = torch.rand(T, K)
    plan = plan_from_topk(ids, w, E, block_m=16)
    assert_plans_identical(plan, plan_from_topk_reference(ids, w, E, block_m=16))
    assert_plan_valid(plan, distinct=False)
    assert plan.expert_counts.sum() == T * K
    rows = (plan.token_idx == 5).nonzero().flatten()
    assert plan.pair_idx[rows].tolist() == [15, 16, 17]
    assert (plan.topk_ids.reshape(-1)[plan.pair_idx[rows].long()] == 2).all()
    assert torch.equal(plan.weights[rows], w[5])
    rows6 = (plan.token_idx == 6).nonzero().flatten()
    assert plan.pair_idx[rows6].tolist() == [19, 18, 20]  # expert 0 (slot 1), then expert 1 (slots 0, 2)


def test_nan_and_inf_weights_pass_through():
    T, E, K = 9, 4, 2
    ids = distinct_ids(T, E, K)
    w = torch.rand(T, K)
    w[2, 1], w[4, 0] = float("nan"), float("inf")
    plan = plan_from_topk(ids, w, E, block_m=16)
    ref = plan_from_topk_reference(ids, w, E, block_m=16)
    assert_plans_identical(plan, ref, equal_nan=True)
    assert torch.isnan(plan.weights[plan.inverse[5]]) and torch.isinf(plan.weights[plan.inverse[8]])
    assert torch.isfinite(plan.weights).sum() == T * K - 2


# ------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gradients_match_reference(wdtype):
    """Through plan.weights, through plan.topk_weights, and through both; ids get none."""
    T, E, K = 45, 12, 2
    ids = distinct_ids(T, E, K)
    w0 = torch.rand(T, K).to(wdtype)
    g_sorted, g_topk = torch.randn(T * K), torch.randn(T, K)

    def grads(fn):
        w = w0.clone().requires_grad_(True)
        p = fn(ids, w, E, block_m=16)
        assert p.weights.requires_grad and p.topk_weights.requires_grad
        assert not p.topk_ids.requires_grad and not p.token_idx.requires_grad
        ls, lt = (p.weights * g_sorted).sum(), (p.topk_weights * g_topk).sum()
        out = [torch.autograd.grad(loss, w, retain_graph=True)[0] for loss in (ls, lt, ls + lt)]
        return out, p

    (k_s, k_t, k_b), plan = grads(plan_from_topk)
    (r_s, r_t, r_b), _ = grads(plan_from_topk_reference)
    for a, b in ((k_s, r_s), (k_t, r_t), (k_b, r_b)):
        assert a.dtype == wdtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # and the formula: each pair's gradient is its sorted row's (through inverse)
    torch.testing.assert_close(k_s, g_sorted[plan.inverse.long()].view(T, K).to(wdtype), atol=0, rtol=0)
    torch.testing.assert_close(k_t, g_topk.to(wdtype), atol=0, rtol=0)


def test_gradient_with_duplicate_ids():
    T, E, K = 10, 3, 3
    ids = torch.tensor([[0, 0, 2]] * T)
    w = torch.rand(T, K, requires_grad=True)
    g = torch.randn(T * K)
    plan = plan_from_topk(ids, w, E, block_m=16)
    (gk,) = torch.autograd.grad((plan.weights * g).sum(), w)
    w2 = w.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad((plan_from_topk_reference(ids, w2, E, block_m=16).weights * g).sum(), w2)
    torch.testing.assert_close(gk, gr, atol=0, rtol=0)


def test_float64_weights_gradcheck():
    """float64 runs the reference (as topk_route does), differentiable to any order."""
    ids = distinct_ids(6, 5, 2)
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)

    def f(x):
        p = plan_from_topk(ids, x, 5, block_m=4)
        return p.weights, p.topk_weights

    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))


# ------------------------------------------------------------------------------ ids out of range
I32_MIN, I32_MAX = -2**31, 2**31 - 1
# (dtype, bad id): below 0 and at/above E in either width; the int64 ids 2**32 and -2**63 would
# pass a check made after a cast to int32 (their low words are 0)
BAD_IDS = [
    pytest.param(torch.int64, -1, id="i64-neg"),
    pytest.param(torch.int64, 5, id="i64-E"),
    pytest.param(torch.int64, 2**40, id="i64-2^40"),
    pytest.param(torch.int64, 2**32, id="i64-2^32"),
    pytest.param(torch.int64, -2**63, id="i64-min"),
    pytest.param(torch.int32, -1, id="i32-neg"),
    pytest.param(torch.int32, 5, id="i32-E"),
    pytest.param(torch.int32, I32_MAX, id="i32-max"),
    pytest.param(torch.int32, I32_MIN, id="i32-min"),
]


@pytest.mark.parametrize("idtype,bad", BAD_IDS)
@pytest.mark.parametrize("fn", [plan_from_topk, plan_from_topk_reference], ids=["kernel", "reference"])
def test_out_of_range_ids_fail_the_device_assertion(fn, idtype, bad):
    ids = distinct_ids(4, 5, 2, idtype)
    ids[2, 1] = bad
    with pytest.raises(RuntimeError, match=r"topk_ids must lie in \[0, num_experts = 5\)"):
        fn(ids, torch.rand(4, 2), 5)


def launch_counted(ids, w, E, block_m, pack=False):
    """The kernel path's plan (as a RoutingPlan), its in-range flag and the per-tile counts of
    ids out of range the kernels wrote (the flag's buffer holds them just before it)."""
    T, K = ids.shape
    *out, ok = R._plan_from_topk_launch(ids, w, E, block_m, pack)
    sw, ids32, tok, pair, inv, counts, offsets, padded, bexp, brow = out
    n_tiles = -(-T // R._tile_tokens(E, K))
    assert ok.shape == (1,) and ok.dtype == torch.int32
    per_tile = ok.as_strided((n_tiles,), (1,), ok.storage_offset() - n_tiles)
    plan = R.RoutingPlan(
        token_idx=tok, weights=sw, expert_counts=counts, expert_offsets=offsets, padded_offsets=padded,
        block_expert=bexp, block_row=brow, num_tokens=T, num_experts=E, block_m=block_m, top_k=K,
        topk_ids=ids32, topk_weights=w, pair_idx=pair, inverse=inv)
    return plan, int(ok), per_tile.tolist()


def test_kernel_clamps_out_of_range_ids():
    """Past the (on CUDA asynchronous) assertion, the kernels never go out of bounds: they
    clamp ids into [0, E), as the reference does, and every output is written."""
    T, E, K = 20, 5, 2
    ids = distinct_ids(T, E, K)
    ids[3, 0], ids[7, 1], ids[11, 0] = -7, E, 2**40
    w = torch.rand(T, K)
    got, ok, per_tile = launch_counted(ids, w, E, 16)
    assert ok == 0 and per_tile == [3]
    assert_plans_identical(got, R._plan_from_topk_reference(ids, w, E, 16))
    assert got.topk_ids[3, 0] == 0 and got.topk_ids[7, 1] == E - 1 and got.topk_ids[11, 0] == E - 1
    assert_plan_valid(got, distinct=False)


# T=150 tokens at E=128 (K=1): tiles of 64 tokens, so three, the last one partial (22 tokens)
MT, ME = 150, 128


@pytest.mark.parametrize("idtype,bad,token", [
    pytest.param(torch.int32, -1, 100, id="i32-neg-middle"),
    pytest.param(torch.int32, ME, MT - 1, id="i32-E-last"),
    pytest.param(torch.int64, ME, 100, id="i64-E-middle"),
    pytest.param(torch.int64, -1, MT - 1, id="i64-neg-last"),
    pytest.param(torch.int64, 2**32, 130, id="i64-2^32-last"),
])
def test_kernels_count_out_of_range_ids_per_tile(idtype, bad, token):
    """The kernel path counts ids out of range in its own kernels (the histogram, per tile;
    the scan, into one flag), in a middle tile as in the last, partial one; the public
    function raises on that flag, and the plan is the reference's of the clamped ids."""
    T, E = MT, ME
    assert R._tile_tokens(E, 1) == 64
    ids = torch.randint(0, E, (T, 1), dtype=idtype)
    ids[token, 0] = bad
    w = torch.rand(T, 1)
    got, ok, per_tile = launch_counted(ids, w, E, 16, pack=True)
    want = [0, 0, 0]
    want[token // 64] = 1
    assert ok == 0 and per_tile == want
    assert_plans_identical(got, R._plan_from_topk_reference(ids, w, E, 16))
    with pytest.raises(RuntimeError, match=rf"topk_ids must lie in \[0, num_experts = {E}\)"):
        plan_from_topk(ids, w, E, block_m=16)


@pytest.mark.parametrize("T,E,K,idtype", [
    pytest.param(MT, ME, 1, torch.int32, id="3tiles-i32"),
    pytest.param(MT, ME, 1, torch.int64, id="3tiles-i64"),
    pytest.param(5, 1, 1, torch.int64, id="E1"),  # every id is 0 = E - 1
    pytest.param(30, 2, 2, torch.int32, id="K=E"),
])
def test_valid_ids_never_trip_the_count(T, E, K, idtype):
    """Ids 0 and E - 1 in every tile (the first and last rows of each) count as in range."""
    ids = torch.randint(0, E, (T, K), dtype=idtype)
    tile = R._tile_tokens(E, K)
    for t0 in range(0, T, tile):
        ids[t0, 0], ids[min(t0 + tile, T) - 1, K - 1] = 0, E - 1
    w = torch.rand(T, K)
    got, ok, per_tile = launch_counted(ids, w, E, 16)
    assert ok == 1 and per_tile == [0] * (-(-T // tile))
    assert_plans_identical(got, R._plan_from_topk_reference(ids, w, E, 16))
    assert_plans_identical(plan_from_topk(ids, w, E, block_m=16), plan_from_topk_reference(ids, w, E, block_m=16))


def test_kernel_path_checks_ids_without_torch_ops(monkeypatch):
    """On the kernel path no torch op reads the ids (the kernels count the ones out of range)
    and one ``_assert_async`` reports the kernels' flag: the host cost of a per-layer call.
    The reference path's torch check does read them (so this would see it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self, ids):
            super().__init__()
            self.ids, self.on_ids, self.asserts = ids, [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [*args, *(kwargs or {}).values()]
            if any(a is self.ids for a in flat):
                self.on_ids.append(str(func))
            if func.overloadpacket is torch.ops.aten._assert_async:
                self.asserts += 1
                return None  # (the launches below do not run: the flag is not written)
            return func(*args, **(kwargs or {}))

    ids, w = distinct_ids(12, 6, 2), torch.rand(12, 2)
    monkeypatch.setattr(R, "launch", lambda *a, **k: None)
    with Ops(ids) as kernel:
        plan_from_topk(ids, w, 6, block_m=16)
    with Ops(ids) as ref:
        plan_from_topk_reference(ids, w, 6, block_m=16)
    assert kernel.on_ids == [] and kernel.asserts == 1
    assert ref.on_ids and ref.asserts == 1


def test_meta_tensors_give_shapes():
    """Inputs on the meta device (a model built there) take the custom op's fake: shapes, no check."""
    plan = plan_from_topk(torch.empty(7, 2, dtype=torch.int64, device="meta"), torch.empty(7, 2, device="meta"), 5,
                          block_m=4)
    assert plan.token_idx.shape == (14,) and plan.expert_counts.shape == (5,) and plan.token_idx.is_meta


# ------------------------------------------------------------------------------ errors
IDS, W = torch.zeros(4, 2, dtype=torch.int64), torch.rand(4, 2)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: plan_from_topk([[0, 1]], W[:1], 3), TypeError, "topk_ids must be a torch.Tensor"),
    (lambda: plan_from_topk(IDS, 0.5, 3), TypeError, "topk_weights must be a torch.Tensor"),
    (lambda: plan_from_topk(IDS.float(), W, 3), TypeError, "topk_ids must be an int32 or int64"),
    (lambda: plan_from_topk(IDS.bool(), W, 3), TypeError, "topk_ids must be an int32 or int64"),
    (lambda: plan_from_topk(IDS.to(torch.int16), W, 3), TypeError, "topk_ids must be an int32 or int64"),
    (lambda: plan_from_topk(IDS, W.long(), 3), TypeError, "topk_weights must be a floating-point"),
    (lambda: plan_from_topk(IDS.reshape(-1), W.reshape(-1), 3), ValueError, r"topk_ids must have shape \[T, K\]"),
    (lambda: plan_from_topk(IDS, W[None], 3), ValueError, r"topk_weights must have shape \[T, K\]"),
    (lambda: plan_from_topk(IDS, W[:3], 3), ValueError, "same shape"),
    (lambda: plan_from_topk(IDS, W.to("meta"), 3), ValueError, "one device"),
    (lambda: plan_from_topk(IDS, W, 0), ValueError, "num_experts must be in"),
    (lambda: plan_from_topk(IDS, W, 3.0), TypeError, "num_experts must be an int"),
    (lambda: plan_from_topk(IDS, W, True), TypeError, "num_experts must be an int"),
    (lambda: plan_from_topk(IDS, W, 1), ValueError, r"K = 2 .* \[1, num_experts = 1\]"),
    (lambda: plan_from_topk(IDS[:, :0], W[:, :0], 3), ValueError, "K = 0"),
    (lambda: plan_from_topk(IDS[:0], W[:0], 3), ValueError, "T = 0"),
    (lambda: plan_from_topk(IDS, W, 3, block_m=48), ValueError, "block_m must be a power of two"),
    (lambda: plan_from_topk_reference(IDS, W, 1), ValueError, "K = 2"),
    (lambda: plan_from_topk_reference(IDS[:0], W[:0], 3), ValueError, "T = 0"),
])
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    ids = distinct_ids(3, 4, 2)
    w = torch.rand(3, 2)
    assert_plans_identical(plan_from_topk(ids, w, np.int64(4), block_m=np.int32(16)),
                           plan_from_topk_reference(ids, w, 4, block_m=16))


# ------------------------------------------------------------------------------ dispatch / tracing
def test_kernel_path_has_no_torch_sort_or_bincount(monkeypatch):
    ids, w = distinct_ids(12, 6, 2), torch.rand(12, 2)
    ref = plan_from_topk_reference(ids, w, 6, block_m=16)

    def banned(*a, **k):
        raise AssertionError("the kernel path must not sort or count with torch ops")

    for name in ("sort", "argsort", "bincount", "searchsorted", "unique"):
        monkeypatch.setattr(torch, name, banned)
    plan = plan_from_topk(ids, w, 6, block_m=16)
    monkeypatch.undo()
    assert_plans_identical(plan, ref)


def test_forced_reference_and_no_interpreter_take_the_reference(monkeypatch):
    ids, w = distinct_ids(10, 4, 2), torch.rand(10, 2)
    ref = plan_from_topk_reference(ids, w, 4)

    def no_kernels(*a, **k):
        raise AssertionError("the reference path launched a kernel")

    monkeypatch.setattr(R, "launch", no_kernels)
    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
    assert_plans_identical(plan_from_topk(ids, w, 4), ref)
    monkeypatch.setenv("FLOPWISE_BACKEND", "auto")
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    assert_plans_identical(plan_from_topk(ids, w, 4), ref)
    monkeypatch.setenv("FLOPWISE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="FLOPWISE_BACKEND=triton"):
        plan_from_topk(ids, w, 4)


def test_forced_triton_backend_refuses_float64(monkeypatch):
    monkeypatch.setenv("FLOPWISE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="no Triton kernel for torch.float64"):
        plan_from_topk(distinct_ids(3, 4, 2), torch.rand(3, 2, dtype=torch.float64), 4)


def test_custom_op_passes_opcheck():
    ids, w = distinct_ids(3, 2, 1), torch.rand(3, 1, requires_grad=True)
    torch.library.opcheck(R._plan_from_topk_op, (ids, w, 2, 4))


def test_compiles_without_graph_breaks():
    """The custom op under torch.compile (fullgraph); its implementation checks the ids."""
    torch._dynamo.reset()
    ids = distinct_ids(6, 3, 2)

    def f(ids, w):
        plan = plan_from_topk(ids, w, 3, block_m=4)
        return (plan.weights * torch.arange(12.0)).sum() + plan.expert_counts.sum()

    w = torch.rand(6, 2, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(ids, w)
    out.backward()
    w2 = w.detach().clone().requires_grad_(True)
    expected = f(ids, w2)
    expected.backward()
    torch.testing.assert_close(out.detach(), expected.detach())
    torch.testing.assert_close(w.grad, w2.grad)
    bad = ids.clone()
    bad[4, 1] = 3
    with pytest.raises(RuntimeError, match=r"topk_ids must lie in \[0, num_experts = 3\)"):
        compiled(bad, w)


# ------------------------------------------------------------------------------ the checks can fail
def test_comparison_catches_an_unwritten_or_wrong_element():
    """Each field's check fails on one poisoned element (what new_output leaves where a kernel
    did not write) and the invariants fail on a swapped pair of rows."""
    ids, w = distinct_ids(9, 4, 2), torch.rand(9, 2)
    plan = plan_from_topk(ids, w, 4, block_m=2)
    for f in INT_FIELDS + FLOAT_FIELDS:
        t = getattr(plan, f).detach().clone()
        t.view(-1)[-1] = float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min
        with pytest.raises(AssertionError):
            assert_plans_identical(dataclasses.replace(plan, **{f: t}), plan)
    pair = plan.pair_idx.clone()
    lo = int(plan.expert_offsets[1])  # first row of expert 1: swap it with the last of expert 0
    pair[lo - 1], pair[lo] = plan.pair_idx[lo], plan.pair_idx[lo - 1]
    with pytest.raises(AssertionError):
        assert_plan_valid(dataclasses.replace(plan, pair_idx=pair))


# ------------------------------------------------------------------------------ GPU (scripts/gpu_check.sh)
@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K", [(16384, 64, 8), (16384, 128, 2), (1000, 60, 6), (4096, 1, 1)])
def test_gpu_plan_from_topk(T, E, K):
    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    route = topk_route(logits, K, renormalize=True)
    plan = plan_from_topk(route.topk_ids.long(), route.topk_weights, E)
    assert_plans_identical(plan, route)
    w = route.topk_weights.to(torch.bfloat16)
    assert_plans_identical(plan_from_topk(route.topk_ids, w, E), plan_from_topk_reference(route.topk_ids, w, E))
    x = route.topk_weights.clone().requires_grad_(True)
    g = torch.randn(T * K, device="cuda")
    (gk,) = torch.autograd.grad((plan_from_topk(route.topk_ids, x, E).weights * g).sum(), x)
    torch.testing.assert_close(gk, g[plan.inverse.long()].view(T, K), atol=0, rtol=0)
