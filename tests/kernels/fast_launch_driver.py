"""Run by ``test_fast_launch.py`` in a process of its own: Triton compiles for sm_90 with no
GPU (``scripts/host_overhead.py``'s stand-in driver records what the C launcher is given, and
reports the device and stream the test sets), and small kernels are launched with argument
changes that make Triton pick another compiled kernel and changes that must not. flopwise's
direct launches must hand the launcher the same compiled kernel, grid, stream and arguments
(tensors by address) as Triton's own dispatch, call for call. Prints one line per check."""

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


@triton.jit
def _positional_kernel(x_ptr, y_ptr, n, K: tl.constexpr, BLOCK: tl.constexpr = 64, scale=2.0):
    # a constexpr passed by position, a constexpr and a float left at their defaults
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * (scale + K), mask=mask)


@triton.jit(do_not_specialize=["n"])
def _unspecialised_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _annotated_kernel(x_ptr, y_ptr, n: tl.int32, s: tl.float16, FLAG: tl.constexpr = False, m=3):
    # annotated parameters, a pointer that may be None, a non-constexpr parameter with a default
    offs = tl.arange(0, 64)
    v = tl.load(x_ptr + offs, mask=offs < n)
    if y_ptr is not None:
        v += tl.load(y_ptr + offs, mask=offs < n)
    if FLAG:
        v = v * s
    tl.store(x_ptr + offs, v + m, mask=offs < n)


def _cases():
    """(name, compiled-kernel group, new class, kernel, args, keyword args, device, stream).
    Cases of one group must get the same compiled kernel from Triton, cases of different
    groups different ones. A case that is not of a new class must be launched directly on its
    first call (its key by value is new, its key by class is not). Every call gets tensors of
    its own, so a direct launch that handed the launcher stale arguments would differ."""
    f32, bf16 = torch.zeros(96), torch.zeros(96, dtype=torch.bfloat16)
    base = dict(FLAG=True, BLOCK=64, num_warps=4)
    sk, pk, uk, ak = _scale_kernel, _positional_kernel, _unspecialised_kernel, _annotated_kernel
    p1, p2 = torch.nn.Parameter(torch.zeros(96)), torch.nn.Parameter(torch.zeros(96))
    rows = [
        ("baseline", "a", True, sk, (f32, f32, 64, 2.0), base, 0, 0),
        ("another stream", "a", False, sk, (f32, f32, 64, 2.0), base, 0, 7),
        ("n = 48: same class", "a", False, sk, (f32, f32, 48, 2.0), base, 0, 0),
        ("n = 0: same class", "a", False, sk, (f32, f32, 0, 2.0), base, 0, 0),
        ("n = -32: same class", "a", False, sk, (f32, f32, -32, 2.0), base, 0, 0),
        ("another float: same class", "a", False, sk, (f32, f32, 64, -0.5), base, 0, 0),
        ("pointer offset 4 B", "b", True, sk, (f32[1:], f32, 64, 2.0), base, 0, 0),
        ("pointer offset 8 B: same class", "b", False, sk, (f32[2:], f32, 64, 2.0), base, 0, 0),
        ("pointer offset 12 B: same class", "b", False, sk, (f32[3:], f32, 64, 2.0), base, 0, 0),
        ("pointer offset 20 B: same class", "b", False, sk, (f32[5:], f32, 64, 2.0), base, 0, 0),
        ("n == 1", "c", True, sk, (f32, f32, 1, 2.0), base, 0, 0),
        ("n not a multiple of 16", "d", True, sk, (f32, f32, 17, 2.0), base, 0, 0),
        ("n = -17: same class", "d", False, sk, (f32, f32, -17, 2.0), base, 0, 0),
        ("n = 2**31 - 1: same class", "d", False, sk, (f32, f32, 2 ** 31 - 1, 2.0), base, 0, 0),
        ("n beyond int32", "e", True, sk, (f32, f32, 2 ** 31 + 16, 2.0), base, 0, 0),
        ("n below int32: same class", "e", False, sk, (f32, f32, -2 ** 31 - 16, 2.0), base, 0, 0),
        ("n beyond int32, not a multiple of 16", "f", True, sk, (f32, f32, 2 ** 33 + 3, 2.0), base, 0, 0),
        ("n beyond int64", "g", True, sk, (f32, f32, 2 ** 63 + 16, 2.0), base, 0, 0),
        ("n beyond int64, not a multiple of 16", "h", True, sk, (f32, f32, 2 ** 64 - 1, 2.0), base, 0, 0),
        ("bf16 tensors", "i", True, sk, (bf16, bf16, 64, 2.0), base, 0, 0),
        ("constexpr", "j", True, sk, (f32, f32, 64, 2.0), dict(base, FLAG=False), 0, 0),
        ("num_warps", "k", True, sk, (f32, f32, 64, 2.0), dict(base, num_warps=8), 0, 0),
        ("int scale", "l", True, sk, (f32, f32, 64, 2), base, 0, 0),
        ("scale == 1", "m", True, sk, (f32, f32, 64, 1), base, 0, 0),
        ("bool scale", "n", True, sk, (f32, f32, 64, True), base, 0, 0),
        ("another device", "o", True, sk, (f32, f32, 64, 2.0), base, 1, 3),
        ("positional constexpr K = 3", "p", True, pk, (f32, f32, 64, 3), {}, 0, 0),
        ("positional constexpr K = 5", "q", True, pk, (f32, f32, 64, 5), {}, 0, 0),
        ("defaults given", "r", True, pk, (f32, f32, 64, 3), dict(BLOCK=32, scale=0.5), 0, 0),
        ("not specialised: n = 16", "s", True, uk, (f32, f32, 16), dict(BLOCK=64), 0, 0),
        ("not specialised: n = 1", "s", True, uk, (f32, f32, 1), dict(BLOCK=64), 0, 0),
        ("not specialised: n = 17", "s", True, uk, (f32, f32, 17), dict(BLOCK=64), 0, 0),
        ("annotated", "t", True, ak, (f32, None, 48, 2.0), {}, 0, 0),
        ("annotated: n = 80, another float", "t", False, ak, (f32, None, 80, -1.0), {}, 0, 0),
        ("annotated: int for the fp16", "t", True, ak, (f32, None, 48, 3), {}, 0, 0),
        ("annotated: n == 1", "u", True, ak, (f32, None, 1, 2.0), {}, 0, 0),
        ("annotated: n = 17", "v", True, ak, (f32, None, 17, 2.0), {}, 0, 0),
        ("annotated: a tensor for None", "w", True, ak, (f32, f32, 48, 2.0), {}, 0, 0),
        ("annotated: an empty tensor", "w", False, ak, (f32, torch.zeros(0), 48, 2.0), {}, 0, 0),
        ("annotated: Parameters", "w", False, ak, (p1, p2, 48, 2.0), {}, 0, 0),
        ("annotated: default given by keyword", "w", True, ak, (f32, f32, 48, 2.0), dict(m=5), 0, 0),
        ("annotated: default given, multiple of 16", "x", True, ak, (f32, f32, 48, 2.0), dict(m=16), 0, 0),
        ("annotated: FLAG=True", "y", True, ak, (f32, f32, 48, 2.0), dict(FLAG=True), 0, 0),
    ]

    def fresh(a):  # a new tensor with the same values and address modulo 16
        if not isinstance(a, torch.Tensor) or a.numel() == 0:
            return a
        if isinstance(a, torch.nn.Parameter):
            return torch.nn.Parameter(fresh(a.data))
        base = torch.zeros(a.numel() + 16 + a.storage_offset(), dtype=a.dtype)
        shift = ((a.data_ptr() & 15) - (base.data_ptr() & 15)) % 16 // a.element_size()
        return base[shift:shift + a.numel()]

    return [(name, group, new, kernel, tuple(fresh(a) for a in args), kw, dev, stream)
            for name, group, new, kernel, args, kw, dev, stream in rows], fresh


def main() -> None:
    cases, fresh = _cases()
    # every case twice in a row (each call with tensors of its own), then all again
    calls = [(c, tuple(fresh(a) for a in c[4])) for c in cases for _ in range(2)]
    calls += [(c, tuple(fresh(a) for a in c[4])) for c in cases]

    def run_all():
        paths = []
        for (_, _, _, kernel, _, kw, dev, stream), args in calls:
            ho.CURRENT.update(device=dev, stream=stream)
            before = fl.stats["fast"]
            fl.launch(kernel, (3, 2), *args, **kw)
            paths.append(fl.stats["fast"] - before)
        ho.CURRENT.update(device=0, stream=0)
        return paths

    ho.ADDRESSES[0] = True
    try:
        fl.FAST = False
        slow = ho.recorded(run_all)
        fl.FAST = True
        fl.clear()
        paths = []
        fast = ho.recorded(lambda: paths.extend(run_all()))
    finally:
        ho.ADDRESSES[0] = False
    assert len(slow) == len(fast) == len(calls), (len(slow), len(fast))
    for ((name, *_), _), s, f in zip(calls, slow, fast):
        assert s == f, f"{name}: direct launch differs from Triton's dispatch\n{s}\n{f}"
    # each group is one compiled kernel, and different groups are different ones: a key that
    # missed a difference between groups would have handed a call the wrong kernel
    picked = {}
    for ((name, group, *_), _), s in zip(calls, slow):
        assert picked.setdefault(group, s[0]) is s[0], f"{name}: Triton picked another kernel than for its group"
    assert len({id(k) for k in picked.values()}) == len(picked), "two groups share a compiled kernel"
    seen = set()
    for ((name, _, new, *_), _), direct in zip(calls, paths):
        expected = 0 if (new and name not in seen) else 1
        seen.add(name)
        assert direct == expected, f"{name}: {'direct' if direct else 'through Triton'}, expected otherwise"
    print(f"specialisation: {len(calls)} launches, {sum(paths)} direct, {len(picked)} compiled kernels, all equal")

    # both caches starting over every few entries change nothing but the paths taken
    limit = fl._MAX_ENTRIES
    fl._MAX_ENTRIES = 5
    try:
        ho.ADDRESSES[0] = True
        again = ho.recorded(run_all)
    finally:
        ho.ADDRESSES[0] = False
        fl._MAX_ENTRIES = limit
    assert again == fast, "a cache starting over changed a launch"
    print("caches starting over: the same launches")
    _settings_and_errors(cases[0])
    _hooks(cases[0])


def _both_raise(kernel, args, kw) -> str:
    """The exception a call raises through Triton's dispatch, checked to be the one the
    direct path raises too."""
    raised = []
    for fast in (False, True):
        fl.FAST = fast
        try:
            fl.launch(kernel, (1,), *args, **kw)
        except Exception as e:  # noqa: BLE001
            raised.append(type(e).__name__)
        else:
            raised.append(None)
    fl.FAST = True
    assert raised[0] is not None and raised[0] == raised[1], raised
    return raised[0]


def _settings_and_errors(case) -> None:
    _, _, _, kernel, args, kw, _, _ = case
    # a setting Triton reads on every call: the direct path follows it
    fl.launch(kernel, (1,), *args, **kw)
    for debug in (True, False):
        triton.knobs.runtime.debug = debug
        try:
            rec = []
            for fast in (False, True):
                fl.FAST = fast
                rec.append(ho.recorded(lambda: fl.launch(kernel, (1,), *args, **kw)))
        finally:
            fl.FAST = True
            triton.knobs.runtime.debug = False
        assert rec[0] == rec[1], f"debug={debug}: direct launch differs"
        if debug:
            debug_kernel = rec[0][0][0]
    assert debug_kernel is not rec[0][0][0], "the debug setting did not change Triton's pick"

    # values Triton refuses are refused on the direct path too, after a value of the same
    # class was cached: integers past uint64 or below int64, a float for num_warps
    x = args[0]
    refused = []
    for ok, bad in [(2 ** 63 + 17, 2 ** 64 + 17), (-2 ** 62 - 3, -2 ** 63 - 3)]:
        fl.launch(kernel, (1,), x, x, ok, 2.0, **kw)
        fl.launch(kernel, (1,), x, x, ok, 2.0, **kw)
        refused.append(_both_raise(kernel, (x, x, bad, 2.0), kw))
    refused.append(_both_raise(kernel, args, dict(kw, num_warps=4.0)))
    print(f"the debug setting followed; refused on both paths: {refused}")


def _hooks(case) -> None:
    _, _, _, kernel, args, kw, _, _ = case

    def path():
        before = dict(fl.stats)
        fl.launch(kernel, (1,), *args, **kw)
        return "direct" if fl.stats["fast"] > before["fast"] else "triton"

    assert path() == "direct"
    # a registered launch hook sends every call through Triton's dispatch (which calls it)
    seen = []
    hook = seen.append
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert path() == "triton"  # (the C launcher, here a stand-in, would call it)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert path() == "direct"
    # so does a pre-run hook added after the key was cached (Triton calls it before launching)
    ran = []
    kernel.add_pre_run_hook(lambda *a, **k: ran.append(1))
    try:
        assert path() == "triton" and ran == [1]
    finally:
        kernel.pre_run_hooks.clear()
    assert path() == "direct"
    print("launch and pre-run hooks: Triton's dispatch while registered, direct after")

    # arguments the key cannot describe take Triton's dispatch every time
    f32 = torch.zeros(80)
    before = dict(fl.stats)
    for _ in range(2):
        fl.launch(kernel, (1,), f32, y_ptr=f32, n=64, scale=2.0, **kw)  # a tensor keyword
        fl.launch(kernel, lambda meta: (1,), f32, f32, 64, 2.0, **kw)
    assert fl.stats["fast"] == before["fast"] and fl.stats["slow"] == before["slow"] + 4

    # a kernel taking *args (Triton packs them into one argument) is never launched directly
    def rest_kernel(x_ptr, *rest, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + rest[0])

    rest_kernel = triton.jit(rest_kernel)
    try:
        slow, fast, direct = ho.both_paths(lambda: fl.launch(rest_kernel, (1,), f32, 48, BLOCK=16))
    except Exception as e:  # noqa: BLE001 - a Triton that refuses such kernels refuses them either way
        print(f"(*args kernel refused by this Triton: {type(e).__name__})")
    else:
        assert slow == fast and direct == 0, (slow, fast, direct)
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
        # again with the cache by value emptied first: every launch through the key by class
        _, by_class, direct = ho.both_paths(op, reset=fl._CACHE.clear)
        assert by_class == slow, f"{name}: launches through the key by class differ\n{slow}\n{by_class}"
        assert direct == len(by_class), f"{name}: {direct} of {len(by_class)} launches direct by class"
        print(f"{name}: {len(fast)} launches, all direct (by value and by class), equal to Triton's dispatch")


if __name__ == "__main__":
    main()
    check_library()
