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
# direct launches exist only for the Triton releases they were checked against
needs_tested_triton = pytest.mark.skipif(not fl.SUPPORTED, reason="this Triton is not in _launch.TESTED: "
                                         "every call takes Triton's dispatch (test_untested_triton_...)")


@pytest.mark.parametrize("version, supported", [("3.5.1", False), ("3.6.0", True), ("3.9.0+git1a2b", True),
                                                ("3.10.0", False), ("4.0.0", False), ("dev", False)])
def test_untested_triton_keeps_tritons_dispatch(version, supported):
    """Another Triton release may key or launch differently (3.5 lacks a setting the key reads):
    the direct path is on only for the tested ones."""
    code = ("import triton; triton.__version__ = %r\n"
            "import importlib; fl = importlib.import_module('flopwise.kernels._launch')\n"
            "print(fl.SUPPORTED, fl._JIT is None)") % version
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(supported), str(not supported)]


@needs_tested_triton
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
    assert len({k(t, 1), k(t, True), k(t, 1.0)}) == 3
    assert len({k(t, 3, B=1), k(t, 3, B=2), k(t, 3, B=True), k(t, 3, B=1.0)}) == 4  # 1 == True == 1.0
    assert fl._key("kernel", 0, (t,), {}, (True, "")) != fl._key("kernel", 0, (t,), {}, (False, ""))
    assert fl._key("a", 0, (t,), {}) != fl._key("b", 0, (t,), {}) != fl._key("a", 1, (t,), {})
    assert k(t, object()) is None  # e.g. a TMA descriptor
    assert k(t, y=t) is None  # a tensor keyword
    assert k(t, B=[1]) is None and k(t, B=(1,)) is None  # keys stay hashable and exact
    assert k(t, 3, B=1) is not None


@needs_tested_triton
def test_int_class_is_as_fine_as_tritons_specialisation():
    """Integers of one class get the same specialisation from Triton (its own C routine, for
    the CUDA backend, with and without specialisation and alignment)."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    from triton.backends.nvidia.compiler import CUDABackend

    g = torch.Generator().manual_seed(0)
    edges = [0, 1, -1, 2, 15, 16, 17, -16, -17, 2 ** 31 - 1, 2 ** 31, 2 ** 31 - 16, -2 ** 31, -2 ** 31 - 1,
             -2 ** 31 - 16, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 63 + 16, 2 ** 64 - 1, 2 ** 64 - 16]
    rand = [int(v) for v in torch.randint(-2 ** 40, 2 ** 40, (2000,), generator=g)]
    rand += [int(v) * 16 for v in torch.randint(-2 ** 35, 2 ** 35, (500,), generator=g)]
    rand += [2 ** 63 + int(v) for v in torch.randint(0, 2 ** 62, (500,), generator=g)]
    classes = {}
    for v in edges + rand:
        triton_says = tuple(libtriton.native_specialize_impl(CUDABackend, v, False, spec, align)
                            for spec in (True, False) for align in (True, False))
        assert classes.setdefault(fl._int_class(v), triton_says) == triton_says, v
    assert len(classes) == 7  # 1; and int32, int64, uint64, each divisible by 16 or not
    # values Triton refuses: each a class of its own, so none is launched on another's pick
    refused = [2 ** 64, 2 ** 64 + 16, 2 ** 70, -2 ** 63 - 1, -2 ** 63 - 16, -2 ** 80]
    for v in refused:
        with pytest.raises(OverflowError):
            libtriton.native_specialize_impl(CUDABackend, v, False, True, True)
    assert len({fl._int_class(v) for v in refused} | set(classes)) == len(refused) + len(classes)
    assert fl._int_class(-2 ** 63) in classes and fl._int_class(2 ** 64 - 1) in classes  # the last in range


def test_class_key_keeps_constexpr_values():
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    def body(x_ptr, n, scale, K: tl.constexpr):
        pass

    kernel = JITFunction(body)  # (what @triton.jit makes without the interpreter)

    t = torch.zeros(8)
    k = lambda *args, **kw: fl._class_key(kernel, 0, args, kw)  # noqa: E731
    assert k(t, 48, 2.0, 3) == k(t[4:], 64, -1.5, 3)  # aligned, int32 multiples of 16, any float
    others = [k(t, 48, 2.0, 5),  # a positional constexpr counts by value
              k(t[1:], 48, 2.0, 3), k(t.half(), 48, 2.0, 3), k(t, 17, 2.0, 3), k(t, 1, 2.0, 3), k(t, 2 ** 32, 2.0, 3),
              k(t, 2 ** 63, 2.0, 3), k(t, 48, 2, 3), k(t, 48, True, 3), k(t, 48, None, 3),
              k(t, 48, 2.0, 3, num_warps=4), k(t, 48, 2.0, 3, num_warps=8), k(t, 48, 2.0, 3, num_warps=4.0)]
    keys = [k(t, 48, 2.0, 3)] + others
    assert len(set(keys)) == len(keys)  # pairwise different
    assert fl._class_key(kernel, 0, (t, 48, 2.0, 3), {}, (True, "")) != k(t, 48, 2.0, 3)  # settings count


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
