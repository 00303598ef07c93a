"""Mixture-of-Depths token movement: gather the selected tokens, scatter the block's output back.

A Mixture-of-Depths block runs on ``k`` of the ``S`` tokens of each sequence. Around the block
sit three memory-bound ops, all in this file:

* ``gather_tokens(x_BSD, idx_BK) -> x_BKD``: the selected rows;
* ``rmsnorm_gather_tokens(x_BSD, idx_BK, gamma_D)``: the same rows, RMS-normalised (the block's
  first op), so each selected row is read from memory once;
* ``scatter_tokens(residual_BSD, y_BKD, idx_BK, weight_BK)``: ``residual[b, idx[b, j]] +=
  weight[b, j] * y[b, j]``, out of place (training) or in place (inference).

Shape legend: B batch, S sequence, D model dim, K tokens selected per sequence (``k``).

Index contract. ``idx[b]`` holds positions in ``[0, S)``, **distinct within each row**
(MoD routing picks them with ``topk`` and sorts them, so they are also increasing, though
nothing here needs the order). Distinctness is what lets the scatter and every backward
write each destination row from exactly one program, with a plain read-add-write instead of
atomics: bit-for-bit deterministic and no atomic traffic. Ranks, shapes, dtypes and devices
are validated on every call (no host synchronisation); ``check_indices=True`` additionally
checks range and distinctness, which needs a device-to-host copy (keep it off the hot path).
A position outside ``[0, S)`` (a negative one included: no Python-style wrap) selects no
row, in every backend and both directions: it gathers a zero row and scatters nothing, and
nothing out of bounds is ever read or written. With repeated indices the results are
unspecified and differ between backends (the kernels' gather backward keeps one of the
repeated rows' gradients, the reference sums them).

Every op is a ``torch.library.custom_op`` (``flopwise::mod_gather`` ...) with a fake
implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through
it. Inside, ``_dispatch.backend`` picks the Triton kernel (CUDA, or CPU under
``TRITON_INTERPRET=1``) or the plain-PyTorch ``*_reference`` (CPU).

Performance design (H100, bf16, B=8 S=4096 D=4096 K=512; BASELINES.md has torch's numbers):

* All kernels are bandwidth-bound copies with a little fp32 math. One program owns a tile of
  ``ROWS x BLOCK_D`` elements (about 4096, i.e. 8 KB of bf16 per tensor it streams) on a 2-D
  grid (row blocks, D blocks): at D=4096 that is 4096 programs of 128 threads moving four
  16-byte vectors each per stream, enough loads in flight per SM to cover HBM latency and
  enough programs to fill 132 SMs many times over without a persistent loop.
* Row offsets are ``row * D`` in int64 (``B*S*D`` passes 2**31 at B=16 of this shape).
  Triton specialises integer arguments divisible by 16, so with D % 16 == 0 the compiler
  knows every row start is 16-byte aligned and emits 128-bit loads/stores; odd D (100) stays
  correct with narrower accesses.
* Inputs and outputs stay in their dtype (bf16); sums and products are done in fp32 and
  rounded once on store.
* Backward passes and the out-of-place scatter write each row of a ``[B, S, D]`` result
  exactly once, through an inverse map ``inv[b, s] = j`` (or -1): unselected rows get zeros
  (or the copied residual) in the same pass, instead of a ``zeros`` fill followed by a scatter.
* Reductions over D (RMSNorm statistics, the router-weight gradient) keep whole rows in
  registers (RMSNorm; D up to 65536) or loop over D with a per-row fp32 accumulator (scatter
  backward). ``gamma``'s gradient is reduced in two deterministic stages: a persistent grid of
  about two programs per SM accumulates its rows in registers and writes one fp32 partial
  row each, then ``partial.sum(0)``; no atomics.
Tile sizes and warp counts are first choices from these rules; re-tune them against
``flopwise bench mod`` on the target card before recording numbers.
"""

import torch

from ._dispatch import HAS_TRITON, acc_dtype, autograd_twin, cdiv, new_output, next_pow2, records, traced, use_triton
from ._launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "gather_tokens",
    "gather_tokens_reference",
    "scatter_tokens",
    "scatter_tokens_reference",
    "rmsnorm_gather_tokens",
    "rmsnorm_gather_tokens_reference",
    "GatherTokensFunction",
    "ScatterTokensFunction",
    "RMSNormGatherTokensFunction",
]

# ----------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _selected_rows(idx_ptr, n_sel, S, K, ROWS: tl.constexpr):
        """This program's ROWS selected rows ``j = b*K + i`` (int64), which exist, the
        flattened source row ``b*S + idx[j]`` of each, and which of them have a source: a
        position outside ``[0, S)`` selects no row (never read or written)."""
        j = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = j < n_sel
        pos = tl.load(idx_ptr + j, mask=row_ok, other=0).to(tl.int64)
        src = (j // K) * S + pos
        return j, row_ok, src, row_ok & (pos >= 0) & (pos < S)

    @triton.jit
    def _inverse_index_kernel(idx_ptr, inv_ptr, S, K, BLOCK: tl.constexpr):
        """``inv[b, s] = i`` where ``idx[b, i] == s``, else -1, for one sequence b per program:
        first -1 over the row, then (after a barrier, which orders the CTA's global writes)
        the selected positions. A position outside ``[0, S)`` is dropped, never written."""
        b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        row = inv_ptr + b * S
        for s0 in range(0, S, BLOCK):
            tl.store(row + s0 + offs, tl.full([BLOCK], -1, tl.int32), mask=(s0 + offs) < S)
        tl.debug_barrier()
        for i0 in range(0, K, BLOCK):
            m = (i0 + offs) < K
            pos = tl.load(idx_ptr + b * K + i0 + offs, mask=m, other=0).to(tl.int64)
            tl.store(row + pos, (i0 + offs).to(tl.int32), mask=m & (pos >= 0) & (pos < S))

    @triton.jit
    def _gather_tokens_fwd_kernel(
        x_ptr, idx_ptr, out_ptr,
        n_sel, S, K, D,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[j] = x[b*S + idx[j]] for the flattened selection j = b*K + i."""
        j, row_ok, src, src_ok = _selected_rows(idx_ptr, n_sel, S, K, ROWS)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols[None, :] < D
        # Each selected row is read exactly once: stream it past L2 ("evict_first").
        v = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=src_ok[:, None] & col_ok, other=0.0,
                    eviction_policy="evict_first")
        tl.store(out_ptr + j[:, None] * D + cols[None, :], v, mask=row_ok[:, None] & col_ok)


    @triton.jit
    def _scatter_tokens_fwd_kernel(
        base_ptr, y_ptr, w_ptr, inv_ptr, out_ptr,
        n_rows, S, K, D,
        HAS_BASE: tl.constexpr, HAS_Y: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Dense pass over all B*S rows of ``out`` through the inverse map ``inv`` (-1: unselected).

        out[r] = (base[r] if HAS_BASE else 0) + (w[inv[r]] if HAS_WEIGHT else 1) * y[inv[r]]
        (the second term only on selected rows). With HAS_Y=False the selected rows are left
        untouched (another kernel writes them) and the others get ``base`` or zeros. Used for the
        out-of-place scatter (all flags), gather's backward (HAS_Y only) and the zero rows of
        RMSNorm-gather's backward (no flags).
        """
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = r < n_rows
        inv = tl.load(inv_ptr + r, mask=row_ok, other=-1)
        sel = inv >= 0
        mask = row_ok[:, None] & (cols[None, :] < D)
        offs = r[:, None] * D + cols[None, :]
        if HAS_BASE:
            acc = tl.load(base_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        else:
            acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        if HAS_Y:
            yrow = (r // S) * K + inv.to(tl.int64)
            ymask = mask & sel[:, None]
            yv = tl.load(y_ptr + yrow[:, None] * D + cols[None, :], mask=ymask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                wv = tl.load(w_ptr + yrow, mask=row_ok & sel, other=0.0).to(tl.float32)
                yv = yv * wv[:, None]
            acc = acc + yv
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask & (inv < 0)[:, None])


    @triton.jit
    def _scatter_tokens_inplace_kernel(
        res_ptr, y_ptr, w_ptr, idx_ptr,
        n_sel, S, K, D,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """residual[b*S + idx[j]] += w[j] * y[j]; distinct indices -> one writer per row, no atomics."""
        j, row_ok, dst, dst_ok = _selected_rows(idx_ptr, n_sel, S, K, ROWS)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = dst_ok[:, None] & (cols[None, :] < D)
        dst_offs = dst[:, None] * D + cols[None, :]
        res = tl.load(res_ptr + dst_offs, mask=mask, other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + j[:, None] * D + cols[None, :], mask=mask, other=0.0,
                     eviction_policy="evict_first").to(tl.float32)
        wv = tl.load(w_ptr + j, mask=dst_ok, other=0.0).to(tl.float32)
        tl.store(res_ptr + dst_offs, (res + wv[:, None] * yv).to(res_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _scatter_tokens_bwd_kernel(
        grad_ptr, y_ptr, w_ptr, idx_ptr, dy_ptr, dw_ptr,
        n_sel, S, K, D,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dy[j] = w[j] * grad[src_j];  dw[j] = <grad[src_j], y[j]>  (grad rows read once, fused).

        One program owns ROWS selected rows and loops over D, so the dot product is finished in
        registers (no second reduction stage, deterministic).
        """
        j, row_ok, src, src_ok = _selected_rows(idx_ptr, n_sel, S, K, ROWS)
        wv = tl.load(w_ptr + j, mask=row_ok, other=0.0).to(tl.float32)
        dot = tl.zeros((ROWS,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols[None, :] < D)
            g = tl.load(grad_ptr + src[:, None] * D + cols[None, :], mask=mask & src_ok[:, None],
                        other=0.0).to(tl.float32)
            yv = tl.load(y_ptr + j[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + j[:, None] * D + cols[None, :], (g * wv[:, None]).to(dy_ptr.dtype.element_ty), mask=mask)
            dot += tl.sum(g * yv, axis=1)
        tl.store(dw_ptr + j, dot.to(dw_ptr.dtype.element_ty), mask=row_ok)


    @triton.jit
    def _rmsnorm_gather_tokens_fwd_kernel(
        x_ptr, idx_ptr, gamma_ptr, out_ptr,
        n_sel, S, K, D, eps,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[j] = x[src_j] * rsqrt(mean(x[src_j]**2) + eps) * gamma, whole rows in registers
        (BLOCK_D >= D), so each selected row is read once."""
        j, row_ok, src, src_ok = _selected_rows(idx_ptr, n_sel, S, K, ROWS)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        xv = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=src_ok[:, None] & col_ok[None, :], other=0.0,
                     eviction_policy="evict_first").to(tl.float32)
        # a row that names no position is a zero row, also at eps = 0 (0 * rsqrt(0) would be NaN)
        rstd = tl.where(src_ok, tl.rsqrt(tl.sum(xv * xv, axis=1) / D + eps), 0.0)
        g = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = (xv * rstd[:, None]) * g[None, :]
        tl.store(out_ptr + j[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _rmsnorm_gather_tokens_bwd_kernel(
        grad_ptr, x_ptr, idx_ptr, gamma_ptr, dx_ptr, dgamma_part_ptr,
        n_sel, S, K, D, eps, rows_per_prog,
        BLOCK_D: tl.constexpr,
    ):
        """Selected rows of dx and one partial row of dgamma per program (persistent grid).

        xhat = x * rstd (rstd recomputed from the row, which is read anyway: nothing saved),
        dxhat = grad * gamma, dx = rstd * (dxhat - xhat * mean(dxhat * xhat)),
        dgamma_part[pid] = sum over this program's rows of grad * xhat.
        """
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        gam = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dg_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_prog
        for i in range(0, rows_per_prog):
            j = start + i
            ok = j < n_sel
            pos = tl.load(idx_ptr + j, mask=ok, other=0).to(tl.int64)
            # a position outside [0, S) selects no row: its x reads as zeros, its dx is not written.
            # (the row tests broadcast to vectors first: the interpreter rejects scalar & vector masks)
            pos_v = pos + tl.zeros((BLOCK_D,), dtype=tl.int64)
            mask = col_ok & ((j + tl.zeros((BLOCK_D,), dtype=tl.int64)) < n_sel) & (pos_v >= 0) & (pos_v < S)
            src = (j // K) * S + pos
            xv = tl.load(x_ptr + src * D + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + j * D + cols, mask=mask, other=0.0).to(tl.float32)
            # no row (past the end, or a position outside [0, S)): rstd 0, so it adds nothing to
            # dgamma, also at eps = 0 (0 * rsqrt(0) would be NaN)
            valid = ok & (pos >= 0) & (pos < S)
            rstd = tl.where(valid, tl.rsqrt(tl.sum(xv * xv, axis=0) / D + eps), 0.0)
            xhat = xv * rstd
            dxhat = g * gam
            c = tl.sum(dxhat * xhat, axis=0) / D
            dx = (dxhat - xhat * c) * rstd
            tl.store(dx_ptr + src * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dg_acc += g * xhat
        tl.store(dgamma_part_ptr + pid.to(tl.int64) * D + cols, dg_acc, mask=col_ok)


# ----------------------------------------------------------------------------------------
# 2. References: the readable definitions (also the CPU path)
# ----------------------------------------------------------------------------------------


def _batch_rows(idx: torch.Tensor) -> torch.Tensor:
    """[B, 1] batch index that broadcasts against idx for advanced indexing."""
    return torch.arange(idx.shape[0], device=idx.device)[:, None]


def _selected(idx: torch.Tensor, S: int):
    """The (batch, position) index pair for ``idx`` and the mask of entries that name a row.
    A position outside ``[0, S)`` selects nothing (gathers a zero row, scatters nothing; the
    kernels mask it the same way, so a bad index never reads or writes out of bounds). Such an
    entry is pointed at position 0 and masked out by value, so there is no host sync."""
    ok = (idx >= 0) & (idx < S)
    return (_batch_rows(idx), torch.where(ok, idx, 0).long()), ok[..., None]


def gather_tokens_reference(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = x[b, idx[b, j]]`` (zeros where ``idx[b, j]`` is outside ``[0, S)``).
    x: [B, S, D], idx: [B, K] -> [B, K, D]."""
    rows, ok = _selected(idx, x.shape[1])
    return x[rows].masked_fill(~ok, 0)


def scatter_tokens_reference(
    residual: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``out = residual`` with ``out[b, idx[b, j]] += weight[b, j] * y[b, j]`` (fp32 math, or
    float64 for float64, one rounding to residual's dtype). residual: [B, S, D], y: [B, K, D], weight: [B, K]."""
    rows, ok = _selected(idx, residual.shape[1])
    acc = acc_dtype(residual)
    update = (weight.to(acc)[..., None] * y.to(acc)).masked_fill(~ok, 0)  # outside [0, S): nothing
    out = residual.to(acc, copy=True).index_put_(rows, update, accumulate=True)
    return out.to(residual.dtype)


def rmsnorm_gather_tokens_reference(
    x: torch.Tensor, idx: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``rmsnorm(gather_tokens(x, idx)) * gamma`` in fp32, rounded to x's dtype:
    ``out[b, j] = x[b, i] / sqrt(mean(x[b, i]**2) + eps) * gamma`` with ``i = idx[b, j]``."""
    xs = gather_tokens_reference(x, idx).to(acc_dtype(x))
    rstd = _masked_rstd(xs, idx, x.shape[1], eps)
    return ((xs * rstd) * gamma.to(xs.dtype)).to(x.dtype)


def _masked_rstd(xs: torch.Tensor, idx: torch.Tensor, S: int, eps: float) -> torch.Tensor:
    """``rsqrt(mean(xs**2) + eps)`` per row, 0 for a row that names no position (a zero row
    then, also at eps = 0, where 0 * rsqrt(0) would be NaN)."""
    rstd = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
    return torch.where(_selected(idx, S)[1], rstd, 0.0)


def _scatter_tokens_inplace_reference(residual, y, idx, weight) -> None:
    residual.copy_(scatter_tokens_reference(residual, y, idx, weight))


def _gather_tokens_bwd_reference(grad: torch.Tensor, idx: torch.Tensor, S: int) -> torch.Tensor:
    B, _, D = grad.shape
    rows, ok = _selected(idx, S)
    return grad.new_zeros(B, S, D).index_put_(rows, grad.masked_fill(~ok, 0), accumulate=True)


def _scatter_tokens_bwd_reference(grad, y, idx, weight):
    g = gather_tokens_reference(grad, idx).to(acc_dtype(grad))
    dy = (weight.to(g.dtype)[..., None] * g).to(y.dtype)
    dw = (g * y.to(g.dtype)).sum(-1).to(weight.dtype)
    return dy, dw


def _rmsnorm_gather_tokens_bwd_reference(grad, x, idx, gamma, eps):
    xs = gather_tokens_reference(x, idx).to(acc_dtype(x))
    g = grad.to(xs.dtype)
    D = x.shape[-1]
    rstd = _masked_rstd(xs, idx, x.shape[1], eps)
    xhat = xs * rstd
    dxhat = g * gamma.to(xs.dtype)
    dxs = (dxhat - xhat * (dxhat * xhat).sum(-1, keepdim=True) / D) * rstd
    dgamma = (g * xhat).sum((0, 1)).to(gamma.dtype)
    return _gather_tokens_bwd_reference(dxs.to(x.dtype), idx, x.shape[1]), dgamma


# ----------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------

# Elements one program moves per streamed tensor: 4096 (8 KB of bf16) with 4 warps is 32
# elements (four 16-byte vectors) per thread per stream.
_TILE_ELEMS = 4096
_MAX_ROWS = 64
_MAX_BLOCK_D = 2048
# Whole-row RMSNorm keeps a row in registers; beyond this it would spill badly.
_MAX_NORM_D = 65536


_TILES: dict = {}  # (kind, D) -> tile: the launchers ask on every call


def _copy_tile(D: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) for kernels that stream rows without a full-row reduction."""
    hit = _TILES.get(("copy", D))
    if hit is None:
        block_d = min(max(16, next_pow2(D)), _MAX_BLOCK_D)  # >= 16: no degenerate layouts
        rows = max(1, min(_MAX_ROWS, _TILE_ELEMS // block_d))
        hit = _TILES[("copy", D)] = (rows, block_d, 4)
    return hit


def _norm_tile(D: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) with BLOCK_D >= D: one program holds whole rows.
    Warps grow with the tile (16 fp32 values per thread), as Liger-Kernel's RMSNorm does."""
    hit = _TILES.get(("norm", D))
    if hit is None:
        block_d = max(16, next_pow2(D))
        rows = max(1, min(_MAX_ROWS, _TILE_ELEMS // block_d))
        hit = _TILES[("norm", D)] = (rows, block_d, min(32, max(4, rows * block_d // 512)))
    return hit


def _persistent_programs(device: torch.device, n: int) -> int:
    """About two resident programs per SM for the grid-strided dgamma reduction."""
    if device.type == "cuda":
        g = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: few programs, it runs them one after another
        g = 4
    return max(1, min(n, g))


def _inverse_index(idx: torch.Tensor, S: int) -> torch.Tensor:
    """inv[b, s] = j where idx[b, j] == s, else -1 (int32, B*S*4 bytes: small next to the rows).

    One launch, where the torch formulation (fill, arange, int64 copy of idx, scatter) took
    four kernels and about 25 µs of host time per call on this project's CPU."""
    B, K = idx.shape
    inv = new_output((B, S), dtype=torch.int32, device=idx.device)
    if B * S:
        launch(_inverse_index_kernel, (B,), idx.contiguous(), inv, S, K, BLOCK=min(1024, max(16, next_pow2(max(S, K)))),
               num_warps=4)
    return inv


def _inverse_index_reference(idx: torch.Tensor, S: int) -> torch.Tensor:
    B, K = idx.shape
    inv = torch.full((B, S), -1, dtype=torch.int32, device=idx.device)
    return inv.scatter_(1, idx.long(), torch.arange(K, dtype=torch.int32, device=idx.device).expand(B, K))


def _gather_tokens_fwd(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    x, idx = x.contiguous(), idx.contiguous()
    B, S, D = x.shape
    K = idx.shape[1]
    out = new_output((B, K, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows, block_d, warps = _copy_tile(D)
    grid = (cdiv(B * K, rows), cdiv(D, block_d))
    launch(_gather_tokens_fwd_kernel, grid, x, idx, out, B * K, S, K, D, ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return out


def _dense_scatter(base, y, weight, inv, out, S: int, K: int) -> None:
    """Launch ``_scatter_tokens_fwd_kernel`` over all rows of ``out`` ([B, S, D])."""
    B, _, D = out.shape
    if out.numel() == 0:
        return
    rows, block_d, warps = _copy_tile(D)
    grid = (cdiv(B * S, rows), cdiv(D, block_d))
    dummy = out  # never dereferenced when its flag is off
    launch(_scatter_tokens_fwd_kernel, grid,
        dummy if base is None else base, dummy if y is None else y, dummy if weight is None else weight,
        inv, out, B * S, S, K, D,
        HAS_BASE=base is not None, HAS_Y=y is not None, HAS_WEIGHT=weight is not None,
        ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )


def _gather_tokens_bwd(grad: torch.Tensor, idx: torch.Tensor, S: int) -> torch.Tensor:
    grad, idx = grad.contiguous(), idx.contiguous()
    B, K, D = grad.shape
    dx = new_output((B, S, D), dtype=grad.dtype, device=grad.device)
    _dense_scatter(None, grad, None, _inverse_index(idx, S), dx, S, K)
    return dx


def _scatter_tokens_fwd(residual, y, idx, weight) -> torch.Tensor:
    residual, y, idx, weight = residual.contiguous(), y.contiguous(), idx.contiguous(), weight.contiguous()
    B, S, D = residual.shape
    out = new_output((B, S, D), dtype=residual.dtype, device=residual.device)
    _dense_scatter(residual, y, weight, _inverse_index(idx, S), out, S, idx.shape[1])
    return out


def _scatter_tokens_inplace(residual, y, idx, weight) -> None:
    if not residual.is_contiguous():
        raise ValueError("residual must be contiguous for scatter_tokens(..., inplace=True)")
    # y or weight sharing residual's memory (y = residual[:, :k], say) would be read after other
    # programs updated it: read them from a copy, as the reference's gather-then-write does
    base = residual.untyped_storage().data_ptr()
    if y.untyped_storage().data_ptr() == base:
        y = y.clone()
    if weight.untyped_storage().data_ptr() == base:
        weight = weight.clone()
    y, idx, weight = y.contiguous(), idx.contiguous(), weight.contiguous()
    B, S, D = residual.shape
    K = idx.shape[1]
    if B * K * D == 0:
        return
    rows, block_d, warps = _copy_tile(D)
    grid = (cdiv(B * K, rows), cdiv(D, block_d))
    launch(_scatter_tokens_inplace_kernel, grid, residual, y, weight, idx, B * K, S, K, D,
           ROWS=rows, BLOCK_D=block_d, num_warps=warps)


def _scatter_tokens_bwd(grad, y, idx, weight):
    grad, y, idx, weight = grad.contiguous(), y.contiguous(), idx.contiguous(), weight.contiguous()
    B, S, D = grad.shape
    K = idx.shape[1]
    dy = new_output((B, K, D), dtype=y.dtype, device=y.device)
    dw = new_output((B, K), dtype=weight.dtype, device=weight.device)
    if B * K == 0:
        return dy, dw
    if D == 0:
        return dy, dw.zero_()
    rows, block_d, warps = _copy_tile(D)
    grid = (cdiv(B * K, rows),)
    launch(_scatter_tokens_bwd_kernel, grid, grad, y, weight, idx, dy, dw, B * K, S, K, D,
           ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return dy, dw


def _rmsnorm_gather_tokens_fwd(x, idx, gamma, eps: float) -> torch.Tensor:
    x, idx, gamma = x.contiguous(), idx.contiguous(), gamma.contiguous()
    B, S, D = x.shape
    K = idx.shape[1]
    if D > _MAX_NORM_D:
        raise ValueError(f"rmsnorm_gather_tokens keeps whole rows in registers: x's D must be <= {_MAX_NORM_D}")
    out = new_output((B, K, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows, block_d, warps = _norm_tile(D)
    grid = (cdiv(B * K, rows),)
    launch(_rmsnorm_gather_tokens_fwd_kernel, grid, x, idx, gamma, out, B * K, S, K, D, eps,
           ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return out


def _rmsnorm_gather_tokens_bwd(grad, x, idx, gamma, eps: float):
    grad, x, idx, gamma = grad.contiguous(), x.contiguous(), idx.contiguous(), gamma.contiguous()
    B, S, D = x.shape
    K = idx.shape[1]
    dx = new_output((B, S, D), dtype=x.dtype, device=x.device)
    if B * K == 0 or D == 0:
        return dx.zero_(), torch.zeros_like(gamma)
    n_prog = _persistent_programs(x.device, B * K)
    part = new_output((n_prog, D), dtype=torch.float32, device=x.device)
    # One row per loop iteration: warps follow the row length alone (16 values per thread).
    block_d = max(16, next_pow2(D))
    warps = min(32, max(2, block_d // 512))
    launch(_rmsnorm_gather_tokens_bwd_kernel, (n_prog,),
        grad, x, idx, gamma, dx, part, B * K, S, K, D, eps, cdiv(B * K, n_prog),
        BLOCK_D=block_d, num_warps=warps,
    )
    # Unselected rows of dx are zero: one pass that writes only those rows.
    _dense_scatter(None, None, None, _inverse_index(idx, S), dx, S, K)
    return dx, part.sum(0).to(gamma.dtype)


# ----------------------------------------------------------------------------------------
# 4. Autograd Functions (their setup_context/backward are also the custom ops' formulas)
# ----------------------------------------------------------------------------------------


def _gather_fwd_impl(x, idx):
    if use_triton(x, op="gather_tokens"):
        return _gather_tokens_fwd(x, idx)
    return gather_tokens_reference(x, idx)


def _gather_bwd_impl(grad, idx, seq_len: int):
    if use_triton(grad, op="gather_tokens backward"):
        return _gather_tokens_bwd(grad, idx, seq_len)
    return _gather_tokens_bwd_reference(grad, idx, seq_len)


def _scatter_fwd_impl(residual, y, idx, weight):
    if use_triton(residual, op="scatter_tokens"):
        return _scatter_tokens_fwd(residual, y, idx, weight)
    return scatter_tokens_reference(residual, y, idx, weight)


def _scatter_inplace_impl(residual, y, idx, weight) -> None:
    if use_triton(residual, op="scatter_tokens(inplace=True)"):
        _scatter_tokens_inplace(residual, y, idx, weight)
    else:
        _scatter_tokens_inplace_reference(residual, y, idx, weight)


def _scatter_bwd_impl(grad, y, idx, weight):
    if use_triton(grad, op="scatter_tokens backward"):
        return _scatter_tokens_bwd(grad, y, idx, weight)
    return _scatter_tokens_bwd_reference(grad, y, idx, weight)


def _rmsnorm_fwd_impl(x, idx, gamma, eps: float):
    if use_triton(x, op="rmsnorm_gather_tokens"):
        return _rmsnorm_gather_tokens_fwd(x, idx, gamma, eps)
    return rmsnorm_gather_tokens_reference(x, idx, gamma, eps)


def _rmsnorm_bwd_impl(grad, x, idx, gamma, eps: float):
    if use_triton(x, op="rmsnorm_gather_tokens backward"):
        return _rmsnorm_gather_tokens_bwd(grad, x, idx, gamma, eps)
    return _rmsnorm_gather_tokens_bwd_reference(grad, x, idx, gamma, eps)


# Each backward formula is written once and bound twice: to the eager autograd.Function with
# the Triton launchers (the public ops take that Function only on the Triton path, so it
# does not dispatch again), and to the custom op with the backward custom ops (whose
# implementations, ``*_impl``, dispatch: the op also runs on the reference path).
def _gather_backward(bwd):
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return (bwd(grad, idx, ctx.seq_len) if ctx.needs_input_grad[0] else None), None

    return backward


def _scatter_backward(bwd):
    def backward(ctx, grad):
        y, idx, weight = ctx.saved_tensors
        dy = dw = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            dy, dw = bwd(grad, y, idx, weight)
        dres = grad if ctx.needs_input_grad[0] else None
        return dres, dy, None, dw

    return backward


def _rmsnorm_backward(bwd):
    def backward(ctx, grad):
        x, idx, gamma = ctx.saved_tensors
        dx = dgamma = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            dx, dgamma = bwd(grad, x, idx, gamma, ctx.eps)
        return dx, None, dgamma, None

    return backward


def _gather_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.seq_len = x.shape[1]


def _scatter_setup(ctx, inputs, output):
    _, y, idx, weight = inputs
    ctx.save_for_backward(y, idx, weight)


def _rmsnorm_setup(ctx, inputs, output):
    x, idx, gamma, eps = inputs
    ctx.save_for_backward(x, idx, gamma)
    ctx.eps = eps


# ----------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees, one opaque node per op. In eager the public functions
# call the autograd.Functions below instead: the same kernels with less host time per call
# (scripts/host_overhead.py).
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("flopwise::mod_gather", mutates_args=())
def _mod_gather_op(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _gather_fwd_impl(x, idx)


@_mod_gather_op.register_fake
def _(x, idx):
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


@torch.library.custom_op("flopwise::mod_gather_bwd", mutates_args=())
def _mod_gather_bwd_op(grad: torch.Tensor, idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    return _gather_bwd_impl(grad, idx, seq_len)


@_mod_gather_bwd_op.register_fake
def _(grad, idx, seq_len):
    return grad.new_empty((grad.shape[0], seq_len, grad.shape[2]))


@torch.library.custom_op("flopwise::mod_scatter", mutates_args=())
def _mod_scatter_op(residual: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _scatter_fwd_impl(residual, y, idx, weight)


@_mod_scatter_op.register_fake
def _(residual, y, idx, weight):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


@torch.library.custom_op("flopwise::mod_scatter_", mutates_args=("residual",))
def _mod_scatter_inplace_op(residual: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> None:
    _scatter_inplace_impl(residual, y, idx, weight)


@_mod_scatter_inplace_op.register_fake
def _(residual, y, idx, weight):
    return None


@torch.library.custom_op("flopwise::mod_scatter_bwd", mutates_args=())
def _mod_scatter_bwd_op(
    grad: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _scatter_bwd_impl(grad, y, idx, weight)


@_mod_scatter_bwd_op.register_fake
def _(grad, y, idx, weight):
    contiguous = torch.contiguous_format
    return torch.empty_like(y, memory_format=contiguous), torch.empty_like(weight, memory_format=contiguous)


@torch.library.custom_op("flopwise::mod_rmsnorm_gather", mutates_args=())
def _mod_rmsnorm_gather_op(x: torch.Tensor, idx: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return _rmsnorm_fwd_impl(x, idx, gamma, eps)


@_mod_rmsnorm_gather_op.register_fake
def _(x, idx, gamma, eps):
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


@torch.library.custom_op("flopwise::mod_rmsnorm_gather_bwd", mutates_args=())
def _mod_rmsnorm_gather_bwd_op(
    grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, gamma: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rmsnorm_bwd_impl(grad, x, idx, gamma, eps)


@_mod_rmsnorm_gather_bwd_op.register_fake
def _(grad, x, idx, gamma, eps):
    contiguous = torch.contiguous_format
    return torch.empty_like(x, memory_format=contiguous), torch.empty_like(gamma, memory_format=contiguous)


# Autograd for the custom ops, and the eager Functions the public functions call outside
# torch.compile: implementations forward and backward, the backward custom ops only for
# gradients that are not plain tensors.
GatherTokensFunction = autograd_twin(
    _mod_gather_op, "GatherTokensFunction", _gather_tokens_fwd, _gather_setup, _gather_backward,
    bwd_impl=_gather_tokens_bwd, bwd_op=_mod_gather_bwd_op,
    doc="``gather_tokens`` with backward ``dx = rows of grad at idx, zeros elsewhere``.")
ScatterTokensFunction = autograd_twin(
    _mod_scatter_op, "ScatterTokensFunction", _scatter_tokens_fwd, _scatter_setup, _scatter_backward,
    bwd_impl=_scatter_tokens_bwd, bwd_op=_mod_scatter_bwd_op,
    doc="Out-of-place ``scatter_tokens``: d residual = grad, d y = weight * grad[idx], "
        "d weight = <grad[idx], y> (the last two from one fused kernel).")
RMSNormGatherTokensFunction = autograd_twin(
    _mod_rmsnorm_gather_op, "RMSNormGatherTokensFunction", _rmsnorm_gather_tokens_fwd, _rmsnorm_setup,
    _rmsnorm_backward, bwd_impl=_rmsnorm_gather_tokens_bwd, bwd_op=_mod_rmsnorm_gather_bwd_op,
    doc="``rmsnorm_gather_tokens`` with gradients for x (selected rows, zeros elsewhere) and gamma.")


# ----------------------------------------------------------------------------------------
# 5. Public ops
# ----------------------------------------------------------------------------------------


def _check_tensor(t, name: str, ndim: int, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim != 1 else ''}, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_idx(idx, x: torch.Tensor, x_name: str, check_indices: bool) -> None:
    _check_tensor(idx, "idx", 2, floating=False)
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")
    if idx.device != x.device:
        raise ValueError(f"idx is on {idx.device} but {x_name} is on {x.device}")
    B, S = x.shape[0], x.shape[1]
    if idx.shape[0] != B:
        raise ValueError(f"idx has batch size {idx.shape[0]} but {x_name} has {B}")
    if idx.shape[1] > S:
        raise ValueError(f"idx selects {idx.shape[1]} distinct tokens per row but {x_name} has only S={S}")
    if check_indices and idx.numel():  # host synchronisation: debugging / validation only
        if int(idx.min()) < 0 or int(idx.max()) >= S:
            raise ValueError(f"idx values must lie in [0, {S}), got [{int(idx.min())}, {int(idx.max())}]")
        srt = idx.sort(dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("idx has a repeated position within a row; indices must be distinct per row")


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, *, check_indices: bool = False) -> torch.Tensor:
    """Gather the selected tokens of each sequence: ``out[b, j] = x[b, idx[b, j]]``.

    Args:
        x: ``[B, S, D]`` float tensor (bf16/fp16/fp32), the residual stream.
        idx: ``[B, K]`` int32/int64 positions in ``[0, S)``, distinct within each row
            (MoD routing's sorted top-k). The backward relies on distinctness. A position
            outside ``[0, S)`` gathers a zero row (no wrap-around for negatives).
        check_indices: also check range and distinctness (synchronises with the device).

    Returns:
        ``[B, K, D]`` tensor of x's dtype. Differentiable in ``x``: the gradient is the
        output gradient placed at the selected rows, zeros elsewhere.

    Example:
        >>> x = torch.randn(2, 8, 16)
        >>> idx = torch.tensor([[0, 3, 5], [1, 2, 7]])
        >>> gather_tokens(x, idx).shape
        torch.Size([2, 3, 16])
    """
    _check_tensor(x, "x", 3)
    _check_idx(idx, x, "x", check_indices)
    if traced(x, idx):
        return torch.ops.flopwise.mod_gather(x, idx)
    if not use_triton(x, op="gather_tokens"):  # plain torch ops: differentiable to any order
        return gather_tokens_reference(x, idx)
    if not records(x):  # no graph to record: the launch alone
        return _gather_tokens_fwd(x, idx)
    return GatherTokensFunction.apply(x, idx)


def scatter_tokens(
    residual: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    *,
    inplace: bool = False,
    check_indices: bool = False,
) -> torch.Tensor:
    """Add the block's output back into the residual stream at the selected positions:
    ``out = residual; out[b, idx[b, j]] += weight[b, j] * y[b, j]`` (fp32 math).

    Args:
        residual: ``[B, S, D]`` float tensor.
        y: ``[B, K, D]``, same dtype as residual (the block's output on the selected tokens).
        idx: ``[B, K]`` int32/int64 positions in ``[0, S)``, **distinct within each row**:
            each destination row is updated by one program with a plain read-add-write (no
            atomics), so a repeated position would lose one of its updates. A position
            outside ``[0, S)`` updates nothing.
        weight: ``[B, K]`` float router weights (e.g. the sigmoid of the router score).
        inplace: update ``residual`` in place and return it. Only for tensors outside
            autograd (inference, or under ``torch.no_grad()``): with grad mode on and any of
            residual / y / weight requiring grad it raises ``ValueError`` (use the default
            out-of-place form in training; it writes every row of the result in one pass).
            residual must then be contiguous; y and weight may be views of it (they are
            read from a copy then).
        check_indices: also check range and distinctness (synchronises with the device).

    Returns:
        ``[B, S, D]`` tensor of residual's dtype. Out of place it is differentiable in
        residual (identity), y (``weight * grad[idx]``) and weight (``<grad[idx], y>``).

    Example:
        >>> h = torch.randn(2, 8, 16)
        >>> idx = torch.tensor([[0, 3, 5], [1, 2, 7]])
        >>> w = torch.sigmoid(torch.randn(2, 3))
        >>> y = gather_tokens(h, idx) * 2.0          # stands in for the block
        >>> out = scatter_tokens(h, y, idx, w)
        >>> out.shape
        torch.Size([2, 8, 16])
    """
    _check_tensor(residual, "residual", 3)
    _check_tensor(y, "y", 3)
    _check_tensor(weight, "weight", 2)
    _check_idx(idx, residual, "residual", check_indices)
    B, S, D = residual.shape
    K = idx.shape[1]
    if tuple(y.shape) != (B, K, D):
        raise ValueError(f"y must have shape {(B, K, D)} (batch, idx.shape[1], residual's D), got {tuple(y.shape)}")
    if tuple(weight.shape) != (B, K):
        raise ValueError(f"weight must have shape {(B, K)} like idx, got {tuple(weight.shape)}")
    if y.dtype != residual.dtype:
        raise TypeError(f"y must have residual's dtype {residual.dtype}, got {y.dtype}")
    for name, t in (("y", y), ("weight", weight)):
        if t.device != residual.device:
            raise ValueError(f"{name} is on {t.device} but residual is on {residual.device}")
    if inplace:
        if torch.is_grad_enabled() and (residual.requires_grad or y.requires_grad or weight.requires_grad):
            raise ValueError(
                "scatter_tokens(..., inplace=True) cannot be differentiated: residual, y or weight "
                "requires grad. Use inplace=False in training, or call it under torch.no_grad()."
            )
        if not residual.is_contiguous():
            raise ValueError("residual must be contiguous for scatter_tokens(..., inplace=True)")
        if traced(residual, y, idx, weight):
            torch.ops.flopwise.mod_scatter_(residual, y, idx, weight)
        else:
            _scatter_inplace_impl(residual, y, idx, weight)
            # the kernel writes through a pointer: tell autograd, so that a graph which saved
            # residual earlier refuses to backward through the stale value (as for any in-place op)
            torch.autograd.graph.increment_version(residual)
        return residual
    if traced(residual, y, idx, weight):
        return torch.ops.flopwise.mod_scatter(residual, y, idx, weight)
    if not use_triton(residual, op="scatter_tokens"):
        return scatter_tokens_reference(residual, y, idx, weight)
    if not records(residual, y, weight):
        return _scatter_tokens_fwd(residual, y, idx, weight)
    return ScatterTokensFunction.apply(residual, y, idx, weight)


def rmsnorm_gather_tokens(
    x: torch.Tensor,
    idx: torch.Tensor,
    gamma: torch.Tensor,
    eps: float = 1e-6,
    *,
    check_indices: bool = False,
) -> torch.Tensor:
    """Gather the selected tokens and RMS-normalise them in one pass (each row read once):
    ``out[b, j] = x[b, i] / sqrt(mean(x[b, i]**2) + eps) * gamma`` with ``i = idx[b, j]``,
    computed in fp32 and rounded once to x's dtype.

    Args:
        x: ``[B, S, D]`` float tensor; D up to 65536 on the Triton path.
        idx: ``[B, K]`` int32/int64 positions in ``[0, S)``, distinct within each row
            (outside ``[0, S)``: a zero row).
        gamma: ``[D]`` float scale (any float dtype; its gradient has gamma's dtype).
        eps: added to the mean square, >= 0.
        check_indices: also check range and distinctness (synchronises with the device).

    Returns:
        ``[B, K, D]`` tensor of x's dtype, differentiable in x and gamma.

    Example:
        >>> x = torch.randn(2, 8, 16)
        >>> idx = torch.tensor([[0, 3, 5], [1, 2, 7]])
        >>> rmsnorm_gather_tokens(x, idx, torch.ones(16)).shape
        torch.Size([2, 3, 16])
    """
    _check_tensor(x, "x", 3)
    _check_tensor(gamma, "gamma", 1)
    _check_idx(idx, x, "x", check_indices)
    if gamma.shape[0] != x.shape[2]:
        raise ValueError(f"gamma must have shape ({x.shape[2]},) (x's D), got {tuple(gamma.shape)}")
    if gamma.device != x.device:
        raise ValueError(f"gamma is on {gamma.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if traced(x, idx, gamma):
        return torch.ops.flopwise.mod_rmsnorm_gather(x, idx, gamma, float(eps))
    if not use_triton(x, op="rmsnorm_gather_tokens"):
        return rmsnorm_gather_tokens_reference(x, idx, gamma, float(eps))
    if not records(x, gamma):
        return _rmsnorm_gather_tokens_fwd(x, idx, gamma, float(eps))
    return RMSNormGatherTokensFunction.apply(x, idx, gamma, float(eps))
