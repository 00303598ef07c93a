"""Routing benchmarks: token-choice plan, expert-choice selection, MoD selection.

The torch providers are what BASELINES.md times: ``topk`` + stable ``argsort`` +
``bincount`` + ``cumsum`` for the token-choice plan (and the same with ``index_add_`` counts,
which a CUDA graph can capture), ``topk`` along tokens for expert
choice, ``topk`` + ``sort`` for MoD. Every provider's output is reduced to the same
canonical form before the check, so a provider is timed only if it selects what the
reference selects (expert choice: up to ties within 1e-6 of the selection threshold,
since two exp implementations may differ in the last bit).
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
from flopwise.kernels.routing import MoDSelection, RoutingPlan


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
    w = w / w.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(logits.shape[1], dtype=torch.long, device=logits.device).index_add_(
        0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0)
    return order // k, w.reshape(-1)[order], counts, offsets


def _tc_canonical(out):
    if isinstance(out, RoutingPlan):
        return out.token_idx.long(), out.weights, out.expert_counts.long(), out.expert_offsets[1:].long()
    tok, w, counts, offsets = out
    return tok.long(), w, counts.long(), offsets.long()


def _check_token_choice(out, ref) -> str | None:
    a, b = _tc_canonical(out), _tc_canonical(ref)
    for name, x, y in zip(("token_idx", "weights", "counts", "offsets"), a, b):
        if x.shape != y.shape:
            return f"{name} shape {tuple(x.shape)} != {tuple(y.shape)}"
        if name == "weights":
            if not torch.allclose(x, y, atol=1e-5, rtol=1e-4):
                return "weights differ"
        elif not torch.equal(x, y):
            return f"{name} differs"
    return None


# ---------------------------------------------------------------- expert choice
def _ec_selected(out, E: int):
    if isinstance(out, RoutingPlan):
        return out.token_idx.long().view(E, -1)
    return out[1].long()  # torch: (values, indices) of topk along tokens


def _make_ec_check(logits: torch.Tensor, E: int):
    probs_ET = torch.softmax(logits.float(), -1).t()

    def check(out, ref) -> str | None:
        sel, rsel = _ec_selected(out, E), _ec_selected(ref, E)
        if sel.shape != rsel.shape:
            return f"shape {tuple(sel.shape)} != {tuple(rsel.shape)}"
        chosen = probs_ET.gather(1, sel)
        rest = probs_ET.clone().scatter_(1, sel, float("-inf"))
        if not (chosen.min(1).values >= rest.max(1).values - 1e-6).all():
            return "not a top-C selection"
        if torch.unique(sel, dim=1).shape[1] != sel.shape[1] and sel.shape[1] > 1:
            if (torch.sort(sel, 1).values.diff(dim=1) == 0).any():
                return "duplicate tokens"
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
    (i, w), (ri, rw) = _mod_canonical(out), _mod_canonical(ref)
    if i.shape != ri.shape:
        return f"shape {tuple(i.shape)} != {tuple(ri.shape)}"
    if not torch.equal(i, ri):
        return "indices differ"
    if not torch.equal(w, rw):
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
