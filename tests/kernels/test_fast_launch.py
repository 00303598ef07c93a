"""``kernels._launch.launch``: direct launches reach Triton's C launcher exactly as Triton's own
dispatch would (checked for sm_90 builds with a recording stand-in for the launcher, in a
process of its own), and calls it cannot key take Triton's path."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DRIVER = Path(__file__).with_name("fast_launch_driver.py")
fl = importlib.import_module("flopwise.kernels._launch")


def test_direct_launches_match_tritons_dispatch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, str(DRIVER)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all equal" in proc.stdout and "direct after" in proc.stdout and "unkeyable" in proc.stdout


def test_key_tells_arguments_apart():
    t = torch.zeros(8)
    k = lambda *args, **kw: fl._key("kernel", 0, args, kw)  # noqa: E731
    assert k(t, 3) == k(torch.ones(8), 3)  # same dtype and alignment, same int
    assert k(t, 3) != k(t[1:], 3)  # misaligned
    assert k(t, 3) != k(t.half(), 3)
    assert k(t, 3) != k(t, 4)
    assert k(t, 1) != k(t, True) != k(t, 1.0)
    assert k(t, 3, B=1) != k(t, 3, B=2)
    assert fl._key("a", 0, (t,), {}) != fl._key("b", 0, (t,), {}) != fl._key("a", 1, (t,), {})
    assert k(t, object()) is None  # e.g. a TMA descriptor
    assert k(t, y=t) is None  # a tensor keyword
    assert k(t, B=[1]) is None and k(t, B=(1,)) is None  # keys stay hashable and exact
    assert k(t, 3, B=1) is not None


def test_other_launchables_are_called_as_kernel_grid():
    calls = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((grid, args, kw))

    before = fl.stats["slow"]
    fl.launch(Spy(), (2, 3), 1, 2, BLOCK=4)
    assert calls == [((2, 3), (1, 2), {"BLOCK": 4})]
    assert fl.stats["slow"] == before + 1


@pytest.mark.gpu
def test_gpu_direct_launches_give_the_same_bits():
    """On the card: every op's outputs and gradients are the same bits with direct launches as
    with Triton's dispatch (deterministic mode, so the MoE layer's sums are ordered)."""
    from flopwise.kernels import (expert_choice_route, gather_tokens, mod_select, moe_mlp, rmsnorm_gather_tokens,
                                  scatter_tokens, topk_route)
    from flopwise.kernels._dispatch import deterministic_algorithms

    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, D, K, T, E, F = 2, 96, 200, 24, 300, 8, 96
    x = torch.randn(B, S, D, device="cuda", generator=g, dtype=torch.bfloat16)
    y = torch.randn(B, K, D, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.rand(B, K, device="cuda", generator=g)
    gamma = torch.rand(D, device="cuda", generator=g)
    logits = torch.randn(T, E, device="cuda", generator=g)
    xt = torch.randn(T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    ws = [torch.randn(E, D, F, device="cuda", generator=g, dtype=torch.bfloat16) / 16,
          torch.randn(E, D, F, device="cuda", generator=g, dtype=torch.bfloat16) / 16,
          torch.randn(E, F, D, device="cuda", generator=g, dtype=torch.bfloat16) / 16]

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, w, gamma, logits, xt, *ws)]
        lx, ly, lw, lg, ll, lxt, *lws = leaves
        idx = mod_select(lx[..., 0].float(), k=K).indices
        plan = topk_route(ll, 2)
        with deterministic_algorithms():
            outs = [gather_tokens(lx, idx), scatter_tokens(lx, ly, idx, lw), rmsnorm_gather_tokens(lx, idx, lg),
                    moe_mlp(lxt, plan, *lws), expert_choice_route(ll.detach(), 2.0).token_idx, idx]
            loss = sum(o.float().square().sum() for o in outs[:4]) + plan.weights.sum()
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return outs + [gr for gr in grads if gr is not None]

    fl.FAST = False
    try:
        slow = run()
    finally:
        fl.FAST = True
    run()  # first calls of each key
    before = fl.stats["fast"]
    fast = run()
    assert fl.stats["fast"] > before
    assert len(fast) == len(slow)
    for a, b in zip(slow, fast):
        assert torch.equal(a, b)
