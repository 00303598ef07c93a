"""Grouped matmuls over expert-sorted rows, driven by a :class:`~flopwise.kernels.routing.RoutingPlan`.

Legend: T tokens, D model dim, F expert hidden dim, E experts, N plan rows (T*K or E*C),
NB grouped-matmul blocks of ``plan.block_m`` rows.

Two public ops:

* :func:`grouped_mm` ``(a, w_EKN, plan) -> [N, N_]``: row ``r`` is ``a[src(r)] @ w[e(r)]`` where
  ``src(r) = plan.token_idx[r]`` (``gather=True``, rows read straight from the token
  matrix, no permuted copy) or ``r``.
* :func:`moe_mlp` ``(x_TD, plan, w_gate_EDF, w_up_EDF, w_down_EFD) -> [T, D]``: the whole
  SwiGLU expert MLP in two launches: gate and up share the gathered input tile and fuse
  ``silu(g) * u`` in the epilogue; down scales by the combine weight and accumulates each
  token's output in place (no permuted output, no separate combine pass).

Backward: dX is a grouped matmul with ``W^T`` whose epilogue scatter-adds into the token
rows; dW is a per-expert ``X^T dY`` over each expert's variable row range (zero rows give
zero gradients); the combine weights' gradient (``<h_r, dY[t] W_down^T>``) is reduced in
the epilogue of the down projection's backward, which also applies the SwiGLU backward.

Meta-parameters: ``_tiles`` and ``_dw_tiles`` give each launch a default; on CUDA the
autotuner (:mod:`._tune`) times a few alternatives per shape once and keeps the fastest.

Every kernel walks the plan's block map on the device: a program whose block is past the
end (``block_expert == -1``) returns at once, and the persistent row kernel's tile loop stops
at the block count it sums from the expert offsets, so no host sync is ever needed.

Numerics: operands in their dtype (fp32, bf16, fp16), fp32 accumulation; token outputs and
dX accumulate with fp32 atomics and are cast at the end, so sums over a token's experts are
order-nondeterministic at the last fp32 bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _tune
from ._tune import OutOfResources
from ._dispatch import HAS_TRITON, acc_dtype, autograd_twin, backend, cdiv, new_output, new_output_like, next_pow2, \
    traced
from ._launch import launch
from .routing import RoutingPlan

if HAS_TRITON:
    import triton
    import triton.language as tl

    try:  # host-side tensor descriptors (TMA on Hopper); a Triton without them gets no TMA candidates
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover
        TensorDescriptor = None
else:  # pragma: no cover
    TensorDescriptor = None


__all__ = ["grouped_mm", "grouped_mm_reference", "moe_mlp", "moe_mlp_reference"]

# What moe_mlp's forward saves: nothing, the pre-activations, or the pre-activations for a
# backward that may write over them (the eager path only; the custom op's backward is functional)
_SAVE_NONE, _SAVE, _SAVE_REUSE = 0, 1, 2

# Epilogues of the row-block kernel. The kernel compares EPILOGUE with these values as
# literals: a global constexpr costs every launch a comparison in Triton's dispatch (2.5 µs
# a launch for these four on a 2-core CPU: ``scripts/host_overhead.py --triton-dispatch``).
_STORE, _SWIGLU, _SCALE_SCATTER, _SWIGLU_BWD, _SCATTER = 0, 1, 2, 3, 4

# ----------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
        if DOT_F32:  # Triton's CPU interpreter multiplies bf16 tiles wrongly; fp32 is exact for bf16 values
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """Program id -> (m tile, n tile), GROUP_M m tiles at a time across all n tiles.

        The programs resident together then share GROUP_M row tiles and a band of column
        tiles in L2. Walking m fastest instead (one column tile over every row block) re-reads
        the whole A from memory once per column tile: at Mixtral's shape that traffic, not
        the tensor cores, set the kernel's speed."""
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m

    @triton.jit
    def _desc_tile(desc, e, k0, n0, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, TRANS: tl.constexpr):
        """The ``[BLOCK_K, BLOCK_N]`` tile at (k0, n0) of expert e's weight through its tensor
        descriptor (zero past the edges, never another expert's rows: the descriptor is 3-D)."""
        if TRANS:
            return tl.trans(tl.reshape(desc.load([e, n0, k0]), [BLOCK_N, BLOCK_K]))
        return tl.reshape(desc.load([e, k0, n0]), [BLOCK_K, BLOCK_N])

    @triton.jit
    def _swiglu_bwd_half(acc, w, rows, rmask, cols, N, stride_om, pre_ptr, pre2_ptr, out_ptr, out2_ptr, out3_ptr,
                         SAVE_PRE: tl.constexpr):
        """SwiGLU backward on columns ``cols`` of a tile; returns each row's <h, acc>."""
        omask = rmask[:, None] & (cols < N)[None, :]
        o_rows = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        g = tl.load(pre_ptr + o_rows, mask=omask, other=0.0).to(tl.float32)
        u = tl.load(pre2_ptr + o_rows, mask=omask, other=0.0).to(tl.float32)
        sg = tl.sigmoid(g)
        silu = g * sg
        h = (silu * u).to(out_ptr.dtype.element_ty).to(tl.float32)  # the h the forward used
        dh = acc * w[:, None]
        dg = dh * u * sg * (1.0 + g * (1.0 - sg))
        tl.store(out_ptr + o_rows, dg.to(out_ptr.dtype.element_ty), mask=omask)
        tl.store(out2_ptr + o_rows, (dh * silu).to(out2_ptr.dtype.element_ty), mask=omask)
        if SAVE_PRE:  # w*h: dW_down's A operand, so its kernel streams it instead of recomputing
            tl.store(out3_ptr + o_rows, (h * w[:, None]).to(out3_ptr.dtype.element_ty), mask=omask)
        return tl.sum(h * acc, 1)

    @triton.jit
    def _rows_tile(
        pid_b, pid_n, e,
        a_ptr, a2_ptr, a_idx_ptr, stride_am,
        b_ptr, b2_ptr, stride_be, stride_bk, stride_bn, b_desc, b2_desc,
        out_ptr, out2_ptr, out3_ptr, stride_om,
        pre_ptr, pre2_ptr, w_ptr, dw_ptr, tok_ptr,
        block_row_ptr, offsets_ptr, K, N, dw_stride,
        EPILOGUE: tl.constexpr, GATHER_A: tl.constexpr, DUAL_A: tl.constexpr, SAVE_PRE: tl.constexpr,
        PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        B_TMA: tl.constexpr, B_TRANS: tl.constexpr, DW_PARTIAL: tl.constexpr,
    ):
        """Tile (row block pid_b of expert e, column block pid_n) of the row-block kernel."""
        row0 = tl.load(block_row_ptr + pid_b)
        end = tl.load(offsets_ptr + e + 1)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        if GATHER_A:
            src = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = cols < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + src[:, None] * stride_am + offs_k[None, :]
        a2_ptrs = a2_ptr + src[:, None] * stride_am + offs_k[None, :]
        b_off = e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
        b_ptrs = b_ptr + b_off
        b2_ptrs = b2_ptr + b_off
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + offs_k) < K
            amask = rmask[:, None] & kmask[None, :]
            bmask = kmask[:, None] & nmask[None, :]
            a = tl.load(a_ptrs, mask=amask, other=0.0)
            if B_TMA:
                b = _desc_tile(b_desc, e, k0, pid_n * BLOCK_N, BLOCK_K, BLOCK_N, B_TRANS)
            else:
                b = tl.load(b_ptrs, mask=bmask, other=0.0)
            acc = _dot(a, b, acc, PRECISION, DOT_F32)
            if EPILOGUE == 1:  # _SWIGLU
                if B_TMA:
                    b2 = _desc_tile(b2_desc, e, k0, pid_n * BLOCK_N, BLOCK_K, BLOCK_N, B_TRANS)
                else:
                    b2 = tl.load(b2_ptrs, mask=bmask, other=0.0)
                acc2 = _dot(a, b2, acc2, PRECISION, DOT_F32)
                b2_ptrs += BLOCK_K * stride_bk
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
        if DUAL_A:
            # A2 @ B2 into the same accumulator, in a loop of its own: chaining both dots in
            # one step makes the second wait for the first, so no tensor-core op would stay in
            # flight across steps (ptx: wgmma.wait_group 0 every step).
            b2_ptrs = b2_ptr + b_off
            for k0 in range(0, K, BLOCK_K):
                kmask = (k0 + offs_k) < K
                a2 = tl.load(a2_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
                if B_TMA:
                    b2 = _desc_tile(b2_desc, e, k0, pid_n * BLOCK_N, BLOCK_K, BLOCK_N, B_TRANS)
                else:
                    b2 = tl.load(b2_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = _dot(a2, b2, acc, PRECISION, DOT_F32)
                a2_ptrs += BLOCK_K
                b2_ptrs += BLOCK_K * stride_bk
        omask = rmask[:, None] & nmask[None, :]
        o_rows = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        if EPILOGUE == 0:  # _STORE
            tl.store(out_ptr + o_rows, acc.to(out_ptr.dtype.element_ty), mask=omask)
        elif EPILOGUE == 1:  # _SWIGLU
            if SAVE_PRE:
                tl.store(pre_ptr + o_rows, acc.to(pre_ptr.dtype.element_ty), mask=omask)
                tl.store(pre2_ptr + o_rows, acc2.to(pre2_ptr.dtype.element_ty), mask=omask)
            # silu from the rounded pre-activations, so backward recomputes exactly this h
            g = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
            u = acc2.to(out_ptr.dtype.element_ty).to(tl.float32)
            h = g * tl.sigmoid(g) * u
            tl.store(out_ptr + o_rows, h.to(out_ptr.dtype.element_ty), mask=omask)
        elif EPILOGUE == 2:  # _SCALE_SCATTER
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
            tl.atomic_add(out_ptr + tok[:, None] * stride_om + cols[None, :], acc * w[:, None], mask=omask,
                          sem="relaxed")
        elif EPILOGUE == 3:  # _SWIGLU_BWD
            # in two column halves: the whole tile's epilogue (g, u, dg, du, w*h next to the
            # accumulator) needs more than 255 registers and spilled 1.7 KB per thread
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N // 2]), [0, 2, 1]))
            half = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
            dw_rows = _swiglu_bwd_half(acc_lo, w, rows, rmask, half, N, stride_om, pre_ptr, pre2_ptr, out_ptr,
                                       out2_ptr, out3_ptr, SAVE_PRE)
            dw_rows += _swiglu_bwd_half(acc_hi, w, rows, rmask, half + BLOCK_N // 2, N, stride_om, pre_ptr, pre2_ptr,
                                        out_ptr, out2_ptr, out3_ptr, SAVE_PRE)
            if DW_PARTIAL:  # this column tile's share, summed in a fixed order afterwards
                tl.store(dw_ptr + pid_n.to(tl.int64) * dw_stride + rows, dw_rows, mask=rmask)
            else:
                tl.atomic_add(dw_ptr + rows, dw_rows, mask=rmask, sem="relaxed")
        else:  # _SCATTER
            tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
            tl.atomic_add(out_ptr + tok[:, None] * stride_om + cols[None, :], acc, mask=omask, sem="relaxed")

    @triton.jit
    def _row_blocks(offsets_ptr, E, BLOCK_M: tl.constexpr):
        """Row blocks the plan really uses, sum over experts of cdiv(rows, BLOCK_M), read from
        the expert offsets on the device (the block map's valid prefix)."""
        nb = tl.zeros([], dtype=tl.int32)
        for e0 in range(0, E, 128):
            es = e0 + tl.arange(0, 128)
            lo = tl.load(offsets_ptr + es, mask=es < E, other=0)
            hi = tl.load(offsets_ptr + es + 1, mask=es < E, other=0)
            nb += tl.sum((hi - lo + BLOCK_M - 1) // BLOCK_M, 0).to(tl.int32)
        return nb

    @triton.jit
    def _grouped_mm_fwd_kernel(
        a_ptr, a2_ptr, a_idx_ptr, stride_am,
        b_ptr, b2_ptr, stride_be, stride_bk, stride_bn, b_desc, b2_desc,
        out_ptr, out2_ptr, out3_ptr, stride_om,
        pre_ptr, pre2_ptr, w_ptr, dw_ptr, tok_ptr,
        block_expert_ptr, block_row_ptr, offsets_ptr,
        K, N, NB, E,
        EPILOGUE: tl.constexpr, GATHER_A: tl.constexpr, DUAL_A: tl.constexpr, SAVE_PRE: tl.constexpr,
        PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        B_TMA: tl.constexpr = False, B_TRANS: tl.constexpr = False,
        PERSISTENT: tl.constexpr = False, DW_PARTIAL: tl.constexpr = False,
    ):
        """One (row block, column block) tile of ``A[rows] @ B[e]`` for the block's expert e.

        A is row-major ``[*, K]``; B is ``[E, K, N]`` through strides (so ``W^T`` needs no copy).
        EPILOGUE:
          _STORE         out[r] = acc
          _SWIGLU        acc = A@Wg, acc2 = A@Wu: out[r] = silu(acc)*acc2 (+ pre-activations)
          _SCALE_SCATTER out[tok[r]] += w[r] * acc          (fp32 atomics)
          _SWIGLU_BWD    acc = dY[tok] @ Wd^T: dw[r] += <h_r, acc>; dH = w*acc -> dG, dU (+ w*h)
          _SCATTER       out[tok[r]] += acc (+ A2@B2 when DUAL_A)  (fp32 atomics)
        SAVE_PRE: _SWIGLU stores the pre-activations (pre, pre2); _SWIGLU_BWD stores w*h (out3).
        DW_PARTIAL: _SWIGLU_BWD stores each column tile's share of dw[r] at
          ``dw[pid_n * NB * BLOCK_M + r]`` instead of adding it atomically (deterministic mode).
        B_TMA: the B tiles (the weights) come through tensor descriptors (TMA on Hopper),
        ``b_desc`` / ``b2_desc`` over ``[E, K, N]``, or ``[E, N, K]`` when B_TRANS; the rows of A
        are gathered by index, which TMA cannot do on Hopper, so they keep pointer loads.
        PERSISTENT: a grid of a few programs per SM; program p takes tiles p, p + programs, ...
        of the same swizzled order, up to the row blocks the plan really uses (summed from the
        E experts' offsets). Otherwise one program per tile of the upper bound NB, and a
        program past the plan's last block returns at once.
        """
        num_n = tl.cdiv(N, BLOCK_N)
        if PERSISTENT:
            # launch and set-up costs per program, not per tile (the tuner keeps this variant
            # only where it is faster)
            nb = tl.minimum(_row_blocks(offsets_ptr, E, BLOCK_M), NB)
            for tile in range(tl.program_id(0), nb * num_n, tl.num_programs(0)):
                pid_b, pid_n = _swizzle(tile, nb, num_n, GROUP_M)
                e = tl.load(block_expert_ptr + pid_b)
                if e >= 0:
                    _rows_tile(pid_b, pid_n, e, a_ptr, a2_ptr, a_idx_ptr, stride_am, b_ptr, b2_ptr, stride_be,
                               stride_bk, stride_bn, b_desc, b2_desc, out_ptr, out2_ptr, out3_ptr, stride_om,
                               pre_ptr, pre2_ptr, w_ptr, dw_ptr, tok_ptr, block_row_ptr, offsets_ptr, K, N,
                               NB * BLOCK_M, EPILOGUE, GATHER_A, DUAL_A, SAVE_PRE, PRECISION, DOT_F32,
                               BLOCK_M, BLOCK_N, BLOCK_K, B_TMA, B_TRANS, DW_PARTIAL)
        else:
            pid_b, pid_n = _swizzle(tl.program_id(0), NB, num_n, GROUP_M)
            e = tl.load(block_expert_ptr + pid_b)
            if e < 0:
                return
            _rows_tile(pid_b, pid_n, e, a_ptr, a2_ptr, a_idx_ptr, stride_am, b_ptr, b2_ptr, stride_be,
                       stride_bk, stride_bn, b_desc, b2_desc, out_ptr, out2_ptr, out3_ptr, stride_om,
                       pre_ptr, pre2_ptr, w_ptr, dw_ptr, tok_ptr, block_row_ptr, offsets_ptr, K, N,
                       NB * BLOCK_M, EPILOGUE, GATHER_A, DUAL_A, SAVE_PRE, PRECISION, DOT_F32,
                       BLOCK_M, BLOCK_N, BLOCK_K, B_TMA, B_TRANS, DW_PARTIAL)

    @triton.jit
    def _grouped_mm_dw_kernel(
        a_ptr, a_idx_ptr, stride_am,
        g_ptr, g2_ptr, g_idx_ptr, stride_gm,
        dw_ptr, dw2_ptr, stride_de, stride_dk, stride_dn,
        offsets_ptr, K, N,
        GATHER_A: tl.constexpr, GATHER_G: tl.constexpr, DUAL_G: tl.constexpr,
        PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """dW[e] (and dW2[e]) = A_e^T @ G_e over expert e's rows ``offsets[e]:offsets[e+1]``.

        A rows: ``a[tok[r]]`` (GATHER_A) or ``a[r]``; G rows: ``g[tok[r]]`` (GATHER_G) or
        ``g[r]``; DUAL_G: a second output from G2 with the same A (gate and up share the x
        tile). dW and dW2 share their strides (``stride_dn`` is 1 for the usual ``[E, K, N]``
        layout; a weight stored ``[E, N, K]``, as ``nn.Linear`` stores it, gets its gradient
        in that layout). Both operands go from memory to the tensor cores unchanged: an operand computed
        in registers (say h = silu(g) * u) would cost more ALU time per step than the MMA."""
        e = tl.program_id(1)
        pid_k, pid_n = _swizzle(tl.program_id(0), tl.cdiv(K, BLOCK_K), tl.cdiv(N, BLOCK_N), GROUP_M)
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = ks < K
        nmask = ns < N
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rmask = rows < end
            if GATHER_A:
                sa = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
            else:
                sa = rows.to(tl.int64)
            am = kmask[:, None] & rmask[None, :]
            a = tl.load(a_ptr + sa[None, :] * stride_am + ks[:, None], mask=am, other=0.0)
            gm = rmask[:, None] & nmask[None, :]
            if GATHER_G:
                sg = tl.load(g_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
                g = tl.load(g_ptr + sg[:, None] * stride_gm + ns[None, :], mask=gm, other=0.0)
            else:
                g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + ns[None, :], mask=gm, other=0.0)
            acc = _dot(a, g, acc, PRECISION, DOT_F32)
            if DUAL_G:
                g2 = tl.load(g2_ptr + rows.to(tl.int64)[:, None] * stride_gm + ns[None, :], mask=gm, other=0.0)
                acc2 = _dot(a, g2, acc2, PRECISION, DOT_F32)
        out = e.to(tl.int64) * stride_de + ks[:, None] * stride_dk + ns[None, :] * stride_dn
        m = kmask[:, None] & nmask[None, :]
        tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=m)
        if DUAL_G:
            tl.store(dw2_ptr + out, acc2.to(dw2_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _combine_rows_kernel(rows_ptr, stride_r, w_ptr, order_ptr, starts_ptr, out_ptr, stride_o, D,
                             HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
        """``out[t] = sum of (w[r] *) rows[r]`` over token t's rows, in expert order, fp32.

        ``order`` lists the plan's rows sorted by token (stably, so each token's rows keep
        their expert order) and token t's are ``order[starts[t]:starts[t+1]]``: one program per
        (token, column block) adds them in that fixed order, which makes the result the same
        on every run, unlike atomic adds (deterministic mode)."""
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        lo = tl.load(starts_ptr + t)
        hi = tl.load(starts_ptr + t + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(lo, hi):
            r = tl.load(order_ptr + j).to(tl.int64)
            v = tl.load(rows_ptr + r * stride_r + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + r).to(tl.float32)
            acc += v
        tl.store(out_ptr + t.to(tl.int64) * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------
# 2. References
# ----------------------------------------------------------------------------------------
def _segments(plan: RoutingPlan) -> list[tuple[int, int]]:
    o = plan.expert_offsets.tolist()  # host sync: fine for the reference
    return [(o[e], o[e + 1]) for e in range(plan.num_experts)]


def grouped_mm_reference(a: torch.Tensor, w: torch.Tensor, plan: RoutingPlan, *, gather: bool = True) -> torch.Tensor:
    """``out[r] = a[src(r)] @ w[e(r)]``, one matmul per expert (fp32 accumulation)."""
    rows = a[plan.token_idx.long()] if gather else a
    acc = acc_dtype(a)
    out = [rows[s:t].to(acc) @ w[e].to(acc) for e, (s, t) in enumerate(_segments(plan))]
    return torch.cat(out).to(a.dtype) if out else a.new_zeros(0, w.shape[2])


def moe_mlp_reference(x: torch.Tensor, plan: RoutingPlan, w_gate: torch.Tensor, w_up: torch.Tensor,
                      w_down: torch.Tensor) -> torch.Tensor:
    """The SwiGLU expert MLP, combined: ``y[t] = sum_r w_r * (silu(x_t Wg_e) * (x_t Wu_e)) Wd_e``."""
    acc = acc_dtype(x)
    y = torch.zeros(x.shape[0], w_down.shape[2], dtype=acc, device=x.device)
    for e, (s, t) in enumerate(_segments(plan)):
        tok = plan.token_idx[s:t].long()
        h = x[tok].to(acc)
        act = F.silu(h @ w_gate[e].to(acc)) * (h @ w_up[e].to(acc))
        y = y.index_add(0, tok, (act @ w_down[e].to(acc)) * plan.weights[s:t, None].to(acc))
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # fp32 operands stay fp32 (tests compare tightly); bf16/fp16 use the tensor cores as is.
    return "ieee" if dtype == torch.float32 else None


def _dot_f32(a: torch.Tensor) -> bool:
    return a.device.type == "cpu" and a.dtype == torch.bfloat16


# Tile configurations, per kernel; ``scripts/tune_grouped_mm.py`` times alternatives on the
# card at hand, through ``_OVERRIDE`` ({"rows" | "rows_dual" | "rows_swiglu_bwd" | "dw" | "dw_dual":
# {name: value}}).
_OVERRIDE: dict[str, dict] = {}
_GROUP_M = 8


def _tiles(K: int, N: int, dtype: torch.dtype, epilogue: int, dual_a: bool) -> dict:
    """Meta-parameters of the row-block kernel (BLOCK_M is the plan's block_m).

    ``wide``: one fp32 accumulator and a light epilogue (store, scale and scatter, scatter;
    a second A operand runs in a loop of its own into the same accumulator), which may take
    256 columns (H100, bf16: 604-638 TFLOP/s against 533 with 128 at Mixtral's and OLMoE's
    up-projection); ``dual``: two fp32 accumulators (gate and up), and the SwiGLU backward,
    whose epilogue holds four tiles, capped at 128. Long K loops (K >= 4096) get a fourth
    pipeline stage, except the SwiGLU backward's (H100 sweep, Mixtral: 256 columns 605 ->
    639 TFLOP/s with it; the gate/up forward 21.5 -> 20.9 ms; OLMoE's K=2048 is unchanged)."""
    wide = epilogue in (_STORE, _SCALE_SCATTER, _SCATTER)
    dual = epilogue == _SWIGLU
    cap = 256 if wide and dtype != torch.float32 else 128
    bn = min(cap, max(16, next_pow2(N)))
    bk = min(64 if dtype != torch.float32 else 32, max(16, next_pow2(K)))
    cfg = dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M, num_warps=8 if bn >= 128 else 4,
               num_stages=4 if (wide or dual) and K >= 4096 else 3)
    cfg.update(_OVERRIDE.get("rows_dual" if dual else "rows_swiglu_bwd" if epilogue == _SWIGLU_BWD else "rows", {}))
    return cfg


def _dw_tiles(K: int, N: int, dtype: torch.dtype, dual: bool, gather: bool) -> dict:
    """Meta-parameters of the weight-gradient kernel: a BLOCK_K x BLOCK_N tile of dW[e],
    reduced over the expert's rows BLOCK_R at a time.

    With a gathered operand, each step's operand addresses come from a row-index load in the
    same loop, and Triton's pipeliner spends two of ``num_stages`` on that chain (3.6 and 3.9
    alike: 3 or 4 stages give two operand buffers and wait for every copy at the top of each
    step, so a copy's latency is hidden by one step's MMA only). Five stages give three
    buffers and keep two steps of copies in flight, as three stages do without a gather."""
    bk = min(128, max(16, next_pow2(K)))
    bn = min(128, max(16, next_pow2(N)))
    cfg = dict(BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=32 if dtype == torch.float32 else 64, GROUP_M=_GROUP_M,
               num_warps=8 if bk * bn >= 64 * 128 else 4, num_stages=5 if gather else 3)
    cfg.update(_OVERRIDE.get("dw_dual" if dual else "dw", {}))
    return cfg


# Pipeline depth per kernel variant. Three stages fit an H100's 227 KiB of shared memory for
# every variant (sm_90 builds: at most 192 KiB, the dual-input backward at BLOCK_M=128); a
# card or Triton version that needs more gets fewer stages, remembered per variant, instead
# of an OutOfResources error.
_STAGES: dict[tuple, int] = {}


def _launch_fitting(launch, key: tuple, stages: int) -> None:
    """``launch(num_stages)`` with the deepest pipeline, at most ``stages``, that fits."""
    s = _STAGES.get(key, stages)
    while True:
        try:
            launch(s)
        except OutOfResources:
            if s <= 1:
                raise
            s -= 1
            continue
        _STAGES[key] = s
        return


def _variants(default: dict, options: list[dict], caps: dict) -> list[dict]:
    """``default`` first, then each option applied to it (tile sizes clamped to the problem
    as the defaults are, duplicates dropped)."""
    out = [default]
    for opt in options:
        cfg = dict(default, **opt)
        for name, cap in caps.items():
            cfg[name] = min(cfg[name], cap)
        if cfg not in out:
            out.append(cfg)
    return out


def _rows_candidates(default: dict, N: int, dtype: torch.dtype, epilogue: int, tma: bool = False,
                     fp32_out: bool = False) -> list[dict]:
    """What the autotuner times for the row-block kernel: column tile, warps and pipeline
    depth around the default. Never BLOCK_K (the dot's reduction step), nor the SwiGLU
    backward's column tile and warps (its epilogue reduces over the tile): the pick is meant
    to change speed, not bits (the interpreter tests check bit-equality). The caps of
    ``_tiles`` hold: 256 columns only for single-accumulator epilogues in 16-bit types.
    ``tma``: the weights may be read through tensor descriptors (``_tma_ok``); then the
    default and the widest tile are also timed that way (16-bit types).

    ``PERSISTENT``: n programs per SM (``_tune.device_sm_count``), each looping over tiles in
    the default's swizzled order; one program per SM for the default's tiles (and TMA's), two
    for 64 columns and 4 warps, which fit twice on an SM (sm_90 builds at Mixtral's and
    OLMoE's shapes: 96 KiB of shared memory, at most 230 registers; 128 columns do not).
    Each tile is computed as the non-persistent kernel computes it.
    ``fp32_out``: a plain store of fp32 rows (deterministic mode's down projection and dX);
    the persistent loop with TMA weights is left out there, because at 256 columns its fp32
    epilogue leaves it spilling inside the main loop (sm_90 build: 254 registers)."""
    cap = max(16, next_pow2(N))
    persistent = [dict(PERSISTENT=1)]
    if epilogue in (_STORE, _SCALE_SCATTER, _SCATTER) and dtype != torch.float32:
        opts = [dict(BLOCK_N=bn, num_stages=s, num_warps=8) for bn in (128, 256) for s in (3, 4)]
        persistent.append(dict(BLOCK_N=64, num_stages=4, num_warps=4, PERSISTENT=2))
    elif epilogue == _SWIGLU_BWD:
        # its epilogue sums <h, dY W^T> over the column tile: BLOCK_N and the warps (the
        # reduction's layout) stay the default's, so the router's gradient is the same bits
        opts = [dict(num_stages=s) for s in (2, 3)]
    else:
        opts = [dict(BLOCK_N=128, num_stages=s, num_warps=8) for s in (3, 4)] + [dict(BLOCK_N=64, num_warps=4)]
        persistent.append(dict(BLOCK_N=64, num_stages=3, num_warps=4, PERSISTENT=2))
    if tma and dtype != torch.float32:  # the default's tiles, and the widest, with TMA weights
        widest = [o for o in opts if o.get("BLOCK_N") == 256 and o.get("num_stages") == 4]
        opts = opts + [dict(B_TMA=True)] + [dict(o, B_TMA=True) for o in widest]
        if not (fp32_out and epilogue == _STORE):
            persistent.append(dict(B_TMA=True, PERSISTENT=1))
    return _variants(default, opts + persistent, {"BLOCK_N": cap})


def _tma_device(device: torch.device) -> bool:
    """Tensor-descriptor loads pay on Hopper and later (TMA); the interpreter runs them too."""
    if TensorDescriptor is None:
        return False
    if device.type != "cuda":
        return device.type == "cpu"
    return _tune.device_capability(device) >= (9, 0)


def _tma_ok(*ws) -> bool:
    """Whether weights can be read through tensor descriptors (TMA's requirements, on the
    strides the descriptor is built from: a contiguous tensor may still carry an odd stride
    on a size-1 dimension): unit last stride, 16-byte aligned base and other strides, none
    of them 0 (an expanded weight, e.g. one expert broadcast to all E, takes pointer loads)."""
    return TensorDescriptor is not None and all(
        w is None or (w.numel() > 0 and w.stride(-1) == 1 and w.data_ptr() % 16 == 0
                      and all(st > 0 and st * w.element_size() % 16 == 0 for st in w.stride()[:-1])) for w in ws)


def _dw_candidates(default: dict, K: int, N: int, gather: bool) -> list[dict]:
    """The weight-gradient kernel's candidates: output tile shape and pipeline depth (never
    BLOCK_R, the rows reduced per step)."""
    stages = (4, 5, 6) if gather else (3, 4)
    opts = [dict(num_stages=s) for s in stages] + [dict(BLOCK_K=64, BLOCK_N=128, num_warps=4),
                                                   dict(BLOCK_K=128, BLOCK_N=64, num_warps=4)]
    return _variants(default, opts, {"BLOCK_K": max(16, next_pow2(K)), "BLOCK_N": max(16, next_pow2(N))})


def _shares_memory(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _launch_tuned(key: tuple, default: dict, candidates, launch, trial, device) -> None:
    """Launch ``launch(cfg)`` with the autotuner's pick for ``key`` (see ``_tune``), or with
    the default and its stage fallback. ``candidates()`` lists what to time (called only
    when tuning); ``trial(cfg)`` runs a candidate where it cannot disturb the real outputs.
    An explicit ``_OVERRIDE`` (the tuning script's) turns the autotuner off."""
    cfg = None if _OVERRIDE else _tune.pick(key, candidates, trial, device)
    if cfg is not None:
        try:
            launch(cfg)
            return
        except Exception as exc:  # noqa: BLE001
            if _tune.device_fault(exc):
                raise
            # the pick built when it was timed, but this call specialises differently (an
            # unaligned operand, say) and its build fails or does not fit: the default path
            # from now on, whose own errors are the caller's
            _tune.forget(key)
    cfg = dict(default)
    warps = cfg.pop("num_warps")
    _launch_fitting(lambda s: launch(dict(cfg, num_warps=warps, num_stages=s)), (warps, *key),
                    cfg.pop("num_stages"))


def _launch_rows(a, w_t, plan: RoutingPlan, out, *, epilogue: int, gather: bool, a2=None, w2=None,
                 out2=None, out3=None, pre=None, pre2=None, weights=None, dw=None, transpose_w=False,
                 out_zeroed=False, dw_partial=False):
    """Launch the row-block kernel. ``w_t`` is ``[E, K, N]`` (or ``[E, N, K]`` read transposed).
    ``out_zeroed``: ``out`` (an atomic epilogue's accumulator) holds zeros on entry, so the
    autotuner's trials may accumulate into it and zero it again (no scratch copy).
    ``dw_partial``: the SwiGLU backward writes ``dw`` (need not be zeroed) without atomics:
    each column tile's share goes to a scratch ``[column tiles, rows]``, summed afterwards."""
    E = w_t.shape[0]
    if transpose_w:
        N, K = w_t.shape[1], w_t.shape[2]
        sbk, sbn = w_t.stride(2), w_t.stride(1)
    else:
        K, N = w_t.shape[1], w_t.shape[2]
        sbk, sbn = w_t.stride(1), w_t.stride(2)
    default = _tiles(K, N, a.dtype, epilogue, dual_a=a2 is not None)
    nb = plan.max_blocks
    save = (pre is not None) if epilogue == _SWIGLU else (out3 is not None)  # see the kernel's SAVE_PRE
    consts = dict(EPILOGUE=epilogue, GATHER_A=gather, DUAL_A=a2 is not None, SAVE_PRE=save,
                  PRECISION=_precision(a.dtype), DOT_F32=_dot_f32(a), BLOCK_M=plan.block_m)
    bufs = dict(out=out, out2=out2, out3=out3, pre=pre, pre2=pre2, dw=dw)

    def run(cfg, b):
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        # (a descriptor choice meets weights it cannot describe, e.g. a misaligned view: pointers)
        tma = cfg.pop("B_TMA", False) and _tma_ok(w_t, w2)
        descs = (None, None)
        if tma:
            box = [1, cfg["BLOCK_N"], cfg["BLOCK_K"]] if transpose_w else [1, cfg["BLOCK_K"], cfg["BLOCK_N"]]
            descs = tuple(None if w is None else TensorDescriptor(w, list(w.shape), list(w.stride()), box)
                          for w in (w_t, w2))
        d = b["out"]  # placeholder for pointers a variant never dereferences
        dw_buf = b["dw"]
        if dw_partial:
            dw_buf = new_output((cdiv(N, cfg["BLOCK_N"]), nb * plan.block_m), dtype=torch.float32, device=a.device)
        tiles = nb * cdiv(N, cfg["BLOCK_N"])  # (an upper bound: the plan's real row blocks are on the device)
        per_sm = cfg.pop("PERSISTENT", 0)
        grid = min(tiles, per_sm * _tune.device_sm_count(a.device)) if per_sm else tiles
        launch(_grouped_mm_fwd_kernel, (grid,),
            a, _or(a2, d), plan.token_idx, a.stride(0),
            w_t, _or(w2, d), w_t.stride(0), sbk, sbn, *descs,
            b["out"], _or(b["out2"], d), _or(b["out3"], d), b["out"].stride(0),
            _or(b["pre"], d), _or(b["pre2"], d), _or(weights, d), _or(dw_buf, d), plan.token_idx,
            plan.block_expert, plan.block_row, plan.expert_offsets,
            K, N, nb, E, **consts, **cfg, B_TMA=tma, B_TRANS=transpose_w, PERSISTENT=per_sm > 0,
            DW_PARTIAL=dw_partial, num_warps=warps, num_stages=stages,
        )
        if dw_partial:  # a fixed order of the column tiles' shares
            torch.sum(dw_buf[:, :plan.num_rows], 0, out=b["dw"])

    def trial(cfg):
        # A candidate's trial must neither change what the real launch reads nor leave
        # anything in what it accumulates into, and should cost no memory. Plain stores go to
        # the real outputs (the real launch writes the same values again). Atomic scatters
        # add into ``out``, which their callers pass zeroed (``out_zeroed``): it is zeroed
        # again after each trial. The SwiGLU backward may write dG, dU over the g, u it reads
        # (``reuse``): its trials send both to the w*h buffer instead (the values do not
        # matter, only the traffic), and its combine-weight gradient to a small scratch.
        b = dict(bufs)
        if epilogue in (_SCALE_SCATTER, _SCATTER) and not out_zeroed:
            b["out"] = torch.empty_like(out)
        if epilogue == _SWIGLU_BWD:
            b["dw"] = torch.empty_like(dw)
            for n, src in (("out", pre), ("out2", pre2)):
                if _shares_memory(b[n], src):
                    b[n] = out3 if out3 is not None else torch.empty_like(b[n])
        run(cfg, b)
        if b["out"] is out and epilogue in (_SCALE_SCATTER, _SCATTER):
            out.zero_()  # (the same memset in every candidate's time: the ranking holds)

    key = ("rows", _tune.device_name(a.device), a.dtype, epilogue, gather, a2 is not None, save, transpose_w,
           K, N, plan.block_m, next_pow2(nb), out.dtype, dw_partial)
    _launch_tuned(key, default,
                  lambda: _rows_candidates(default, N, a.dtype, epilogue, _tma_device(a.device) and _tma_ok(w_t, w2),
                                           out.dtype == torch.float32),
                  lambda cfg: run(cfg, bufs), trial, a.device)
    return E


def _or(t, d):
    """``t``, or the placeholder ``d`` for a pointer the variant never dereferences."""
    return d if t is None else t


def _token_rows(token_idx: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's rows grouped by token: ``order`` (rows sorted by token, stably, so each
    token's rows stay in expert order) and ``starts`` [T+1] (token t owns
    ``order[starts[t]:starts[t+1]]``). Sorting and searching are deterministic on CUDA."""
    order = torch.argsort(token_idx, stable=True)
    bounds = torch.arange(T + 1, device=token_idx.device, dtype=token_idx.dtype)
    starts = torch.searchsorted(token_idx[order], bounds)
    return order.to(torch.int32), starts.to(torch.int32)


def _combine_rows(rows: torch.Tensor, weights, token_idx: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = sum over plan rows r of token t of (weights[r] *) rows[r]``, ``[T, D]`` in
    ``dtype``, summed in fp32 in a fixed order (deterministic mode's combine, instead of the
    epilogues' atomic adds). Tokens without rows get zeros."""
    D = rows.shape[1]
    out = new_output((T, D), dtype=dtype, device=rows.device)
    if T == 0 or D == 0:
        return out
    order, starts = _token_rows(token_idx, T)
    block_d = min(1024, max(16, next_pow2(D)))
    launch(_combine_rows_kernel, (T, cdiv(D, block_d)), rows, rows.stride(0), _or(weights, rows), order, starts, out,
           out.stride(0), D, HAS_W=weights is not None, BLOCK_D=block_d, num_warps=4)
    return out


def _launch_dw(a, plan: RoutingPlan, g, dw, *, gather_a: bool, gather_g: bool, g2=None, dw2=None):
    E, K, N = dw.shape
    if dw2 is not None and dw2.stride() != dw.stride():
        raise AssertionError("dw and dw2 must share their strides")  # (the callers allocate them so)
    gather = gather_a or gather_g
    default = _dw_tiles(K, N, a.dtype, dual=g2 is not None, gather=gather)
    consts = dict(GATHER_A=gather_a, GATHER_G=gather_g, DUAL_G=g2 is not None,
                  PRECISION=_precision(a.dtype), DOT_F32=_dot_f32(a))

    def run(cfg):
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        launch(_grouped_mm_dw_kernel, (cdiv(K, cfg["BLOCK_K"]) * cdiv(N, cfg["BLOCK_N"]), E),
            a, plan.token_idx, a.stride(0),
            g, dw if g2 is None else g2, plan.token_idx, g.stride(0),
            dw, dw if dw2 is None else dw2, dw.stride(0), dw.stride(1), dw.stride(2),
            plan.expert_offsets, K, N, **consts, **cfg, num_warps=warps, num_stages=stages,
        )

    # every program stores its own tile of dW: candidates may write the real outputs
    key = ("dw", _tune.device_name(a.device), a.dtype, gather_a, gather_g, g2 is not None, K, N, E,
           next_pow2(plan.num_rows), dw.stride(2) == 1)
    _launch_tuned(key, default, lambda: _dw_candidates(default, K, N, gather), run, run, a.device)


_LAUNCH_NAMES = {_STORE: "grouped mm", _SWIGLU: "gate/up + SwiGLU", _SCALE_SCATTER: "down, scale, scatter",
                 _SWIGLU_BWD: "dY Wd^T + SwiGLU bwd", _SCATTER: "dX, scatter"}


def tuned_tiles() -> list[dict]:
    """The autotuner's picks so far, one dict per tuned key: ``launch``, ``K``, ``N``,
    ``chosen`` and ``default`` (meta-parameters; ``chosen`` is None where tuning was skipped),
    and the ``key`` itself."""
    out = []
    for key, cfg in _tune.tuned().items():
        if key[0] == "rows":
            _, _, dtype, epi, gather, dual_a, save, trans, K, N, _, _, out_dtype, partial = key
            name = _LAUNCH_NAMES[epi] + (" (gathered rows)" if gather and epi == _STORE else
                                         " (saves g, u)" if save and epi == _SWIGLU else "")
            if partial or (epi == _STORE and out_dtype == torch.float32 and dtype != torch.float32):
                # deterministic mode: fp32 rows for the combine, per-tile shares of dw
                name = ("dX rows" if dual_a else "dA rows" if trans else "down rows") if epi == _STORE else name
                name += " (deterministic)"
            default = _tiles(K, N, dtype, epi, dual_a)
        elif key[0] == "dw":
            _, _, dtype, ga, gg, dual, K, N, *_ = key
            name = "dW gate, up" if dual else "dW (x^T dY)" if ga else "dW down" if gg else "dW"
            default = _dw_tiles(K, N, dtype, dual=dual, gather=ga or gg)
        else:
            continue
        out.append(dict(launch=name, K=K, N=N, chosen=cfg, default=default, key=key))
    return out


def _as_b(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The operand ``B`` (logical ``[E, K, N]``) as the row launches read it, without a copy
    where its storage allows: ``(w, False)`` when N is its unit-stride dimension, ``(w^T,
    True)`` (the ``[E, N, K]`` storage, read transposed) when K is, as for a transposed view
    of a weight stored like ``nn.Linear``'s; otherwise a contiguous copy."""
    if w.stride(2) == 1 or w.shape[2] <= 1:
        return w, False
    if w.stride(1) == 1 or w.shape[1] <= 1:
        return w.transpose(1, 2), True
    return w.contiguous(), False


def _as_b_pair(w: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``_as_b`` for the two operands of a dual launch, which share one set of strides (gate
    and up: two halves of one fused weight do)."""
    b, tr = _as_b(w)
    b2, tr2 = _as_b(w2)
    if tr == tr2 and b.stride() == b2.stride():
        return b, b2, tr
    return w.contiguous(), w2.contiguous(), False


def _split_gate_up(w_gate: torch.Tensor, w_up):
    """``(w_gate, w_up)``; with ``w_up`` None, ``w_gate`` is a fused ``[E, D, 2F]`` weight
    holding the gate's columns then the up's."""
    if w_up is not None:
        return w_gate, w_up
    Fh = w_gate.shape[2] // 2
    return w_gate[:, :, :Fh], w_gate[:, :, Fh:]


def _gate_up_grads(w_gate: torch.Tensor, w_up):
    """The backward's gate and up weight gradients: ``(returned for w_gate, returned for w_up,
    dWg, dWu)``, the last two being what the kernel writes (one set of strides). Fused
    (``w_up`` None): one gradient like the fused weight, its halves written, and an empty
    tensor in w_up's place. (The fake implementation calls this too, so compiled graphs see
    the same layouts.)"""
    if w_up is None:
        dwgu = new_output_like(w_gate)
        return (dwgu, dwgu.new_empty(0), *_split_gate_up(dwgu, None))
    dwg, dwu = new_output_like(w_gate), new_output_like(w_up)
    if dwg.stride() != dwu.stride():
        dwg, dwu = dwg.contiguous(), dwu.contiguous()
    return dwg, dwu, dwg, dwu


def _plan_from(token_idx, weights, offsets, block_expert, block_row, block_m: int, T: int) -> RoutingPlan:
    return RoutingPlan(token_idx=token_idx, weights=weights, expert_counts=offsets[1:] - offsets[:-1],
                       expert_offsets=offsets, padded_offsets=offsets, block_expert=block_expert,
                       block_row=block_row, num_tokens=T, num_experts=offsets.shape[0] - 1, block_m=block_m)


def _moe_fwd(x, weights, w_gate, w_up, w_down, token_idx, offsets, block_expert, block_row, block_m: int,
             save: int, deterministic: bool = False):
    x = x.contiguous()
    T, D = x.shape
    w_gate, w_up = _split_gate_up(w_gate, w_up)
    N, Fh = token_idx.shape[0], w_gate.shape[2]
    plan = _plan_from(token_idx, weights, offsets, block_expert, block_row, block_m, T)
    h = new_output((N, Fh), dtype=x.dtype, device=x.device)
    g = new_output((N, Fh) if save else (0, Fh), dtype=x.dtype, device=x.device)
    u = new_output((N, Fh) if save else (0, Fh), dtype=x.dtype, device=x.device)
    bg, bu, tr = _as_b_pair(w_gate, w_up)
    _launch_rows(x, bg, plan, h, epilogue=_SWIGLU, gather=True, w2=bu, transpose_w=tr,
                 pre=g if save else None, pre2=u if save else None)
    bd, trd = _as_b(w_down)
    if deterministic:  # each row's output, then each token's rows summed in a fixed order
        rows = new_output((N, w_down.shape[2]), dtype=torch.float32, device=x.device)
        _launch_rows(h, bd, plan, rows, epilogue=_STORE, gather=False, transpose_w=trd)
        del h
        return _combine_rows(rows, weights, token_idx, T, x.dtype), g, u
    y = torch.zeros(T, w_down.shape[2], dtype=torch.float32, device=x.device)
    _launch_rows(h, bd, plan, y, epilogue=_SCALE_SCATTER, gather=False, weights=weights,
                 out_zeroed=True, transpose_w=trd)
    return y.to(x.dtype), g, u


_DW_GATE_UP, _DW_DOWN = 1, 2  # which weight gradients moe_mlp's backward computes (bits)
_DA, _DW = 1, 2  # which gradients grouped_mm's backward computes (bits)


def _moe_bwd(dy, x, g, u, weights, w_gate, w_up, w_down, token_idx, offsets, block_expert, block_row,
             block_m: int, deterministic: bool = False, need_dw: int = _DW_GATE_UP | _DW_DOWN,
             reuse: bool = False):
    """The backward's four launches (two without the weight gradients: ``need_dw`` names the
    ones to compute, frozen experts skip theirs, and get empty tensors). ``reuse``: dG and dU are written over the saved
    pre-activations g and u (each tile reads its g, u before it writes the same elements),
    which takes 2 x N x F off the backward's peak; g and u are garbage afterwards.
    ``deterministic``: no floating-point atomics (the combine weights' gradient from
    per-column-tile shares, dX from per-row outputs summed per token in a fixed order)."""
    dy, x = dy.contiguous(), x.contiguous()
    fused = w_up is None
    w_gu = w_gate
    w_gate, w_up = _split_gate_up(w_gate, w_up)
    T, D = x.shape
    N, Fh = g.shape
    plan = _plan_from(token_idx, weights, offsets, block_expert, block_row, block_m, T)
    dev = x.device
    dg = g if reuse else new_output((N, Fh), dtype=x.dtype, device=dev)
    du = u if reuse else new_output((N, Fh), dtype=x.dtype, device=dev)
    hw = new_output((N, Fh), dtype=x.dtype, device=dev) if need_dw & _DW_DOWN else None
    dweights = (new_output if deterministic else torch.zeros)((N,), dtype=torch.float32, device=dev)
    # dY[tok] @ Wd^T, with d combine weights, d silu*mul and w*h fused in the epilogue
    bd, trd = _as_b(w_down.transpose(1, 2))
    _launch_rows(dy, bd, plan, dg, epilogue=_SWIGLU_BWD, gather=True, out2=du, out3=hw, pre=g, pre2=u,
                 weights=weights, dw=dweights, transpose_w=trd, dw_partial=deterministic)
    # dWd = sum_r (w_r h_r)^T dY[tok_r], first: hw is freed before dX's fp32 buffer exists
    if need_dw & _DW_DOWN:
        dwd = new_output_like(w_down)
        _launch_dw(hw, plan, dy, dwd, gather_a=False, gather_g=True)
        del hw
    else:
        dwd = w_down.new_empty(0)
    # dX[tok] += dG @ Wg^T + dU @ Wu^T
    bg, bu, trg = _as_b_pair(w_gate.transpose(1, 2), w_up.transpose(1, 2))
    if deterministic:
        rows = new_output((N, D), dtype=torch.float32, device=dev)
        _launch_rows(dg, bg, plan, rows, epilogue=_STORE, gather=False, a2=du, w2=bu, transpose_w=trg)
        dx = _combine_rows(rows, None, token_idx, T, x.dtype)
        del rows
    else:
        dx = torch.zeros(T, D, dtype=torch.float32, device=dev)
        _launch_rows(dg, bg, plan, dx, epilogue=_SCATTER, gather=False, a2=du, w2=bu, transpose_w=trg,
                     out_zeroed=True)
    # dWg = X^T dG, dWu = X^T dU (shared x tile), each in its weight's layout (fused: the two
    # halves of one gradient)
    if need_dw & _DW_GATE_UP:
        dw_first, dw_second, dwg, dwu = _gate_up_grads(w_gu, None if fused else w_up)
        _launch_dw(x, plan, dg, dwg, gather_a=True, gather_g=False, g2=du, dw2=dwu)
    else:
        dw_first, dw_second = w_gu.new_empty(0), w_gu.new_empty(0)
    return dx.to(x.dtype), dweights.to(weights.dtype), dw_first, dw_second, dwd


def _gmm_fwd(a, w, token_idx, offsets, block_expert, block_row, block_m: int, gather: bool):
    a = a.contiguous()
    plan = _plan_from(token_idx, a.new_empty(0), offsets, block_expert, block_row, block_m, a.shape[0])
    out = new_output((token_idx.shape[0], w.shape[2]), dtype=a.dtype, device=a.device)
    b, tr = _as_b(w)
    _launch_rows(a, b, plan, out, epilogue=_STORE, gather=gather, transpose_w=tr)
    return out


def _gmm_bwd(dout, a, w, token_idx, offsets, block_expert, block_row, block_m: int, gather: bool,
             deterministic: bool = False, need: int = _DA | _DW):
    """dA and dW (the bits of ``need``); a gradient not needed (a frozen weight, say) is
    not computed and comes back empty."""
    dout, a = dout.contiguous(), a.contiguous()
    plan = _plan_from(token_idx, a.new_empty(0), offsets, block_expert, block_row, block_m, a.shape[0])
    b, tr = _as_b(w.transpose(1, 2))
    if not need & _DA:
        da = a.new_empty(0)
    elif gather and deterministic:  # per-row dA, then each token's rows summed in a fixed order
        rows = new_output((token_idx.shape[0], a.shape[1]), dtype=torch.float32, device=a.device)
        _launch_rows(dout, b, plan, rows, epilogue=_STORE, gather=False, transpose_w=tr)
        da = _combine_rows(rows, None, token_idx, a.shape[0], a.dtype)
        del rows
    elif gather:
        da = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
        _launch_rows(dout, b, plan, da, epilogue=_SCATTER, gather=False, transpose_w=tr, out_zeroed=True)
        da = da.to(a.dtype)
    else:
        # rows outside every expert's range (none in a full plan) keep a zero gradient
        da = torch.zeros_like(a)
        _launch_rows(dout, b, plan, da, epilogue=_STORE, gather=False, transpose_w=tr)
    if not need & _DW:
        return da, w.new_empty(0)
    dw = new_output_like(w)
    _launch_dw(a, plan, dout, dw, gather_a=gather, gather_g=False)
    return da, dw


# ----------------------------------------------------------------------------------------
# 4. Custom ops with autograd
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("flopwise::moe_mlp", mutates_args=())
def _moe_mlp_op(x: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor | None,
                w_down: torch.Tensor, token_idx: torch.Tensor, offsets: torch.Tensor, block_expert: torch.Tensor,
                block_row: torch.Tensor, block_m: int, save: int,
                deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _moe_fwd(x, weights, w_gate, w_up, w_down, token_idx, offsets, block_expert, block_row, block_m, save,
                    deterministic)


@_moe_mlp_op.register_fake
def _(x, weights, w_gate, w_up, w_down, token_idx, offsets, block_expert, block_row, block_m, save, deterministic):
    N, Fh = token_idx.shape[0], w_down.shape[1]
    rows = N if save else 0
    return (x.new_empty(x.shape[0], w_down.shape[2]), x.new_empty(rows, Fh), x.new_empty(rows, Fh))


@torch.library.custom_op("flopwise::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd_op(dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, weights: torch.Tensor,
                    w_gate: torch.Tensor, w_up: torch.Tensor | None, w_down: torch.Tensor, token_idx: torch.Tensor,
                    offsets: torch.Tensor, block_expert: torch.Tensor, block_row: torch.Tensor,
                    block_m: int, deterministic: bool, need_dw: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _moe_bwd(dy, x, g, u, weights, w_gate, w_up, w_down, token_idx, offsets, block_expert, block_row,
                    block_m, deterministic, need_dw)


@_moe_mlp_bwd_op.register_fake
def _(dy, x, g, u, weights, w_gate, w_up, w_down, token_idx, offsets, block_expert, block_row, block_m,
      deterministic, need_dw):
    if need_dw & _DW_GATE_UP:
        dw_first, dw_second, _, _ = _gate_up_grads(w_gate, w_up)
    else:
        dw_first, dw_second = w_gate.new_empty(0), w_gate.new_empty(0)
    dwd = new_output_like(w_down) if need_dw & _DW_DOWN else w_down.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weights), dw_first, dw_second, dwd


def _moe_setup(ctx, inputs, output):
    x, weights, w_gate, w_up, w_down, token_idx, offsets, block_expert, block_row, block_m, save, _ = inputs
    _, g, u = output
    ctx.save_for_backward(x, g, u, weights, w_gate, w_up, w_down, token_idx, offsets, block_expert, block_row)
    ctx.block_m = block_m
    ctx.saved = save
    ctx.consumed = False
    # g and u are outputs only to be saved: without this, autograd would hand the backward
    # two zero-filled N x F gradients for them (1.8 GB at Mixtral's shape)
    ctx.mark_non_differentiable(g, u)
    ctx.set_materialize_grads(False)


def _moe_backward(bwd):
    def backward(ctx, dy, dg_unused, du_unused):
        x, g, u, weights, w_gate, w_up, w_down, token_idx, offsets, block_expert, block_row = ctx.saved_tensors
        if dy is None:  # (grads are not materialised)
            return (None,) * 12
        if not ctx.saved:
            raise RuntimeError("moe_mlp was run without saving activations (save=False) and cannot be differentiated")
        if ctx.consumed:
            raise RuntimeError(
                "moe_mlp's backward ran before for this forward and wrote its gradients over the saved "
                "activations; to backpropagate through it more than once (retain_graph=True), call "
                "moe_mlp(..., retain_activations=True) (MoE layers: MoEConfig(retain_activations=True))")
        reuse = ctx.saved == _SAVE_REUSE and bwd is _moe_bwd
        # marked before the launches: a backward that fails part-way (out of memory, say) may
        # already have overwritten g and u, so a retry must refuse too
        ctx.consumed = reuse
        # (deterministic mode as set when the backward runs, as for torch's own ops)
        need = ctx.needs_input_grad
        need_gu, need_d = need[2] or (w_up is not None and need[3]), need[4]
        dx, dw, dwg, dwu, dwd = bwd(dy, x, g, u, weights, w_gate, w_up, w_down, token_idx, offsets,
                                    block_expert, block_row, ctx.block_m, torch.are_deterministic_algorithms_enabled(),
                                    _DW_GATE_UP * need_gu | _DW_DOWN * need_d, *((True,) if reuse else ()))
        return (dx, dw, dwg if need_gu else None, dwu if need_gu and w_up is not None else None,
                dwd if need_d else None, None, None, None, None, None, None, None)

    return backward




@torch.library.custom_op("flopwise::grouped_mm", mutates_args=())
def _gmm_op(a: torch.Tensor, w: torch.Tensor, token_idx: torch.Tensor, offsets: torch.Tensor,
            block_expert: torch.Tensor, block_row: torch.Tensor, block_m: int, gather: bool) -> torch.Tensor:
    return _gmm_fwd(a, w, token_idx, offsets, block_expert, block_row, block_m, gather)


@_gmm_op.register_fake
def _(a, w, token_idx, offsets, block_expert, block_row, block_m, gather):
    return a.new_empty(token_idx.shape[0], w.shape[2])


@torch.library.custom_op("flopwise::grouped_mm_bwd", mutates_args=())
def _gmm_bwd_op(dout: torch.Tensor, a: torch.Tensor, w: torch.Tensor, token_idx: torch.Tensor,
                offsets: torch.Tensor, block_expert: torch.Tensor, block_row: torch.Tensor, block_m: int,
                gather: bool, deterministic: bool, need: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _gmm_bwd(dout, a, w, token_idx, offsets, block_expert, block_row, block_m, gather, deterministic, need)


@_gmm_bwd_op.register_fake
def _(dout, a, w, token_idx, offsets, block_expert, block_row, block_m, gather, deterministic, need):
    return (torch.empty_like(a) if need & _DA else a.new_empty(0)), (new_output_like(w) if need & _DW else w.new_empty(0))


def _gmm_setup(ctx, inputs, output):
    a, w, token_idx, offsets, block_expert, block_row, block_m, gather = inputs
    ctx.save_for_backward(a, w, token_idx, offsets, block_expert, block_row)
    ctx.block_m, ctx.gather = block_m, gather


def _gmm_backward(bwd):
    def backward(ctx, dout):
        a, w, token_idx, offsets, block_expert, block_row = ctx.saved_tensors
        need_a, need_w = ctx.needs_input_grad[:2]
        da, dw = bwd(dout, a, w, token_idx, offsets, block_expert, block_row, ctx.block_m, ctx.gather,
                     torch.are_deterministic_algorithms_enabled(), _DA * need_a | _DW * need_w)
        return da if need_a else None, dw if need_w else None, None, None, None, None, None, None

    return backward


# Autograd for the custom ops, and their eager twins (see ``_dispatch.traced``): the same
# launches without the dispatcher's host cost.
_MoEMLPFunction = autograd_twin(_moe_mlp_op, "MoEMLPFunction", _moe_fwd, _moe_setup, _moe_backward,
                                bwd_impl=_moe_bwd, bwd_op=_moe_mlp_bwd_op)
_GroupedMMFunction = autograd_twin(_gmm_op, "GroupedMMFunction", _gmm_fwd, _gmm_setup, _gmm_backward,
                                   bwd_impl=_gmm_bwd, bwd_op=_gmm_bwd_op)


# ----------------------------------------------------------------------------------------
# 5. Public API
# ----------------------------------------------------------------------------------------
def _check_plan(plan, T: int | None, E: int, name="plan"):
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"{name} must be a RoutingPlan (from topk_route / expert_choice_route), got {type(plan).__name__}")
    if plan.num_experts != E:
        raise ValueError(f"{name} routes to {plan.num_experts} experts but the expert weights hold E = {E}")
    if T is not None and plan.num_tokens != T:
        raise ValueError(f"{name} was made for T = {plan.num_tokens} tokens, the input has {T}")


def _plan_tensors(plan: RoutingPlan, device: torch.device):
    """The plan tensors the kernels read, on ``device`` and contiguous (the kernels index
    them as plain arrays: a strided view, e.g. of a user-built plan, would be misread)."""
    ts = (plan.weights, plan.token_idx, plan.expert_offsets, plan.block_expert, plan.block_row)
    for n, t in zip(("weights", "token_idx", "expert_offsets", "block_expert", "block_row"), ts):
        if t.device != device:
            raise ValueError(f"plan.{n} is on {t.device}, the input on {device}")
    return tuple(t.contiguous() for t in ts)


def _check_weight(w, name: str, E: int | None, shape2: tuple[int | None, int | None], dtype, device,
                  sources: tuple[str | None, str | None] = (None, None)):
    """``sources`` names where each expected size comes from (an input's width, another weight)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 3:
        raise ValueError(f"{name} must have shape [E, in, out] (3 dims), got {tuple(w.shape)}")
    if E is not None and w.shape[0] != E:
        raise ValueError(f"{name} has {w.shape[0]} experts, expected {E}")
    for i, want in enumerate(shape2):
        if want is not None and w.shape[1 + i] != want:
            raise ValueError(f"{name} has shape {tuple(w.shape)}; dim {1 + i} must be {want}"
                             + (f" ({sources[i]})" if sources[i] else ""))
    if w.dtype != dtype:
        raise TypeError(f"{name} has dtype {w.dtype}, the input has {dtype}: cast one of them")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device}, the input on {device}")


def _use_kernel(x: torch.Tensor, op: str) -> bool:
    if backend(x, op=op) != "triton":
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: the Triton kernel supports float32, bfloat16 and float16, got {x.dtype}")
    return True


def grouped_mm(a: torch.Tensor, w: torch.Tensor, plan: RoutingPlan, *, gather: bool = True) -> torch.Tensor:
    """Grouped matmul over the plan's expert-sorted rows: ``out[r] = a[src(r)] @ w[e(r)]``.

    Args:
        a: ``[T, K]`` token rows (``gather=True``: read at ``plan.token_idx``, no permuted copy)
            or ``[N, K]`` rows already in plan order (``gather=False``).
        w: ``[E, K, N_]`` per-expert matrices, same dtype and device as ``a``.
        plan: the :class:`RoutingPlan` that sorted the rows (its ``block_m`` is the kernel's BLOCK_M).

    Returns ``[N, N_]`` in plan order; differentiable in ``a`` and ``w``.

    Example::

        plan = topk_route(logits, k=2)
        up = grouped_mm(x, w_up, plan)      # [T*2, F]
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"a must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() != 2:
        raise ValueError(f"a must be a 2-D tensor [T, K] (or [N, K] with gather=False), got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"a must be a floating-point tensor (float32, bfloat16, float16), got {a.dtype}")
    _check_weight(w, "w", None, (a.shape[1], None), a.dtype, a.device, ("a's last dim", None))
    _check_plan(plan, a.shape[0] if gather else None, w.shape[0])
    if not gather and a.shape[0] != plan.num_rows:
        raise ValueError(f"with gather=False a must have the plan's N = {plan.num_rows} rows, got {a.shape[0]}")
    # meta inputs: the custom op, whose fake implementation gives the shapes (the reference reads offsets)
    if not a.is_meta and (not _use_kernel(a, "grouped_mm") or plan.num_rows == 0):
        return grouped_mm_reference(a, w, plan, gather=gather)
    _, tok, offsets, bexp, brow = _plan_tensors(plan, a.device)
    op = _gmm_op if traced(a, w, tok) else _GroupedMMFunction.run
    return op(a, w, tok, offsets, bexp, brow, plan.block_m, gather)


def moe_mlp(x: torch.Tensor, plan: RoutingPlan, w_gate: torch.Tensor, w_up: torch.Tensor | None,
            w_down: torch.Tensor, *, retain_activations: bool = False) -> torch.Tensor:
    """SwiGLU experts applied along a routing plan and combined into each token's output.

    ``y[t] = sum over plan rows r of token t: w_r * (silu(x_t @ Wg_e) * (x_t @ Wu_e)) @ Wd_e``.

    Args:
        x: ``[T, D]`` tokens (fp32, bf16, fp16).
        plan: a :class:`RoutingPlan` over T tokens and E experts; ``plan.weights`` are the
            combine weights and receive gradients (so the router learns).
        w_gate, w_up: ``[E, D, F]``; w_down: ``[E, F, D]``; x's dtype and device. With
            ``w_up=None``, ``w_gate`` is one fused ``[E, D, 2F]`` weight, the gate's F
            columns then the up's (its gradient is then one tensor too). Any weight may be a
            transposed view of ``[E, out, in]`` storage (``nn.Linear``'s layout, and Hugging
            Face's expert weights: ``gate_up_proj.transpose(1, 2)``): the kernels read it in
            place, without a copy, and write its gradient in that layout.
        retain_activations: the forward saves the gate and up pre-activations (2 x N x F),
            and by default the backward writes their gradients over them, so it needs no
            further 2 x N x F and can run once per forward (a second backward, as with
            ``retain_graph=True``, raises). True keeps them intact for repeated backwards.
            Under ``torch.compile`` the backward never writes over them.

    Returns ``y: [T, D]`` in x's dtype (tokens no expert chose get zeros). Differentiable in
    x, the plan's weights and the three expert weights. Two launches forward, four backward.

    Example::

        plan = topk_route(x @ w_router, k=2, renormalize=True)
        y = moe_mlp(x, plan, w_gate, w_up, w_down)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [T, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32, bfloat16, float16), got {x.dtype}")
    T, D = x.shape
    _check_weight(w_gate, "w_gate", None, (D, None), x.dtype, x.device, ("x's last dim: x or the weight is wrong", None))
    _check_plan(plan, T, w_gate.shape[0])
    Fh = w_gate.shape[2]
    if w_up is None:
        if Fh % 2:
            raise ValueError(f"with w_up=None, w_gate is a fused [E, D, 2F] gate-up weight: its last dim must be "
                             f"even, got shape {tuple(w_gate.shape)}")
        Fh //= 2
    else:
        _check_weight(w_up, "w_up", plan.num_experts, (D, Fh), x.dtype, x.device, ("x's last dim", "w_gate's dim 2"))
    _check_weight(w_down, "w_down", plan.num_experts, (Fh, D), x.dtype, x.device,
                  ("w_gate's dim 2" + (" / 2" if w_up is None else ""), "x's last dim"))
    if not x.is_meta and (not _use_kernel(x, "moe_mlp") or plan.num_rows == 0 or x.shape[0] == 0):
        # (nothing routed: zeros, no launch)
        return moe_mlp_reference(x, plan, *_split_gate_up(w_gate, w_up), w_down)
    weights, tok, offsets, bexp, brow = _plan_tensors(plan, x.device)
    save = _SAVE_NONE
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weights, w_gate, w_up, w_down)):
        save = _SAVE if retain_activations else _SAVE_REUSE
    op = _moe_mlp_op if traced(x, weights, tok, w_gate, w_down, *(() if w_up is None else (w_up,))) \
        else _MoEMLPFunction.run
    y, _, _ = op(x, weights, w_gate, w_up, w_down, tok, offsets, bexp, brow, plan.block_m, save,
                 torch.are_deterministic_algorithms_enabled())
    return y
