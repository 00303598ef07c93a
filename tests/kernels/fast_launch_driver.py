"""Run by ``test_fast_launch.py`` in a process of its own: Triton compiles for sm_90 with no
GPU (``scripts/host_overhead.py``'s stand-in driver records what the C launcher is given),
and a small kernel is launched with every argument change that makes Triton pick another
compiled kernel. flopwise's direct launches must hand the launcher the same compiled kernel,
grid and arguments as Triton's own dispatch, call for call. Prints one line per check."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
os.environ.pop("TRITON_INTERPRET", None)
import host_overhead as ho  # noqa: E402

ho._dispatch_only_driver()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

importlib.import_module("flopwise.kernels._dispatch").INTERPRET = True  # CPU tensors take the kernels
fl = importlib.import_module("flopwise.kernels._launch")


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask)
    if FLAG:
        v = v * scale
    tl.store(y_ptr + offs, v, mask=mask)


def main() -> None:
    f32 = torch.zeros(80)
    bf16 = torch.zeros(80, dtype=torch.bfloat16)
    out = torch.zeros(80)
    base = dict(FLAG=True, BLOCK=64, num_warps=4)
    # (what changes, args, keyword args): each case is a different compiled kernel for Triton
    cases = [
        ("baseline", (f32, out, 64, 2.0), base),
        ("misaligned pointer", (f32[1:], out, 64, 2.0), base),
        ("n == 1", (f32, out, 1, 2.0), base),
        ("n not a multiple of 16", (f32, out, 17, 2.0), base),
        ("n beyond int32", (f32, out, 2 ** 31 + 16, 2.0), base),
        ("bf16 tensors", (bf16, bf16, 64, 2.0), base),
        ("constexpr", (f32, out, 64, 2.0), dict(base, FLAG=False)),
        ("num_warps", (f32, out, 64, 2.0), dict(base, num_warps=8)),
        ("int scale", (f32, out, 64, 2), base),
        ("scale == 1", (f32, out, 64, 1), base),
        ("bool scale", (f32, out, 64, True), base),
    ]
    # every case twice in a row, then all again: the second and third calls of a key are direct
    calls = [c for c in cases for _ in range(2)] + cases

    def run_all():
        return ho.recorded(lambda: [fl.launch(_scale_kernel, (1,), *args, **kw) for _, args, kw in calls])

    fl.FAST = False
    slow = run_all()
    fl.FAST = True
    fl._CACHE.clear()
    before = dict(fl.stats)
    fast = run_all()
    direct = fl.stats["fast"] - before["fast"]
    assert len(slow) == len(fast) == len(calls), (len(slow), len(fast))
    for (name, _, _), s, f in zip(calls, slow, fast):
        assert s == f, f"{name}: direct launch differs from Triton's dispatch\n{s}\n{f}"
    kernels = {id(s[0]) for s in slow}
    # Triton picked a different compiled kernel for every case, so a key that missed any of
    # these differences would have handed a call the wrong one
    assert len(kernels) == len(cases), (len(kernels), len(cases))
    assert direct == len(calls) - len(cases), direct
    print(f"specialisation: {len(calls)} launches, {direct} direct, {len(kernels)} compiled kernels, all equal")

    # a registered launch hook sends every call through Triton's dispatch (which calls it)
    seen = []
    hook = seen.append
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        before = dict(fl.stats)
        fl.launch(_scale_kernel, (1,), *cases[0][1], **cases[0][2])
        assert fl.stats["slow"] == before["slow"] + 1 and fl.stats["fast"] == before["fast"]
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    before = dict(fl.stats)
    fl.launch(_scale_kernel, (1,), *cases[0][1], **cases[0][2])
    assert fl.stats["fast"] == before["fast"] + 1
    print("launch hook: Triton's dispatch while registered, direct after")

    # arguments the key cannot describe take Triton's dispatch every time
    before = dict(fl.stats)
    for _ in range(2):
        fl.launch(_scale_kernel, (1,), f32, y_ptr=out, n=64, scale=2.0, **base)  # a tensor keyword
        fl.launch(_scale_kernel, lambda meta: (1,), f32, out, 64, 2.0, **base)
    assert fl.stats["fast"] == before["fast"] and fl.stats["slow"] == before["slow"] + 4
    print("unkeyable calls: Triton's dispatch")


def _library_ops():
    """Every launch site of flopwise's kernels, forward and backward. (The stand-in launcher
    runs nothing, so outputs are whatever their buffers held: only the launches are compared.)"""
    import contextlib

    from flopwise.coding import triton_coder
    from flopwise.kernels import (expert_choice_route, gather_tokens, grouped_mm, mod_select, moe_mlp,
                                  rmsnorm_gather_tokens, scatter_tokens, topk_route, topk_route_reference)
    from flopwise.kernels._dispatch import deterministic_algorithms

    g = torch.Generator().manual_seed(0)
    B, S, D, K = 2, 64, 24, 8
    x = torch.randn(B, S, D, generator=g, requires_grad=True)
    idx = torch.arange(0, S, S // K)[None].repeat(B, 1).int()
    y = torch.randn(B, K, D, generator=g, requires_grad=True)
    w = torch.rand(B, K, generator=g, requires_grad=True)
    gamma = torch.rand(D, generator=g, requires_grad=True)
    logits = torch.randn(64, 8, generator=g, requires_grad=True)
    xt = torch.randn(64, 16, generator=g, requires_grad=True)
    ws = [torch.randn(8, 16, 32, generator=g, requires_grad=True), torch.randn(8, 16, 32, generator=g,
                                                                                requires_grad=True),
          torch.randn(8, 32, 16, generator=g, requires_grad=True)]
    plan = topk_route_reference(logits.detach(), 2)
    symbols = torch.randint(0, 4, (3, 5), generator=g)
    cdf = torch.tensor([0, 1 << 22, 1 << 23, 3 << 22, 1 << 24]).repeat(3, 5, 1)

    def backward(out, *inputs):
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    def moe_deterministic():
        with deterministic_algorithms():
            backward(moe_mlp(xt, plan, *ws), xt, *ws)

    def decode():
        with contextlib.suppress(ValueError):  # the stand-in decoded nothing: the stream is "corrupt"
            triton_coder.decode_triton(torch.zeros(3, 8, dtype=torch.uint8), torch.full((3,), 64), cdf, 5)

    return [
        ("gather", lambda: backward(gather_tokens(x, idx), x)),
        ("scatter", lambda: backward(scatter_tokens(x, y, idx, w), x, y, w)),
        ("scatter in place", lambda: scatter_tokens(x.detach().clone(), y.detach(), idx, w.detach(), inplace=True)),
        ("rmsnorm gather", lambda: backward(rmsnorm_gather_tokens(x, idx, gamma), x, gamma)),
        ("token-choice plan", lambda: backward(topk_route(logits, 2).weights, logits)),
        ("sigmoid plan, renormalised", lambda: backward(topk_route(logits, 3, score="sigmoid",
                                                                    renormalize=True).weights, logits)),
        ("expert choice", lambda: expert_choice_route(logits, 2.0)),  # (its backward is torch ops)
        ("MoD selection", lambda: mod_select(x[..., 0].detach())),  # (its backward is torch ops)
        ("moe_mlp", lambda: backward(moe_mlp(xt, plan, *ws), xt, *ws)),
        ("moe_mlp, deterministic", moe_deterministic),
        ("grouped_mm", lambda: backward(grouped_mm(xt, ws[0], plan), xt, ws[0])),
        ("coder encode", lambda: triton_coder.encode_triton(symbols, cdf)),
        ("coder decode", decode),
    ]


def check_library() -> None:
    for name, op in _library_ops():
        slow, fast, direct = ho.both_paths(op)
        assert slow and fast == slow, f"{name}: direct launches differ from Triton's dispatch\n{slow}\n{fast}"
        assert direct == len(fast), f"{name}: {direct} of {len(fast)} launches direct"
        print(f"{name}: {len(fast)} launches, all direct, equal to Triton's dispatch")


if __name__ == "__main__":
    main()
    check_library()
