"""Where a Mixture-of-Depths step spends its time: torch.profiler tables (top CUDA kernels,
host time per call) for flopwise's token movement and for the MoD training step, each next to
the plain-torch pipeline it replaces, with the token movement's host time through Triton's
dispatch and through flopwise's direct launches; and (``memory``) what is live at the step's peak memory,
by the source line that allocated it, for both implementations.

    python scripts/profile_mod.py [--rows 12] [--only ops|step|memory]
"""

from __future__ import annotations

import argparse
import collections
import importlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

from flopwise.kernels import gather_tokens, mod_select, scatter_tokens
from flopwise.models.transformer import ModelConfig, Transformer


def _host_us(fn, n=20) -> float:
    """Host time per call with the GPU idle beforehand (launch and dispatch cost)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def _show(name: str, fn, rows: int, iters: int = 5) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ev if str(e.device_type).endswith("CUDA")) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e6
    print(f"\n### {name}: wall {wall:.0f} us/call, CUDA kernels {cuda_total:.0f} us/call, "
          f"host enqueue {_host_us(fn):.0f} us/call")
    print(ev.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


def _launch_paths(name: str, fn) -> None:
    """Host time to enqueue ``fn`` through Triton's dispatch and through flopwise's direct launches."""
    fl = importlib.import_module("flopwise.kernels._launch")
    times = {}
    for fast in (False, True):
        fl.FAST = fast
        fn()
        times[fast] = min(_host_us(fn, 100) for _ in range(3))
    fl.FAST = True
    print(f"{name}: host enqueue {times[False]:.1f} us/call through Triton's dispatch, "
          f"{times[True]:.1f} us/call with direct launches")


def ops(rows: int) -> None:
    for B, S, D, K in ((8, 4096, 1024, 512), (2, 4096, 2048, 512)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, S, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        idx = torch.rand(B, S, device="cuda", generator=g).topk(K, 1).indices.sort(1).values.int()
        y = torch.randn(B, K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.rand(B, K, device="cuda", requires_grad=True)
        gk, gs = torch.randn_like(y), torch.randn_like(x)
        idx_e = idx.long()[..., None].expand(B, K, D)
        tag = f"B{B} S{S} D{D} K{K}"
        _launch_paths(f"gather fwd {tag}", lambda: gather_tokens(x.detach(), idx))
        _launch_paths(f"gather fwd+bwd {tag}", lambda: torch.autograd.grad(gather_tokens(x, idx), [x], gk))
        _launch_paths(f"scatter fwd+bwd {tag}",
                      lambda: torch.autograd.grad(scatter_tokens(x, y, idx, w), [x, y, w], gs))
        _show(f"gather fwd {tag} flopwise", lambda: gather_tokens(x.detach(), idx), rows)
        _show(f"gather fwd+bwd {tag} flopwise", lambda: torch.autograd.grad(gather_tokens(x, idx), [x], gk), rows)
        _show(f"gather fwd+bwd {tag} torch", lambda: torch.autograd.grad(torch.gather(x, 1, idx_e), [x], gk), rows)
        _show(f"scatter fwd+bwd {tag} flopwise",
              lambda: torch.autograd.grad(scatter_tokens(x, y, idx, w), [x, y, w], gs), rows)
        s = torch.randn(B, S, device="cuda", requires_grad=True)
        _show(f"mod_select fwd+bwd {tag}", lambda: torch.autograd.grad(mod_select(s, k=K).weights, [s],
                                                                       torch.ones(B, K, device="cuda")), rows)


def _mod_steps():
    """(impl, one fwd+bwd step) of the D2048 MoD decoder, flopwise's ops then plain torch; each
    model lives only while its step is in use."""
    base = ModelConfig.preset("bench-d2048", max_seq_len=4096)
    cfg = base.replace(routing="every_other", mod_capacity=0.125)
    tokens = torch.randint(0, base.vocab_size, (2, 4096), device="cuda")
    for impl in ("kernels", "torch"):
        torch.manual_seed(0)
        model = Transformer(cfg.replace(mod_impl=impl)).to(device="cuda", dtype=torch.bfloat16)

        def run(model=model):
            model.zero_grad(set_to_none=True)
            model(tokens, tokens).loss.backward()

        yield impl, run
        del model, run
        torch.cuda.empty_cache()


def step(rows: int) -> None:
    for impl, run in _mod_steps():
        _show(f"mod_step D2048 L8 B2 S4096 mod_impl={impl}", run, rows, iters=3)


def _live_at_peak(fn) -> tuple[int, dict[str, list[int]]]:
    """The CUDA caching allocator's trace of one ``fn()`` (after a warm-up call), replayed
    by :func:`peak_sites`."""
    fn()
    torch.cuda.synchronize()
    # Python frames only: the default also symbolises C++ frames, which in a snapshot of this
    # size takes minutes (addr2line), and only the Python file and line are read below
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return peak_sites(snap["device_traces"][torch.cuda.current_device()])


def peak_sites(trace: list[dict]) -> tuple[int, dict[str, list[int]]]:
    """From an allocator trace (``alloc`` / ``free_completed`` events with ``addr``, ``size``
    and ``frames``, innermost first): the peak of bytes allocated inside the trace and still
    live, and the blocks live at that peak grouped by the innermost project source line that
    allocated them (``{site: [bytes, blocks]}``). Frees of blocks allocated before the trace
    do not count."""
    live: dict[int, dict] = {}
    cur = peak = 0
    at_peak: dict[int, dict] = {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
    sites: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for ev in at_peak.values():
        frames = ev.get("frames") or [{"filename": "?", "line": 0, "name": "?"}]
        ours = [f for f in frames if any(d in f["filename"] for d in ("/flopwise/", "/kernels/", "/models/"))]
        f = (ours or frames)[0]
        site = f"{'/'.join(f['filename'].rsplit('/', 2)[-2:])}:{f['line']} {f['name']}"
        sites[site][0] += ev["size"]
        sites[site][1] += 1
    return peak, dict(sites)


def memory(rows: int) -> None:
    for impl, run in _mod_steps():
        peak, sites = _live_at_peak(run)
        print(f"\n### mod_step D2048 L8 B2 S4096 mod_impl={impl}: peak {peak / 2**20:.0f} MiB allocated "
              f"during the step; live at the peak, by allocating line:")
        for site, (size, n) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:rows]:
            print(f"- {size / 2**20:9.1f} MiB  {n:4d} blocks  {site}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--only", choices=("ops", "step", "memory"))
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{p.prog} times CUDA kernels and needs a CUDA device (torch.cuda.is_available() is False)")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    if a.only in (None, "ops"):
        ops(a.rows)
    if a.only in (None, "step"):
        step(a.rows)
    if a.only in (None, "memory"):
        memory(a.rows)
