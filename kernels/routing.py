"""Routing: token-choice top-k, expert-choice, and Mixture-of-Depths selection.

Every MoE router produces one :class:`RoutingPlan` (a dataclass of device tensors, made
without host synchronisation) that the grouped matmul and the combine consume. MoD
selection produces a :class:`MoDSelection`.

Legend for shape suffixes: T tokens, E experts, K top-k (token choice), C capacity per
expert (expert choice), N = selected (token, slot) pairs (T*K or E*C), B batch,
S sequence, NB = blocks of the grouped matmul.

Ranking rules (identical in every backend, so plans agree exactly):

* Token choice ranks a token's experts by their *logits*; softmax and sigmoid are
  monotone, so this is the top-k of the probabilities without rounding ties. With a
  selection bias it ranks by probability + bias, and a group limit scores groups on the
  probabilities (+ bias): values each backend computes with its own ``exp``, so where two
  lie within float32 rounding of each other the kernel and the reference may choose
  differently (everywhere else they agree exactly).
* Expert choice ranks tokens by the expert's probability (float32), MoD ranks positions by
  the score as given.
* Ties go to the lower index. NaN ranks as ``-inf`` (lowest, then by index). ``-0.0``
  equals ``0.0``.
* NaN or ``+inf`` logits never produce an invalid index: the plan stays a valid
  permutation; the affected token's weights are NaN (softmax of a row holding NaN or
  ``+inf`` is NaN, as in torch), so the NaN surfaces in the layer output. A row of only
  ``-inf`` gives NaN softmax weights too. Check logits upstream if that must not happen.
  In expert choice such a token's NaN probabilities rank lowest in every expert's column,
  so no expert takes it while enough finite tokens remain (with sigmoid scores only the
  NaN column is affected, and ``+inf`` scores 1).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ._dispatch import HAS_TRITON, acc_dtype, autograd_twin, cdiv, new_output, next_pow2, traced, use_triton
from ._launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None

__all__ = [
    "RoutingPlan",
    "MoDSelection",
    "topk_route",
    "topk_route_reference",
    "expert_choice_route",
    "expert_choice_route_reference",
    "expert_choice_capacity",
    "mod_select",
    "mod_select_reference",
    "mod_capacity",
    "plan_from_counts",
    "plan_from_topk",
    "plan_from_topk_reference",
    "topk_rows",
    "topk_rows_reference",
]

_SCORES = {"softmax": 0, "sigmoid": 1}
# The kernels write the int32 bounds (-2147483648, 2147483647) as literals: a global
# constexpr would be compared with its compile-time value on every launch (Triton's dispatch).

# ----------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _monotone_key(x):
        """float -> int32 whose signed order is the float order. NaN -> key(-inf), -0 -> +0.

        16-bit floats are keyed from their own bits, into [-2**15, 2**15): the same order as
        their (exact) float32 values, in a range a bisection covers in 16 steps, not 32.
        Their NaN and -0 are fixed on the integer keys (the interpreter's bfloat16 select
        returns its input unchanged)."""
        if x.dtype.primitive_bitwidth == 16:
            xf = x.to(tl.float32)
            bits16 = x.to(tl.int16, bitcast=True).to(tl.int32)
            bits16 = tl.where(bits16 == -32768, 0, bits16)
            key16 = bits16 ^ ((bits16 >> 31) & 0x7FFF)
            if x.dtype == tl.bfloat16:
                return tl.where(xf != xf, -0x7F80 - 1, key16)  # key of bfloat16 -inf
            return tl.where(xf != xf, -0x7C00 - 1, key16)  # key of float16 -inf
        x = tl.where(x != x, float("-inf"), x)
        x = tl.where(x == 0.0, 0.0, x)
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _load_scores(logits_ptr, stride_t, rows, cols, rmask, cmask, SCORE: tl.constexpr):
        """A [rows, cols] tile of logits (float32, -inf past E) and its probabilities:
        softmax over the experts (SCORE 0) or sigmoid (SCORE 1)."""
        m2 = rmask[:, None] & cmask[None, :]
        x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=m2,
                    other=float("-inf")).to(tl.float32)
        x = tl.where(rmask[:, None], x, 0.0)  # rows past T: finite, so no inf - inf
        if SCORE == 0:
            mx = tl.max(x, 1)
            p = tl.exp(x - mx[:, None])
            p = tl.where(cmask[None, :], p, 0.0)
            p = p / tl.sum(p, 1)[:, None]
        else:
            p = tl.sigmoid(x)
        return x, p

    @triton.jit
    def _write_offsets(
        counts, cols, cmask, E, counts_ptr, offsets_ptr, padded_ptr, BLOCK_M: tl.constexpr,
    ):
        """From per-expert counts (a [BLOCK_E] vector, zero past E) write counts, offsets
        [E+1] and padded offsets [E+1] (each expert padded to BLOCK_M rows); returns the
        exclusive offsets and the padded block ranges (first, end) for the block map."""
        incl = tl.cumsum(counts, 0)
        excl = incl - counts
        total = tl.sum(counts, 0)
        tl.store(counts_ptr + cols, counts, mask=cmask)
        tl.store(offsets_ptr + cols, excl, mask=cmask)
        tl.store(offsets_ptr + E, total)
        nblk = (counts + BLOCK_M - 1) // BLOCK_M
        pincl = tl.cumsum(nblk, 0)
        pexcl = pincl - nblk
        tl.store(padded_ptr + cols, pexcl * BLOCK_M, mask=cmask)
        tl.store(padded_ptr + E, tl.sum(nblk, 0) * BLOCK_M)
        return excl, pexcl, pincl

    @triton.jit
    def _write_block_map(
        excl, pexcl, pincl, cols, cmask, E, block_expert_ptr, block_row_ptr, b_start, b_end,
        BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        """Blocks [b_start, b_end) of the block map: for block b, its expert (-1 past the
        end) and its first expert-sorted row."""
        for start in range(b_start, b_end, BLOCK_B):
            b = start + tl.arange(0, BLOCK_B)
            # expert of block b = number of experts whose padded range ends at or before b
            ended = (pincl[None, :] <= b[:, None]) & cmask[None, :]
            e = tl.sum(ended.to(tl.int32), 1)
            sel = cols[None, :] == e[:, None]
            first_blk = tl.sum(tl.where(sel, pexcl[None, :], 0), 1)
            first_row = tl.sum(tl.where(sel, excl[None, :], 0), 1)
            valid = e < E
            bmask = b < b_end
            tl.store(block_expert_ptr + b, tl.where(valid, e, -1), mask=bmask)
            tl.store(block_row_ptr + b, tl.where(valid, first_row + (b - first_blk) * BLOCK_M, -1), mask=bmask)

    @triton.jit
    def _group_limit(key, s, cols, cmask, GSIZE, G, TOPK_G, GROUP_SCORE: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_G: tl.constexpr):
        """``key`` [BLOCK_T, BLOCK_E] with every expert outside each row's TOPK_G best groups
        set to the minimum key. Group g holds experts [g * GSIZE, (g + 1) * GSIZE); its score
        is the largest ``s`` (GROUP_SCORE 1) or the sum of the two largest (2) among them, a
        NaN counting as -inf; groups tie to the lower index."""
        s = tl.where((s != s) | ~cmask[None, :], float("-inf"), s)
        gid = cols // GSIZE
        gcols = tl.arange(0, BLOCK_G)
        gkey = tl.full([BLOCK_T, BLOCK_G], -2147483648, tl.int32)
        for g in range(G):
            sg = tl.where((gid == g)[None, :], s, float("-inf"))
            best = tl.max(sg, 1)
            if GROUP_SCORE == 2:
                first = tl.argmax(sg, 1, tie_break_left=True)
                best += tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), sg), 1)
            gkey = tl.where(gcols[None, :] == g, _monotone_key(best)[:, None], gkey)
        keep = tl.zeros_like(key) != 0
        for j in range(TOPK_G):
            gi = tl.argmax(gkey, 1, tie_break_left=True)
            gkey = tl.where(gcols[None, :] == gi[:, None], -2147483648, gkey)
            keep = keep | (gid[None, :] == gi[:, None])
        return tl.where(keep, key, -2147483648)

    @triton.jit
    def _topk_route_fwd_kernel(
        logits_ptr, stride_t, T, E, K, bias_ptr, G, TOPK_G,
        ids_ptr, w_ptr, tile_counts_ptr,
        SCORE: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SCORE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        """One tile of BLOCK_T tokens: score, top-k by repeated argmax, renormalise, store
        ids/weights [T, K], and the tile's histogram of chosen experts. Without a bias the
        experts are ranked by logit (the scores' order); with one (HAS_BIAS, ``bias [E]``
        float32) by score + bias, while the weights stay the unbiased scores.

        Group-limited (GROUP_SCORE 1: a group's score is its best member's, 2: the sum of its
        best two): the E experts form G groups of E // G consecutive ids, each token keeps
        only its TOPK_G best groups (by the ranking scores, score + bias or score), and the
        top k is taken among their experts."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        x, p = _load_scores(logits_ptr, stride_t, rows, cols, rmask, cmask, SCORE)
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
            s = p + b[None, :]
            key = _monotone_key(s)
        else:
            s = p
            key = _monotone_key(x)
        key = tl.where(cmask[None, :], key, -2147483648)
        if GROUP_SCORE != 0:
            key = _group_limit(key, s, cols, cmask, E // G, G, TOPK_G, GROUP_SCORE, BLOCK_T, BLOCK_G)
        kcols = tl.arange(0, BLOCK_K)
        ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        counts = tl.zeros([BLOCK_E], dtype=tl.int32)
        for j in range(K):
            idx = tl.argmax(key, 1, tie_break_left=True).to(tl.int32)
            sel = cols[None, :] == idx[:, None]
            pj = tl.sum(tl.where(sel, p, 0.0), 1)
            key = tl.where(sel, -2147483648, key)
            ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
            w = tl.where(kcols[None, :] == j, pj[:, None], w)
            counts += tl.sum((sel & rmask[:, None]).to(tl.int32), 0)
        if RENORM:
            w = w / tl.sum(w, 1)[:, None]
        kmask = rmask[:, None] & (kcols[None, :] < K)
        out = rows[:, None].to(tl.int64) * K + kcols[None, :]
        tl.store(ids_ptr + out, ids, mask=kmask)
        tl.store(w_ptr + out, w, mask=kmask)
        tl.store(tile_counts_ptr + pid * E + cols, counts, mask=cmask)

    @triton.jit
    def _plan_from_topk_fwd_kernel(
        ids_ptr, T, E, K, ids32_ptr, tile_counts_ptr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """One tile of BLOCK_T tokens of caller-given choices ``ids [T, K]`` (int32 or
        int64): an int32 copy with every id clamped into [0, E) (an id out of range, which
        the public function's device-side assertion reports, then never sends the scan or
        the scatter out of bounds), the tile's histogram of experts, as
        ``_topk_route_fwd_kernel`` writes it, and the tile's count of ids out of range, at
        ``tile_counts[n_tiles * E + tile]`` (after every tile's histogram), which
        ``_route_scan_checked_kernel`` sums."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        counts = tl.zeros([BLOCK_E], dtype=tl.int32)
        bad = tl.zeros([BLOCK_T], dtype=tl.int32)
        for j in range(K):
            pj = rows.to(tl.int64) * K + j
            e = tl.load(ids_ptr + pj, mask=rmask, other=0)
            bad += (rmask & ((e < 0) | (e >= E))).to(tl.int32)
            e = tl.minimum(tl.maximum(e, 0), E - 1).to(tl.int32)  # clamp in the ids' own width
            tl.store(ids32_ptr + pj, e, mask=rmask)
            counts += tl.sum(((cols[None, :] == e[:, None]) & rmask[:, None]).to(tl.int32), 0)
        tl.store(tile_counts_ptr + pid * E + cols, counts, mask=cols < E)
        tl.store(tile_counts_ptr + tl.num_programs(0) * E + pid, tl.sum(bad, 0))

    @triton.jit
    def _route_scan(
        tile_counts_ptr, n_tiles, E, counts_ptr, offsets_ptr, padded_ptr,
        BLOCK_E: tl.constexpr, BLOCK_TILES: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """Single program: per-expert totals and offsets, and for every tile and expert the
        shift ``delta`` that takes a pair's position in its tile's expert-sorted order to its
        global expert-sorted row (written over the counts). The block map, up to
        E + N / BLOCK_M entries, is left to the scatter's programs, which split it."""
        cols = tl.arange(0, BLOCK_E)
        cmask = cols < E
        total = tl.zeros([BLOCK_E], dtype=tl.int32)
        for start in range(0, n_tiles, BLOCK_TILES):
            tr = start + tl.arange(0, BLOCK_TILES)
            m = (tr[:, None] < n_tiles) & cmask[None, :]
            c = tl.load(tile_counts_ptr + tr[:, None] * E + cols[None, :], mask=m, other=0)
            total += tl.sum(c, 0)
        excl = tl.cumsum(total, 0) - total
        running = excl
        for start in range(0, n_tiles, BLOCK_TILES):
            tr = start + tl.arange(0, BLOCK_TILES)
            m = (tr[:, None] < n_tiles) & cmask[None, :]
            ptrs = tile_counts_ptr + tr[:, None] * E + cols[None, :]
            c = tl.load(ptrs, mask=m, other=0)
            tile_base = running[None, :] + tl.cumsum(c, 0) - c  # first global row of (tile, expert)
            local_first = tl.cumsum(c, 1) - c  # first position of the expert in the tile's sorted order
            tl.store(ptrs, tile_base - local_first, mask=m)
            running += tl.sum(c, 0)
        _write_offsets(total, cols, cmask, E, counts_ptr, offsets_ptr, padded_ptr, BLOCK_M)

    @triton.jit
    def _route_scan_kernel(
        tile_counts_ptr, n_tiles, E, counts_ptr, offsets_ptr, padded_ptr,
        BLOCK_E: tl.constexpr, BLOCK_TILES: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """The scan of per-tile histograms ``tile_counts [n_tiles, E]`` (``_route_scan``)."""
        _route_scan(tile_counts_ptr, n_tiles, E, counts_ptr, offsets_ptr, padded_ptr, BLOCK_E, BLOCK_TILES, BLOCK_M)

    @triton.jit
    def _route_scan_checked_kernel(
        tile_counts_ptr, n_tiles, E, counts_ptr, offsets_ptr, padded_ptr,
        BLOCK_E: tl.constexpr, BLOCK_TILES: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """``_route_scan_kernel`` for caller-given ids: ``tile_counts`` also holds, after the
        histograms, each tile's count of ids out of range (``[n_tiles]``) and one more int32,
        written here: 1 if every id was in range, else 0 (the flag of the device-side
        assertion, one op on the host). A kernel of its own, so topk_route, whose ids are
        always in range, neither reads nor passes anything more."""
        _route_scan(tile_counts_ptr, n_tiles, E, counts_ptr, offsets_ptr, padded_ptr, BLOCK_E, BLOCK_TILES, BLOCK_M)
        bad_ptr = tile_counts_ptr + n_tiles * E
        bad = tl.zeros([BLOCK_TILES], dtype=tl.int32)
        for start in range(0, n_tiles, BLOCK_TILES):
            tr = start + tl.arange(0, BLOCK_TILES)
            bad += tl.load(bad_ptr + tr, mask=tr < n_tiles, other=0)
        tl.store(bad_ptr + n_tiles, (tl.sum(bad, 0) == 0).to(tl.int32))

    @triton.jit
    def _route_scatter_kernel(
        ids_ptr, w_ptr, delta_ptr, TK, E, pairs_per_tile,
        token_idx_ptr, sorted_w_ptr, pair_ptr, inverse_ptr, K,
        offsets_ptr, padded_ptr, block_expert_ptr, block_row_ptr, max_blocks, blocks_per_prog,
        BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        """Counting-sort scatter of one tile's (token, slot) pairs to their expert-sorted
        rows. Within a tile pairs are ordered by (expert, pair index) with one bitonic sort
        of packed keys; the scan kernel's delta adds the rows of earlier tiles/experts, so the
        global order is stable: expert-major, then token, then slot. Each program also
        writes its ``blocks_per_prog`` entries of the block map from the scan's offsets."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_E)
        cmask = cols < E
        excl = tl.load(offsets_ptr + cols, mask=cmask, other=0)
        pexcl = tl.load(padded_ptr + cols, mask=cmask, other=0) // BLOCK_M
        pincl = tl.load(padded_ptr + cols + 1, mask=cmask, other=0) // BLOCK_M
        b_start = pid * blocks_per_prog
        _write_block_map(excl, pexcl, pincl, cols, cmask, E, block_expert_ptr, block_row_ptr, b_start,
                         tl.minimum(b_start + blocks_per_prog, max_blocks), BLOCK_M, BLOCK_B)
        local = tl.arange(0, BLOCK_N)
        pair = pid * pairs_per_tile + local
        m = (local < pairs_per_tile) & (pair < TK)
        e = tl.load(ids_ptr + pair, mask=m, other=E)
        skey = tl.sort(e * BLOCK_N + local)
        se = skey // BLOCK_N
        sl = skey % BLOCK_N
        valid = se < E
        delta = tl.load(delta_ptr + pid * E + se, mask=valid, other=0)
        dest = local + delta
        spair = pid * pairs_per_tile + sl
        tl.store(token_idx_ptr + dest, spair // K, mask=valid)
        tl.store(pair_ptr + dest, spair, mask=valid)
        tl.store(sorted_w_ptr + dest, tl.load(w_ptr + spair, mask=valid), mask=valid)
        tl.store(inverse_ptr + spair, dest, mask=valid)

    @triton.jit
    def _slot_grad(ids_ptr, g_topk_ptr, g_sorted_ptr, inverse_ptr, rows, rmask, K, j,
                   HAS_G_TOPK: tl.constexpr, HAS_G_SORTED: tl.constexpr):
        """For choice j of each token row: its expert and the gradient of its combine weight
        (from the [T, K] weights and/or, through the inverse permutation, the sorted ones)."""
        pj_ptr = rows.to(tl.int64) * K + j
        idj = tl.load(ids_ptr + pj_ptr, mask=rmask, other=0)
        g = tl.zeros(rows.shape, dtype=tl.float32)
        if HAS_G_TOPK:
            g += tl.load(g_topk_ptr + pj_ptr, mask=rmask, other=0.0)
        if HAS_G_SORTED:
            dest = tl.load(inverse_ptr + pj_ptr, mask=rmask, other=0)
            g += tl.load(g_sorted_ptr + dest, mask=rmask, other=0.0)
        return idj, g

    @triton.jit
    def _topk_route_bwd_kernel(
        logits_ptr, stride_t, T, E, K,
        ids_ptr, g_topk_ptr, g_sorted_ptr, inverse_ptr, dlogits_ptr,
        HAS_G_TOPK: tl.constexpr, HAS_G_SORTED: tl.constexpr,
        SCORE: tl.constexpr, RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        """d logits from the gradients of the combine weights ([T, K] and/or expert-sorted),
        recomputing the probabilities from the logits."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        x, p = _load_scores(logits_ptr, stride_t, rows, cols, rmask, cmask, SCORE)
        # sum of the selected probabilities and sum_j g_j * p_j (renormalisation backward)
        s = tl.zeros([BLOCK_T], dtype=tl.float32)
        gs = tl.zeros([BLOCK_T], dtype=tl.float32)
        for j in range(K):
            idj, g = _slot_grad(ids_ptr, g_topk_ptr, g_sorted_ptr, inverse_ptr, rows, rmask, K, j,
                                HAS_G_TOPK, HAS_G_SORTED)
            pj = tl.sum(tl.where(cols[None, :] == idj[:, None], p, 0.0), 1)
            s += pj
            gs += g * pj
        gp = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for j in range(K):
            idj, g = _slot_grad(ids_ptr, g_topk_ptr, g_sorted_ptr, inverse_ptr, rows, rmask, K, j,
                                HAS_G_TOPK, HAS_G_SORTED)
            if RENORM:
                g = (g - gs / s) / s
            gp += tl.where(cols[None, :] == idj[:, None], g[:, None], 0.0)
        if SCORE == 0:
            dx = p * (gp - tl.sum(p * gp, 1)[:, None])
        else:
            dx = gp * p * (1.0 - p)
        tl.store(dlogits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], dx, mask=m2)

    @triton.jit
    def _expert_scores_kernel(
        logits_ptr, stride_t, T, E, scores_ptr, C,
        counts_ptr, offsets_ptr, padded_ptr, block_expert_ptr, block_row_ptr, max_blocks,
        SCORE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """Probabilities of a tile of tokens, written transposed ([E, T], float32) so that each
        expert's selection reads one contiguous row. Program 0 also writes the plan's counts,
        offsets and block map, which expert choice fixes in advance (every expert has C rows):
        no launch of their own."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        x, p = _load_scores(logits_ptr, stride_t, rows, cols, rmask, cmask, SCORE)
        tl.store(scores_ptr + cols[None, :].to(tl.int64) * T + rows[:, None], p, mask=m2)
        if pid == 0:
            excl, pexcl, pincl = _write_offsets(tl.where(cmask, C, 0), cols, cmask, E, counts_ptr, offsets_ptr,
                                                padded_ptr, BLOCK_M)
            _write_block_map(excl, pexcl, pincl, cols, cmask, E, block_expert_ptr, block_row_ptr, 0, max_blocks,
                             BLOCK_M, BLOCK_B)

    @triton.jit
    def _count_at_least(row, L, key, mid, offs, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
        """How many keys of the row are >= ``mid`` (the row in registers, or streamed)."""
        if SINGLE:
            return tl.sum((key >= mid).to(tl.int32), 0)
        cnt = tl.full([], 0, tl.int32)
        for start in range(0, L, BLOCK):
            mc = (start + offs) < L
            kc = _monotone_key(tl.load(row + start + offs, mask=mc, other=0.0))
            cnt += tl.sum((mc & (kc >= mid)).to(tl.int32), 0)
        return cnt

    @triton.jit
    def _topk_rows_kernel(
        x_ptr, stride_r, L, k,
        idx_ptr, val_ptr, stride_o,
        BLOCK: tl.constexpr, SINGLE: tl.constexpr,
    ):
        """Per row: the k largest of L values, emitted in increasing position order.

        The k-th largest monotone int32 key is found by bisection over the keys' range
        [min, max]: each step counts the keys at or above a midpoint with one reduction
        (at most 32 steps, fewer when the range is narrow). No histogram: a shared-memory
        histogram of router probabilities, which share their sign and exponent bits, sends
        nearly every element's atomic add to one bin, serialising the pass. A final pass
        keeps every key above the threshold plus the first ``remaining`` keys equal to it
        (ties: lower position wins) and compacts them with a prefix sum, so the output is
        already in position order.
        SINGLE: the row fits in one block and stays in registers; otherwise it is streamed
        in chunks of BLOCK values, once per step."""
        r = tl.program_id(0)
        row = x_ptr + r.to(tl.int64) * stride_r
        orow = r.to(tl.int64) * stride_o
        offs = tl.arange(0, BLOCK)
        if SINGLE:
            m = offs < L
            xv = tl.load(row + offs, mask=m, other=0.0)
            # padding lanes get the smallest int32, below every real key (NaN maps to -inf's
            # key), and never reach a count: every midpoint is above the smallest real key
            key = tl.where(m, _monotone_key(xv), -2147483648)
            lo = tl.min(tl.where(m, key, 2147483647), 0).to(tl.int64)
            hi = tl.max(key, 0).to(tl.int64)
        else:
            key = tl.full([BLOCK], 0, tl.int32)  # unused
            lo32 = tl.full([], 2147483647, tl.int32)
            hi32 = tl.full([], -2147483648, tl.int32)
            for start in range(0, L, BLOCK):
                mc = (start + offs) < L
                kc = _monotone_key(tl.load(row + start + offs, mask=mc, other=0.0))
                lo32 = tl.minimum(lo32, tl.min(tl.where(mc, kc, 2147483647), 0))
                hi32 = tl.maximum(hi32, tl.max(tl.where(mc, kc, -2147483648), 0))
            lo = lo32.to(tl.int64)
            hi = hi32.to(tl.int64)
        # invariant: count(key >= lo) >= k > count(key > hi) == above
        above = tl.full([], 0, tl.int32)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2  # int64: the range may span 2**32
            cnt = _count_at_least(row, L, key, mid.to(tl.int32), offs, BLOCK, SINGLE)
            take = cnt >= k
            lo = tl.where(take, mid, lo)
            above = tl.where(take, above, cnt)
            hi = tl.where(take, hi, mid - 1)
        thr = lo.to(tl.int32)  # the k-th largest key
        remaining = k - above  # keys equal to thr to take, first by position
        if SINGLE:
            gt = key > thr
            eq = key == thr
            # one prefix sum counts both (L <= 2**15): keys above the threshold in the low 16
            # bits, keys equal to it in the high 16 (2**15 equal keys wrap the int32's sign:
            # the mask after the shift undoes it)
            packed = tl.cumsum(gt.to(tl.int32) + (eq.to(tl.int32) << 16), 0)
            eq_rank = (packed >> 16) & 0xFFFF
            sel = gt | (eq & (eq_rank <= remaining))
            pos = (packed & 0xFFFF) + tl.minimum(eq_rank, remaining) - 1
            tl.store(idx_ptr + orow + pos, offs, mask=sel)
            # the values are read again (cache hits) for the selected lanes only: holding
            # the loaded row in registers through the search spills at 16,384 values
            tl.store(val_ptr + orow + pos, tl.load(row + offs, mask=sel), mask=sel)
        else:
            n_sel = tl.full([], 0, tl.int32)
            n_eq = tl.full([], 0, tl.int32)
            for start in range(0, L, BLOCK):
                mc = (start + offs) < L
                xc = tl.load(row + start + offs, mask=mc, other=0.0)
                kc = _monotone_key(xc)
                gt = mc & (kc > thr)
                eq = mc & (kc == thr)
                eq_rank = n_eq + tl.cumsum(eq.to(tl.int32), 0)
                sel = gt | (eq & (eq_rank <= remaining))
                pos = n_sel + tl.cumsum(sel.to(tl.int32), 0) - 1
                tl.store(idx_ptr + orow + pos, start + offs, mask=sel)
                tl.store(val_ptr + orow + pos, xc, mask=sel)
                n_sel += tl.sum(sel.to(tl.int32), 0)
                n_eq += tl.sum(eq.to(tl.int32), 0)


# ----------------------------------------------------------------------------------------
# 2. Plans and references
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoutingPlan:
    """Expert-sorted routing of N (token, slot) pairs, made on the device without host sync.

    Rows are sorted by expert, then by token (then slot): expert ``e`` owns rows
    ``expert_offsets[e]:expert_offsets[e+1]``.

    Attributes:
        token_idx: ``[N]`` int32, the token each sorted row reads.
        weights: ``[N]`` float32 (float64 for float64 logits), the combine weight of each
            sorted row; differentiable with respect to the logits.
        expert_counts: ``[E]`` int32 rows per expert (may be 0).
        expert_offsets: ``[E+1]`` int32 exclusive cumulative counts.
        padded_offsets: ``[E+1]`` int32 offsets after padding every expert to ``block_m`` rows.
        block_expert: ``[NB]`` int32 expert of grouped-matmul block ``b`` (``-1``: unused),
            ``NB = (N + E*(block_m-1)) // block_m``, an upper bound known without sync.
        block_row: ``[NB]`` int32 first sorted row of block ``b`` (``-1``: unused); the block
            covers rows ``block_row[b] : min(block_row[b] + block_m, expert_offsets[e+1])``.
        topk_ids, topk_weights: ``[T, K]`` the token-major choice (token choice only).
        pair_idx: ``[N]`` int32 sorted row -> flat pair ``t*K + k`` (token choice only).
        inverse: ``[T*K]`` int32 flat pair -> sorted row (token choice only).
    """

    token_idx: torch.Tensor
    weights: torch.Tensor
    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    padded_offsets: torch.Tensor
    block_expert: torch.Tensor
    block_row: torch.Tensor
    num_tokens: int
    num_experts: int
    block_m: int
    top_k: int | None = None
    capacity: int | None = None
    topk_ids: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    pair_idx: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.token_idx.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.block_expert.shape[0]


@dataclass(frozen=True)
class MoDSelection:
    """Per sequence, the k selected positions in increasing order and their router scores.

    Attributes:
        indices: ``[B, k]`` int32, strictly increasing along each row.
        weights: ``[B, k]`` the scores at those positions (scores' dtype; differentiable).
    """

    indices: torch.Tensor
    weights: torch.Tensor

    @property
    def k(self) -> int:
        return self.indices.shape[1]


def _max_blocks(n_rows: int, n_experts: int, block_m: int) -> int:
    return (n_rows + n_experts * (block_m - 1)) // block_m


def _block_map_reference(counts: torch.Tensor, n_rows: int, block_m: int):
    """offsets, padded offsets and block map from per-expert counts, in plain torch."""
    E = counts.shape[0]
    dev = counts.device
    counts = counts.to(torch.int64)
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    offsets = torch.cat([zero, counts.cumsum(0)])
    nblk = (counts + block_m - 1) // block_m
    pblk = torch.cat([zero, nblk.cumsum(0)])
    b = torch.arange(_max_blocks(n_rows, E, block_m), device=dev)
    e = torch.searchsorted(pblk[1:].contiguous(), b, right=True)
    valid = e < E
    ec = e.clamp(max=E - 1)
    row = offsets[ec] + (b - pblk[ec]) * block_m
    i32 = torch.int32
    return (
        counts.to(i32),
        offsets.to(i32),
        (pblk * block_m).to(i32),
        torch.where(valid, e, -1).to(i32),
        torch.where(valid, row, -1).to(i32),
    )


def _check_logits(logits, name="logits"):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape [T, E] (2 dims), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {logits.dtype}")
    if logits.shape[0] == 0:
        raise ValueError(f"{name} has T = 0 tokens; routing needs at least one")
    if logits.shape[1] == 0:
        raise ValueError(f"{name} has E = 0 experts")


def _check_int(value, name, lo, hi):
    """``value`` as a Python int (a numpy or other integral scalar is taken; bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _check_block_m(block_m):
    """Rows per grouped-matmul block: the kernels tile with it, so a power of two."""
    block_m = _check_int(block_m, "block_m", 1, 1 << 16)
    if block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two (the grouped matmul's row tile), got {block_m}")
    return block_m


def _check_renormalize(renormalize):
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")


def _check_score(score):
    if not isinstance(score, str) or score not in _SCORES:
        raise ValueError(f"score must be one of {sorted(_SCORES)}, got {score!r}")


def _scores_reference(logits: torch.Tensor, score: str) -> torch.Tensor:
    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.softmax(x, -1) if score == "softmax" else torch.sigmoid(x)


def _rank_key(x: torch.Tensor) -> torch.Tensor:
    """The ranking key every backend uses: NaN ranks as -inf; ties resolved by stable sort."""
    return x.masked_fill(torch.isnan(x), float("-inf"))


def _stable_topk(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Indices of the k largest along ``dim``, largest first, ties to the lower index."""
    return torch.sort(_rank_key(x), dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)


def _group_keep_reference(s: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """[T, E] bool: the experts in each token's ``topk_group`` best groups of ``E // n_group``
    consecutive experts, a group scored by its largest ``s`` ("max") or the sum of its two
    largest ("top2"); a NaN counts as -inf, groups tie to the lower index."""
    T, E = s.shape
    grouped = _rank_key(s).view(T, n_group, E // n_group)
    best = grouped.topk(1 if group_score == "max" else 2, dim=-1).values.sum(-1)
    keep = torch.zeros(T, n_group, dtype=torch.bool, device=s.device)
    keep.scatter_(1, _stable_topk(best, topk_group, dim=1), True)
    return keep.repeat_interleave(E // n_group, dim=1)


def topk_route_reference(logits: torch.Tensor, k: int, *, score: str = "softmax",
                         renormalize: bool = False, block_m: int = 64,
                         bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int | None = None,
                         group_score: str = "top2") -> RoutingPlan:
    """Plain-PyTorch token-choice routing; the definition :func:`topk_route` must match."""
    k, block_m, n_group, topk_group, code = _validate_topk(logits, k, score, block_m, renormalize, bias, n_group,
                                                           topk_group, group_score)
    T, E = logits.shape
    probs = _scores_reference(logits, score)
    s = probs.detach() if bias is None else probs.detach() + bias.detach().to(probs.dtype)
    # rank by logits without a bias (monotone in the probabilities); with one by score + bias:
    # the bias only chooses, the weights stay the scores
    order = torch.sort(_rank_key(logits.detach() if bias is None else s), dim=1, descending=True, stable=True).indices
    if code:  # the kept groups' experts first, each part in the order above
        kept = _group_keep_reference(s, n_group, topk_group, group_score).gather(1, order)
        order = order.gather(1, torch.sort(kept.to(torch.uint8), dim=1, descending=True, stable=True).indices)
    ids = order[:, :k]
    w = probs.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return _plan_from_topk_reference(ids, w, E, block_m)


def plan_from_counts(token_idx: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor, num_tokens: int, *,
                     block_m: int = 64) -> RoutingPlan:
    """A :class:`RoutingPlan` for rows already sorted by expert (e.g. rows received from other
    ranks): ``token_idx [N]`` the token each row reads, ``weights [N]``, ``counts [E]`` rows per
    expert (summing to N). Offsets and the block map are computed with torch ops on the
    device, no host sync: counts that are negative or do not sum to N, and a ``token_idx``
    outside ``[0, num_tokens)``, fail a device-side assertion (``torch._assert_async``; on CUDA it is reported asynchronously, as a device-side
    assert after which the process's CUDA context is unusable)."""
    for name, t in (("token_idx", token_idx), ("weights", weights), ("counts", counts)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if counts.dim() != 1 or counts.is_floating_point() or counts.dtype == torch.bool:
        raise TypeError(f"counts must be a 1-D integer tensor [E], got {counts.dtype} of shape {tuple(counts.shape)}")
    if token_idx.is_floating_point() or token_idx.dtype == torch.bool:
        raise TypeError(f"token_idx must be an integer tensor, got {token_idx.dtype}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    if token_idx.dim() != 1 or weights.shape != token_idx.shape:
        raise ValueError(f"token_idx and weights must both be [N], got {tuple(token_idx.shape)} and {tuple(weights.shape)}")
    if len({t.device for t in (token_idx, weights, counts)}) != 1:
        raise ValueError(f"token_idx, weights and counts must be on one device, got {token_idx.device}, "
                         f"{weights.device}, {counts.device}")
    num_tokens = _check_int(num_tokens, "num_tokens", 0, 1 << 62)
    block_m = _check_block_m(block_m)
    N = token_idx.shape[0]
    # token_idx is read by the grouped matmuls as a row address: one out of range would read
    # (and, in the backward, atomically add) outside the token tensor
    torch._assert_async(((counts >= 0).all() & (counts.sum() == N)
                         & ((token_idx >= 0) & (token_idx < num_tokens)).all()),
                        f"plan_from_counts: counts must be >= 0 and sum to N = {N} (the rows of token_idx), "
                        f"and token_idx must lie in [0, num_tokens = {num_tokens})")
    counts, offsets, padded, block_expert, block_row = _block_map_reference(counts, N, block_m)
    # the kernels index these as contiguous arrays
    return RoutingPlan(
        token_idx=token_idx.to(torch.int32).contiguous(), weights=weights.contiguous(), expert_counts=counts,
        expert_offsets=offsets,
        padded_offsets=padded, block_expert=block_expert, block_row=block_row, num_tokens=num_tokens,
        num_experts=counts.shape[0], block_m=block_m,
    )


_INT32_MAX = 2**31 - 1


def _validate_plan_from_topk(topk_ids, topk_weights, num_experts, block_m) -> tuple[int, int, int, int]:
    """Checks shared by :func:`plan_from_topk` and its reference; returns ``T, K, E, block_m``.
    Ids outside ``[0, E)`` are checked on the device, later: by ``_assert_ids_in_range`` on the
    reference path, by the kernels' own count on the kernel path."""
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be an int32 or int64 tensor of expert ids, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be a floating-point tensor, got {topk_weights.dtype}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape [T, K] (2 dims), got {tuple(t.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must have the same shape [T, K], got {tuple(topk_ids.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    if topk_ids.device != topk_weights.device:
        raise ValueError(f"topk_ids and topk_weights must be on one device, got {topk_ids.device} and "
                         f"{topk_weights.device}")
    E = _check_int(num_experts, "num_experts", 1, _INT32_MAX)
    block_m = _check_block_m(block_m)
    T, K = topk_ids.shape
    if T == 0:  # as topk_route
        raise ValueError("topk_ids has T = 0 tokens; routing needs at least one")
    if not 1 <= K <= E:
        raise ValueError(f"topk_ids has K = {K} choices per token; K must be in [1, num_experts = {E}]")
    if T * K > _INT32_MAX:
        raise ValueError(f"topk_ids has T * K = {T * K} pairs; the plan's int32 rows hold at most {_INT32_MAX}")
    return T, K, E, block_m


_IDS_RANGE_MSG = "plan_from_topk: topk_ids must lie in [0, num_experts = {})"


def _assert_ids_in_range(topk_ids: torch.Tensor, E: int) -> None:
    """The reference's device-side check of the ids (no host sync). The ids become row and
    histogram addresses; both paths also clamp them, so a bad id never reads or writes out of
    bounds before the (asynchronous on CUDA) assertion reports it. The kernel path counts them
    in its kernels instead (``_plan_from_topk_fwd``), with the same message."""
    torch._assert_async(((topk_ids >= 0) & (topk_ids < E)).all(), _IDS_RANGE_MSG.format(E))


def plan_from_topk_reference(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, *,
                             block_m: int = 64) -> RoutingPlan:
    """Plain-PyTorch :func:`plan_from_topk`; the definition its kernel path must match."""
    T, K, E, block_m = _validate_plan_from_topk(topk_ids, topk_weights, num_experts, block_m)
    _assert_ids_in_range(topk_ids, E)
    return _plan_from_topk_reference(topk_ids, topk_weights, E, block_m)


def _plan_from_topk_reference(topk_ids, topk_weights, E: int, block_m: int) -> RoutingPlan:
    T, K = topk_ids.shape
    ids = topk_ids.long().clamp(0, E - 1)  # as the kernel (the assertion reports ids out of range)
    w = topk_weights.to(acc_dtype(topk_weights)).contiguous()
    flat = ids.reshape(-1)
    pair = torch.sort(flat, stable=True).indices  # by expert, then by pair index t*K + k
    inverse = torch.empty_like(pair).scatter_(0, pair, torch.arange(pair.numel(), device=pair.device))
    # (scatter_add, not bincount: the meta device has it, so a model built there gets shapes)
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    counts, offsets, padded, block_expert, block_row = _block_map_reference(counts, T * K, block_m)
    i32 = torch.int32
    return RoutingPlan(
        token_idx=(pair // K).to(i32), weights=w.reshape(-1)[pair], expert_counts=counts,
        expert_offsets=offsets, padded_offsets=padded, block_expert=block_expert, block_row=block_row,
        num_tokens=T, num_experts=E, block_m=block_m, top_k=K, topk_ids=ids.to(i32), topk_weights=w,
        pair_idx=pair.to(i32), inverse=inverse.to(i32),
    )


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert, ``C = ceil(T * capacity_factor / E)``, clamped to ``[1, T]``."""
    return max(1, min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts)))


def expert_choice_route_reference(logits: torch.Tensor, capacity_factor: float = 2.0, *, score: str = "softmax",
                                  block_m: int = 64) -> RoutingPlan:
    """Plain-PyTorch expert-choice routing; the definition :func:`expert_choice_route` must match."""
    C, block_m = _validate_ec(logits, capacity_factor, score, block_m)
    T, E = logits.shape
    probs_ET = _scores_reference(logits, score).t()
    tok = torch.sort(_stable_topk(probs_ET, C, dim=1), dim=1).values  # [E, C] increasing tokens
    w = probs_ET.gather(1, tok).reshape(-1)
    counts = torch.full((E,), C, dtype=torch.int64, device=logits.device)
    counts, offsets, padded, block_expert, block_row = _block_map_reference(counts, E * C, block_m)
    return RoutingPlan(
        token_idx=tok.reshape(-1).to(torch.int32), weights=w, expert_counts=counts, expert_offsets=offsets,
        padded_offsets=padded, block_expert=block_expert, block_row=block_row, num_tokens=T,
        num_experts=E, block_m=block_m, capacity=C,
    )


def topk_rows_reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x [R, L]``, the k largest values: (indices [R, k] int32 increasing, values)."""
    idx = torch.sort(_stable_topk(x, k, dim=1), dim=1).values
    return idx.to(torch.int32), x.gather(1, idx)


def mod_capacity(seq_len: int, capacity: float) -> int:
    """Tokens per sequence a MoD block processes: ``k = ceil(capacity * S)``."""
    return max(1, math.ceil(capacity * seq_len - 1e-9))


def mod_select_reference(scores: torch.Tensor, capacity: float = 0.125, *, k: int | None = None) -> MoDSelection:
    """Plain-PyTorch Mixture-of-Depths selection; the definition :func:`mod_select` must match."""
    k = _validate_mod(scores, capacity, k)
    idx, w = topk_rows_reference(scores, k)
    return MoDSelection(indices=idx, weights=w)


# ----------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------
def _tile_tokens(E: int, K: int) -> int:
    # Tiles of 128 tokens give one wave of 128 programs at T=16384 on 132 SMs; fewer tokens
    # per tile when E is wide keep the [BLOCK_T, BLOCK_E] logits tile within registers.
    block_e = next_pow2(E)
    return max(16, min(128, 8192 // block_e))


def _int_outputs(shapes: list[tuple[int, ...]], device, pack: bool) -> list[torch.Tensor]:
    """int32 outputs of the given shapes: separate tensors, or (``pack``) views of one buffer,
    each starting on a 16-byte boundary: one allocation instead of many, which is host time
    an eager call of a small op notices. (A custom op may not return outputs that alias one
    another, so only the eager path packs.) The views share one autograd version counter:
    modifying any plan tensor in place makes the plan's backward refuse to run, as it would
    if the saved ids or inverse were modified."""
    if not pack:
        return [new_output(sh, dtype=torch.int32, device=device) for sh in shapes]
    starts, total = [], 0
    for sh in shapes:  # 1-D or 2-D
        starts.append(total)
        total += -(-math.prod(sh) // 4) * 4
    buf = new_output((total,), dtype=torch.int32, device=device)
    return [buf.as_strided(sh, (sh[1], 1) if len(sh) == 2 else (1,), a) for a, sh in zip(starts, shapes)]


def _topk_route_fwd(logits: torch.Tensor, bias: torch.Tensor | None, k: int, score: int, renormalize: bool,
                    block_m: int, n_group: int = 1, topk_group: int = 1, group_score: int = 0, pack: bool = False):
    logits = logits.contiguous()
    T, E = logits.shape
    dev = logits.device
    BLOCK_T = _tile_tokens(E, k)
    BLOCK_E = next_pow2(E)
    n_tiles = cdiv(T, BLOCK_T)
    N = T * k
    nb = _max_blocks(N, E, block_m)
    ids, tile_counts, counts, offsets, padded, block_expert, block_row, token_idx, pair, inverse = _int_outputs(
        [(T, k), (n_tiles, E), (E,), (E + 1,), (E + 1,), (nb,), (nb,), (N,), (N,), (N,)], dev, pack)
    w = new_output((T, k), dtype=torch.float32, device=dev)
    launch(_topk_route_fwd_kernel, (n_tiles,),
        logits, logits.stride(0), T, E, k, logits if bias is None else bias.float().contiguous(), n_group,
        topk_group, ids, w, tile_counts,
        SCORE=score, RENORM=renormalize, HAS_BIAS=bias is not None, GROUP_SCORE=group_score, BLOCK_T=BLOCK_T,
        BLOCK_E=BLOCK_E, BLOCK_K=next_pow2(k), BLOCK_G=next_pow2(n_group), num_warps=4,
    )
    sorted_w = _scan_and_scatter(ids, w, tile_counts, counts, offsets, padded, block_expert, block_row, token_idx,
                                 pair, inverse, BLOCK_T, block_m)
    # float outputs first (opcheck's aot check sums outputs into the first one's dtype)
    return w, sorted_w, ids, token_idx, pair, inverse, counts, offsets, padded, block_expert, block_row


def _scan_and_scatter(ids, w, tile_counts, counts, offsets, padded, block_expert, block_row, token_idx, pair,
                      inverse, BLOCK_T: int, block_m: int, check_ids: bool = False) -> torch.Tensor:
    """The launches every token-choice plan shares once ``ids [T, K]`` (int32, in [0, E)),
    their float32 weights and the per-tile histograms ``tile_counts [n_tiles, E]`` of tiles of
    BLOCK_T tokens exist: the scan (counts, offsets, per-tile shifts) and the scatter (sorted
    rows, pair/inverse permutations, block map). Writes the given outputs; returns the
    expert-sorted weights. ``check_ids``: ``tile_counts`` also holds the per-tile counts of
    ids out of range and the flag the scan writes from them (``_route_scan_checked_kernel``)."""
    T, k = ids.shape
    E = counts.shape[0]
    n_tiles = cdiv(T, BLOCK_T)
    N = T * k
    nb = block_expert.shape[0]
    BLOCK_E = next_pow2(E)
    launch(_route_scan_checked_kernel if check_ids else _route_scan_kernel, (1,),
        tile_counts, n_tiles, E, counts, offsets, padded,
        BLOCK_E=BLOCK_E, BLOCK_TILES=max(1, min(64, 4096 // BLOCK_E)), BLOCK_M=block_m, num_warps=4,
    )
    sorted_w = new_output((N,), dtype=torch.float32, device=ids.device)
    pairs_per_tile = BLOCK_T * k
    blocks_per_prog = cdiv(nb, n_tiles)
    launch(_route_scatter_kernel, (n_tiles,),
        ids, w, tile_counts, N, E, pairs_per_tile, token_idx, sorted_w, pair, inverse, k,
        offsets, padded, block_expert, block_row, nb, blocks_per_prog,
        BLOCK_N=next_pow2(pairs_per_tile), BLOCK_E=BLOCK_E, BLOCK_M=block_m,
        BLOCK_B=max(16, min(next_pow2(blocks_per_prog), 8192 // BLOCK_E)), num_warps=4,
    )
    return sorted_w


def _plan_from_topk_fwd(ids: torch.Tensor, w: torch.Tensor, num_experts: int, block_m: int, pack: bool = False):
    """Kernel path of :func:`plan_from_topk`: ``ids [T, K]`` int32/int64, ``w [T, K]`` float32.
    The plan's tensors (:func:`_plan_from_topk_launch`), after one device-side assertion that
    every id lay in ``[0, num_experts)``, counted by the kernels: no torch op reads the ids."""
    *out, ok = _plan_from_topk_launch(ids, w, num_experts, block_m, pack)
    torch._assert_async(ok, _IDS_RANGE_MSG.format(num_experts))
    return tuple(out)


def _plan_from_topk_launch(ids: torch.Tensor, w: torch.Tensor, num_experts: int, block_m: int, pack: bool = False):
    """Per-tile histograms of the given ids (clamped into [0, E)), then the scan and scatter
    ``topk_route`` uses; returns the plan's tensors and ``ok [1]`` int32: 1 if every id lay in
    ``[0, E)``, else 0. ``tile_counts`` is one int32 buffer: the ``[n_tiles, E]`` histograms,
    then each tile's count of ids out of range, then ``ok``, a view of its last element (the
    custom op does not return ``ok``, so its outputs still alias nothing)."""
    ids = ids.contiguous()
    w = w.contiguous()
    T, k = ids.shape
    E = num_experts
    dev = ids.device
    BLOCK_T = _tile_tokens(E, k)  # same tiles as topk_route: the scatter's pairs_per_tile follows them
    n_tiles = cdiv(T, BLOCK_T)
    N = T * k
    nb = _max_blocks(N, E, block_m)
    n_flag = n_tiles * (E + 1)  # the flag's index in tile_counts
    ids32, tile_counts, counts, offsets, padded, block_expert, block_row, token_idx, pair, inverse = _int_outputs(
        [(T, k), (n_flag + 1,), (E,), (E + 1,), (E + 1,), (nb,), (nb,), (N,), (N,), (N,)], dev, pack)
    launch(_plan_from_topk_fwd_kernel, (n_tiles,),
        ids, T, E, k, ids32, tile_counts, BLOCK_T=BLOCK_T, BLOCK_E=next_pow2(E), num_warps=4,
    )
    sorted_w = _scan_and_scatter(ids32, w, tile_counts, counts, offsets, padded, block_expert, block_row,
                                 token_idx, pair, inverse, BLOCK_T, block_m, check_ids=True)
    return (sorted_w, ids32, token_idx, pair, inverse, counts, offsets, padded, block_expert, block_row,
            tile_counts[n_flag:])


def _topk_route_bwd(logits, ids, inverse, g_topk, g_sorted, score: int, renormalize: bool):
    logits = logits.contiguous()
    T, E = logits.shape
    k = ids.shape[1]
    BLOCK_T = _tile_tokens(E, k)
    dlogits = new_output((T, E), dtype=torch.float32, device=logits.device)
    dummy = dlogits
    launch(_topk_route_bwd_kernel, (cdiv(T, BLOCK_T),),
        logits, logits.stride(0), T, E, k, ids,
        g_topk.contiguous() if g_topk is not None else dummy,
        g_sorted.contiguous() if g_sorted is not None else dummy,
        inverse, dlogits,
        HAS_G_TOPK=g_topk is not None, HAS_G_SORTED=g_sorted is not None,
        SCORE=score, RENORM=renormalize, BLOCK_T=BLOCK_T, BLOCK_E=next_pow2(E), num_warps=4,
    )
    return dlogits.to(logits.dtype)


# Largest row kept in registers by the selection kernel (16 warps x 32 threads x 64 values:
# no spill in the search loop on sm_90, some in the final compaction; its one prefix sum
# packs two counts of at most 2**15 into an int32, so never above 32768). 16-bit rows stop
# at half that: at 2**15 values Triton 3.6 spills their search loop.
_SINGLE_MAX = 32768
# Longer rows are streamed in chunks of this many values (16 warps x 32 threads x 16),
# re-read on each bisection step.
_CHUNK = 8192


def _topk_rows_fwd(x: torch.Tensor, k: int):
    x = x.contiguous()
    R, L = x.shape
    idx = new_output((R, k), dtype=torch.int32, device=x.device)
    val = new_output((R, k), dtype=x.dtype, device=x.device)
    single = L <= (_SINGLE_MAX if x.element_size() >= 4 else _SINGLE_MAX // 2)
    BLOCK = next_pow2(L) if single else _CHUNK
    num_warps = 4 if BLOCK <= 2048 else (8 if BLOCK < _CHUNK else 16)
    launch(_topk_rows_kernel, (R,), x, x.stride(0), L, k, idx, val, k, BLOCK=BLOCK, SINGLE=single, num_warps=num_warps)
    return idx, val


def _expert_choice_fwd(logits: torch.Tensor, C: int, score: int, block_m: int):
    logits = logits.contiguous()
    T, E = logits.shape
    dev = logits.device
    BLOCK_E = next_pow2(E)
    BLOCK_T = max(16, min(128, 8192 // BLOCK_E))
    nb = _max_blocks(E * C, E, block_m)
    probs_ET = new_output((E, T), dtype=torch.float32, device=dev)
    counts, offsets, padded, block_expert, block_row = _int_outputs([(E,), (E + 1,), (E + 1,), (nb,), (nb,)], dev,
                                                                    pack=False)
    launch(_expert_scores_kernel, (cdiv(T, BLOCK_T),),
        logits, logits.stride(0), T, E, probs_ET, C, counts, offsets, padded, block_expert, block_row, nb,
        SCORE=score, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_M=block_m, BLOCK_B=max(16, min(256, 8192 // BLOCK_E)),
        num_warps=4)
    tok, w = _topk_rows_fwd(probs_ET, C)
    return w.reshape(-1), tok.reshape(-1), counts, offsets, padded, block_expert, block_row


# ----------------------------------------------------------------------------------------
# 4. Custom ops with autograd (opaque to torch.compile: no graph breaks, no host sync)
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("flopwise::topk_route", mutates_args=())
def _topk_route_op(logits: torch.Tensor, bias: torch.Tensor | None, k: int, score: int, renormalize: bool,
                   block_m: int, n_group: int, topk_group: int, group_score: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _topk_route_fwd(logits, bias, k, score, renormalize, block_m, n_group, topk_group, group_score)


@_topk_route_op.register_fake
def _(logits, bias, k, score, renormalize, block_m, n_group, topk_group, group_score):
    T, E = logits.shape
    N = T * k
    nb = _max_blocks(N, E, block_m)
    i32, f32 = torch.int32, torch.float32
    e = logits.new_empty
    return (e((T, k), dtype=f32), e((N,), dtype=f32), e((T, k), dtype=i32), e((N,), dtype=i32),
            e((N,), dtype=i32), e((N,), dtype=i32), e((E,), dtype=i32), e((E + 1,), dtype=i32),
            e((E + 1,), dtype=i32), e((nb,), dtype=i32), e((nb,), dtype=i32))


@torch.library.custom_op("flopwise::topk_route_bwd", mutates_args=())
def _topk_route_bwd_op(logits: torch.Tensor, ids: torch.Tensor, inverse: torch.Tensor,
                       g_topk: torch.Tensor | None, g_sorted: torch.Tensor | None,
                       score: int, renormalize: bool) -> torch.Tensor:
    return _topk_route_bwd(logits, ids, inverse, g_topk, g_sorted, score, renormalize)


@_topk_route_bwd_op.register_fake
def _(logits, ids, inverse, g_topk, g_sorted, score, renormalize):
    return torch.empty_like(logits)


def _topk_route_setup(ctx, inputs, output):
    logits, bias, k, score, renormalize, block_m, n_group, topk_group, group_score = inputs
    ctx.save_for_backward(logits, output[2], output[5])
    ctx.score, ctx.renormalize = score, renormalize


def _topk_route_backward(bwd):
    def backward(ctx, g_topk, g_sorted, *rest):
        logits, ids, inverse = ctx.saved_tensors
        rest = (None,) * 8  # the bias only ranks the experts: no gradient reaches it
        if g_topk is None and g_sorted is None:
            return (None, *rest)
        return (bwd(logits, ids, inverse, g_topk, g_sorted, ctx.score, ctx.renormalize), *rest)

    return backward




@torch.library.custom_op("flopwise::expert_choice_route", mutates_args=())
def _expert_choice_op(logits: torch.Tensor, capacity: int, score: int, block_m: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _expert_choice_fwd(logits, capacity, score, block_m)


@_expert_choice_op.register_fake
def _(logits, capacity, score, block_m):
    T, E = logits.shape
    N = E * capacity
    nb = _max_blocks(N, E, block_m)
    i32 = torch.int32
    e = logits.new_empty
    return (e((N,), dtype=torch.float32), e((N,), dtype=i32), e((E,), dtype=i32), e((E + 1,), dtype=i32),
            e((E + 1,), dtype=i32), e((nb,), dtype=i32), e((nb,), dtype=i32))


def _expert_choice_setup(ctx, inputs, output):
    logits, capacity, score, block_m = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.score, ctx.capacity = score, capacity


def _expert_choice_backward(ctx, g_w, *rest):
    logits, tok = ctx.saved_tensors
    if g_w is None:
        return None, None, None, None
    T, E = logits.shape
    # d probs[t, e] for the selected (expert, token) pairs; then the score's Jacobian.
    x = logits.float()
    g_ET = torch.zeros(E, T, dtype=torch.float32, device=logits.device)
    g_ET.scatter_(1, tok.view(E, ctx.capacity).long(), g_w.view(E, ctx.capacity).float())
    gp = g_ET.t()
    if ctx.score == 0:
        p = torch.softmax(x, -1)
        d = p * (gp - (p * gp).sum(-1, keepdim=True))
    else:
        p = torch.sigmoid(x)
        d = gp * p * (1 - p)
    return d.to(logits.dtype), None, None, None




@torch.library.custom_op("flopwise::topk_rows", mutates_args=())
def _topk_rows_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _topk_rows_impl(x, k)


def _topk_rows_impl(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx, val = _topk_rows_fwd(x, k)
    return val, idx


@_topk_rows_op.register_fake
def _(x, k):
    return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.int32)


def _topk_rows_setup(ctx, inputs, output):
    x, k = inputs
    ctx.save_for_backward(output[1])
    ctx.shape = x.shape


def _topk_rows_backward(ctx, g_val, g_idx):
    (idx,) = ctx.saved_tensors
    if g_val is None:
        return None, None
    g = torch.zeros(ctx.shape, dtype=g_val.dtype, device=g_val.device)
    return g.scatter_(1, idx.long(), g_val), None



@torch.library.custom_op("flopwise::plan_from_topk", mutates_args=())
def _plan_from_topk_op(topk_ids: torch.Tensor, weights: torch.Tensor, num_experts: int, block_m: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor, torch.Tensor, torch.Tensor]:
    return _plan_from_topk_fwd(topk_ids, weights, num_experts, block_m)


@_plan_from_topk_op.register_fake
def _(topk_ids, weights, num_experts, block_m):
    T, k = topk_ids.shape
    E = num_experts
    N = T * k
    nb = _max_blocks(N, E, block_m)
    i32 = torch.int32
    e = weights.new_empty
    return (e((N,), dtype=torch.float32), e((T, k), dtype=i32), e((N,), dtype=i32), e((N,), dtype=i32),
            e((N,), dtype=i32), e((E,), dtype=i32), e((E + 1,), dtype=i32), e((E + 1,), dtype=i32),
            e((nb,), dtype=i32), e((nb,), dtype=i32))


def _plan_from_topk_setup(ctx, inputs, output):
    ctx.save_for_backward(output[4])  # inverse: flat pair -> sorted row
    ctx.shape = inputs[1].shape


def _plan_from_topk_backward(ctx, g_sorted, *rest):
    """The sorted weights are ``w.flatten()[pair_idx]``, a permutation: each pair's gradient
    is its sorted row's, read back through ``inverse``. A gather, so deterministic (no
    scatter-add)."""
    (inverse,) = ctx.saved_tensors
    if g_sorted is None:
        return None, None, None, None
    return None, g_sorted.index_select(0, inverse).view(ctx.shape), None, None


# Autograd for the three custom ops, and their eager twins: the same kernels and formulas
# without the dispatcher's host cost (see ``_dispatch.traced``); the public functions pick
# one per call.
def _topk_route_fwd_packed(logits, bias, k: int, score: int, renormalize: bool, block_m: int, n_group: int,
                           topk_group: int, group_score: int):
    return _topk_route_fwd(logits, bias, k, score, renormalize, block_m, n_group, topk_group, group_score,
                           pack=True)


def _plan_from_topk_fwd_packed(topk_ids, weights, num_experts: int, block_m: int):
    return _plan_from_topk_fwd(topk_ids, weights, num_experts, block_m, pack=True)


_TopkRouteFunction = autograd_twin(_topk_route_op, "TopkRouteFunction", _topk_route_fwd_packed, _topk_route_setup,
                                   _topk_route_backward, bwd_impl=_topk_route_bwd, bwd_op=_topk_route_bwd_op)
_ExpertChoiceFunction = autograd_twin(_expert_choice_op, "ExpertChoiceFunction", _expert_choice_fwd,
                                      _expert_choice_setup, _expert_choice_backward)
_PlanFromTopkFunction = autograd_twin(_plan_from_topk_op, "PlanFromTopkFunction", _plan_from_topk_fwd_packed,
                                      _plan_from_topk_setup, _plan_from_topk_backward)
_TopkRowsFunction = autograd_twin(_topk_rows_op, "TopkRowsFunction", _topk_rows_impl, _topk_rows_setup,
                                  _topk_rows_backward)


# ----------------------------------------------------------------------------------------
# 5. Public API
# ----------------------------------------------------------------------------------------
_GROUP_SCORES = {"max": 1, "top2": 2}


def check_group_limit(num_experts: int, k: int, n_group, topk_group, group_score, prefix: str = "",
                      k_name: str = "k") -> tuple[int, int]:
    """Validate group-limited routing's settings for E = ``num_experts`` and k experts per
    token; return ``(n_group, topk_group)`` with ``topk_group=None`` as ``n_group``. Errors
    name each setting ``prefix + name`` (a config's field names: "MoEConfig.", "moe_")."""
    E = num_experts
    n_group = _check_int(n_group, prefix + "n_group", 1, E)
    if E % n_group:
        raise ValueError(f"{prefix}n_group must divide the number of experts E = {E}, got {n_group}")
    topk_group = n_group if topk_group is None else _check_int(topk_group, prefix + "topk_group", 1, n_group)
    if not isinstance(group_score, str) or group_score not in _GROUP_SCORES:
        raise ValueError(f"{prefix}group_score must be one of {sorted(_GROUP_SCORES)}, got {group_score!r}")
    size = E // n_group
    if group_score == "top2" and topk_group < n_group and size < 2:
        raise ValueError(f"{prefix}group_score 'top2' sums each group's two best experts: {prefix}n_group = "
                         f"{n_group} leaves {size} expert per group (E = {E}); use fewer groups or "
                         f"{prefix}group_score='max'")
    if k > topk_group * size:
        raise ValueError(f"{k_name} = {k} exceeds the experts of the kept groups: {prefix}topk_group ({topk_group}) "
                         f"x E // {prefix}n_group ({size}) = {topk_group * size}")
    return n_group, topk_group


def _validate_topk(logits, k, score, block_m, renormalize, bias=None, n_group=1, topk_group=None,
                   group_score="top2") -> tuple[int, int, int, int, int]:
    """(k, block_m, n_group, topk_group, group code: 0 when no group is excluded, else
    ``_GROUP_SCORES[group_score]``)."""
    _check_logits(logits)
    _check_renormalize(renormalize)
    E = logits.shape[1]
    k = _check_int(k, "k", 1, E)
    _check_score(score)
    n_group, topk_group = check_group_limit(E, k, n_group, topk_group, group_score)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        if bias.shape != (logits.shape[1],):
            raise ValueError(f"bias must have shape [E] = [{logits.shape[1]}] (one value per expert), "
                             f"got {tuple(bias.shape)}")
        if bias.device != logits.device:
            raise ValueError(f"bias must be on logits' device ({logits.device}), got {bias.device}")
    code = _GROUP_SCORES[group_score] if topk_group < n_group else 0
    return k, _check_block_m(block_m), n_group, topk_group, code


def _validate_ec(logits, capacity_factor, score, block_m) -> tuple[int, int]:
    _check_logits(logits)
    _check_score(score)
    block_m = _check_block_m(block_m)
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real):
        raise TypeError(f"capacity_factor must be a number, got {type(capacity_factor).__name__}")
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor}")
    return expert_choice_capacity(logits.shape[0], logits.shape[1], capacity_factor), block_m


def _validate_mod(scores, capacity, k) -> int:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [B, S] (2 dims), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must have B >= 1 and S >= 1, got {tuple(scores.shape)}")
    S = scores.shape[1]
    if k is None:
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Real):
            raise TypeError(f"capacity must be a number, got {type(capacity).__name__}")
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity must be in (0, 1], got {capacity}")
        return mod_capacity(S, capacity)
    k = _check_int(k, "k", 1, S)
    return k


def topk_route(logits: torch.Tensor, k: int, *, score: str = "softmax", renormalize: bool = False,
               block_m: int = 64, bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int | None = None,
               group_score: str = "top2") -> RoutingPlan:
    """Token-choice top-k routing: each token picks its k best experts (dropless).

    Args:
        logits: ``[T, E]`` router logits (fp32, bf16, fp16; float64 runs the reference).
        k: experts per token, ``1 <= k <= E``.
        score: ``"softmax"`` over experts (Mixtral, OLMoE) or ``"sigmoid"`` per expert.
        renormalize: divide each token's k weights by their sum (Mixtral: yes, OLMoE: no).
        block_m: rows per block of the grouped matmul that will consume the plan.
        bias: optional ``[E]`` per-expert selection bias (auxiliary-loss-free load balancing,
            as DeepSeek-V3): experts are ranked by ``score + bias`` (in float32) instead of by
            logit, while the weights stay the unbiased scores. It receives no gradient. Ties
            (also scores that round to one float32 value, e.g. saturated sigmoids, which the
            logits would have ordered) go to the lower expert id; a NaN ranks as -inf. Where two experts' biased scores
            lie within float32 rounding of each other, the kernel (its own exp) and the
            reference may pick differently.
        n_group, topk_group, group_score: group-limited routing (DeepSeek-V2/V3). The E
            experts form ``n_group`` groups of ``E // n_group`` consecutive ids; each token
            keeps its ``topk_group`` best groups and picks its k experts among theirs only
            (``k <= topk_group * E // n_group``). A group is scored on the ranking scores
            (``score + bias``, or the scores without a bias) by its best expert
            (``group_score="max"``, DeepSeek-V2) or the sum of its best two (``"top2"``,
            DeepSeek-V3; groups of at least 2). Groups tie to the lower index (also scores
            that round to one float32 value, e.g. saturated sigmoids, as in DeepSeek's own
            gate), a NaN counts as -inf (so does a group whose +inf and -inf sum to NaN); group
            scores within float32 rounding of each other may be ordered differently by the
            kernel and the reference, as biased scores. The default (one group, or
            ``topk_group=None``: every group) limits nothing.
            DeepSeek-V3: ``score="sigmoid", renormalize=True, bias=b, n_group=8,
            topk_group=4`` over E = 256, k = 8.

    Returns a :class:`RoutingPlan` with ``N = T * k`` rows; ``plan.weights`` and
    ``plan.topk_weights`` carry gradients to ``logits``. No host synchronisation.

    Example::

        plan = topk_route(router(x), k=2, renormalize=True)
        rows = x[plan.token_idx]          # [T*k, D], expert-sorted
    """
    k, block_m, n_group, topk_group, code = _validate_topk(logits, k, score, block_m, renormalize, bias, n_group,
                                                           topk_group, group_score)
    if not use_triton(logits, op="topk_route"):  # float64 (gradcheck): the reference
        return topk_route_reference(logits, k, score=score, renormalize=renormalize, block_m=block_m, bias=bias,
                                    n_group=n_group, topk_group=topk_group, group_score=group_score)
    T, E = logits.shape
    op = _topk_route_op if traced(logits, *(() if bias is None else (bias,))) else _TopkRouteFunction.run
    w, sw, ids, tok, pair, inv, counts, offsets, padded, bexp, brow = op(
        logits, bias, k, _SCORES[score], bool(renormalize), block_m, n_group, topk_group, code)
    return RoutingPlan(
        token_idx=tok, weights=sw, expert_counts=counts, expert_offsets=offsets, padded_offsets=padded,
        block_expert=bexp, block_row=brow, num_tokens=T, num_experts=E, block_m=block_m, top_k=k,
        topk_ids=ids, topk_weights=w, pair_idx=pair, inverse=inv,
    )


def plan_from_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, *,
                   block_m: int = 64) -> RoutingPlan:
    """The token-choice :class:`RoutingPlan` of top-k choices the caller already made (e.g. a
    Hugging Face router's ``top_k_index`` and ``top_k_weights``), as :func:`topk_route` builds it.

    Args:
        topk_ids: ``[T, K]`` int32 or int64 expert ids, each in ``[0, num_experts)``;
            ``1 <= K <= num_experts``, ``T >= 1`` (as :func:`topk_route`, which refuses T = 0).
        topk_weights: ``[T, K]`` combine weights (fp32, bf16, fp16; float64 runs the reference
            and keeps float64), used as given: no softmax, no renormalisation.
        num_experts: E, ``>= 1``.
        block_m: rows per block of the grouped matmul that will consume the plan (power of two).

    Returns a :class:`RoutingPlan` with ``N = T * K`` rows in :func:`topk_route`'s order:
    expert-major, then token, then slot (stable). ``plan.topk_ids`` is the ids as int32,
    ``plan.topk_weights`` the weights as float32 (float64 stays; the caller's tensor itself when it
    is already float32 and contiguous); ``plan.weights`` (sorted) and ``plan.topk_weights`` carry
    gradients to ``topk_weights`` (the sorted one's backward is a gather through
    ``plan.inverse``: deterministic). The ids get none.

    * Duplicate ids within a token's row are allowed: the token gets one row per slot for
      that expert (slot order), each with its own weight, and the plan stays a permutation.
    * Ids outside ``[0, E)`` fail a device-side assertion (``torch._assert_async``: raised at
      once on the CPU; on CUDA reported asynchronously as a device-side assert, after which the
      process's CUDA context is unusable). Until it is reported, every backend clamps them into
      ``[0, E)``, so no kernel reads or writes out of bounds.

    No host synchronisation on the kernel path (CUDA, or the CPU under ``TRITON_INTERPRET=1``).

    Example::

        logits = hf_router(x)                                   # [T, E]
        w, ids = torch.topk(logits.softmax(-1), k=2)            # the model's own choice
        plan = plan_from_topk(ids, w / w.sum(-1, keepdim=True), logits.shape[1])
        rows = x[plan.token_idx]                                # [T*2, D], expert-sorted
    """
    T, K, E, block_m = _validate_plan_from_topk(topk_ids, topk_weights, num_experts, block_m)
    if not use_triton(topk_weights, topk_ids, op="plan_from_topk"):  # float64 weights: the reference
        _assert_ids_in_range(topk_ids, E)
        return _plan_from_topk_reference(topk_ids, topk_weights, E, block_m)
    w = topk_weights.to(torch.float32).contiguous()
    ids = topk_ids.contiguous()
    op = _plan_from_topk_op if traced(ids, w) else _PlanFromTopkFunction.run
    sw, ids32, tok, pair, inv, counts, offsets, padded, bexp, brow = op(ids, w, E, block_m)
    return RoutingPlan(
        token_idx=tok, weights=sw, expert_counts=counts, expert_offsets=offsets, padded_offsets=padded,
        block_expert=bexp, block_row=brow, num_tokens=T, num_experts=E, block_m=block_m, top_k=K,
        topk_ids=ids32, topk_weights=w, pair_idx=pair, inverse=inv,
    )


def expert_choice_route(logits: torch.Tensor, capacity_factor: float = 2.0, *, score: str = "softmax",
                        block_m: int = 64) -> RoutingPlan:
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top C tokens.

    ``C = ceil(T * capacity_factor / E)`` (clamped to ``[1, T]``); a token may be picked by
    several experts or none. Probabilities are the softmax over experts (or sigmoid) per
    token; each expert ranks tokens by its probability, ties to the lower token index.

    Args:
        logits: ``[T, E]`` router logits.
        capacity_factor: average experts per token (Zhou et al. use 2).
        score: ``"softmax"`` or ``"sigmoid"``.
        block_m: rows per block of the consuming grouped matmul.

    Returns a :class:`RoutingPlan` with ``N = E * C`` rows, each expert's tokens in
    increasing order; ``plan.weights`` (the selected probabilities) carry gradients.

    Example::

        plan = expert_choice_route(router(x), capacity_factor=2.0)
    """
    C, block_m = _validate_ec(logits, capacity_factor, score, block_m)
    if not use_triton(logits, op="expert_choice_route"):
        return expert_choice_route_reference(logits, capacity_factor, score=score, block_m=block_m)
    T, E = logits.shape
    op = _expert_choice_op if traced(logits) else _ExpertChoiceFunction.run
    w, tok, counts, offsets, padded, bexp, brow = op(logits, C, _SCORES[score], block_m)
    return RoutingPlan(
        token_idx=tok, weights=w, expert_counts=counts, expert_offsets=offsets, padded_offsets=padded,
        block_expert=bexp, block_row=brow, num_tokens=T, num_experts=E, block_m=block_m, capacity=C,
    )


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x [R, L]``, the k largest values in increasing position order.

    Returns ``(indices [R, k] int32, values [R, k])``; values are differentiable. Ties go to
    the lower position, NaN ranks lowest. Exactly k per row.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise TypeError("x must be a 2-D floating-point torch.Tensor [R, L]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must have R >= 1 and L >= 1, got {tuple(x.shape)}")
    k = _check_int(k, "k", 1, x.shape[1])
    if not use_triton(x, op="topk_rows"):
        return topk_rows_reference(x, k)
    val, idx = (_topk_rows_op if traced(x) else _TopkRowsFunction.run)(x, k)
    return idx, val


def mod_select(scores: torch.Tensor, capacity: float = 0.125, *, k: int | None = None) -> MoDSelection:
    """Mixture-of-Depths selection: per sequence, the top ``k = ceil(capacity * S)`` positions.

    Args:
        scores: ``[B, S]`` router scores (any float dtype).
        capacity: fraction of positions that enter the block, in ``(0, 1]`` (paper: 0.125).
        k: explicit count (overrides ``capacity``), ``1 <= k <= S``.

    Returns a :class:`MoDSelection`: ``indices [B, k]`` int32 in increasing position order
    (causal order preserved), ``weights [B, k]`` the selected scores (differentiable).
    Exactly k per row; ties go to the lower position in every backend.

    Example::

        sel = mod_select(router(x).squeeze(-1), capacity=0.125)
    """
    k = _validate_mod(scores, capacity, k)
    idx, w = topk_rows(scores, k)
    return MoDSelection(indices=idx, weights=w)
