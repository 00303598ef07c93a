"""Routing kernels against their references, routing invariants, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch

from flopwise.kernels import routing as R
from flopwise.kernels import (
    expert_choice_route,
    expert_choice_route_reference,
    mod_select,
    mod_select_reference,
    topk_route,
    topk_route_reference,
    topk_rows,
    topk_rows_reference,
)

INT_FIELDS = ["token_idx", "expert_counts", "expert_offsets", "padded_offsets", "block_expert", "block_row",
              "topk_ids", "pair_idx", "inverse"]


def assert_block_map_valid(plan: R.RoutingPlan):
    """The block map: every row covered exactly once, blocks never cross experts, unused
    entries -1."""
    N, BM = plan.num_rows, plan.block_m
    counts, offsets = plan.expert_counts.long(), plan.expert_offsets.long()
    padded = plan.padded_offsets.long()
    assert torch.equal(padded[1:] - padded[:-1], (counts + BM - 1) // BM * BM)
    covered = torch.zeros(N, dtype=torch.long)
    be, br = plan.block_expert.long(), plan.block_row.long()
    n_used = int(padded[-1]) // BM
    assert (be[:n_used] >= 0).all() and (be[n_used:] == -1).all() and (br[n_used:] == -1).all()
    for b in range(n_used):
        e = int(be[b])
        lo, hi = int(br[b]), min(int(br[b]) + BM, int(offsets[e + 1]))
        assert offsets[e] <= lo < hi <= offsets[e + 1]
        covered[lo:hi] += 1
    assert (covered == 1).all(), "block map covers each row once"


def assert_plan_valid(plan: R.RoutingPlan):
    """Invariants every plan satisfies, whatever the logits."""
    E, N, BM = plan.num_experts, plan.num_rows, plan.block_m
    counts = plan.expert_counts.long()
    offsets = plan.expert_offsets.long()
    assert counts.shape == (E,) and (counts >= 0).all()
    assert offsets[0] == 0 and torch.equal(offsets[1:], counts.cumsum(0)), "offsets are the cumulative counts"
    assert offsets[-1] == N
    tok = plan.token_idx.long()
    assert ((tok >= 0) & (tok < plan.num_tokens)).all(), "token indices in range"
    # rows of one expert read distinct tokens, in increasing order
    for e in range(E):
        seg = tok[offsets[e]:offsets[e + 1]]
        assert (seg[1:] > seg[:-1]).all(), f"expert {e}: tokens not strictly increasing"
    if plan.pair_idx is not None:
        K = plan.top_k
        pair = plan.pair_idx.long()
        assert torch.equal(torch.sort(pair).values, torch.arange(N)), "pair_idx is a bijection"
        assert torch.equal(plan.inverse.long()[pair], torch.arange(N)), "inverse undoes pair_idx"
        assert torch.equal(pair // K, tok)
        assert torch.equal(plan.topk_ids.reshape(-1).long()[pair],
                           torch.repeat_interleave(torch.arange(E), counts)), "rows sorted by expert"
        assert torch.equal(plan.weights, plan.topk_weights.reshape(-1)[pair]) or torch.isnan(plan.weights).any()
    assert_block_map_valid(plan)


def assert_plans_equal(p: R.RoutingPlan, r: R.RoutingPlan, atol=1e-6):
    for f in INT_FIELDS:
        a, b = getattr(p, f), getattr(r, f)
        if a is None and b is None:
            continue
        assert a.dtype == torch.int32 and b.dtype == torch.int32, f
        assert torch.equal(a, b), f"{f} differs:\n{a}\n{b}"
    torch.testing.assert_close(p.weights, r.weights, atol=atol, rtol=1e-5, equal_nan=True)
    if r.topk_weights is not None:
        torch.testing.assert_close(p.topk_weights, r.topk_weights, atol=atol, rtol=1e-5, equal_nan=True)


# ------------------------------------------------------------------------------ token choice
TC_SHAPES = [
    pytest.param(1, 1, 1, id="T1-E1-k1"),
    pytest.param(1, 8, 2, id="T1-E8-k2"),
    pytest.param(63, 8, 2, id="T63-E8-k2"),
    pytest.param(100, 64, 8, id="T100-E64-k8"),
    pytest.param(37, 5, 5, id="T37-E5-k=E"),
    pytest.param(130, 128, 8, id="T130-E128-k8"),
    pytest.param(50, 6, 3, id="T50-E6-k3"),
    pytest.param(700, 16, 4, id="T700-E16-k4"),  # 6 tiles: the block map split over 6 programs
]


@pytest.mark.parametrize("T,E,k", TC_SHAPES)
@pytest.mark.parametrize("score,renorm", [("softmax", False), ("softmax", True), ("sigmoid", True)])
def test_topk_route_matches_reference(T, E, k, score, renorm):
    logits = torch.randn(T, E)
    plan = topk_route(logits, k, score=score, renormalize=renorm, block_m=16)
    ref = topk_route_reference(logits, k, score=score, renormalize=renorm, block_m=16)
    assert_plans_equal(plan, ref)
    assert_plan_valid(plan)


@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_all_tokens_to_one_expert_leaves_others_empty(block_m):
    logits = torch.randn(70, 8)
    logits[:, 3] += 100.0
    logits[:, 6] += 50.0
    plan = topk_route(logits, 2, block_m=block_m)
    assert_plans_equal(plan, topk_route_reference(logits, 2, block_m=block_m))
    assert_plan_valid(plan)
    counts = plan.expert_counts.tolist()
    assert counts[3] == 70 and counts[6] == 70 and sum(counts) == 140
    assert plan.padded_offsets[-1] == 2 * ((70 + block_m - 1) // block_m) * block_m


def test_ties_go_to_lower_expert():
    logits = torch.zeros(9, 6)  # every expert ties
    logits[4, 5] = 1.0
    plan = topk_route(logits, 3)
    assert_plans_equal(plan, topk_route_reference(logits, 3))
    assert plan.topk_ids[0].tolist() == [0, 1, 2]
    assert plan.topk_ids[4].tolist() == [5, 0, 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_route_half_precision_logits(dtype):
    logits = torch.randn(90, 16).to(dtype)
    plan = topk_route(logits, 4, renormalize=True)
    ref = topk_route_reference(logits, 4, renormalize=True)
    assert plan.weights.dtype == torch.float32
    assert_plans_equal(plan, ref)  # ranking by the logits themselves: exact in every dtype


def test_nan_and_inf_logits_give_a_valid_plan_with_nan_weights():
    logits = torch.randn(12, 8)
    logits[2, 5] = float("nan")
    logits[5, 1] = float("inf")
    logits[7] = float("-inf")
    logits[9, :6] = float("-inf")
    plan = topk_route(logits, 3, renormalize=True)
    ref = topk_route_reference(logits, 3, renormalize=True)
    assert_plans_equal(plan, ref)
    assert_plan_valid(plan)
    w = plan.topk_weights
    assert torch.isnan(w[2]).all() and torch.isnan(w[5]).all() and torch.isnan(w[7]).all()
    assert torch.isfinite(w[[0, 1, 3, 4, 6, 8, 9, 10, 11]]).all()
    assert 5 not in plan.topk_ids[2].tolist(), "NaN ranks lowest"
    assert plan.topk_ids[5, 0] == 1, "+inf ranks highest"
    assert plan.topk_ids[7].tolist() == [0, 1, 2], "-inf ties go to the lower index"
    assert sorted(plan.topk_ids[9, :2].tolist()) == [6, 7] and plan.topk_ids[9, 2] == 0


@pytest.mark.parametrize("score,renorm", [("softmax", False), ("softmax", True), ("sigmoid", False), ("sigmoid", True)])
def test_topk_route_reference_gradcheck(score, renorm):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def f(x):
        p = topk_route_reference(x, 2, score=score, renormalize=renorm)
        return p.weights, p.topk_weights

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("score,renorm", [("softmax", False), ("softmax", True), ("sigmoid", False), ("sigmoid", True)])
@pytest.mark.parametrize("which", ["sorted", "topk", "both"])
def test_topk_route_kernel_gradients(score, renorm, which):
    logits = torch.randn(45, 12)
    g_sorted = torch.randn(45 * 3)
    g_topk = torch.randn(45, 3)

    def grads(fn):
        x = logits.clone().requires_grad_(True)
        p = fn(x, 3, score=score, renormalize=renorm)
        loss = 0
        if which in ("sorted", "both"):
            loss = loss + (p.weights * g_sorted).sum()
        if which in ("topk", "both"):
            loss = loss + (p.topk_weights * g_topk).sum()
        loss.backward()
        return x.grad

    torch.testing.assert_close(grads(topk_route), grads(topk_route_reference), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ selection bias
@pytest.mark.parametrize("T,E,k", [pytest.param(1, 1, 1, id="T1-E1"), pytest.param(63, 8, 2, id="T63-E8"),
                                   pytest.param(100, 64, 8, id="T100-E64"), pytest.param(37, 5, 5, id="k=E")])
@pytest.mark.parametrize("score,renorm", [("softmax", False), ("softmax", True), ("sigmoid", True)])
def test_topk_route_with_bias_matches_reference(T, E, k, score, renorm):
    logits = torch.randn(T, E)
    bias = 0.3 * torch.randn(E)
    plan = topk_route(logits, k, score=score, renormalize=renorm, block_m=16, bias=bias)
    ref = topk_route_reference(logits, k, score=score, renormalize=renorm, block_m=16, bias=bias)
    assert_plans_equal(plan, ref)
    assert_plan_valid(plan)
    # the bias chooses; the weights are the unbiased scores of the chosen experts
    p = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    w = p.gather(1, plan.topk_ids.long())
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(plan.topk_weights, w)
    expect = torch.sort(p + bias, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(plan.topk_ids.long(), expect)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_overrides_the_logits_order(score):
    """A bias larger than any score difference decides alone: every token picks the k most
    favoured experts, whatever its logits; a zero bias picks as without one."""
    logits = torch.randn(70, 8)
    bias = torch.zeros(8)
    bias[[6, 2]] = torch.tensor([2.0, 3.0])
    plan = topk_route(logits, 2, score=score, bias=bias, block_m=16)
    assert (plan.topk_ids == torch.tensor([2, 6], dtype=torch.int32)).all()
    assert plan.expert_counts.tolist() == [0, 0, 70, 0, 0, 0, 70, 0]
    assert_plan_valid(plan)
    zero = topk_route(logits, 2, score=score, bias=torch.zeros(8), block_m=16)
    assert torch.equal(zero.topk_ids, topk_route(logits, 2, score=score, block_m=16).topk_ids)


def test_bias_ties_and_nan():
    logits = torch.zeros(5, 6)  # every score ties
    bias = torch.tensor([0.0, 0.0, float("nan"), 0.5, 0.5, 0.0])
    plan = topk_route(logits, 4, bias=bias)
    assert_plans_equal(plan, topk_route_reference(logits, 4, bias=bias))
    assert plan.topk_ids[0].tolist() == [3, 4, 0, 1], "ties to the lower id, NaN last"


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float64])
def test_bias_in_other_dtypes_ranks_in_float32(bias_dtype):
    logits = torch.randn(40, 16, dtype=torch.bfloat16)
    bias = (0.1 * torch.randn(16)).to(bias_dtype)
    plan = topk_route(logits, 4, bias=bias, renormalize=True)
    assert_plans_equal(plan, topk_route_reference(logits, 4, bias=bias, renormalize=True))


@pytest.mark.parametrize("score,renorm", [("softmax", True), ("sigmoid", False)])
def test_bias_gradients_reach_the_logits_only(score, renorm):
    logits = torch.randn(45, 12)
    bias = (0.2 * torch.randn(12)).requires_grad_(True)
    g_sorted, g_topk = torch.randn(45 * 3), torch.randn(45, 3)

    def grads(fn):
        x = logits.clone().requires_grad_(True)
        p = fn(x, 3, score=score, renormalize=renorm, bias=bias)
        ((p.weights * g_sorted).sum() + (p.topk_weights * g_topk).sum()).backward()
        return x.grad

    torch.testing.assert_close(grads(topk_route), grads(topk_route_reference), atol=1e-6, rtol=1e-5)
    assert bias.grad is None
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b64 = 0.3 * torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: topk_route_reference(x, 2, score=score, renormalize=renorm,
                                                                   bias=b64).weights, (x,))


def test_bias_compiles_without_graph_breaks():
    torch._dynamo.reset()

    def route(logits, bias):
        plan = topk_route(logits, 2, renormalize=True, bias=bias)
        return plan.weights.sum() + plan.expert_counts.float() @ bias

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    logits, bias = torch.randn(16, 4, requires_grad=True), torch.tensor([0.0, 1.0, 0.0, -1.0])
    out = compiled(logits, bias)
    out.backward()
    torch.testing.assert_close(out.detach(), route(logits.detach(), bias))
    assert logits.grad is not None


@pytest.mark.parametrize("bias,exc,match", [
    ([0.0, 0.0, 0.0], TypeError, "bias must be a torch.Tensor or None"),
    (torch.zeros(4), ValueError, r"bias must have shape \[E\] = \[3\]"),
    (torch.zeros(1, 3), ValueError, r"bias must have shape \[E\]"),
    (torch.zeros(3, dtype=torch.int64), TypeError, "bias must be a floating-point tensor"),
    (torch.zeros(3, device="meta"), ValueError, "bias must be on logits' device"),
])
def test_bad_bias_raises_clear_error(bias, exc, match):
    with pytest.raises(exc, match=match):
        topk_route(torch.randn(4, 3), 2, bias=bias)
    with pytest.raises(exc, match=match):
        topk_route_reference(torch.randn(4, 3), 2, bias=bias)


# ------------------------------------------------------------------------------ group-limited
def _group_limited_by_hand(logits, k, score, bias, n_group, topk_group, group_score):
    """Each token on its own, in Python: the groups' scores, the kept groups, then the k best
    kept experts (by logit without a bias, by score + bias with one)."""
    p = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    s = p if bias is None else p + bias
    rank = logits if bias is None else s
    E = logits.shape[1]
    size = E // n_group
    ids = []
    for t in range(logits.shape[0]):
        gs = []
        for g in range(n_group):
            members = sorted(s[t, g * size:(g + 1) * size].tolist(), reverse=True)
            gs.append(members[0] if group_score == "max" else members[0] + members[1])
        kept = sorted(range(n_group), key=lambda g: (-gs[g], g))[:topk_group]
        cand = [e for e in range(E) if e // size in kept]
        ids.append(sorted(cand, key=lambda e: (-float(rank[t, e]), e))[:k])
    return torch.tensor(ids)


GROUP_CASES = [
    pytest.param(1, 4, 1, 2, 1, "top2", id="T1-E4-G2"),
    pytest.param(63, 16, 3, 4, 2, "top2", id="T63-E16-G4"),
    pytest.param(100, 64, 8, 8, 3, "top2", id="T100-E64-G8"),
    pytest.param(37, 20, 8, 5, 2, "top2", id="E20-k=kept"),  # E not a power of two; k = all kept experts
    pytest.param(50, 12, 3, 12, 3, "max", id="E12-G12-max"),  # groups of one expert
    pytest.param(300, 24, 4, 6, 2, "max", id="T300-E24-max"),  # several tiles
]


@pytest.mark.parametrize("T,E,k,G,TG,gscore", GROUP_CASES)
@pytest.mark.parametrize("score,with_bias", [("softmax", False), ("sigmoid", True)])
def test_group_limited_matches_reference_and_definition(T, E, k, G, TG, gscore, score, with_bias):
    torch.manual_seed(T + E)
    logits = torch.randn(T, E)
    bias = 0.1 * torch.randn(E) if with_bias else None
    kw = dict(score=score, renormalize=True, block_m=16, bias=bias, n_group=G, topk_group=TG, group_score=gscore)
    plan = topk_route(logits, k, **kw)
    assert_plans_equal(plan, topk_route_reference(logits, k, **kw))
    assert_plan_valid(plan)
    expect = _group_limited_by_hand(logits, k, score, bias, G, TG, gscore)
    assert torch.equal(plan.topk_ids.long(), expect)
    free = topk_route_reference(logits, k, score=score, bias=bias, block_m=16)
    if E == G:  # groups of one scored by their best: keeping the k best groups is plain top k
        assert torch.equal(free.topk_ids, plan.topk_ids)
    elif T > 1:  # the limit binds: without it some tokens pick experts outside their kept groups
        assert not torch.equal(free.topk_ids, plan.topk_ids)


def test_group_limited_is_deepseek_v3s_gate():
    """DeepSeek-V3's gate (sigmoid, bias, 8 groups scored by their top two, 4 kept, k = 8 of
    256, renormalised), written as its reference implementation computes it."""
    torch.manual_seed(0)
    T, E, G, TG, k = 40, 256, 8, 4, 8
    logits, bias = torch.randn(T, E), 0.05 * torch.randn(E)
    plan = topk_route(logits, k, score="sigmoid", renormalize=True, bias=bias, n_group=G, topk_group=TG)
    scores = torch.sigmoid(logits)
    choice = (scores + bias).view(T, G, -1)
    group_scores = choice.topk(2, dim=-1)[0].sum(dim=-1)
    drop = torch.ones(T, G, dtype=torch.bool).scatter_(1, group_scores.topk(TG, dim=-1)[1], False)
    ids = choice.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1).topk(k, dim=-1)[1]
    w = scores.gather(1, ids)
    w = w / w.sum(-1, keepdim=True)
    order = torch.argsort(ids, dim=1)  # compare as sets with their weights
    got = torch.argsort(plan.topk_ids.long(), dim=1)
    assert torch.equal(plan.topk_ids.long().gather(1, got), ids.gather(1, order))
    torch.testing.assert_close(plan.topk_weights.gather(1, got), w.gather(1, order))


def test_group_limit_keeping_every_group_changes_nothing():
    logits, bias = torch.randn(30, 12), 0.1 * torch.randn(12)
    free = topk_route(logits, 3, bias=bias, block_m=16)
    for kw in (dict(n_group=4, topk_group=4), dict(n_group=4), dict(n_group=1)):
        assert_plans_equal(topk_route(logits, 3, bias=bias, block_m=16, **kw), free)


def test_group_limit_ties_and_nan():
    logits = torch.zeros(3, 8)  # every group ties: the lower groups are kept
    plan = topk_route(logits, 2, n_group=4, topk_group=2, group_score="max")
    assert plan.topk_ids.tolist() == [[0, 1]] * 3
    logits = torch.randn(20, 8)
    logits[:, 0:2] = float("nan")  # a NaN group scores -inf: never kept while another group is left
    logits[5, :] = float("nan")
    kw = dict(n_group=4, topk_group=2, renormalize=True)
    plan = topk_route(logits, 2, **kw)
    ref = topk_route_reference(logits, 2, **kw)
    assert torch.equal(plan.topk_ids, ref.topk_ids)
    assert not (plan.topk_ids[torch.arange(20) != 5] < 2).any()


def test_group_limited_gradients_and_compile():
    logits = torch.randn(33, 16)
    bias = 0.1 * torch.randn(16)
    kw = dict(score="sigmoid", renormalize=True, bias=bias, n_group=4, topk_group=2, block_m=16)
    g_sorted, g_topk = torch.randn(33 * 4), torch.randn(33, 4)

    def grads(fn):
        x = logits.clone().requires_grad_(True)
        p = fn(x, 4, **kw)
        ((p.weights * g_sorted).sum() + (p.topk_weights * g_topk).sum()).backward()
        return x.grad

    torch.testing.assert_close(grads(topk_route), grads(topk_route_reference), atol=1e-6, rtol=1e-5)
    x64 = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: topk_route_reference(x, 2, score="sigmoid", n_group=4, topk_group=2).weights, (x64,))
    torch._dynamo.reset()
    compiled = torch.compile(lambda lg: topk_route(lg, 4, **kw).topk_ids, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits), topk_route_reference(logits, 4, **kw).topk_ids)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(n_group=3), ValueError, "n_group must divide the number of experts E = 8"),
    (dict(n_group=0), ValueError, "n_group"),
    (dict(n_group=True), TypeError, "n_group"),
    (dict(n_group=4, topk_group=5), ValueError, "topk_group"),
    (dict(n_group=4, topk_group=0), ValueError, "topk_group"),
    (dict(n_group=4, topk_group=1), ValueError, r"k = 3 exceeds the experts of the kept groups"),
    (dict(n_group=8, topk_group=4), ValueError, "group_score 'top2' sums each group's two best"),
    (dict(n_group=2, topk_group=1, group_score="mean"), ValueError, "group_score must be one of"),
])
def test_bad_group_arguments_raise_clear_errors(kw, exc, match):
    for fn in (topk_route, topk_route_reference):
        with pytest.raises(exc, match=match):
            fn(torch.randn(4, 8), 3, **kw)


# ------------------------------------------------------------------------------ expert choice
EC_SHAPES = [
    pytest.param(1, 1, 1.0, id="T1-E1"),
    pytest.param(1, 4, 2.0, id="T1-E4"),
    pytest.param(63, 8, 2.0, id="T63-E8-cf2"),
    pytest.param(100, 16, 1.0, id="T100-E16-cf1"),
    pytest.param(40, 4, 8.0, id="C=T"),
    pytest.param(33, 64, 0.5, id="C=1"),
]


@pytest.mark.parametrize("T,E,cf", EC_SHAPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_choice_matches_reference(T, E, cf, score):
    logits = torch.randn(T, E)
    plan = expert_choice_route(logits, cf, score=score, block_m=8)
    ref = expert_choice_route_reference(logits, cf, score=score, block_m=8)
    C = R.expert_choice_capacity(T, E, cf)
    assert plan.capacity == C and plan.num_rows == E * C
    assert_plan_valid(plan)
    # Probabilities come from different exp implementations (kernel vs torch); the
    # selection must still be a top-C of the reference probabilities, and here (no near
    # ties at these seeds) the very same one.
    probs = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    tok = plan.token_idx.long().view(E, C)
    for e in range(E):
        chosen = torch.zeros(T, dtype=torch.bool)
        chosen[tok[e]] = True
        if (~chosen).any():
            assert probs[chosen, e].min() >= probs[~chosen, e].max() - 1e-6
    torch.testing.assert_close(plan.weights, probs.t().gather(1, tok).reshape(-1), atol=1e-6, rtol=1e-5)
    assert_plans_equal(plan, ref)


def test_expert_choice_token_may_get_zero_or_many_experts():
    logits = torch.randn(32, 4)
    logits[7] += 20.0  # with sigmoid scores, token 7 tops every expert's column
    plan = expert_choice_route(logits, 1.0, score="sigmoid")
    per_token = torch.bincount(plan.token_idx.long(), minlength=32)
    assert per_token[7] == 4
    assert (per_token == 0).any()
    assert_plans_equal(plan, expert_choice_route_reference(logits, 1.0, score="sigmoid"))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_choice_gradients(score):
    logits = torch.randn(50, 8)
    g = torch.randn(8 * R.expert_choice_capacity(50, 8, 2.0))
    grads = []
    for fn in (expert_choice_route, expert_choice_route_reference):
        x = logits.clone().requires_grad_(True)
        (fn(x, 2.0, score=score).weights * g).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_choice_reference_gradcheck(score):
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: expert_choice_route_reference(t, 2.0, score=score).weights, (x,))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_choice_nan_and_inf_logits(score):
    """Expert choice ranks tokens by their scores: a NaN score ranks lowest. Softmax turns a
    token's whole row NaN when one logit is NaN or +inf (so no expert takes it); sigmoid keeps
    the other columns, and +inf scores 1, the highest. The plan stays valid either way."""
    logits = torch.randn(12, 3)
    logits[2, 0] = float("nan")
    logits[5, 1] = float("inf")
    plan = expert_choice_route(logits, 1.0, score=score, block_m=8)
    assert_plan_valid(plan)
    tok = plan.token_idx.long().view(3, plan.capacity)
    assert 2 not in tok[0].tolist(), "NaN ranks lowest"
    if score == "softmax":
        assert not {2, 5} & set(tok.flatten().tolist())
    else:
        assert 5 in tok[1].tolist(), "+inf ranks highest"
    assert torch.isfinite(plan.weights).all()
    assert_plans_equal(plan, expert_choice_route_reference(logits, 1.0, score=score, block_m=8))


# ------------------------------------------------------------------------------ MoD selection
MOD_SHAPES = [
    pytest.param(1, 1, 1, id="B1-S1-k1"),
    pytest.param(1, 64, 1, id="B1-k1"),
    pytest.param(3, 64, 64, id="k=S"),
    pytest.param(4, 100, 13, id="S100"),
    pytest.param(2, 257, 33, id="S257"),
]


@pytest.mark.parametrize("B,S,k", MOD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mod_select_matches_reference(B, S, k, dtype):
    scores = torch.randn(B, S).to(dtype)
    sel = mod_select(scores, k=k)
    ref = mod_select_reference(scores, k=k)
    assert sel.indices.shape == (B, k) and sel.indices.dtype == torch.int32
    assert torch.equal(sel.indices, ref.indices)
    assert torch.equal(sel.weights, ref.weights)
    assert (sel.indices[:, 1:] > sel.indices[:, :-1]).all(), "causal order preserved"
    # exactly the top k: every selected score >= every unselected one
    for b in range(B):
        mask = torch.zeros(S, dtype=torch.bool)
        mask[sel.indices[b].long()] = True
        if (~mask).any():
            assert scores[b][mask].float().min() >= scores[b][~mask].float().max()


def test_mod_select_ties_lower_position_wins():
    scores = torch.randint(0, 3, (5, 90)).float()  # heavy ties
    scores[1] = 0.0  # all equal
    scores[2, ::2] = -0.0
    sel = mod_select(scores, k=20)
    ref = mod_select_reference(scores, k=20)
    assert torch.equal(sel.indices, ref.indices)
    assert sel.indices[1].tolist() == list(range(20))
    for b in range(5):
        row = scores[b].tolist()
        expected = sorted(sorted(range(90), key=lambda i: (-row[i], i))[:20])  # -0.0 == 0.0
        assert sel.indices[b].tolist() == expected


def test_mod_select_nan_scores_rank_lowest():
    scores = torch.randn(2, 40)
    scores[0, :10] = float("nan")
    scores[1, 5] = float("inf")
    scores[1, 6] = float("-inf")
    sel = mod_select(scores, k=35)
    ref = mod_select_reference(scores, k=35)
    assert torch.equal(sel.indices, ref.indices)
    assert sel.indices[0, :5].tolist() == [0, 1, 2, 3, 4]  # 30 finite + the first 5 NaN
    assert 5 in sel.indices[1].tolist() and 6 not in sel.indices[1].tolist()


def test_mod_select_capacity():
    scores = torch.randn(2, 4096)
    assert mod_select(scores, 0.125).k == 512
    assert R.mod_capacity(30, 0.1) == 3  # no float round-up
    assert R.mod_capacity(10, 1.0) == 10
    assert R.mod_capacity(7, 0.01) == 1


def test_topk_rows_streaming_path(monkeypatch):
    # Rows longer than what stays in registers are streamed in chunks.
    monkeypatch.setattr(R, "_SINGLE_MAX", 64)
    monkeypatch.setattr(R, "_CHUNK", 64)
    x = torch.randint(0, 50, (3, 300)).float()
    x[1, 17] = float("nan")
    for k in (1, 77, 300):
        idx, val = topk_rows(x, k)
        ridx, rval = topk_rows_reference(x, k)
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(val, rval, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("streamed", [False, True])
def test_topk_rows_threshold_search_extremes(monkeypatch, streamed, dtype):
    # The k-th largest key is found by bisection over [min key, max key]: rows whose keys
    # span the whole key range (-inf with +inf, NaN, -0/+0, subnormals, the largest finite
    # values), a row of one repeated value (empty range), a row of two values, probabilities
    # that share sign and exponent, and every k from 1 to L. 16-bit floats are keyed from
    # their own bits; the order must still be that of their float32 values.
    if streamed:
        monkeypatch.setattr(R, "_SINGLE_MAX", 16)
        monkeypatch.setattr(R, "_CHUNK", 16)
    f32 = torch.finfo(torch.float32)
    wide = torch.tensor([float("-inf"), float("inf"), float("nan"), -0.0, 0.0, f32.tiny / 4, -f32.tiny / 4,
                         f32.max, -f32.max, 1.0, -1.0, 0.0, float("inf"), float("-inf"), float("nan"), 3.0,
                         f32.tiny, -f32.tiny, 2.0, 2.0, -2.0, 1e-30, -1e-30, 7.0, 0.5, 0.25, 0.125])
    L = wide.numel()
    rows = torch.stack([
        wide,
        torch.full((L,), 0.3),
        torch.where(torch.arange(L) % 3 == 0, 1.0, -1.0),
        torch.softmax(torch.randn(L), 0),
        wide.flip(0),
    ]).to(dtype)
    fin = torch.finfo(dtype)
    rows[0, 7], rows[0, 8], rows[0, 5], rows[0, 6] = fin.max, -fin.max, fin.tiny / 4, -fin.tiny / 4
    for k in range(1, L + 1):
        idx, val = topk_rows(rows, k)
        ridx, rval = topk_rows_reference(rows, k)
        assert torch.equal(idx, ridx), k
        torch.testing.assert_close(val, rval, atol=0, rtol=0, equal_nan=True)


def test_topk_rows_longest_row_in_registers():
    # The longest row the kernel keeps in registers (2**15 values): its prefix sum packs
    # two counts of up to 2**15 in one int32, which a row of equal values fills (the sign
    # bit wraps). Also a row just below it, with ties everywhere.
    L = R._SINGLE_MAX
    rows = torch.stack([torch.full((L,), 0.5), torch.randint(0, 7, (L,)).float(), torch.randn(L)])
    for k in (1, 12345, L - 1, L):
        idx, val = topk_rows(rows, k)
        ridx, rval = topk_rows_reference(rows, k)
        assert torch.equal(idx, ridx), k
        torch.testing.assert_close(val, rval, atol=0, rtol=0)
    short = torch.randint(0, 3, (2, L - 5)).to(torch.bfloat16)
    idx, val = topk_rows(short, 9999)
    assert torch.equal(idx, topk_rows_reference(short, 9999)[0])


def test_mod_select_reference_gradcheck():
    x = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mod_select_reference(t, k=4).weights, (x,))
    assert torch.autograd.gradcheck(lambda t: mod_select(t, k=4).weights, (x,))  # float64: the reference


def test_mod_select_gradients():
    scores = torch.randn(3, 50)
    g = torch.randn(3, 9)
    grads = []
    for fn in (mod_select, mod_select_reference):
        x = scores.clone().requires_grad_(True)
        (fn(x, k=9).weights * g).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert (grads[0] != 0).sum() == 27


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("call,exc,match", [
    (lambda: topk_route(torch.randn(4, 3), 4), ValueError, "k must be in"),
    (lambda: topk_route(torch.randn(4, 3), 0), ValueError, "k must be in"),
    (lambda: topk_route(torch.randn(4, 3), 2.0), TypeError, "k must be an int"),
    (lambda: topk_route(torch.randn(4), 1), ValueError, r"logits must have shape \[T, E\]"),
    (lambda: topk_route(torch.ones(4, 3, dtype=torch.int64), 1), TypeError, "floating-point"),
    (lambda: topk_route(torch.randn(0, 3), 1), ValueError, "T = 0"),
    (lambda: topk_route(torch.randn(4, 3), 1, score="relu"), ValueError, "score must be one of"),
    (lambda: topk_route([[1.0]], 1), TypeError, "logits must be a torch.Tensor"),
    (lambda: expert_choice_route(torch.randn(4, 3), 0.0), ValueError, "capacity_factor"),
    (lambda: expert_choice_route(torch.randn(4, 3), float("nan")), ValueError, "capacity_factor"),
    (lambda: mod_select(torch.randn(2, 8), 0.0), ValueError, r"capacity must be in \(0, 1\]"),
    (lambda: mod_select(torch.randn(2, 8), 1.5), ValueError, r"capacity must be in \(0, 1\]"),
    (lambda: mod_select(torch.randn(2, 8), k=9), ValueError, "k must be in"),
    (lambda: mod_select(torch.randn(2, 8, 1)), ValueError, r"scores must have shape \[B, S\]"),
    (lambda: mod_select(torch.randn(2, 0)), ValueError, "S >= 1"),
])
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------ dispatch / compile
def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
    logits = torch.randn(10, 4)
    plan = topk_route(logits, 2)
    assert_plans_equal(plan, topk_route_reference(logits, 2))


def test_forced_triton_backend_refuses_float64(monkeypatch):
    monkeypatch.setenv("FLOPWISE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="no Triton kernel for torch.float64"):
        topk_route(torch.randn(10, 4, dtype=torch.float64), 2)


def test_forced_triton_backend_without_interpreter_raises(monkeypatch):
    from flopwise.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    monkeypatch.setenv("FLOPWISE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="FLOPWISE_BACKEND=triton"):
        _dispatch.backend(torch.randn(2), op="x")
    monkeypatch.setenv("FLOPWISE_BACKEND", "auto")
    assert _dispatch.backend(torch.randn(2)) == "reference"
    monkeypatch.setenv("FLOPWISE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FLOPWISE_BACKEND must be one of"):
        _dispatch.backend(torch.randn(2))


def test_backend_setting_is_read_on_every_call(monkeypatch):
    """FLOPWISE_BACKEND changes take effect on the next call, however they are made."""
    import os

    from flopwise.kernels import _dispatch

    monkeypatch.delenv("FLOPWISE_BACKEND", raising=False)
    assert _dispatch._requested() == "auto"
    for raw, want in [(" Reference ", "reference"), ("reference", "reference"), ("TRITON", "triton"), ("", "auto"),
                      ("auto", "auto"), ("reference", "reference")]:
        monkeypatch.setenv("FLOPWISE_BACKEND", raw)
        assert _dispatch._requested() == want, raw
    os.environ["FLOPWISE_BACKEND"] = "triton"  # (monkeypatch restores it)
    assert _dispatch._requested() == "triton"
    del os.environ["FLOPWISE_BACKEND"]
    assert _dispatch._requested() == "auto"
    os.environ.update(FLOPWISE_BACKEND="cpu")
    with pytest.raises(ValueError, match="FLOPWISE_BACKEND must be one of"):
        _dispatch._requested()
    with pytest.raises(ValueError, match="FLOPWISE_BACKEND must be one of"):  # not cached as valid
        _dispatch._requested()
    monkeypatch.setattr(os, "environ", {"FLOPWISE_BACKEND": "reference"})  # os.environ replaced outright
    assert _dispatch._requested() == "reference"


def test_custom_ops_pass_opcheck():
    logits = torch.randn(5, 4, requires_grad=True)
    torch.library.opcheck(R._topk_route_op, (logits, None, 2, 0, True, 4, 1, 1, 0))
    torch.library.opcheck(R._topk_route_op, (logits, torch.randn(4), 2, 1, False, 4, 1, 1, 0))
    torch.library.opcheck(R._topk_route_op, (logits, torch.randn(4), 2, 1, True, 4, 2, 1, 2))
    torch.library.opcheck(R._expert_choice_op, (logits, 3, 1, 4))
    torch.library.opcheck(R._topk_rows_op, (torch.randn(2, 9, requires_grad=True), 3))


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()

    def route_and_combine(logits, scores):
        plan = topk_route(logits, 2, renormalize=True)
        sel = mod_select(scores, 0.25)
        return plan.weights.sum() + sel.weights.sum() + plan.expert_counts.sum()

    compiled = torch.compile(route_and_combine, fullgraph=True, backend="aot_eager")
    logits = torch.randn(16, 4, requires_grad=True)
    scores = torch.randn(2, 16, requires_grad=True)
    out = compiled(logits, scores)
    out.backward()
    expected = route_and_combine(logits.detach(), scores.detach())
    torch.testing.assert_close(out.detach(), expected)
    assert logits.grad is not None and scores.grad is not None


# ------------------------------------------------------------------------------ GPU (scripts/gpu_check.sh)
@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k", [(16384, 8, 2), (16384, 64, 8), (16384, 128, 8), (1000, 60, 6)])
def test_gpu_topk_route(T, E, k):
    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    plan = topk_route(logits, k, renormalize=True)
    ref = topk_route_reference(logits, k, renormalize=True)
    for f in INT_FIELDS:
        assert torch.equal(getattr(plan, f), getattr(ref, f)), f
    torch.testing.assert_close(plan.weights, ref.weights, atol=1e-5, rtol=1e-4)
    x = logits.float().requires_grad_(True)
    g = torch.randn(T * k, device="cuda")
    (topk_route(x, k, renormalize=True).weights * g).sum().backward()
    x2 = logits.float().requires_grad_(True)
    (topk_route_reference(x2, k, renormalize=True).weights * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,k", [(8, 4096, 512), (3, 20000, 700), (1, 1, 1)])
def test_gpu_mod_select(B, S, k):
    scores = torch.randn(B, S, device="cuda").to(torch.bfloat16)
    sel, ref = mod_select(scores, k=k), mod_select_reference(scores, k=k)
    assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.weights, ref.weights)


@pytest.mark.gpu
def test_gpu_expert_choice():
    logits = torch.randn(16384, 64, device="cuda")
    plan = expert_choice_route(logits, 1.0)
    probs = torch.softmax(logits, -1)
    tok = plan.token_idx.long().view(64, -1)
    thr = probs.t().gather(1, tok).min(1).values
    above = (probs.t() > thr[:, None] + 1e-6).sum(1)
    assert (above <= tok.shape[1]).all()
    torch.testing.assert_close(plan.weights, probs.t().gather(1, tok).reshape(-1), atol=1e-6, rtol=1e-5)


def test_eager_plan_packs_its_int_outputs_on_16_byte_boundaries():
    """The eager path allocates the plan's int32 tensors as views of one buffer (host time);
    each starts 16-byte aligned, so kernels reading them keep their aligned specialisation,
    and none overlaps another."""
    plan = topk_route(torch.randn(37, 5), 2, block_m=16)
    ints = [plan.token_idx, plan.expert_counts, plan.expert_offsets, plan.padded_offsets, plan.block_expert,
            plan.block_row, plan.topk_ids, plan.pair_idx, plan.inverse]
    base = ints[0].untyped_storage().data_ptr()
    spans = []
    for t in ints:
        assert t.dtype == torch.int32 and t.is_contiguous()
        assert t.untyped_storage().data_ptr() == base  # one allocation
        assert t.data_ptr() % 16 == 0
        spans.append((t.data_ptr(), t.data_ptr() + 4 * t.numel()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint


def test_numpy_integers_are_ints():
    """A count from numpy (np.int64 k, block_m) is an int; a bool, float or str is not."""
    import numpy as np

    logits = torch.randn(7, 4)
    a, b = topk_route(logits, np.int64(2), block_m=np.int64(16)), topk_route(logits, 2, block_m=16)
    assert type(a.block_m) is int and all(torch.equal(getattr(a, f), getattr(b, f)) for f in INT_FIELDS)
    assert type(expert_choice_route(logits, np.float32(1.5), block_m=np.int32(16)).block_m) is int
    scores = torch.randn(2, 9)
    assert torch.equal(mod_select(scores, k=np.int32(3)).indices, mod_select(scores, k=3).indices)
    for bad in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="k must be an int"):
            topk_route(logits, bad)
