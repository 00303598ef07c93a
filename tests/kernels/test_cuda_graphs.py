"""Every op, forward and backward, captured in a CUDA graph and replayed on new inputs gives
what an eager call gives: no host synchronisation, no allocation the graph cannot own, no
launch argument baked in from the captured call's values. (The benchmarks time the small
ops this way; a training step under ``torch.compile(mode="reduce-overhead")`` runs them so.)"""

from __future__ import annotations

import gc

import pytest
import torch

from flopwise.kernels import (expert_choice_route, gather_tokens, mod_select, moe_mlp, rmsnorm_gather_tokens,
                              scatter_tokens, topk_route)

pytestmark = pytest.mark.gpu


def _graphed(fn):
    """fn captured once (after two warm-up calls on a side stream): returns (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    gc.collect()
    gc.disable()  # a Triton kernel object collected mid-capture unloads its module
    try:
        with torch.cuda.graph(graph):
            out = fn()
    finally:
        gc.enable()
    return graph, out


def _check_replay(fn, inputs, new_values, exact=True):
    """Capture fn over the static ``inputs``, refill them with ``new_values``, replay, and
    compare with an eager call on the same values."""
    graph, out = _graphed(fn)
    with torch.no_grad():
        for t, v in zip(inputs, new_values):
            t.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    want = fn()
    for i, (a, b) in enumerate(zip(out, want)):
        if exact:
            assert torch.equal(a, b), f"output {i} differs after replay"
        else:
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=f"output {i}")


def test_routing_ops_replay():
    T, E = 4096, 64
    logits = torch.randn(T, E, device="cuda")
    scores = torch.randn(8, 1024, device="cuda")

    def fn():
        p = topk_route(logits, 8, renormalize=True)
        ec = expert_choice_route(logits, 1.0)
        sel = mod_select(scores, 0.125)
        return (p.token_idx, p.weights, p.expert_offsets, p.block_expert, p.block_row, ec.token_idx, ec.weights,
                sel.indices, sel.weights)

    _check_replay(fn, [logits, scores], [torch.randn_like(logits), torch.randn_like(scores)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mod_token_ops_fwd_bwd_replay(dtype):
    B, S, D, K = 4, 512, 1024, 64
    x = torch.randn(B, S, D, device="cuda", dtype=dtype, requires_grad=True)
    scores = torch.randn(B, S, device="cuda")
    gamma = torch.ones(D, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.randn(B, K, D, device="cuda", dtype=dtype, requires_grad=True)
    gy = torch.randn(B, S, D, device="cuda", dtype=dtype)

    def fn():
        sel = mod_select(scores, k=K)
        h = rmsnorm_gather_tokens(x, sel.indices, gamma) + gather_tokens(x, sel.indices) + y
        out = scatter_tokens(x, h, sel.indices, torch.sigmoid(sel.weights.float()).to(dtype))
        return (out, *torch.autograd.grad(out, [x, gamma, y], gy))

    _check_replay(fn, [x, scores, y, gy], [torch.randn_like(x), torch.randn_like(scores), torch.randn_like(y),
                                          torch.randn_like(gy)])


def test_inplace_scatter_replay():
    B, S, D, K = 2, 256, 512, 32
    res = torch.randn(B, S, D, device="cuda", dtype=torch.bfloat16)
    base = res.clone()
    y = torch.randn(B, K, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(B, K, device="cuda", dtype=torch.bfloat16)
    idx = torch.sort(torch.randperm(S, device="cuda")[:K]).values.int().repeat(B, 1)

    def fn():
        res.copy_(base)
        with torch.no_grad():
            scatter_tokens(res, y, idx, w, inplace=True)
        return (res.clone(),)

    _check_replay(fn, [base, y, w], [torch.randn_like(base), torch.randn_like(y), torch.rand_like(w)])


def test_moe_layer_fwd_bwd_replay():
    T, D, Fh, E, k = 1024, 512, 256, 8, 2
    dt = torch.bfloat16
    x = torch.randn(T, D, device="cuda", dtype=dt, requires_grad=True)
    router = torch.randn(D, E, device="cuda", requires_grad=True)
    ws = [(torch.randn(E, D, Fh, device="cuda") / D**0.5).to(dt).requires_grad_(True),
          (torch.randn(E, D, Fh, device="cuda") / D**0.5).to(dt).requires_grad_(True),
          (torch.randn(E, Fh, D, device="cuda") / Fh**0.5).to(dt).requires_grad_(True)]
    gy = torch.randn(T, D, device="cuda", dtype=dt)

    def fn():
        plan = topk_route(x.float() @ router, k, renormalize=True)
        y = moe_mlp(x, plan, *ws)
        return (y, *torch.autograd.grad(y, [x, router, *ws], gy))

    # token outputs and dX accumulate with fp32 atomics: equal up to summation order
    _check_replay(fn, [x, gy], [torch.randn_like(x), torch.randn_like(gy)], exact=False)
