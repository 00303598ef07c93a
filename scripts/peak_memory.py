"""Estimate the MoE layer's CUDA peak memory on a CPU, at the benchmark's shapes scaled down.

Every tensor of the MoE layer scales with T*D, T*F or D*F (E and k fixed), so dividing T, D
and F by ``s`` divides every allocation by ``s**2``. This runs our layer (Triton interpreter)
and the torch pipeline of ``flopwise bench moe`` at the scaled shape under
``torch.profiler(profile_memory=True)``, replays the allocation events, and multiplies the
peak of live bytes back by ``s**2``.

Checked against the H100: for the code measured there (8577 MiB ours, 6657 MiB pipeline at
Mixtral's shape, fwd+bwd: 129%; OLMoE-like 70%, fine-grained 70%), this estimate gives 8649
and 6740 MiB (128%), 72% and 78%. What it cannot see: the CUDA caching allocator's rounding
and workspaces (cuBLAS), and CPU kernels that allocate differently from their CUDA versions
(the pipeline's CPU ``_grouped_mm`` makes per-expert temporaries).

``--hf`` adds the layer as it runs inside a transformers model, on the expert weights as
transformers stores them: transformers' own ``grouped_mm`` experts implementation
(``hf-torch``) and flopwise's (``hf-ours``), each routed by torch; needs transformers >= 5.

    python scripts/peak_memory.py [--scale 64] [--shapes mixtral,olmoe,fine-grained] [--timeline] [--hf]
"""

from __future__ import annotations

import argparse
import gc
import os

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the Triton path (before flopwise is imported)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from flopwise.kernels.bench.moe import GPU_SHAPES, _block_m, hf_providers, hf_weights, ours, torch_pipeline  # noqa: E402


def _collect() -> None:
    """Triton's interpreter leaves reference cycles that hold a launch's arguments until the
    garbage collector runs (a compiled launch does not); collecting before each measurement
    keeps a previous call's buffers from being counted as freed inside the next one."""
    gc.collect()


def peak_bytes(fn, timeline: bool = False, scale: float = 1.0) -> int:
    """Peak of live CPU-allocator bytes while ``fn()`` runs, above what was live before."""
    _collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    ops = [e for e in events if e.name() != "[memory]"]
    live = peak = 0
    for e in events:
        if e.name() != "[memory]":
            continue
        live += e.nbytes()
        peak = max(peak, live)
        if timeline and abs(e.nbytes()) * scale >= 2**26:
            inside = sorted((o for o in ops if o.start_ns() <= e.start_ns() <= o.end_ns()),
                            key=lambda o: o.end_ns() - o.start_ns())
            print(f"    {e.nbytes() * scale / 2**20:+9.0f} MiB  live {live * scale / 2**20:9.0f}  "
                  f"{' < '.join(o.name() for o in inside[:3])}")
    return peak


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=64, help="divide T, D and F by this")
    p.add_argument("--shapes", default="mixtral,olmoe,fine-grained")
    p.add_argument("--timeline", action="store_true", help="print allocations of 64 MiB and more (scaled)")
    p.add_argument("--hf", action="store_true", help="also the layer inside a transformers model (hf-torch, hf-ours)")
    a = p.parse_args(argv)
    hf = {}
    if a.hf:
        hf = hf_providers()
        if not hf:
            raise SystemExit("--hf needs transformers >= 5 (its experts interface)")
    s, mult = a.scale, a.scale**2
    torch.manual_seed(0)
    results = {}
    print(f"{'shape':<13} {'provider':<8} {'fwd MiB':>9} {'fwd+bwd MiB':>12}   (estimates at 1/{mult} scale, x{mult})")
    for label, T0, D0, F0, E, k in GPU_SHAPES:
        if label not in a.shapes.split(","):
            continue
        T, D, Fh = T0 // s, D0 // s, F0 // s
        if min(T, D, Fh) < 1:
            raise SystemExit(f"--scale {s} leaves no rows or columns at {label}'s shape")
        dt = torch.bfloat16
        x = torch.randn(T, D, dtype=dt)
        router_w = torch.randn(E, D) / D**0.5
        ws = [(torch.randn(E, D, Fh) / D**0.5).to(dt), (torch.randn(E, D, Fh) / D**0.5).to(dt),
              (torch.randn(E, Fh, D) / Fh**0.5).to(dt)]
        leaves = [t.clone().requires_grad_(True) for t in (x, *ws)]
        gy = torch.randn_like(x)
        bm = _block_m(T0, k, E)  # the full shape's block size, as on the GPU
        providers = [("torch", torch_pipeline, ws, leaves), ("ours", lambda *args: ours(*args, bm), ws, leaves)]
        if hf:
            stored = hf_weights(*ws)  # gate_up_proj [E, 2F, D], down_proj [E, D, F]
            hf_leaves = [leaves[0], *(t.clone().requires_grad_(True) for t in stored)]
            providers += [("hf-torch", hf["torch-hf-grouped-mm"], stored, hf_leaves),
                          ("hf-ours", hf["triton-hf"], stored, hf_leaves)]
        for name, fn, w_in, g_in in providers:
            def fwd(fn=fn, w_in=w_in):
                with torch.no_grad():
                    fn(x, router_w, *w_in, k)

            def fwd_bwd(fn=fn, g_in=g_in):
                y = fn(g_in[0], router_w, *g_in[1:], k)
                torch.autograd.grad(y, g_in, gy)

            fwd_bwd()  # first call: Triton's interpreter and lazy inits allocate once
            if a.timeline:
                print(f"  {label} {name}, fwd+bwd:")
            f = peak_bytes(fwd) * mult / 2**20
            fb = peak_bytes(fwd_bwd, a.timeline, mult) * mult / 2**20
            results[(label, name)] = (f, fb)
            print(f"{label:<13} {name:<8} {f:9.0f} {fb:12.0f}")
        ours_fb, torch_fb = results[(label, "ours")][1], results[(label, "torch")][1]
        print(f"{label:<13} ours / torch, fwd+bwd: {100 * ours_fb / torch_fb:.0f}%")
        if hf:
            ours_fb, torch_fb = results[(label, "hf-ours")][1], results[(label, "hf-torch")][1]
            print(f"{label:<13} hf-ours / hf-torch, fwd+bwd: {100 * ours_fb / torch_fb:.0f}%")
    return results


if __name__ == "__main__":
    main()
