"""Routing benchmarks: token-choice plan, expert-choice selection, MoD selection.

The torch providers are what BASELINES.md times: ``topk`` + stable ``argsort`` +
``bincount`` + ``cumsum`` for the token-choice plan (and the same with ``index_add_`` counts,
which a CUDA graph can capture), ``topk`` along tokens for expert
choice, ``topk`` + ``sort`` for MoD. Every provider's output is reduced to the same
canonical form before the check, so a provider is timed only if it selects what the
reference selects (expert choice: up to ties within 1e-6 of the selection threshold,
since two exp implementations may differ in the last bit) with the reference's weights,
and a plan only if every field the byte counts credit or later kernels read (pair and
inverse maps, top-k ids and weights, counts, offsets, padded offsets, block map) equals
the reference plan's; the torch pipelines are compared on the fields they compute.
"""

from __future__ import annotations

import torch

from flopwise.kernels import (
    expert_choice_capacity,
    expert_choice_route,
    expert_choice_route_reference,
    mod_select,
    mod_select_reference,
    topk_route,
    topk_route_reference,
)
from flopwise.kernels.bench import Case
from flopwise.kernels.routing import MoDSelection, RoutingPlan, _plan_from_topk_reference


# ---------------------------------------------------------------- token choice
def _torch_token_choice(logits: torch.Tensor, k: int):
    probs = torch.softmax(logits.float(), -1)
    w, ids = torch.topk(probs, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=logits.shape[1])
    offsets = torch.cumsum(counts, 0)
    return order // k, w.reshape(-1)[order], counts, offsets


def _torch_token_choice_graphable(logits: torch.Tensor, k: int):
    """The same pipeline with the counts from ``index_add_``: ``bincount`` reads the largest
    id back to the host, which CUDA-graph capture forbids."""
    probs = torch.softmax(logits.float(), -1)
    w, ids = torch.topk(probs, k, dim=-1)
    return _torch_expert_sorted(ids, w / w.sum(-1, keepdim=True), logits.shape[1])


def _torch_expert_sorted(ids: torch.Tensor, w: torch.Tensor, E: int):
    """(token of each expert-sorted row, its weight, counts, inclusive offsets) from top-k
    choices ``ids, w [T, k]``: argsort, and counts by ``index_add_`` (graph-capturable)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.long, device=ids.device).index_add_(0, flat, torch.ones_like(flat))
    return order // ids.shape[1], w.reshape(-1)[order], counts, torch.cumsum(counts, 0)


def _torch_biased_token_choice(logits: torch.Tensor, bias: torch.Tensor, k: int):
    """Auxiliary-loss-free routing in torch: top-k of score + bias, weights the scores."""
    probs = torch.softmax(logits.float(), -1)
    ids = torch.topk(probs + bias, k, dim=-1).indices
    w = probs.gather(1, ids)
    return _torch_expert_sorted(ids, w / w.sum(-1, keepdim=True), logits.shape[1])


def _torch_grouped_token_choice(logits: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int):
    """DeepSeek-V3's gate in torch (as its reference code and transformers compute it):
    sigmoid, score + bias, groups scored by their best two, the best ``topk_group`` groups
    kept, top k of their experts, weights the renormalised scores; then the expert sort."""
    T, E = logits.shape
    scores = torch.sigmoid(logits.float())
    choice = (scores + bias).view(T, n_group, E // n_group)
    best = choice.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
    drop = torch.ones(T, n_group, dtype=torch.bool, device=logits.device).scatter_(1, best, False)
    ids = choice.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1).topk(k, dim=-1).indices
    w = scores.gather(1, ids)
    return _torch_expert_sorted(ids, w / w.sum(-1, keepdim=True), E)


def _group_candidates(key: torch.Tensor, ids: torch.Tensor, n_group: int, topk_group: int):
    """(why the groups of ``ids [T, k]`` are wrong or None, ``key`` limited to the experts a
    correct choice could rank against). The groups used must be at most ``topk_group``, each
    among the best ``topk_group`` by the sum of its two best keys up to ties within 1e-6; the
    candidates are the groups used and those every correct choice keeps."""
    T, E = key.shape
    size = E // n_group
    gs = key.view(T, n_group, size).topk(2, dim=-1).values.sum(-1)
    thr = gs.topk(topk_group, dim=1).values[:, -1:]
    used = torch.zeros(T, n_group, dtype=torch.bool, device=key.device).scatter_(1, ids // size, True)
    if bool((used.sum(1) > topk_group).any()):
        return "a token's experts span more than topk_group groups", None
    if bool((used & (gs < thr - 1e-6)).any()):
        return "a token uses a group outside its best topk_group", None
    keep = (used | (gs > thr + 1e-6)).repeat_interleave(size, dim=1)
    return None, key.masked_fill(~keep, float("-inf"))


def _make_biased_check(logits: torch.Tensor, bias: torch.Tensor, k: int, *, score: str = "softmax",
                       groups: tuple[int, int] | None = None):
    """Each token's experts must be a top-k of its score + bias up to ties within 1e-6 (the
    kernel's exp is not torch's, so two nearly equal biased scores may swap); with ``groups =
    (n_group, topk_group)``, a top-k among the experts of its best groups (see
    :func:`_group_candidates`). Given those choices, every field must equal the reference
    plan built from them (weights: the renormalised scores, to within rounding)."""
    probs = torch.softmax(logits.float(), -1) if score == "softmax" else torch.sigmoid(logits.float())
    key = probs + bias.float()
    T, E = logits.shape

    def check(out, ref) -> str | None:
        if isinstance(out, RoutingPlan):
            ids = out.topk_ids.long()
            if ids.shape != (T, k) or bool(((ids < 0) | (ids >= E)).any()):
                return "topk_ids out of range"
            mine = key.gather(1, ids)
            if k > 1 and not bool((mine[:, 1:] <= mine[:, :-1] + 1e-6).all()):
                return "topk_ids not in descending order of score + bias"
        else:
            tok, _, counts, _ = out
            if counts.shape != (E,) or int(counts.sum()) != T * k:
                return "counts do not sum to T * k"
            chosen = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
            chosen[tok.long(), torch.repeat_interleave(torch.arange(E, device=logits.device), counts.long())] = True
            if not bool((chosen.sum(1) == k).all()):
                return "a token does not have k distinct experts"
            ids = torch.sort(key.masked_fill(~chosen, float("-inf")), dim=1, descending=True, stable=True).indices[:, :k]
        cand = key
        if groups is not None:
            why, cand = _group_candidates(key, ids, *groups)
            if why is not None:
                return why
        rest = cand.scatter(1, ids, float("-inf"))
        if not bool((key.gather(1, ids).min(1).values >= rest.max(1).values - 1e-6).all()):
            return "not a top-k of score + bias" + (" among the kept groups' experts" if groups else "")
        w = probs.gather(1, ids)
        return _check_token_choice(out, _plan_from_topk_reference(ids, w / w.sum(-1, keepdim=True), E, ref.block_m))

    return check


# Plan fields, each compared exactly (index fields: every backend ranks and breaks ties the
# same way, see kernels/routing.py) or to within float rounding (weights: the kernels' exp
# is not torch's).
_PLAN_INDEX = ("token_idx", "expert_counts", "expert_offsets", "padded_offsets", "block_expert", "block_row",
               "topk_ids", "pair_idx", "inverse")
_PLAN_FLOAT = ("weights", "topk_weights")
_PLAN_SCALARS = ("num_tokens", "num_experts", "block_m", "top_k", "capacity")


def _tc_fields(out) -> dict:
    """The fields a provider's token-choice output holds: a plan's every tensor, or the torch
    pipeline's (token_idx, weights, counts, inclusive offsets), which computes no more."""
    if isinstance(out, RoutingPlan):
        return {n: getattr(out, n) for n in (*_PLAN_INDEX, *_PLAN_FLOAT)}
    tok, w, counts, offsets = out
    offsets = torch.cat([offsets.new_zeros(1), offsets])
    return {"token_idx": tok, "weights": w, "expert_counts": counts, "expert_offsets": offsets}


def _weights_close(x: torch.Tensor, y: torch.Tensor, atol: float, rtol: float) -> bool:
    """Finite and within tolerance (NaN anywhere fails)."""
    finite = bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())
    return finite and torch.allclose(x, y, atol=atol, rtol=rtol)


def _check_plan_extras(out, ref) -> str | None:
    """A plan's scalars and dtypes against the reference plan's (the kernels read int32)."""
    for name in _PLAN_SCALARS:
        if getattr(out, name) != getattr(ref, name):
            return f"{name} {getattr(out, name)} != {getattr(ref, name)}"
    for name in (*_PLAN_INDEX, *_PLAN_FLOAT):
        x, y = getattr(out, name), getattr(ref, name)
        if (x is None) != (y is None):
            return f"{name} is {'missing' if x is None else 'unexpected'}"
        if x is not None and x.dtype != y.dtype:
            return f"{name} dtype {x.dtype} != {y.dtype}"
    return None


def _check_token_choice(out, ref) -> str | None:
    if isinstance(out, RoutingPlan):
        why = _check_plan_extras(out, ref)
        if why is not None:
            return why
    a, b = _tc_fields(out), _tc_fields(ref)
    for name, x in a.items():
        y = b[name]
        if x is None and y is None:
            continue
        if x.shape != y.shape:
            return f"{name} shape {tuple(x.shape)} != {tuple(y.shape)}"
        if name in _PLAN_FLOAT:
            if not _weights_close(x, y, atol=1e-5, rtol=1e-4):
                return f"{name} differ"
        elif not torch.equal(x.long(), y.long()):
            return f"{name} differs"
    return None


# ---------------------------------------------------------------- expert choice
def _ec_selection(out, E: int):
    """(tokens [E, C] increasing, their weights [E, C]); the torch provider's top-k comes in
    value order and is sorted by token here (its indices: duplicates stay visible)."""
    if isinstance(out, RoutingPlan):
        return out.token_idx.long().view(E, -1), out.weights.view(E, -1)
    values, idx = out
    idx, order = torch.sort(idx.long(), dim=1)
    return idx, values.gather(1, order)


def _make_ec_check(logits: torch.Tensor, E: int):
    """The selection must be a top-C of each expert's probabilities up to ties within 1e-6 of
    the threshold (two exp implementations may differ in the last bit), each expert's tokens
    strictly increasing (the plan's order; no duplicates), the weights the probabilities of
    the tokens selected; a plan's counts, offsets and block map must equal the reference's."""
    probs_ET = torch.softmax(logits.float(), -1).t()
    T = logits.shape[0]

    def check(out, ref) -> str | None:
        if isinstance(out, RoutingPlan):
            why = _check_plan_extras(out, ref)
            if why is not None:
                return why
            for name in ("expert_counts", "expert_offsets", "padded_offsets", "block_expert", "block_row"):
                x, y = getattr(out, name), getattr(ref, name)
                if x.shape != y.shape or not torch.equal(x, y):
                    return f"{name} differs"
        (sel, w), (rsel, _) = _ec_selection(out, E), _ec_selection(ref, E)
        if sel.shape != rsel.shape or w.shape != rsel.shape:
            return f"shape {tuple(sel.shape)}/{tuple(w.shape)} != {tuple(rsel.shape)}"
        if not bool(((sel >= 0) & (sel < T)).all()):
            return "token index out of range"
        if sel.shape[1] > 1 and not bool((sel.diff(dim=1) > 0).all()):
            return "tokens not strictly increasing per expert (duplicates or out of order)"
        chosen = probs_ET.gather(1, sel)
        rest = probs_ET.clone().scatter_(1, sel, float("-inf"))
        if not bool((chosen.min(1).values >= rest.max(1).values - 1e-6).all()):
            return "not a top-C selection"
        if not _weights_close(w, chosen, atol=1e-6, rtol=1e-5):
            return "weights differ from the selected tokens' probabilities"
        return None

    return check


# ---------------------------------------------------------------- MoD
def _torch_mod(scores: torch.Tensor, k: int):
    idx = torch.topk(scores, k, dim=1).indices
    idx = torch.sort(idx, dim=1).values
    return idx, scores.gather(1, idx)


def _mod_canonical(out):
    if isinstance(out, MoDSelection):
        return out.indices.long(), out.weights
    return out[0].long(), out[1]


def _check_mod(out, ref) -> str | None:
    """Indices and weights (the selected scores, gathered, so bit-exact) equal the reference's."""
    (i, w), (ri, rw) = _mod_canonical(out), _mod_canonical(ref)
    if i.shape != ri.shape or w.shape != rw.shape:
        return f"shape {tuple(i.shape)}/{tuple(w.shape)} != {tuple(ri.shape)}/{tuple(rw.shape)}"
    if not torch.equal(i, ri):
        return "indices differ"
    if not (bool(torch.isfinite(w).all()) and torch.equal(w, rw)):
        return "weights differ"
    return None


def cases(gpu: bool) -> list[Case]:
    dev = "cuda" if gpu else "cpu"
    out: list[Case] = []
    tc = [(16384, 8, 2), (16384, 64, 8), (16384, 128, 8)] if gpu else [(256, 8, 2), (256, 64, 8)]
    for T, E, k in tc:
        logits = torch.randn(T, E, device=dev)
        N = T * k
        out.append(Case(
            graph=True,
            op="topk_route", shape=f"T={T} E={E} k={k}",
            providers={
                "reference": lambda lg=logits, k=k: topk_route_reference(lg, k, renormalize=True),
                "torch": lambda lg=logits, k=k: _torch_token_choice(lg, k),
                "torch-index-add": lambda lg=logits, k=k: _torch_token_choice_graphable(lg, k),
                "triton": lambda lg=logits, k=k: topk_route(lg, k, renormalize=True),
            },
            check=_check_token_choice, graph_skip=("torch",),  # bincount reads back to the host
            # logits in; ids, weights [T,K]; token_idx, weights, pair, inverse [N]
            bytes=T * E * 4 + T * k * 8 + N * 16,
        ))
    # auxiliary-loss-free balancing: ranked by score + a per-expert bias (one extra [E] load)
    T, E, k = (16384, 64, 8) if gpu else (256, 64, 8)
    logits = torch.randn(T, E, device=dev)
    bias = 0.01 * torch.randn(E, device=dev)
    out.append(Case(
        graph=True,
        op="topk_route+bias", shape=f"T={T} E={E} k={k}",
        providers={
            "reference": lambda lg=logits, b=bias, k=k: topk_route_reference(lg, k, renormalize=True, bias=b),
            "torch": lambda lg=logits, b=bias, k=k: _torch_biased_token_choice(lg, b, k),
            "triton": lambda lg=logits, b=bias, k=k: topk_route(lg, k, renormalize=True, bias=b),
        },
        check=_make_biased_check(logits, bias, k),
        bytes=T * E * 4 + E * 4 + T * k * 8 + T * k * 16,
    ))
    # group-limited: DeepSeek-V3's gate (sigmoid, bias, 256 experts in 8 groups, 4 kept)
    T, E, k, G, TG = (16384, 256, 8, 8, 4) if gpu else (256, 64, 8, 8, 4)
    logits = torch.randn(T, E, device=dev)
    bias = 0.01 * torch.randn(E, device=dev)
    group_kw = dict(score="sigmoid", renormalize=True, n_group=G, topk_group=TG)
    out.append(Case(
        graph=True,
        op="topk_route+group", shape=f"T={T} E={E} k={k} groups={TG}/{G}",
        providers={
            "reference": lambda lg=logits, b=bias, k=k, kw=group_kw: topk_route_reference(lg, k, bias=b, **kw),
            "torch": lambda lg=logits, b=bias, k=k, G=G, TG=TG: _torch_grouped_token_choice(lg, b, k, G, TG),
            "triton": lambda lg=logits, b=bias, k=k, kw=group_kw: topk_route(lg, k, bias=b, **kw),
        },
        check=_make_biased_check(logits, bias, k, score="sigmoid", groups=(G, TG)),
        bytes=T * E * 4 + E * 4 + T * k * 8 + T * k * 16,
    ))
    # the BASELINES shapes, then a longer token axis (rows of 32,768 held in registers)
    ec = [(16384, 64, 1.0), (16384, 8, 1.0), (32768, 64, 1.0)] if gpu else [(256, 8, 1.0)]
    for T, E, cf in ec:
        logits = torch.randn(T, E, device=dev)
        C = expert_choice_capacity(T, E, cf)
        out.append(Case(
            graph=True,
            op="expert_choice", shape=f"T={T} E={E} C={C}",
            providers={
                "reference": lambda lg=logits, cf=cf: expert_choice_route_reference(lg, cf),
                "torch": lambda lg=logits, C=C: torch.topk(torch.softmax(lg, -1).t(), C, dim=1),
                "triton": lambda lg=logits, cf=cf: expert_choice_route(lg, cf),
            },
            check=_make_ec_check(logits, E),
            bytes=T * E * 4 + E * C * 8,
        ))
    mod = [(8, 4096, 512), (8, 2048, 256)] if gpu else [(2, 256, 32)]
    for B, S, k in mod:
        scores = torch.randn(B, S, device=dev)
        if gpu:
            scores = scores.to(torch.bfloat16)
        out.append(Case(
            graph=True,
            op="mod_select", shape=f"B={B} S={S} k={k}",
            providers={
                "reference": lambda s=scores, k=k: mod_select_reference(s, k=k),
                "torch": lambda s=scores, k=k: _torch_mod(s, k),
                "triton": lambda s=scores, k=k: mod_select(s, k=k),
            },
            check=_check_mod,
            bytes=scores.numel() * scores.element_size() + B * k * (4 + scores.element_size()),
        ))
    return out
