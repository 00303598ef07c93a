"""Outside torch.compile the public ops call eager autograd.Functions; the compiler sees the
custom ops. Both registrations must compute the same outputs and gradients, and inputs that
are not plain tensors must still reach the custom op (whose dispatcher unwraps them)."""

from __future__ import annotations

import importlib

import pytest
import torch

import flopwise.kernels._dispatch as D
from flopwise.kernels import (expert_choice_route, gather_tokens, mod_select, moe_mlp, rmsnorm_gather_tokens,
                              scatter_tokens, topk_route)

# the package re-exports functions named like some modules: import the modules themselves
G, M, R = (importlib.import_module(f"flopwise.kernels.{m}") for m in ("grouped_mm", "mod_gather", "routing"))


def _grads(fn, leaves, seed=0):
    """Outputs of fn() and the gradients of a fixed random projection of them."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs if o.is_floating_point())
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves, allow_unused=True))


def _both(monkeypatch, fn, leaves):
    """(eager results, custom-op results) of the same call."""
    eager = _grads(fn, leaves)

    def refuse(*args, **kwargs):
        raise AssertionError("an eager Function ran where the custom op was forced")

    for mod in (G, R, M):
        monkeypatch.setattr(mod, "traced", lambda *t: True)
    for fn_cls in (M.GatherTokensFunction, M.ScatterTokensFunction, M.RMSNormGatherTokensFunction,
                   R._TopkRouteFunction, R._ExpertChoiceFunction, R._TopkRowsFunction, G._MoEMLPFunction,
                   G._GroupedMMFunction):
        monkeypatch.setattr(fn_cls, "apply", refuse)
    op = _grads(fn, leaves)
    return eager, op


def _assert_same(a, b):
    (oa, ga), (ob, gb) = a, b
    for x, y in zip(oa + ga, ob + gb):
        if x is None or y is None:
            assert x is None and y is None
            continue
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_mod_ops(monkeypatch):
    torch.manual_seed(0)
    B, S, Dm, K = 2, 11, 6, 4
    x = torch.randn(B, S, Dm, requires_grad=True)
    y = torch.randn(B, K, Dm, requires_grad=True)
    s = torch.randn(B, S, requires_grad=True)
    gamma = torch.rand(Dm, requires_grad=True)

    def run():
        sel = mod_select(s, k=K)
        h = gather_tokens(x, sel.indices)
        n = rmsnorm_gather_tokens(x, sel.indices, gamma)
        return scatter_tokens(x, h * n + y, sel.indices, torch.sigmoid(sel.weights)), sel.weights

    _assert_same(*_both(monkeypatch, run, [x, y, s, gamma]))


@pytest.mark.parametrize("route", ["token", "expert"])
def test_routing_and_moe(monkeypatch, route):
    torch.manual_seed(1)
    T, Dm, Fh, E = 13, 8, 12, 3
    x = torch.randn(T, Dm, requires_grad=True)
    logits = torch.randn(T, E, requires_grad=True)
    wg, wu = torch.randn(E, Dm, Fh, requires_grad=True), torch.randn(E, Dm, Fh, requires_grad=True)
    wd = torch.randn(E, Fh, Dm, requires_grad=True)

    def run():
        if route == "token":
            plan = topk_route(logits, 2, renormalize=True, block_m=4)
        else:
            plan = expert_choice_route(logits, 1.0, block_m=4)
        return moe_mlp(x, plan, wg, wu, wd)

    _assert_same(*_both(monkeypatch, run, [x, logits, wg, wu, wd]))


def test_calls_autograd_would_not_record_skip_the_function(monkeypatch):
    """Under no_grad, or with no input requiring grad, the eager ops run their kernels without
    the autograd Function (its context and saved tensors are host time for nothing), and give
    the same outputs; a call autograd records still goes through it."""
    from flopwise.kernels import grouped_mm, plan_from_topk

    torch.manual_seed(2)
    T, Dm, Fh, E = 13, 8, 12, 3
    x, logits = torch.randn(T, Dm), torch.randn(T, E)
    wg, wu, wd = torch.randn(E, Dm, Fh), torch.randn(E, Dm, Fh), torch.randn(E, Fh, Dm)
    s = torch.randn(2, 11)

    def run():
        plan = topk_route(logits, 2, renormalize=True, block_m=4)
        given = plan_from_topk(plan.topk_ids, plan.topk_weights, E, block_m=4)
        ec = expert_choice_route(logits, 1.0, block_m=4)
        sel = mod_select(s, k=4)
        return (moe_mlp(x, plan, wg, wu, wd), moe_mlp(x, ec, wg, wu, wd), grouped_mm(x, wg, given),
                given.weights, sel.indices, sel.weights)

    twins = (R._TopkRouteFunction, R._PlanFromTopkFunction, R._ExpertChoiceFunction, R._TopkRowsFunction,
             G._MoEMLPFunction, G._GroupedMMFunction)
    calls = []
    for cls in twins:
        monkeypatch.setattr(cls, "apply", classmethod(lambda c, *a, _f=cls.apply: calls.append(c) or _f(*a)))
    recorded = run()
    assert not calls  # no input requires grad: no Function
    with torch.no_grad():
        for t in (logits, wg):
            t.requires_grad_(True)
        plain = run()
        assert not calls  # grad mode off: no Function either
    for a, b in zip(recorded, plain):
        assert torch.equal(a, b)
    out = run()  # logits and wg require grad now: the Functions record the graph
    assert {R._TopkRouteFunction, R._ExpertChoiceFunction, G._MoEMLPFunction} <= set(calls)
    assert out[0].requires_grad and out[1].grad_fn is not None
    for a, b in zip(out, plain):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_subclass_inputs_take_the_custom_op():
    class Wrapped(torch.Tensor):
        pass

    x = torch.randn(2, 5, 3).as_subclass(Wrapped)
    assert D.traced(x) and D.traced(torch.randn(2), torch.empty(2, device="meta"))
    assert not D.traced(torch.randn(2), torch.nn.Parameter(torch.randn(2)))


def _second_order_cases():
    """(name, leaves, forward) for every op whose backward runs kernels."""
    from flopwise.kernels import grouped_mm, topk_route_reference

    torch.manual_seed(0)
    B, S, Dm, K = 1, 6, 8, 3
    x = torch.randn(B, S, Dm, requires_grad=True)
    y = torch.randn(B, K, Dm, requires_grad=True)
    w = torch.rand(B, K, requires_grad=True)
    gamma = torch.rand(Dm) + 0.5
    idx = torch.tensor([[0, 2, 5]], dtype=torch.int32)
    T, E, F = 5, 3, 16
    xt = torch.randn(T, Dm, requires_grad=True)
    lg = torch.randn(T, E, requires_grad=True)
    ws = [(torch.randn(E, Dm, F) / 4).requires_grad_(), (torch.randn(E, Dm, F) / 4).requires_grad_(),
          (torch.randn(E, F, Dm) / 4).requires_grad_()]
    plan = topk_route_reference(lg.detach(), 2, block_m=16)
    return [
        ("gather_tokens", [x], lambda: gather_tokens(x, idx)),
        ("scatter_tokens", [y, w], lambda: scatter_tokens(x.detach(), y, idx, w)),
        ("rmsnorm_gather_tokens", [x], lambda: rmsnorm_gather_tokens(x, idx, gamma)),
        ("topk_route", [lg], lambda: topk_route(lg, 2, renormalize=True).weights),
        ("moe_mlp", [xt, ws[2]], lambda: moe_mlp(xt, plan, *ws, retain_activations=True)),
        ("grouped_mm", [xt], lambda: grouped_mm(xt, ws[0], plan)),
    ]


@pytest.mark.parametrize("squared", [True, False], ids=["grad-needs-grad", "plain-grad"])
@pytest.mark.parametrize("case", range(6))
def test_second_derivative_through_a_kernel_backward_raises(case, squared):
    """The kernels' gradients carry no graph: create_graph=True must refuse, not silently drop
    their part of the second derivative (which it did while another path reached the leaves),
    whether the incoming gradient or only the saved inputs require grad."""
    name, leaves, fwd = _second_order_cases()[case]
    out = fwd().float()
    if name == "gather_tokens" and not squared:
        # gather's backward depends on the incoming gradient alone: nothing to refuse, and the
        # first derivative (with a graph for the x**3 term) is right
        (g,) = torch.autograd.grad(out.sum() + (leaves[0] ** 3).sum(), leaves, create_graph=True)
        expect = 3 * leaves[0].detach() ** 2
        expect[0, [0, 2, 5]] += 1
        torch.testing.assert_close(g.detach(), expect)
        return
    loss = (out ** 2 if squared else out).sum() + sum((v ** 3).sum() for v in leaves)
    with pytest.raises(RuntimeError, match="differentiable once.*FLOPWISE_BACKEND=reference"):
        torch.autograd.grad(loss, leaves, create_graph=True)
    # first derivatives still work, and the reference path gives the second derivative
    assert all(g is not None for g in torch.autograd.grad((fwd().float() ** 2).sum(), leaves))


def test_second_derivative_on_the_reference_path(monkeypatch):
    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
    name, leaves, fwd = _second_order_cases()[3]  # topk_route: softmax, renormalised
    (g,) = torch.autograd.grad((fwd() ** 2).sum(), leaves, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), leaves)
    assert torch.isfinite(h).all() and h.abs().sum() > 0
    # the MoD ops take their plain-torch definitions there: second derivatives are exact
    torch.manual_seed(0)
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(1, 2, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    idx = torch.tensor([[1, 3]])
    assert torch.autograd.gradgradcheck(lambda x, y, w: scatter_tokens(x, y, idx, w), (x, y, w))
    assert torch.autograd.gradgradcheck(lambda x, g: rmsnorm_gather_tokens(x, idx, g), (x, gamma))
    assert torch.autograd.gradgradcheck(lambda x: gather_tokens(x, idx), (x,))


def test_package_works_without_triton():
    """Triton has wheels for Linux only: elsewhere every op must import and run its
    reference path."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["triton"] = None  # import triton raises
import torch
import flopwise.kernels as K
from flopwise.models.transformer import ModelConfig, Transformer
assert not K._dispatch.HAS_TRITON
x = torch.randn(1, 5, 4)
idx = torch.tensor([[1, 3]])
torch.testing.assert_close(K.gather_tokens(x, idx), K.gather_tokens_reference(x, idx))
m = Transformer(ModelConfig.preset("tiny", mod="every_other", mlp="moe", moe_n_experts=4))
t = torch.randint(0, 256, (2, 32))
m(t, t).loss.backward()
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
