"""Host (Python) time per call of flopwise's eager ops, next to the plain-torch pipeline.

On a GPU, a memory-bound op at small shapes takes less time than its host path to enqueue;
this measures that path on any machine, without a GPU, next to the plain-torch pipeline it
replaces (whose kernels do run, on tensors small enough that their cost is host time too).
Two modes:

* default: every Triton launch is stubbed out, so the time is flopwise's own host path
  (argument checks, dispatch, autograd, allocations, grid arithmetic);
* ``--triton-dispatch``: the launches go through Triton's own JIT dispatch (argument binding
  and specialisation, the kernel-cache lookup, launch metadata), with each kernel compiled
  for sm_90 on first use; only Triton's C launcher and the driver call are left out, so the
  time is what a CUDA host spends before ``cuLaunchKernel``, less those two. The first
  calls compile (seconds per kernel, cached by Triton across runs).

    python scripts/host_overhead.py [--repeat 5] [--triton-dispatch]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import time
import types

import torch

_LAUNCHES = [0]  # launches counted in --triton-dispatch mode
_RECORD: list = []  # (compiled kernel, grid, stream, function, metadata, args) per launch, when recording
RECORDING = [False]
ADDRESSES = [False]  # record tensors' addresses too (for calls that reuse the same tensors)
CURRENT = {"device": 0, "stream": 0}  # what the stand-in driver reports as current


class _Stub:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_kernels(modules) -> None:
    for mod in modules:
        for name in dir(mod):
            # launchable kernels (``kernel[grid](...)``), not helpers whose names end the same way
            if name.startswith("_") and name.endswith("_kernel") and hasattr(getattr(mod, name), "__getitem__"):
                setattr(mod, name, _Stub())


def _dispatch_only_driver() -> None:
    """Make Triton compile for sm_90 and run its launch path on CPU tensors, up to its C
    launcher, which becomes a counter. Must run before flopwise is imported (Triton decides
    between the interpreter and its JIT when a kernel is decorated)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler
    from triton.runtime.driver import driver

    class _Driver:  # what JITFunction.run and CompiledKernel ask of the active driver
        utils = types.SimpleNamespace(get_device_properties=lambda device: {"max_shared_mem": 232448,
                                                                            "multiprocessor_count": 132})
        launcher_cls = None

        def get_current_device(self):
            return CURRENT["device"]

        def get_current_stream(self, device=None):
            return CURRENT["stream"] + 1000 * (CURRENT["device"] if device is None else device)

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        @staticmethod
        def is_active():
            return True

    def init_handles(self):  # instead of loading the cubin into a CUDA context
        if self.module is None:
            self.module, self.function = 0, 0
            self._run = functools.partial(_launch, self)

    driver.set_active(_Driver())
    compiler.CompiledKernel._init_handles = init_handles


def _launch(compiled, *args):
    """The C launcher's stand-in: counts, and records what it was given when asked to."""
    _LAUNCHES[0] += 1
    if RECORDING[0]:
        hooks = args[6:9]  # launch metadata and hook chains: None on flopwise's direct path
        assert all(h is None for h in hooks) or not (hooks[1].calls or hooks[2].calls)
        _RECORD.append((compiled, args[:4], args[4], args[5], tuple(_norm(a) for a in args[9:])))


def _norm(a):
    if isinstance(a, torch.Tensor):
        return "tensor", a.dtype, tuple(a.shape), tuple(a.stride()), a.data_ptr() if ADDRESSES[0] else a.data_ptr() & 15
    return a


def recorded(fn) -> list:
    """The launches ``fn()`` makes, as the C launcher sees them."""
    _RECORD.clear()
    RECORDING[0] = True
    try:
        fn()
    finally:
        RECORDING[0] = False
    return list(_RECORD)


def both_paths(fn, reset=None) -> tuple[list, list, int]:
    """``fn``'s launches through Triton's dispatch and through flopwise's direct launches (each
    after a warm-up call), and how many of the latter were direct. ``reset()``, if given, runs
    before each recorded call (for an ``fn`` whose arguments change from call to call)."""
    fl = importlib.import_module("flopwise.kernels._launch")
    reset = reset or (lambda: None)
    fl.FAST = False
    try:
        fn()
        reset()
        slow = recorded(fn)
    finally:
        fl.FAST = True
    fn()
    reset()
    before = fl.stats["fast"]
    fast = recorded(fn)
    return slow, fast, fl.stats["fast"] - before


def _us(fn, n: int, repeat: int) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def _moe_torch(x, plan, ws):
    """The torch pipeline's part after routing: gather, three grouped matmuls, combine."""
    offs = plan.expert_offsets[1:]
    xs = x[plan.token_idx.long()]
    h = torch.nn.functional.silu(torch._grouped_mm(xs, ws[0], offs=offs)) * torch._grouped_mm(xs, ws[1], offs=offs)
    y = torch._grouped_mm(h, ws[2], offs=offs) * plan.weights[:, None]
    return torch.zeros_like(x).index_add(0, plan.token_idx.long(), y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("-n", type=int, default=300, help="calls per timing")
    p.add_argument("--triton-dispatch", action="store_true",
                   help="run Triton's own launch path (kernels compiled for sm_90) instead of stubbing it")
    a = p.parse_args()
    if "flopwise" in sys.modules:
        raise SystemExit("run this as a script: flopwise must be imported after the mode is set up")
    if a.triton_dispatch:
        os.environ.pop("TRITON_INTERPRET", None)
        _dispatch_only_driver()
        importlib.import_module("flopwise.kernels._dispatch").INTERPRET = True  # CPU tensors take the kernels
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the Triton path
        _stub_kernels([importlib.import_module(f"flopwise.kernels.{m}") for m in ("mod_gather", "routing",
                                                                                    "grouped_mm")])
    from flopwise.kernels import gather_tokens, moe_mlp, plan_from_topk, scatter_tokens, topk_route, \
        topk_route_reference

    # No kernel runs in either mode, so a flag a kernel writes for a device-side assertion
    # (plan_from_topk's "every id in range") holds whatever its allocation held: the assertion
    # reads a tensor holding 1 instead, the same op at the same cost.
    assert_async, one = torch._assert_async, torch.ones((), dtype=torch.int32)
    torch._assert_async = lambda flag, *msg: assert_async(one, *msg)

    B, S, D, K = 2, 64, 8, 8
    x = torch.randn(B, S, D, requires_grad=True)
    idx = torch.arange(0, S, S // K)[None].repeat(B, 1).int()
    y = torch.randn(B, K, D, requires_grad=True)
    w = torch.rand(B, K, requires_grad=True)
    gk, gs = torch.randn(B, K, D), torch.randn(B, S, D)
    ie = idx.long()[..., None].expand(B, K, D)
    logits = torch.randn(64, 8, requires_grad=True)
    xt, gt = torch.randn(64, 16), torch.randn(64, 16)
    ws = [torch.randn(8, 16, 32), torch.randn(8, 16, 32), torch.randn(8, 32, 16)]
    wg = [w.clone().requires_grad_(True) for w in ws]
    plan = topk_route_reference(logits.detach(), 2)  # (real indices: the routing kernels are stubbed)
    # a transformers router's output (int64 ids, float weights) and its experts' stored weights
    tk_ids, tk_w = plan.topk_ids.long(), plan.topk_weights.clone().requires_grad_(True)
    gu_hf = torch.cat([ws[0], ws[1]], 2).transpose(1, 2).contiguous().requires_grad_(True)  # [E, 2F, D]
    dn_hf = ws[2].transpose(1, 2).contiguous().requires_grad_(True)  # [E, D, F]

    def _hf_ours():
        p = plan_from_topk(tk_ids, tk_w, 8)
        return moe_mlp(xt, p, gu_hf.transpose(1, 2), None, dn_hf.transpose(1, 2))

    def _hf_torch():  # transformers' grouped_mm experts: sort, gather, grouped matmuls, unpermute, sum
        flat = tk_ids.view(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=8), 0).int()
        g, u = torch._grouped_mm(xt[order // 2], gu_hf.transpose(1, 2), offs=offs).chunk(2, -1)
        o = torch._grouped_mm(torch.nn.functional.silu(g) * u, dn_hf.transpose(1, 2), offs=offs)
        o = o * tk_w.view(-1)[order, None]
        return o[torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))].view(64, 2, 16).sum(1)
    # a sequence that grows by one token per call (as under a KV cache): a new length each call
    grow, xlong = [0], torch.randn(1, 2048 + 64, D)

    def grown():
        grow[0] += 1
        return xlong[:, :64 + grow[0] % 2048]

    rows = [
        ("gather fwd", lambda: gather_tokens(x.detach(), idx), lambda: torch.gather(x.detach(), 1, ie)),
        ("gather fwd, S grows", lambda: gather_tokens(grown(), idx[:1]),
         lambda: torch.gather(grown(), 1, ie[:1])),
        ("gather fwd+bwd", lambda: torch.autograd.grad(gather_tokens(x, idx), [x], gk),
         lambda: torch.autograd.grad(torch.gather(x, 1, ie), [x], gk)),
        ("scatter fwd+bwd", lambda: torch.autograd.grad(scatter_tokens(x, y, idx, w), [x, y, w], gs),
         lambda: torch.autograd.grad(x.scatter_add(1, ie, w[..., None] * y), [x, y, w], gs)),
        ("token-choice plan fwd", lambda: topk_route(logits.detach(), 2),
         lambda: torch.topk(torch.softmax(logits.detach(), -1), 2).indices.view(-1).argsort(stable=True)),
        ("moe_mlp fwd (plan given)", lambda: moe_mlp(xt, plan, *ws), lambda: _moe_torch(xt, plan, ws)),
        ("moe_mlp fwd+bwd", lambda: torch.autograd.grad(moe_mlp(xt, plan, *wg), wg, gt),
         lambda: torch.autograd.grad(_moe_torch(xt, plan, wg), wg, gt)),
        ("plan from top-k ids", lambda: plan_from_topk(tk_ids, tk_w.detach(), 8),
         lambda: torch.cumsum(torch.bincount(tk_ids.view(-1), minlength=8), 0) + tk_ids.view(-1).argsort(stable=True)[0]),
        # (gradients of the expert weights only: with the launches not run, the plan's inverse
        # permutation, which the routing weights' gradient is gathered through, holds garbage)
        ("HF experts fwd+bwd", lambda: torch.autograd.grad(_hf_ours(), [gu_hf, dn_hf], gt),
         lambda: torch.autograd.grad(_hf_torch(), [gu_hf, dn_hf], gt)),
        ("HF experts fwd, no grad", torch.no_grad()(_hf_ours), torch.no_grad()(_hf_torch)),
    ]
    if not a.triton_dispatch:
        print(f"{'op':<24} {'flopwise host µs':>17} {'torch µs':>9}   (Triton stubbed)")
        for name, ours, ref in rows:
            print(f"{name:<24} {_us(ours, a.n, a.repeat):17.1f} {_us(ref, a.n, a.repeat):9.1f}", flush=True)
        return
    fl = importlib.import_module("flopwise.kernels._launch")
    print(f"{'op':<24} {'Triton dispatch µs':>19} {'direct launch µs':>17} {'launches':>9} {'torch µs':>9}")
    for name, ours, ref in rows:
        # flopwise's direct launches must reach the C launcher exactly as Triton's dispatch does:
        # the same compiled kernels, grids and arguments
        slow, fast, direct = both_paths(ours, reset=lambda: grow.__setitem__(0, 0))
        if fast != slow or direct != len(fast):
            raise SystemExit(f"{name}: direct launches differ from Triton's dispatch "
                             f"({direct} of {len(fast)} direct)\n{slow}\n{fast}")
        fl.FAST = False
        t_slow = _us(ours, a.n, a.repeat)
        fl.FAST = True
        print(f"{name:<24} {t_slow:19.1f} {_us(ours, a.n, a.repeat):17.1f} {len(fast):>9} "
              f"{_us(ref, a.n, a.repeat):9.1f}", flush=True)


if __name__ == "__main__":
    main()
