"""Time grouped-matmul tile configurations on the card at hand.

Each kernel family (``rows``: the row-block kernel with one accumulator; ``rows_dual``: gate
and up together; ``dw`` / ``dw_dual``: the weight gradients) is timed under a few candidate
meta-parameter sets through ``flopwise.kernels.grouped_mm._OVERRIDE``, on the MoE benchmark's
shapes, and every candidate's output is compared with the default's.

    python scripts/tune_grouped_mm.py [--shapes mixtral,olmoe] [--block-m 128,64] [--rep 40]
    python scripts/tune_grouped_mm.py --stages      # each forward/backward launch on its own
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

import importlib
from flopwise.kernels import grouped_mm, moe_mlp, topk_route
from flopwise.kernels.bench.moe import GPU_SHAPES

gm = importlib.import_module("flopwise.kernels.grouped_mm")  # the package re-exports a function of that name

CANDIDATES = {
    # PERSISTENT: n programs per SM, each looping over tiles
    "rows": [{}, dict(BLOCK_N=256), dict(num_stages=4), dict(BLOCK_N=256, num_stages=4), dict(PERSISTENT=1),
             dict(BLOCK_N=64, num_warps=4, num_stages=4, PERSISTENT=2)],
    "rows_dual": [{}, dict(num_stages=4), dict(PERSISTENT=1), dict(BLOCK_N=64, num_warps=4, PERSISTENT=2)],
    # 3 stages: the depth before the gathered-index fix (operand copies one step ahead)
    "dw": [{}, dict(num_stages=3), dict(num_stages=7), dict(BLOCK_K=64)],
}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def stage_times(label: str, x, plan, wg, wu, wd, gy) -> dict:
    """Time each launch of moe_mlp's forward and backward on its own, with the tiles
    moe_mlp runs (the autotuner's pick, made in the first call; the defaults with
    FLOPWISE_AUTOTUNE=0).

    Returns the last outputs (y, dx and the weight gradients; the atomic ones accumulate
    over the timed repetitions)."""
    N, D, Fh = plan.num_rows, x.shape[1], wg.shape[2]
    dev, dt = x.device, x.dtype
    h, g, u, dg, du, hw = (torch.empty(N, Fh, device=dev, dtype=dt) for _ in range(6))
    y = torch.zeros(x.shape, device=dev)
    dx = torch.zeros(x.shape, device=dev)
    dwts = torch.zeros(N, device=dev)
    dwg, dwu, dwd = torch.empty_like(wg), torch.empty_like(wu), torch.empty_like(wd)
    w = plan.weights
    stages = [
        ("fwd  gate+up, silu*mul", 4, lambda: gm._launch_rows(x, wg, plan, h, epilogue=gm._SWIGLU, gather=True,
                                                               w2=wu, pre=g, pre2=u)),
        ("fwd  down, scale, scatter", 2, lambda: gm._launch_rows(h, wd, plan, y, epilogue=gm._SCALE_SCATTER,
                                                                  gather=False, weights=w)),
        ("bwd  dY Wd^T, swiglu bwd", 2, lambda: gm._launch_rows(gy, wd, plan, dg, epilogue=gm._SWIGLU_BWD,
                                                                 gather=True, out2=du, out3=hw, pre=g, pre2=u,
                                                                 weights=w, dw=dwts, transpose_w=True)),
        ("bwd  dW_down", 2, lambda: gm._launch_dw(hw, plan, gy, dwd, gather_a=False, gather_g=True)),
        ("bwd  dX (two loops, scatter)", 4, lambda: gm._launch_rows(dg, wg, plan, dx, epilogue=gm._SCATTER,
                                                                    gather=False, a2=du, w2=wu, transpose_w=True)),
        ("bwd  dW_gate, dW_up", 4, lambda: gm._launch_dw(x, plan, dg, dwg, gather_a=True, gather_g=False,
                                                         g2=du, dw2=dwu)),
    ]
    for name, mult, fn in stages:
        ms = do_bench(fn, warmup=10, rep=30, return_mode="median")
        print(f"{label:<13} {name:<30} {ms:8.3f} ms {mult * N * D * Fh / ms / 1e9:8.1f} TFLOP/s", flush=True)
    return dict(y=y, dx=dx, dw_gate=dwg, dw_up=dwu, dw_down=dwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="mixtral,olmoe")
    p.add_argument("--block-m", default="128", help="plan block sizes to try, e.g. 128,64")
    p.add_argument("--stages", action="store_true",
                   help="only time each launch of moe_mlp (the tiles it runs: the autotuner's picks)")
    p.add_argument("--rep", type=int, default=40, help="ms of timed repetitions per candidate")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{p.prog} times CUDA kernels and needs a CUDA device (torch.cuda.is_available() is False)")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(f"{'shape':<13} {'family':<9} {'block_m':>7} {'candidate':<34} {'ms':>8} {'TFLOP/s':>8} {'rel err':>8}")
    for label, T, D, Fh, E, k in GPU_SHAPES:
        if label not in a.shapes.split(","):
            continue
        N = T * k
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        wg, wu = ((torch.randn(E, D, Fh, device="cuda") / D**0.5).bfloat16() for _ in range(2))
        wd = (torch.randn(E, Fh, D, device="cuda") / Fh**0.5).bfloat16()
        logits = torch.randn(T, E, device="cuda")
        gy = torch.randn_like(x)
        for bm in (int(b) for b in a.block_m.split(",")):
            plan = topk_route(logits, k, renormalize=True, block_m=bm)
            if a.stages:
                stage_times(label, x, plan, wg, wu, wd, gy)
                continue
            xs = x[plan.token_idx.long()]
            leaves = [t.clone().requires_grad_(True) for t in (x, wg, wu, wd)]

            def fwd_bwd():
                y = moe_mlp(leaves[0], plan, *leaves[1:])
                return torch.autograd.grad(y, leaves, gy)

            runs = {
                "rows": (lambda: grouped_mm(xs, wg, plan, gather=False), 2 * N * D * Fh),
                "rows_dual": (lambda: moe_mlp(x, plan, wg, wu, wd), 6 * N * D * Fh),
                "dw": (fwd_bwd, 18 * N * D * Fh),
            }
            for fam, (fn, flops) in runs.items():
                ref = None
                for cand in CANDIDATES[fam]:
                    gm._OVERRIDE.clear()
                    gm._OVERRIDE[fam] = dict(cand)
                    if fam == "dw":  # two accumulators: BLOCK_N stays at 128
                        gm._OVERRIDE["dw_dual"] = {n: v for n, v in cand.items() if n != "BLOCK_N"}
                    try:
                        out = fn()
                        out = out[0] if isinstance(out, tuple) else out
                        ref = out if ref is None else ref
                        ms = do_bench(fn, warmup=10, rep=a.rep, return_mode="median")
                        err = _rel(out, ref)
                        desc = ",".join(f"{k_}={v}" for k_, v in cand.items()) or "default"
                        print(f"{label:<13} {fam:<9} {bm:>7} {desc:<34} {ms:8.3f} {flops / ms / 1e9:8.1f} {err:8.1e}",
                              flush=True)
                    except Exception as exc:  # a candidate that does not fit this card
                        print(f"{label:<13} {fam:<9} {bm:>7} {cand} failed: {type(exc).__name__}: {exc}"[:200],
                              flush=True)
            gm._OVERRIDE.clear()


if __name__ == "__main__":
    main()
