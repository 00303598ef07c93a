"""Host (Python) time per call of flopwise's eager ops, with every Triton launch stubbed out.

On a GPU, a memory-bound op at small shapes takes less time than its host path to enqueue;
this measures that path (argument checks, dispatch, autograd, allocations, grid arithmetic)
on any machine, next to the plain-torch pipeline it replaces (whose kernels do run, on
tensors small enough that their cost is host time too). Triton's own launcher is not
included: it is stubbed with the kernels.

    python scripts/host_overhead.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the Triton path (before flopwise is imported)

import torch  # noqa: E402

import importlib  # noqa: E402

MODULES = [importlib.import_module(f"flopwise.kernels.{m}") for m in ("mod_gather", "routing", "grouped_mm")]


class _Stub:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_kernels() -> None:
    for mod in MODULES:
        for name in dir(mod):
            # launchable kernels (``kernel[grid](...)``), not helpers whose names end the same way
            if name.startswith("_") and name.endswith("_kernel") and hasattr(getattr(mod, name), "__getitem__"):
                setattr(mod, name, _Stub())


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
    a = p.parse_args()
    _stub_kernels()
    from flopwise.kernels import gather_tokens, moe_mlp, scatter_tokens, topk_route, topk_route_reference

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
    rows = [
        ("gather fwd", lambda: gather_tokens(x.detach(), idx), lambda: torch.gather(x.detach(), 1, ie)),
        ("gather fwd+bwd", lambda: torch.autograd.grad(gather_tokens(x, idx), [x], gk),
         lambda: torch.autograd.grad(torch.gather(x, 1, ie), [x], gk)),
        ("scatter fwd+bwd", lambda: torch.autograd.grad(scatter_tokens(x, y, idx, w), [x, y, w], gs),
         lambda: torch.autograd.grad(x.scatter_add(1, ie, w[..., None] * y), [x, y, w], gs)),
        ("token-choice plan fwd", lambda: topk_route(logits.detach(), 2),
         lambda: torch.topk(torch.softmax(logits.detach(), -1), 2).indices.view(-1).argsort(stable=True)),
        ("moe_mlp fwd (plan given)", lambda: moe_mlp(xt, plan, *ws), lambda: _moe_torch(xt, plan, ws)),
        ("moe_mlp fwd+bwd", lambda: torch.autograd.grad(moe_mlp(xt, plan, *wg), wg, gt),
         lambda: torch.autograd.grad(_moe_torch(xt, plan, wg), wg, gt)),
    ]
    print(f"{'op':<24} {'flopwise host µs':>17} {'torch µs':>9}")
    for name, ours, ref in rows:
        print(f"{name:<24} {_us(ours, a.n, a.repeat):17.1f} {_us(ref, a.n, a.repeat):9.1f}")


if __name__ == "__main__":
    main()
