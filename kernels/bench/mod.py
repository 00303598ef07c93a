"""Mixture-of-Depths token movement: gather, weighted scatter-add (in place / out of place),
RMSNorm-gather; forward, and forward+backward for the ops training differentiates.

Providers: ``reference`` (the ``*_reference`` definitions), ``torch`` (the pipeline
BASELINES.md times: ``torch.gather``; ``scatter_add_`` in place; ``clone`` + ``scatter_add_``
out of place; gather + ``F.rms_norm``), ``torch-index`` (the same through ``index_select`` /
``index_add_`` on the flattened ``[B*S, D]`` view, flat indices computed inside the timed call),
``triton`` (flopwise's kernels).

Bytes are what the op must move, whatever the implementation (e = element size):
* gather:             read K rows + write K rows          2*B*K*D*e (+ idx)
* scatter, in place:  read K residual rows + K rows of y, write K rows   3*B*K*D*e (+ idx, weight)
* scatter, out of place: copy the whole residual + read y  (2*B*S*D + B*K*D)*e (+ idx, weight)
* RMSNorm-gather:     as gather (+ gamma)
* backward of gather: read K grad rows, write all of dx   (B*K*D + B*S*D)*e
* backward of scatter: d residual is grad itself (no bytes); dy, dweight read K grad rows and
  K rows of y, write dy                                   3*B*K*D*e
* backward of RMSNorm-gather: read K rows of x and of grad, write all of dx
In-place providers keep their own copy of the residual, so each timed call adds to the result
of the previous one (the values drift, the traffic does not).

Every case is timed twice on a GPU: eagerly (the wall clock of back-to-back calls, which at
these sizes the host's time to enqueue a call can set) and as CUDA-graph replays (``graph
µs``, ``graph TB/s``: the kernels' device time, as inside a captured training step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flopwise.kernels.bench import Case
from flopwise.kernels.mod_gather import (
    gather_tokens,
    gather_tokens_reference,
    rmsnorm_gather_tokens,
    rmsnorm_gather_tokens_reference,
    scatter_tokens,
    scatter_tokens_reference,
)

EPS = 1e-6


def _make_check(dtype: torch.dtype):
    """Relative error ``||out - ref|| / ||ref||`` per tensor: 1e-5 in fp32, 1e-2 in bf16/fp16;
    a non-finite value in the output or the reference fails."""
    tol = 1e-5 if dtype == torch.float32 else 1e-2

    def check(out, ref) -> str | None:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        if len(outs) != len(refs):
            return f"{len(outs)} outputs, expected {len(refs)}"
        for i, (o, r) in enumerate(zip(outs, refs)):
            if tuple(o.shape) != tuple(r.shape):
                return f"output {i}: shape {tuple(o.shape)} != {tuple(r.shape)}"
            o, r = o.detach().double(), r.detach().double()
            if not torch.isfinite(r).all():  # NaN compares False: nothing could be judged
                return f"output {i}: non-finite values in the reference"
            if not torch.isfinite(o).all():
                return f"output {i}: non-finite values"
            err = float((o - r).norm() / r.norm().clamp_min(1e-30))
            if not err <= tol:
                return f"output {i}: relative error {err:.1e} > {tol:.0e}"
        return None

    return check


def _inputs(B, S, D, K, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, S, D, dtype=dtype, device=device, generator=g)
    scores = torch.rand(B, S, device=device, generator=g)
    idx = scores.topk(K, dim=1).indices.sort(dim=1).values  # MoD: increasing, distinct
    y = torch.randn(B, K, D, dtype=dtype, device=device, generator=g)
    w = torch.rand(B, K, device=device, generator=g)
    gamma = (torch.rand(D, device=device, generator=g) + 0.5).to(dtype)
    return x, idx, y, w, gamma


def _flat(idx: torch.Tensor, S: int) -> torch.Tensor:
    """Row numbers in the [B*S, D] view."""
    return (idx + S * torch.arange(idx.shape[0], device=idx.device)[:, None]).reshape(-1)


def _fwd_bwd(fn, inputs, go):
    """Provider for forward+backward: returns the gradients of ``<fn(*inputs), go>``."""
    leaves = [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    diff = [t for t in leaves if t.requires_grad]

    def run():
        out = fn(*leaves)
        return torch.autograd.grad(out, diff, go)

    return run


def _cases_for(B, S, D, K, dtype, device) -> list[Case]:
    x, idx, y, w, gamma = _inputs(B, S, D, K, dtype, device)
    e = x.element_size()
    ie, we = idx.element_size(), w.element_size()
    shape = f"B{B} S{S} D{D} K{K} {str(dtype).replace('torch.', '')}"
    check = _make_check(dtype)
    idx_e = idx[..., None].expand(B, K, D)
    rows = B * K * D
    cases = []

    # ---------------------------------------------------------------- gather
    cases.append(Case(
        graph=True,
        op="gather", shape=shape, check=check, bytes=2 * rows * e + B * K * ie,
        providers={
            "reference": lambda: gather_tokens_reference(x, idx),
            "torch": lambda: torch.gather(x, 1, idx_e),
            "torch-index": lambda: x.view(B * S, D).index_select(0, _flat(idx, S)).view(B, K, D),
            "triton": lambda: gather_tokens(x, idx),
        },
    ))

    # ---------------------------------------------------------------- scatter-add, in place
    bufs = {name: x.clone() for name in ("torch", "torch-index", "triton")}
    wd = w.to(dtype)[..., None]
    cases.append(Case(
        graph=True,
        op="scatter-add in place", shape=shape, check=check, bytes=3 * rows * e + B * K * (ie + we),
        providers={
            "reference": lambda: scatter_tokens_reference(x, y, idx, w),
            "torch": lambda: bufs["torch"].scatter_add_(1, idx_e, wd * y),
            "torch-index": lambda: bufs["torch-index"].view(B * S, D).index_add_(
                0, _flat(idx, S), (wd * y).view(-1, D)).view(B, S, D),
            "triton": lambda: scatter_tokens(bufs["triton"], y, idx, w, inplace=True),
        },
    ))

    # ---------------------------------------------------------------- scatter-add, out of place
    oop_bytes = (2 * B * S * D + rows) * e + B * K * (ie + we)
    cases.append(Case(
        graph=True,
        op="scatter-add out of place", shape=shape, check=check, bytes=oop_bytes,
        providers={
            "reference": lambda: scatter_tokens_reference(x, y, idx, w),
            "torch": lambda: x.clone().scatter_add_(1, idx_e, wd * y),
            "torch-index": lambda: x.view(B * S, D).index_add(0, _flat(idx, S), (wd * y).view(-1, D)).view(B, S, D),
            "triton": lambda: scatter_tokens(x, y, idx, w),
        },
    ))

    # ---------------------------------------------------------------- RMSNorm-gather
    cases.append(Case(
        graph=True,
        op="rmsnorm-gather", shape=shape, check=check, bytes=2 * rows * e + D * gamma.element_size() + B * K * ie,
        providers={
            "reference": lambda: rmsnorm_gather_tokens_reference(x, idx, gamma, EPS),
            "torch": lambda: F.rms_norm(torch.gather(x, 1, idx_e), (D,), gamma, EPS),
            "triton": lambda: rmsnorm_gather_tokens(x, idx, gamma, EPS),
        },
    ))

    # ---------------------------------------------------------------- forward + backward
    go_k = torch.randn(B, K, D, dtype=dtype, device=device)
    go_s = torch.randn(B, S, D, dtype=dtype, device=device)
    dense = B * S * D
    cases.append(Case(
        graph=True,
        op="gather", shape=shape, check=check, mode="fwd+bwd",
        bytes=2 * rows * e + (rows + dense) * e + 2 * B * K * ie,
        providers={
            "reference": _fwd_bwd(lambda x_: gather_tokens_reference(x_, idx), (x,), go_k),
            "torch": _fwd_bwd(lambda x_: torch.gather(x_, 1, idx_e), (x,), go_k),
            "triton": _fwd_bwd(lambda x_: gather_tokens(x_, idx), (x,), go_k),
        },
    ))
    cases.append(Case(
        graph=True,
        op="scatter-add out of place", shape=shape, check=check, mode="fwd+bwd",
        bytes=oop_bytes + 3 * rows * e + B * K * (ie + 2 * we),
        providers={
            "reference": _fwd_bwd(lambda r, y_, w_: scatter_tokens_reference(r, y_, idx, w_), (x, y, w), go_s),
            "torch": _fwd_bwd(lambda r, y_, w_: r.scatter_add(1, idx_e, w_.to(dtype)[..., None] * y_), (x, y, w), go_s),
            "triton": _fwd_bwd(lambda r, y_, w_: scatter_tokens(r, y_, idx, w_), (x, y, w), go_s),
        },
    ))
    cases.append(Case(
        graph=True,
        op="rmsnorm-gather", shape=shape, check=check, mode="fwd+bwd",
        bytes=2 * rows * e + (2 * rows + dense) * e + 2 * B * K * ie,
        providers={
            "reference": _fwd_bwd(lambda x_, g_: rmsnorm_gather_tokens_reference(x_, idx, g_, EPS), (x, gamma), go_k),
            "torch": _fwd_bwd(lambda x_, g_: F.rms_norm(torch.gather(x_, 1, idx_e), (D,), g_, EPS), (x, gamma), go_k),
            "triton": _fwd_bwd(lambda x_, g_: rmsnorm_gather_tokens(x_, idx, g_, EPS), (x, gamma), go_k),
        },
    ))
    return cases


def cases(gpu: bool) -> list[Case]:
    if gpu:
        # BASELINES.md's MoD shape (12.5% capacity), and a narrower model dim.
        shapes = [(8, 4096, 4096, 512, torch.bfloat16), (8, 4096, 1024, 512, torch.bfloat16)]
        device = "cuda"
    else:
        shapes = [(2, 64, 64, 8, torch.float32)]
        device = "cpu"
    return [c for shape in shapes for c in _cases_for(*shape, device=device)]
