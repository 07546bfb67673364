"""Fused TopK encoder: ``pre = x @ weight.T + bias``, keep the k largest per token, ReLU them.

The [B, n] pre-activations are never written to memory. The Triton kernel runs one program per
(token block, latent split): it computes [BLOCK_B, BLOCK_N] tiles of ``pre`` with ``tl.dot`` over
m (fp32 accumulation), keeps the best K_PAD = next_pow2(k) candidates per token as packed int64
keys (``_topk.fold_tile``: insertion, no sort), and writes them; a second stage merges the
candidates of all splits into the final k. The grid follows the compiled kernel's occupancy
(``_topk.latent_splits``). The CPU path computes ``pre`` a block of latents at a time with one GEMM per block into a
reused buffer and keeps a running top-k, so its extra memory is O(B * block) instead of O(B * n).
On a CPU with bf16 matrix units, bf16 operands (and fp32 ones on large enough shapes) go through a
bf16 GEMM that only picks candidates: they are rescored in fp32, and a bound proves the k kept
beat every other latent, else the token takes the fp32 GEMM (``_bf16_candidates_forward``,
``_fp32_candidates_forward``). Ties go to the lower latent id on every backend.

On CUDA the Triton backend runs one of three strategies per shape, picked by ``encode_strategy``
from one table (``ENCODE_MEASURED``: GPU measurements; ``ENCODE_PREDICTED``: what the H100
roofline and the compiled kernel's SASS predict, with the prediction written next to each row):
``"fused"`` (the kernel above), ``"chunked"`` (``_chunked_forward``: cuBLAS
``x @ W[chunk].T`` in fp32, then one selection pass per chunk that adds the bias, packs keys and
folds them into running candidates kept across chunks, by insertion (``_select_kernel``) or by
threshold, append and sort (``_select_buffer_kernel``); extra memory bounded by
``CHUNK_TILE_ELEMS``) or, for large k, ``"threshold"`` (``_threshold_forward``: cuBLAS on whole
rows, a block of tokens at a time, then ``_threshold_select_kernel``: a
sample of each row gives a floor below its k-th value, one read of the row appends what is above
the floor to a small buffer, and exact counts over that buffer find the k-th value). All follow
the package's one NaN order and lowest-id tie rule, so the choice changes speed only.

Backward (only through the selected entries with positive pre-activation, as ReLU dictates):
``grad x`` is a sparse decode of the masked gradient against ``weight``, ``grad weight`` touches
only the active rows (row idx += g * x[token]), ``grad bias`` is a scatter-add; all three reuse the
decoder's kernels and CPU routines in :mod:`topk_kernels.sparse_decode`. On the CPU path with k a
large share of n (``_common.dense_pays``: k >= n/8 and B * k >= n) the gradient goes through dense
[tokens, n] tiles and GEMMs instead (``_common.dense_decode``, ``dense_grad_weight``).

All of it (kernel, CPU path, ``torch.library`` registration with fake and autograd) lives here,
like the decoder.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._common import (
    DENSE_BACKWARD_SHARE,
    HAS_TRITON,
    INTERPRET,
    check_bias,
    check_float,
    check_k,
    check_matrix,
    check_same_device,
    compute_dtype,
    define_op,
    dense_decode,
    dense_grad_weight,
    dense_pays,
    grad_bias,
    launch_options,
    on_device,
    pairs_dot,
    pow2,
    resolve_backend,
    rows_dot,
    unused_grad,
)
from ._topk import (
    ALIGN,
    MIN_KEY_VALUE,
    _exact_topk,
    _unordered_topk,
    candidate_buffer,
    cpu_tile,
    latent_splits,
    merge_candidates,
    resident_ctas,
    tensor_core_generation,
    token_blocked_topk,
)
from .sparse_decode import (
    WHOLE_WIDEN_ELEMS,
    torch_grad_weight as decode_torch_grad_weight,
    triton_grad_weight as decode_triton_grad_weight,
    torch_forward as decode_torch_forward,
    triton_forward as decode_triton_forward,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._topk import CANONICAL_NAN, MIN_KEY, REMOVED, empty_slots, fold_tile, ordered_bits, pack_key

    # The launcher's occupancy query (``resident_ctas``) compiles the kernel before it knows the
    # split count, so the query's build is the launch's only if nothing specialised depends on it:
    # TILES_PER_SPLIT is not specialised (==1, divisible by 16; the same SASS at the benchmark
    # shapes), and C, the candidates' row stride, is always a multiple of 16 (``candidate_buffer``).
    # Left unspecialised, C cost 24-144 SASS instructions (scalar stores), and 2-7 % in the sm_80
    # expander encoder's main loop.
    @triton.jit(do_not_specialize=["TILES_PER_SPLIT"])
    def _encode_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, cand_ptr,
        B, N, M, TILES_PER_SPLIT, C,
        HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
        K_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, CAST_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Program (token block, latent split): the split's top K_PAD keys per token -> cand[:, split]."""
        pid_b = tl.program_id(0)
        split = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        x_rows = offs_b.to(tl.int64) * M
        running = empty_slots(BLOCK_B, K_PAD)
        n_first = split * TILES_PER_SPLIT * BLOCK_N
        for t in range(0, TILES_PER_SPLIT):
            offs_n = n_first + t * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            w_rows = offs_n.to(tl.int64) * M
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for m0 in range(0, M, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                mask_m = offs_m < M
                xt = tl.load(x_ptr + x_rows[:, None] + offs_m[None, :],
                             mask=mask_b[:, None] & mask_m[None, :], other=0.0)
                # Rows of weight are contiguous along m: load [BLOCK_N, BLOCK_M] coalesced, then
                # transpose in registers.
                wt = tl.load(w_ptr + w_rows[:, None] + offs_m[None, :],
                             mask=mask_n[:, None] & mask_m[None, :], other=0.0)
                if DOT_DTYPE == "bf16":  # mixed dtypes: the narrower type feeds the tensor cores
                    xt = xt.to(tl.bfloat16)
                    wt = wt.to(tl.bfloat16)
                elif DOT_DTYPE == "fp16":
                    xt = xt.to(tl.float16)
                    wt = wt.to(tl.float16)
                if CAST_FP32:  # the interpreter multiplies bf16/fp16 dot operands wrongly
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(xt, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            running = fold_tile(running, acc, offs_n, mask_n)
        out = cand_ptr + offs_b.to(tl.int64)[:, None] * C + split * K_PAD + tl.arange(0, K_PAD)[None, :]
        tl.store(out, running, mask=mask_b[:, None])


    # Not specialised on the split count's integers, so that the occupancy query's build (SPLITS=1,
    # C=K_PAD) is the launch's. The cost in the SASS: at K_PAD=2 on sm_90, 48 registers (10 CTAs an
    # SM) where a launch of one tile a split (TILES_PER_SPLIT == 1, a constexpr) took 38 (12 CTAs);
    # at K_PAD=8 on sm_80, 24 instructions outside the loop.
    @triton.jit(do_not_specialize=["TILES_PER_SPLIT", "SPLITS", "C"])
    def _select_kernel(
        pre_ptr, bias_ptr, run_ptr,
        B, NC, ID0, TILES_PER_SPLIT, SPLITS, C,
        HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
    ):
        """Chunked strategy, program (token block, split): fold the split's tiles of one chunk of
        fp32 pre-activations [B, NC] (latent ids ID0 + column) into its running candidates, kept
        in ``run[:, split * K_PAD:]`` between chunks. A split takes tiles split, split + SPLITS, ...
        of every chunk, so its ids only grow, as ``fold_tile`` needs."""
        pid_b = tl.program_id(0)
        split = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        slots = run_ptr + offs_b.to(tl.int64)[:, None] * C + split * K_PAD + tl.arange(0, K_PAD)[None, :]
        running = tl.load(slots, mask=mask_b[:, None], other=0)
        rows = pre_ptr + offs_b.to(tl.int64)[:, None] * NC
        for t in range(0, TILES_PER_SPLIT):
            offs_n = (split + t * SPLITS) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < NC
            pre = tl.load(rows + offs_n[None, :], mask=mask_b[:, None] & mask_n[None, :], other=0.0)
            if HAS_BIAS:
                pre += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            running = fold_tile(running, pre, ID0 + offs_n, mask_n)
        tl.store(slots, running, mask=mask_b[:, None])


    @triton.jit
    def _half_clean(x, LOG_N: tl.constexpr, J: tl.constexpr):
        """One compare-exchange stage of a bitonic merge on the int64 vector x of 2**LOG_N keys:
        x[i] and x[i + 2**J] (bit J of i clear) swap so that the smaller comes first. The pair
        is axis 1 of a [2**(LOG_N-1-J), 2, 2**J] view; XOR of the pair with either gives the
        other."""
        y = tl.reshape(x, [2 ** (LOG_N - 1 - J), 2, 2 ** J])
        other = tl.xor_sum(y, axis=1, keep_dims=True) ^ y
        second = (tl.arange(0, 2) == 1)[None, :, None]
        y = tl.where(second, tl.maximum(y, other), tl.minimum(y, other))
        return tl.reshape(y, [2 ** LOG_N])


    @triton.jit
    def _merge_bitonic(x, LOG_N: tl.constexpr):
        """Sort ascending the int64 vector x of 2**LOG_N keys, which must be bitonic (falling
        then rising, or the reverse): LOG_N half-cleaners, against LOG_N * (LOG_N + 1) / 2
        stages for a full sort."""
        for j in tl.static_range(LOG_N):
            x = _half_clean(x, LOG_N, LOG_N - 1 - j)
        return x


    @triton.jit
    def _flush(buf, count, K_PAD: tl.constexpr, SPARE: tl.constexpr):
        """``_select_buffer_kernel``'s flush of one buffer (see there): merge the best K_PAD of the
        ``count - K_PAD`` appended keys into the K_PAD held ones, store them sorted ascending,
        empty the spare slots; returns the held keys. The barriers order this program's global
        stores between its lanes: appends before the loads, the rewrite before later appends."""
        tl.debug_barrier()
        held_at = tl.arange(0, K_PAD)
        spare_at = K_PAD + tl.arange(0, SPARE)
        held = tl.load(buf + held_at)
        best = tl.sort(tl.load(buf + spare_at, mask=spare_at < count, other=MIN_KEY), descending=True)
        if SPARE > K_PAD:  # sorted descending: each column's maximum is its top row
            best = tl.max(tl.reshape(best, [SPARE // K_PAD, K_PAD]), axis=0)
        held = _merge_bitonic(tl.maximum(held, best), K_PAD.bit_length() - 1)
        tl.store(buf + held_at, held)
        tl.store(buf + spare_at, tl.full([SPARE], MIN_KEY, tl.int64))
        tl.debug_barrier()
        return held


    @triton.jit
    def _row_pre(pre_row, bias_ptr, offs, valid, HAS_BIAS: tl.constexpr):
        """One row's fp32 pre-activations plus the bias at ``offs``; 0 where not ``valid``;
        ``valid=None``: all are loaded."""
        if valid is None:
            pre = tl.load(pre_row + offs)
            if HAS_BIAS:
                pre += tl.load(bias_ptr + offs).to(tl.float32)
        else:
            pre = tl.load(pre_row + offs, mask=valid, other=0.0)
            if HAS_BIAS:
                pre += tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        return pre

    # The split count reaches this kernel only as SPLIT_STRIDE = SPLITS * BLOCK_N, a multiple of 16
    # at every split count: passed as such, SPLITS == 1 would be specialised (a constexpr), and the
    # occupancy query, made before the split count is known, would compile a build that a launch
    # with more splits does not run. TILES_PER_SPLIT is not specialised for the same reason.
    @triton.jit(do_not_specialize=["TILES_PER_SPLIT"])
    def _select_buffer_kernel(
        pre_ptr, bias_ptr, cand_ptr, state_ptr,
        NC, ID0, TILES_PER_SPLIT, SPLIT_STRIDE,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, SPARE: tl.constexpr,
        FINAL: tl.constexpr, AHEAD: tl.constexpr,
    ):
        """Chunked strategy at large K_PAD, program (token, split): threshold, append, merge. A
        split ranks the chunk's tiles split, split + SPLITS, ... (SPLIT_STRIDE latents apart).

        Per (token, split), a buffer of K_PAD + SPARE int64 keys in ``cand`` (SPARE =
        max(K_PAD, BLOCK_N)) and two int32 in ``state`` persist across chunks: the number of keys
        held, and the threshold (the ordered bits of the K_PAD-th best key at the last flush,
        INT32_MIN before any). Slots [0, K_PAD) hold the best K_PAD keys of the last flush sorted
        ascending (at the start, the empty keys MIN_KEY + slot, and count = K_PAD); slots from
        K_PAD on collect appends. A tile's entries whose value beats the threshold are appended (a
        prefix sum gives their slots; a tile where nothing enters costs one compare per entry and
        no store). When a tile would overflow the buffer, only the appended keys are sorted
        (descending; past K_PAD of them only their best K_PAD matter), the elementwise maximum
        with the held keys is the best K_PAD of both (the i-th worst held against the i-th best
        appended) as a bitonic sequence, and LOG2(K_PAD) half-cleaners sort it: about half the
        compare-exchanges of sorting all K_PAD + SPARE keys. The threshold rises to the worst
        kept key and the appended slots are emptied, so stage 2 never sees a key twice.

        An entry dropped by the threshold is beaten by K_PAD keys already held: a lower value,
        or an equal value with a higher id (tiles come in increasing id order). So the buffer
        always holds the split's exact top K_PAD, and stage 2 merges buffers. Cost per row: about
        9-11 flushes over a whole row of 131072 latents, where insertion (``_select_kernel``)
        makes K_PAD * (1 + ln(n / K_PAD)) passes of O(K_PAD) each. A flush leaves SPARE >= BLOCK_N
        free slots, room for a tile. FINAL (the launcher's last launch, with no tiles) flushes what is
        left: the split's exact top K_PAD in slots [0, K_PAD), sorted ascending, and nothing in
        the spare slots.
        """
        row = tl.program_id(0)
        split = tl.program_id(1)
        slot = row.to(tl.int64) * (SPLIT_STRIDE // BLOCK_N) + split
        buf = cand_ptr + slot * (K_PAD + SPARE)
        count = tl.load(state_ptr + slot * 2)
        threshold = tl.load(state_ptr + slot * 2 + 1)
        pre_row = pre_ptr + row.to(tl.int64) * NC
        # AHEAD (``SELECT_AHEAD``): each trip loads the next tile before it ranks this one, so a
        # program keeps two tiles' loads in flight where it had one (the loop is latency-bound:
        # RESULTS.md, "The chunked selection, one tile ahead"). Off, for A/B runs on a GPU.
        offs_n = split * BLOCK_N + tl.arange(0, BLOCK_N)
        ahead = _row_pre(pre_row, bias_ptr, offs_n, offs_n < NC, HAS_BIAS)
        for t in range(0, TILES_PER_SPLIT):
            mask_n = offs_n < NC
            if AHEAD:
                pre = ahead
                offs_next = offs_n + SPLIT_STRIDE
                ahead = _row_pre(pre_row, bias_ptr, offs_next, offs_next < NC, HAS_BIAS)
            else:
                pre = _row_pre(pre_row, bias_ptr, offs_n, mask_n, HAS_BIAS)
            bits = tl.where(mask_n, ordered_bits(pre), REMOVED)
            enters = bits > threshold
            n_new = tl.sum(enters.to(tl.int32), axis=0)
            if n_new > 0:
                if count + n_new > K_PAD + SPARE:
                    held = _flush(buf, count, K_PAD, SPARE)
                    count = K_PAD
                    threshold = (tl.min(held, axis=0) >> 32).to(tl.int32)
                    enters = bits > threshold
                    n_new = tl.sum(enters.to(tl.int32), axis=0)
                at = count + tl.cumsum(enters.to(tl.int32), axis=0) - 1
                tl.store(buf + at, pack_key(bits, ID0 + offs_n), mask=enters)
                count += n_new
            offs_n += SPLIT_STRIDE
        if FINAL:
            if count > K_PAD:
                _flush(buf, count, K_PAD, SPARE)
                count = K_PAD
        tl.store(state_ptr + slot * 2, count)
        tl.store(state_ptr + slot * 2 + 1, threshold)


    @triton.jit
    def _row_bits(pre_row, bias_ptr, offs, valid, HAS_BIAS: tl.constexpr):
        """Ordered bits (``_topk.ordered_bits``) of one row's pre-activations plus the bias at
        ``offs``; REMOVED (below every real value) where not ``valid``; ``valid=None``: all are."""
        bits = ordered_bits(_row_pre(pre_row, bias_ptr, offs, valid, HAS_BIAS))
        if valid is not None:
            bits = tl.where(valid, bits, REMOVED)
        return bits


    @triton.jit
    def _pick(values, j, i: tl.constexpr):
        """values[i] of a small vector (j = its arange) as a scalar."""
        return tl.sum(tl.where(j == i, values, 0), axis=0)


    @triton.jit
    def _append(bits, offs, floor, counter, buf_row, BUF):
        """Append the keys of the entries at or above ``floor`` to ``buf_row`` (at most BUF),
        slots from the row's counter."""
        keep = bits >= floor
        slot = tl.atomic_add(counter + offs * 0, 1, mask=keep, sem="relaxed")
        tl.store(buf_row + slot, pack_key(bits, offs), mask=keep & (slot < BUF))


    @triton.jit
    def _step_bits(pre_row, bias_ptr, start, lane, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """One whole step of the threshold kernel's read: the ordered bits of eight tiles of BLOCK
        entries from ``start``, loaded without masks, all before any is used (ptxas serialises
        masked loads: a zeroed register, then a predicated load into it), and their offsets."""
        o0, o1, o2, o3 = start + lane, start + BLOCK + lane, start + 2 * BLOCK + lane, start + 3 * BLOCK + lane
        o4, o5, o6, o7 = o0 + 4 * BLOCK, o1 + 4 * BLOCK, o2 + 4 * BLOCK, o3 + 4 * BLOCK
        b0, b1 = _row_bits(pre_row, bias_ptr, o0, None, HAS_BIAS), _row_bits(pre_row, bias_ptr, o1, None, HAS_BIAS)
        b2, b3 = _row_bits(pre_row, bias_ptr, o2, None, HAS_BIAS), _row_bits(pre_row, bias_ptr, o3, None, HAS_BIAS)
        b4, b5 = _row_bits(pre_row, bias_ptr, o4, None, HAS_BIAS), _row_bits(pre_row, bias_ptr, o5, None, HAS_BIAS)
        b6, b7 = _row_bits(pre_row, bias_ptr, o6, None, HAS_BIAS), _row_bits(pre_row, bias_ptr, o7, None, HAS_BIAS)
        return b0, b1, b2, b3, b4, b5, b6, b7, o0, o1, o2, o3, o4, o5, o6, o7


    @triton.jit
    def _read_atomic(pre_row, bias_ptr, buf_row, counter, floor, N, BUF, HAS_BIAS: tl.constexpr,
                     BLOCK: tl.constexpr):
        """The threshold kernel's read with slots from the row's atomic counter (zero before):
        appends the keys of every entry at or above ``floor`` to ``buf_row`` (at most BUF) and
        returns how many there were. Whole steps of eight tiles (each append waits for its
        atomic, so all eight loads go first), then the rest a tile at a time."""
        lane = tl.arange(0, BLOCK)
        whole = N // (8 * BLOCK) * (8 * BLOCK)
        for start in range(0, whole, 8 * BLOCK):
            b0, b1, b2, b3, b4, b5, b6, b7, o0, o1, o2, o3, o4, o5, o6, o7 = _step_bits(
                pre_row, bias_ptr, start, lane, HAS_BIAS, BLOCK)
            _append(b0, o0, floor, counter, buf_row, BUF)
            _append(b1, o1, floor, counter, buf_row, BUF)
            _append(b2, o2, floor, counter, buf_row, BUF)
            _append(b3, o3, floor, counter, buf_row, BUF)
            _append(b4, o4, floor, counter, buf_row, BUF)
            _append(b5, o5, floor, counter, buf_row, BUF)
            _append(b6, o6, floor, counter, buf_row, BUF)
            _append(b7, o7, floor, counter, buf_row, BUF)
        for start in range(whole, N, BLOCK):
            offs = start + lane
            _append(_row_bits(pre_row, bias_ptr, offs, offs < N, HAS_BIAS), offs, floor, counter, buf_row, BUF)
        tl.debug_barrier()  # every lane's appends (and their stores) before the count is read
        return tl.atomic_add(counter, 0, sem="relaxed")


    @triton.jit
    def _put(bits, offs, keep, slot, buf_row, BUF):
        """Store the keys of the entries ``keep`` (0 / 1) at their ``slot`` of ``buf_row`` (below BUF)."""
        tl.store(buf_row + slot, pack_key(bits, offs), mask=(keep > 0) & (slot < BUF))


    @triton.jit
    def _read_scan(pre_row, bias_ptr, buf_row, floor, N, BUF, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """``_read_atomic`` without atomics: the program owns its row, so a lane's slots are the
        count so far plus an exclusive scan, across lanes, of how many of its entries each lane
        keeps: one scan and one sum a step of eight tiles (in lane order, then tile order within
        a lane) where the counter took one L2 round trip a tile with any entry kept."""
        lane = tl.arange(0, BLOCK)
        whole = N // (8 * BLOCK) * (8 * BLOCK)
        count = N * 0
        for start in range(0, whole, 8 * BLOCK):
            b0, b1, b2, b3, b4, b5, b6, b7, o0, o1, o2, o3, o4, o5, o6, o7 = _step_bits(
                pre_row, bias_ptr, start, lane, HAS_BIAS, BLOCK)
            k0, k1, k2, k3 = (b0 >= floor).to(tl.int32), (b1 >= floor).to(tl.int32), (b2 >= floor).to(
                tl.int32), (b3 >= floor).to(tl.int32)
            k4, k5, k6, k7 = (b4 >= floor).to(tl.int32), (b5 >= floor).to(tl.int32), (b6 >= floor).to(
                tl.int32), (b7 >= floor).to(tl.int32)
            kept = k0 + k1 + k2 + k3 + k4 + k5 + k6 + k7
            s0 = count + tl.cumsum(kept, axis=0) - kept
            s1, s2, s3 = s0 + k0, s0 + k0 + k1, s0 + k0 + k1 + k2
            s4 = s3 + k3
            s5, s6, s7 = s4 + k4, s4 + k4 + k5, s4 + k4 + k5 + k6
            _put(b0, o0, k0, s0, buf_row, BUF)
            _put(b1, o1, k1, s1, buf_row, BUF)
            _put(b2, o2, k2, s2, buf_row, BUF)
            _put(b3, o3, k3, s3, buf_row, BUF)
            _put(b4, o4, k4, s4, buf_row, BUF)
            _put(b5, o5, k5, s5, buf_row, BUF)
            _put(b6, o6, k6, s6, buf_row, BUF)
            _put(b7, o7, k7, s7, buf_row, BUF)
            count += tl.sum(kept, axis=0)
        for start in range(whole, N, BLOCK):
            offs = start + lane
            bits = _row_bits(pre_row, bias_ptr, offs, offs < N, HAS_BIAS)
            keep = (bits >= floor).to(tl.int32)
            _put(bits, offs, keep, count + tl.cumsum(keep, axis=0) - keep, buf_row, BUF)
            count += tl.sum(keep, axis=0)
        return count


    @triton.jit
    def _stamp(timers_row, at: tl.constexpr, TIMERS: tl.constexpr):
        """With TIMERS, the SM's cycle counter after a barrier (so after the work before it) into
        ``timers_row[at]``; nothing otherwise. For phase timing (benchmarks/threshold_phases.py)."""
        if TIMERS:
            tl.debug_barrier()
            now = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False,
                                            pack=1)
            tl.store(timers_row + at, now)


    @triton.jit
    def _threshold_select_kernel(
        pre_ptr, bias_ptr, out_ptr, scratch_ptr, buf_ptr, count_ptr, timers_ptr,
        N, k, BUF,
        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, SAMPLE: tl.constexpr, SAMPLE_TOP: tl.constexpr,
        PROBES: tl.constexpr, CAP: tl.constexpr, SPREAD: tl.constexpr, APPEND_SCAN: tl.constexpr,
        TIMERS: tl.constexpr,
    ):
        """Threshold strategy, one program per token: the row's exact top k of its N fp32
        pre-activations (plus bias) -> ``out[row, :k]`` as packed keys, in no particular order.

        Everything is decided on ordered bits, so the NaN order and the tie rule are the package's.
          1. Sample: the best SAMPLE_TOP of the first SAMPLE entries, sorted. About
             mu = k * SAMPLE / N of them lie at or above the k-th best value T. Probes: PROBES - 1
             sample entries at ranks mu - 1 + (0, +-1, +-2, +-4, ...) * SPREAD * (sqrt(mu) + 1),
             and the central one's bits + 1 (a row where that value ties many times then brackets
             at once). The lowest probe, the floor, is below T unless the sample misleads by over
             4 * SPREAD of its standard deviations (a smaller SPREAD appends fewer entries and
             brackets tighter, and falls back to the row more often).
          2. One read of the row appends every entry at or above the floor to ``buf`` as a key.
             With APPEND_SCAN, slots come from a scan across the program's lanes (the row is this
             program's alone: the count stays in a register, no atomic and no L2 round trip a
             tile); else from a relaxed atomic counter per row (in no particular order; its
             final value is how many).
          3. If that holds at least k and at most BUF entries, it holds T and everything above:
             the rest runs on ``buf`` (a few thousand keys, in L2), not on the row. Else (rare:
             a misleading sample, or many ties at the floor) the row is the source. The k-th best
             value lies in a bracket [lo, hi) of bits with exact counts c(lo) = #(bits >= lo) >= k
             > c(hi) (from [floor, above +NaN) with c = the entries buffered and 0, or
             [INT32_MIN, above +NaN) with N and 0). While more than CAP entries lie in it and
             it holds more than one value, a counting pass over the source counts the entries at
             or above each of PROBES probes (the sample's first, then lo + 1 and evenly spaced
             bits in the bracket: about PROBES times narrower each pass) and keeps the tightest
             bracket.
          4. Compaction over the source: entries at or above hi fill ``out[row, :c(hi)]``; the
             bracket's (at most CAP) go to ``scratch``, which is sorted as keys, and its best
             k - c(hi) follow. A bracket of one value and more than CAP ties is taken from the
             row in index order instead: its first k - c(hi) entries (ties to the lower id).
        So the usual row is read once (plus its sample); no host sync. The result does not depend
        on the atomics' order: the slots hold a set, ranked by keys. One scan per compaction tile
        ranks both kinds of entry (in its low and high 16 bits: BLOCK <= 2**15). BLOCK should be
        32 * num_warps: one entry per lane keeps loads, atomics and scattered stores in one layout.
        TIMERS (benchmarks only) writes the cycle counter at the phases' ends into
        ``timers[row, 0:6]``, then the passes and the entries buffered into slots 6 and 7.
        """
        tl.static_assert(PROBES == 8, "the counting pass keeps eight accumulators")
        row = tl.program_id(0)
        timers_row = timers_ptr + row.to(tl.int64) * 8
        _stamp(timers_row, 0, TIMERS)
        pre_row = pre_ptr + row.to(tl.int64) * N
        out_row = out_ptr + row.to(tl.int64) * k
        cand_row = scratch_ptr + row.to(tl.int64) * CAP
        buf_row = buf_ptr + row.to(tl.int64) * BUF
        # 1. Sample.
        at = tl.arange(0, SAMPLE)
        sample = tl.topk(_row_bits(pre_row, bias_ptr, at, at < N, HAS_BIAS), SAMPLE_TOP)
        # tl.cast, not .to: Triton specialises an int argument equal to 1 into a constant.
        mu = tl.cast(k, tl.float32) * tl.cast(tl.minimum(N, SAMPLE), tl.float32) / tl.cast(N, tl.float32)
        j = tl.arange(0, PROBES)
        d = (j - PROBES // 2).to(tl.float32)
        step = tl.where(d > 0, 1.0, -1.0) * tl.exp2(tl.abs(d) - 1.0)
        step = tl.where((d == 0) | (j == 0), 0.0, step)
        rank = mu - 0.5 + step * SPREAD * (tl.sqrt(mu) + 1.0)  # round(mu - 1 + step * spread)
        last = (tl.minimum(N, SAMPLE_TOP) - 1).to(tl.float32)
        rank = tl.minimum(tl.maximum(rank, 0.0), last).to(tl.int32)
        top_at = tl.arange(0, SAMPLE_TOP)
        first = tl.sum(tl.where(top_at[None, :] == rank[:, None], sample[None, :], 0), axis=1)
        first = tl.where(j == 0, first + 1, first)
        floor = tl.min(first, axis=0)
        _stamp(timers_row, 1, TIMERS)
        # 2. The read: every entry at or above the floor, appended to buf.
        counter = count_ptr + row
        lane = tl.arange(0, BLOCK)
        if APPEND_SCAN:
            buffered = _read_scan(pre_row, bias_ptr, buf_row, floor, N, BUF, HAS_BIAS, BLOCK)
        else:
            buffered = _read_atomic(pre_row, bias_ptr, buf_row, counter, floor, N, BUF, HAS_BIAS, BLOCK)
        from_buf = (buffered >= k) & (buffered <= BUF)
        size = tl.where(from_buf, buffered, N)
        _stamp(timers_row, 2, TIMERS)
        # 3. Counting passes over the source.
        lo = tl.where(from_buf, floor, -(2**31))
        hi = tl.full([], CANONICAL_NAN + 1, tl.int32)
        c_lo = size
        c_hi = N * 0
        passes = N * 0
        while (c_lo - c_hi > CAP) & (hi > lo + 1):
            lo64 = lo.to(tl.int64)
            even = (lo64 + (hi.to(tl.int64) - lo64) * j // PROBES).to(tl.int32)
            probes = tl.where(passes == 0, first, tl.where(j == 0, lo + 1, even))
            # One accumulator per probe, in the loads' own layout.
            p0, p1, p2, p3 = _pick(probes, j, 0), _pick(probes, j, 1), _pick(probes, j, 2), _pick(probes, j, 3)
            p4, p5, p6, p7 = _pick(probes, j, 4), _pick(probes, j, 5), _pick(probes, j, 6), _pick(probes, j, 7)
            a0 = tl.zeros((BLOCK,), tl.int32)
            a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
            for start in range(0, size, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                if from_buf:
                    bits = (tl.load(buf_row + offs, mask=offs < size, other=MIN_KEY) >> 32).to(tl.int32)
                else:
                    bits = _row_bits(pre_row, bias_ptr, offs, offs < N, HAS_BIAS)
                a0 += (bits >= p0).to(tl.int32)
                a1 += (bits >= p1).to(tl.int32)
                a2 += (bits >= p2).to(tl.int32)
                a3 += (bits >= p3).to(tl.int32)
                a4 += (bits >= p4).to(tl.int32)
                a5 += (bits >= p5).to(tl.int32)
                a6 += (bits >= p6).to(tl.int32)
                a7 += (bits >= p7).to(tl.int32)
            counts = tl.where(j == 0, tl.sum(a0, axis=0), tl.where(j == 1, tl.sum(a1, axis=0), tl.where(
                j == 2, tl.sum(a2, axis=0), tl.where(j == 3, tl.sum(a3, axis=0), tl.where(
                    j == 4, tl.sum(a4, axis=0), tl.where(j == 5, tl.sum(a5, axis=0), tl.where(
                        j == 6, tl.sum(a6, axis=0), tl.sum(a7, axis=0))))))))
            enough = counts >= k
            up = tl.max(tl.where(enough, probes, lo), axis=0)
            c_lo = tl.where(up > lo, tl.min(tl.where(enough & (probes == up), counts, N), axis=0), c_lo)
            lo = up
            down = tl.min(tl.where(enough, hi, probes), axis=0)
            c_hi = tl.where(down < hi, tl.max(tl.where(~enough & (probes == down), counts, 0), axis=0), c_hi)
            hi = down
            passes += 1
        _stamp(timers_row, 3, TIMERS)
        # 4. Compaction: entries at or above hi fill slots [0, c_hi), the bracket's best the rest.
        need = k - c_hi
        ties_in_order = c_lo - c_hi > CAP  # then the bracket is one value
        n_above = N * 0  # entries at or above hi so far
        n_in = N * 0  # entries in the bracket so far
        use_buf = from_buf & ~ties_in_order
        # From the buffer, each tile's keys are loaded while the tile before is ranked.
        ahead = tl.load(buf_row + lane, mask=use_buf & (lane < size), other=MIN_KEY)
        for start in range(0, tl.where(use_buf, size, N), BLOCK):
            offs = start + lane
            if use_buf:
                valid = offs < size
                keys = ahead
                ahead = tl.load(buf_row + BLOCK + offs, mask=BLOCK + offs < size, other=MIN_KEY)
                bits = (keys >> 32).to(tl.int32)
            else:
                valid = offs < N
                bits = _row_bits(pre_row, bias_ptr, offs, valid, HAS_BIAS)
                keys = pack_key(bits, offs)
            above = valid & (bits >= hi)
            inside = valid & (bits >= lo) & ~above
            flags = above.to(tl.int32) + (inside.to(tl.int32) << 16)
            ranks = tl.cumsum(flags, axis=0)  # 1-based ranks among this tile's own kind
            inside_at = n_in + (ranks >> 16) - 1
            tl.store(out_row + n_above + (ranks & 0xFFFF) - 1, keys, mask=above)
            tl.store(out_row + c_hi + inside_at, keys, mask=inside & ties_in_order & (inside_at < need))
            tl.store(cand_row + inside_at, keys, mask=inside & ~ties_in_order)
            tile = tl.sum(flags, axis=0)
            n_above += tile & 0xFFFF
            n_in += tile >> 16
        _stamp(timers_row, 4, TIMERS)
        if not ties_in_order:
            tl.debug_barrier()  # the other lanes' candidate stores before the loads
            slot = tl.arange(0, CAP)
            best = tl.sort(tl.load(cand_row + slot, mask=slot < c_lo - c_hi, other=MIN_KEY), descending=True)
            tl.store(out_row + c_hi + slot, best, mask=slot < need)
        _stamp(timers_row, 5, TIMERS)
        if TIMERS:
            tl.store(timers_row + 6, passes.to(tl.int64))
            tl.store(timers_row + 7, buffered.to(tl.int64))


# Launch configurations of the fused kernel, by K_PAD: (BLOCK_B, BLOCK_N, BLOCK_M, num_warps);
# the exact-fp32 path (FMA units) and K_PAD above the tensor-core table. The [BLOCK_B, K_PAD] int64
# running candidates stay in registers, so a wider K_PAD takes fewer tokens. K_PAD starts at 2:
# with one candidate, ptxas spilled a few bytes on sm_80 at every shape tried (sort-based kernel).
# tests/gpu_compile.py compiles every entry as launched for sm_80 / sm_90 (fp32, TF32, bf16): no spills.
ENCODE_CONFIGS = {
    2: (64, 64, 32, 8),
    4: (64, 64, 32, 8),
    8: (64, 64, 32, 8),
    16: (64, 64, 32, 8),
    32: (64, 64, 32, 8),
    64: (64, 64, 32, 8),
    128: (32, 128, 32, 8),
    256: (16, 256, 16, 8),
}
MAX_FUSED_K_PAD = max(ENCODE_CONFIGS)

# Tensor-core tiles, by (kind, K_PAD, tensor-core generation) -> (BLOCK_B, BLOCK_N, BLOCK_M,
# num_warps); 3 stages. kind: "half" (bf16/fp16 inputs), "mixed" (fp32 with one of them, multiplied
# in the half type), "tf32" (fp32 when torch.get_float32_matmul_precision() allows TF32).
# Generation 90 is sm_90's wgmma, which reads both operands from shared memory; 80 is mma.sync
# (sm_80 to sm_89), whose operand fragments take registers, so it gets half the k-step. 128 x 128
# output tiles halve the x traffic of 128 x 64 (x is re-read once per latent tile) and feed wgmma
# at n = 128; the fp32 accumulator becomes ordered int32 bits in place for ``_topk.fold_tile``,
# so no int64 key tile competes for registers. Measured in ptxas: 128 x 128 x 64 on sm_80 spilled
# 24 bytes (255 registers), 128 x 128 x 32 needs 248 and none; the fp32 operands (tf32, mixed)
# spill at 32-deep k-steps on sm_80 and not at 16; on sm_90 their 32-deep step is 128 bytes of a
# row per stage, as the half kinds' 64-deep one (and 3 stages of 128 x 64 fp32 operands would take
# 192 KiB of shared memory). The k-step is clamped to next_pow2(m). tests/gpu_compile.py compiles
# every entry as launched for sm_80 / sm_90 with 0 spills ("half" in bf16 at every K_PAD and in
# fp16 at 64; test_every_tensor_core_tile_of_the_table_is_compiled checks that no row is missed;
# benchmarks/RESULTS.md, "Encoder: tensor-core tiles, dispatch"). Other K_PAD and the exact-fp32
# path use ENCODE_CONFIGS. m is not a key: it is the GEMM loop's runtime trip count, and only
# clamps the k-step for m < 64 (a smaller tile, never more registers or shared memory).
_TC_K_PADS = (2, 4, 8, 16, 32, 64)
ENCODE_TC_TILES = {
    **{("half", kp, 90): (128, 128, 64, 8) for kp in _TC_K_PADS},
    **{("half", kp, 80): (128, 128, 32, 8) for kp in _TC_K_PADS},
    **{(kind, kp, 90): (128, 128, 32, 8) for kind in ("tf32", "mixed") for kp in _TC_K_PADS},
    **{(kind, kp, 80): (128, 128, 16, 8) for kind in ("tf32", "mixed") for kp in _TC_K_PADS},
}
# CPU path tiles: at most CPU_TILE_ELEMS fp32 pre-activations (128 MiB) exist at a time, which
# bounds the extra memory. Tiles are wide in latents and short in tokens because torch.topk costs
# less per element on long rows (measured here: 2.5 ns/element at 65536 wide, 4.3 at 8192, 15 at
# 2048); at least CPU_MIN_BLOCK_B tokens per tile keep the GEMM compute-bound.
CPU_TILE_ELEMS = 32 * 2**20
CPU_MAX_BLOCK_N = 65536
CPU_MIN_BLOCK_B = 256
# The GEMMs' tiles (``_gemm_tile``: the fp32 path's and the bf16 candidates') are smaller:
# CPU_GEMM_TILE_ELEMS pre-activations, or the weight's elements where that is more (every token
# tile reads the whole weight again), and at least CPU_GEMM_MIN_BLOCK_B tokens. With a small m the
# GEMM costs little beside the selection, which ran 2-3x faster on tiles a fraction of the size. MEASURED (fp32 path, B=1000, one thread, medians of 5,
# ms at tiles of 32 / 8 / 4 / 2 Mi; RESULTS.md, "Thirty-first session"): n=16384, k=8: m=16 47.7 /
# 31.6 / - / 18.7; m=32 51.3 / 34.7 / 21.1 / 22.3; m=64 63.7 / 51.2 / 29.4 / 29.0; m=128 75.0 /
# 63.2 / 45.6 / 45.2; m=256 94.5 / 86.8 / 77.1 / 79.9; m=512 146.7 / 141.1 / 135.9 / 144.2; m=768,
# k=32 194.3 / 190.3 / 188.3 / 211.5. n=65536, k=32: m=64 224.7 / 188.3 / 149.7 / 157.1; m=256
# 348.8 / 350.6 / 420.7 / 587.0 (64 tokens a tile re-read its 64 MiB weight 16 times: the weight
# rule gives it 16 Mi). bf16 candidates, medians of 7 interleaved, one tile of every token / this
# rule: B=1000, m=768, n=16384, k=32 77.5 / 79.7, k=8 62.3 / 66.2 (two tiles of 500: within noise);
# B=2048 158.6 / 141.9; B=4096, m=100, k=32 192.4 / 150.9; fp32 path B=1000, m=100, k=8 72.3 /
# 38.4. Half the weight's elements lost at B=1000, m=768 (87.0 and 73.6).
CPU_GEMM_TILE_ELEMS = 4 * 2**20
CPU_GEMM_MIN_BLOCK_B = 32
# fp32 elements of a narrower weight widened at a time on the CPU path (2 MiB: in L2 here).
CPU_WIDEN_ELEMS = 2**19


# Chunked path tiles: at most CHUNK_TILE_ELEMS fp32 pre-activations per GEMM (128 MiB, which the
# selection kernel reads once; on the packed-keys path (a K_PAD without a selection tile), ``pack_keys_torch``
# holds a few more tensors of that size while it runs), up to CHUNK_MAX_BLOCK_B tokens each.
# Measured on an H100 (benchmarks/encode_sweep.py, bf16 B=8192 m=2048 n=131072 k=64, RESULTS.md):
# chunks of 8192 x 4096 latents ran 10.8 ms, 8192 x 2048 11.0, 8192 x 1024 (the old 32 MiB) 11.9
# with the same selection tile; the GEMMs alone take 7.0-7.2 ms at every size.
CHUNK_TILE_ELEMS = 32 * 2**20
CHUNK_MAX_BLOCK_B = 8192
# The chunked strategy's selection, by K_PAD: (BLOCK_B, BLOCK_N, num_warps) for insertion
# (``_select_kernel``), or (1, BLOCK_N, num_warps, "buffer") for threshold-append-sort
# (``_select_buffer_kernel``); ``select_tile`` reads an entry. A K_PAD without an entry (4096 and
# up) goes through packed keys and torch.topk per chunk (on CUDA the dispatcher sends those K_PAD
# to the threshold strategy instead).
# MEASURED on an H100 (benchmarks/encode_sweep.py, bf16 B=8192 m=2048 n=131072, chunks of 8192 x
# 4096; whole strategy in ms, "dense" = cuBLAS + torch.topk beside it; RESULTS.md, "Selection tiles
# and strategies, k = 8 to 4096"):
#   k=8:    8x128x4 insertion 9.23, 1x128x1 buffer 9.32; dense 13.52.
#   k=32:   1x64x1 buffer 9.63, 1x128x1 buffer 9.68, 8x128x4 insertion 9.88; dense 13.52.
#   k=64:   1x128x1 buffer 9.63, 1x64x1 buffer 9.65, 1x128x1 insertion 9.67, 8x128x4 insertion 10.91
#           (the default until then); dense 13.51.
#   k=128:  1x128x1 buffer 9.68, 1x256x1 buffer 10.42, 8x128x4 insertion 12.09; dense 13.55.
#   k=256:  1x256x1 buffer 10.56-10.66, 1x128x1 buffer 10.73, 1x256x1 insertion 12.98, 8x256x4 19.38;
#           dense 13.66.
#   k=512:  1x256x1 buffer 13.63-13.75, 1x128x1 buffer 14.20, 1x128x1 insertion 20.17, packed keys
#           157.2; dense 13.70 (parity).
#   k=1024: 1x128x1 buffer 18.19-18.34, 1x256x1 buffer 18.71, 1x256x2 buffer 21.49; dense 13.78 (a loss).
#   k=2048: 1x256x2 buffer 32.48, 1x512x4 buffer 32.73, packed keys 272.8; dense 13.99 (a loss: the
#           sm_90 model had predicted ~15.7, off by 2x at this occupancy).
# So buffer tiles from K_PAD 32 up, insertion (8 x 128, 4 warps) at 2 to 16. At K_PAD 2048 the entry
# serves forced runs and the expander's chunked strategy; topk_encode on CUDA takes the threshold
# strategy there (below).
SELECT_CONFIGS = ({kp: (8, 128, 4) for kp in (2, 4, 8, 16)}
                  | {32: (1, 128, 1, "buffer"), 64: (1, 128, 1, "buffer"), 128: (1, 128, 1, "buffer"),
                     256: (1, 256, 1, "buffer"), 512: (1, 256, 1, "buffer"), 1024: (1, 128, 1, "buffer"),
                     2048: (1, 256, 2, "buffer")})
# Register caps (ptxas ``maxnreg``) of ``_select_buffer_kernel`` by K_PAD (both of its builds, the
# tiles' and the final flush's). Its programs are one warp and its read loop is latency-bound, so
# each more resident CTA keeps two more tiles' loads in flight. Chosen in ptxas for sm_80 and sm_90
# (registers / CTAs an SM uncapped -> capped, 0 spills; tests/gpu_compile.py checks every build):
# K_PAD 32-128: 69-72 / 28 -> 64 / 32 (the most CTAs an SM takes); 256: 96-110 / 18-21 -> 80 / 25;
# 512: 196-213 / 9-10 -> 168 / 12 (the tile one ahead had cost 28-45 registers there). The read
# loop's instructions before its first branch are the same capped or not (59-61 at K_PAD 64).
# A PREDICTION until a GPU measures it: RESULTS.md, "The chunked selection, one tile ahead".
SELECT_MAXNREG: dict[int, int] = {32: 64, 64: 64, 128: 64, 256: 80, 512: 168}
# ``_select_buffer_kernel`` loads each tile one trip ahead (its AHEAD); False only for A/B runs
# (benchmarks/encode_sweep.py --select-ab).
SELECT_AHEAD = True
# Threshold strategy blocks: whole rows, at most THRESHOLD_TILE_ELEMS fp32 pre-activations (1 GiB) a
# block. MEASURED on the H100 (bf16 B=8192 m=2048 n=131072, with bias), 512 / 1024 / 2048 tokens a
# block (64 / 128 / 256 Mi): 12.11 / 11.10 / 10.57 ms at k = 256, 15.12 / 13.51 / 12.50 at 1024,
# 18.02 / 15.82 / 14.68 at 2048, 22.12 / 19.33 / 17.99 at 4096; peak extra memory 0.9 / 1.4 / 2.4 GiB
# at k = 1024 against 4.3 GiB for cuBLAS + torch.topk with the bias added apart (16.3 ms; 13.8 with
# torch.addmm). Larger blocks make both the GEMM (7.17 -> 6.24 ms) and the selection (one program
# per token: 512 programs fill 132 SMs poorly; 6.98 -> 5.36 ms at k = 1024) faster.
THRESHOLD_TILE_ELEMS = 256 * 2**20


def _threshold_block_tokens(n: int) -> int:
    """Tokens per whole-row block of the threshold strategy: THRESHOLD_TILE_ELEMS // n, at least
    one."""
    return max(1, THRESHOLD_TILE_ELEMS // n)


# The threshold strategy's selection kernel (``_threshold_select_kernel``), one program per token:
# BLOCK = 32 * num_warps entries a tile (one per lane), at most the first SAMPLE entries as the
# sample, of which the best SAMPLE_TOP are sorted, PROBES thresholds counted per pass, at most CAP
# candidates sorted at the end. Chosen in ptxas for sm_90 (tests/gpu_compile.py; RESULTS.md,
# "Threshold strategy"): a top 128 of the sample took 107 registers, SAMPLE 4096 115, CAP 512 or
# more made ptxas serialise the read loop's eight loads; SAMPLE 2048, a top 64 and CAP 256 take 61
# registers at 8 warps (4 CTAs / 32 warps an SM) with all 16 loads of a step issued before the
# first append. The sample's bracket then often holds more than CAP entries, which costs a
# counting pass over the buffer (a few thousand keys), not over the row. MEASURED on the H100
# with the atomic read (bf16 B=8192 m=2048 n=131072, 2048 tokens a block): 4 warps (BLOCK 128)
# against 8 (BLOCK 256):
# 11.23 / 11.29 ms at k = 512, 11.93 / 12.52 at 1024, 13.22 / 14.67 at 2048, 15.93 / 17.99 at
# 4096; 16 warps lost at k >= 1024. One program is one row's serial pipeline, so 8 CTAs an SM
# (sm_90: 64 registers) keep more rows in flight than 4. ptxas then keeps two lane masks of the
# final sort in 8 bytes of local memory (stored once, loaded once a row, outside every loop); a
# spill-free build (maxnreg=72: 7 CTAs an SM) measured 18 % slower (13.98 against 11.86 ms at k =
# 1024, 18.38 / 15.87 at 4096).
# APPEND_SCAN: the read's slots from a scan across the program's lanes (1) or from the row's atomic
# counter (0: the build measured above). In the sm_90 SASS the atomic read's step (279
# instructions) chains up to eight warp-aggregated ATOMG -> SHFL -> STG (the store could alias the
# counter, so the next atomic waits for it): one L2 round trip a warp's tile with an entry kept,
# ~6.4 a step at k = 4096, ~2.4 at 512. The scan's step is 245 instructions, no atomic, 5 barriers
# (64 registers, a 4-byte spill, 8 CTAs an SM). PREDICTION, not measured (RESULTS.md, "The
# threshold read without atomics"): the measured selection time grows ~0.65 ms per 1,000 entries
# appended a row (~21 SM cycles an entry); the atomic chain accounts for ~8 of them at an unloaded
# L2 round trip and up to ~16 if the counters' shared sectors slow the atomics (all but the
# counting passes' and compaction's ~5). So the scan saves ~1.6-3.2 ms at k = 4096 (15.9 ->
# ~12.7-14.3 ms, against addmm + topk's 14.4) and ~0.4-0.7 ms at k = 512. PART=g of
# benchmarks/gpu_session.sh measures both reads.
THRESHOLD_TILE = dict(BLOCK=128, SAMPLE=2048, SAMPLE_TOP=64, PROBES=8, CAP=256, SPREAD=1.0, APPEND_SCAN=1,
                      num_warps=4)

# --- which strategy runs on CUDA ---------------------------------------------------------------
# Measured on a GPU (benchmarks/gpu.py's fused / chunked strategy rows, benchmarks/encode_sweep.py):
# (device name, dtype of x, dtype of weight, m, K_PAD) -> "fused" | "chunked" | "threshold". Only
# a measurement goes here. H100 SXM, B=8192, m=2048, n=131072 (benchmarks/RESULTS.md, "Measured on an
# NVIDIA H100"): bf16 chunked / fused 9.1 / 10.9 ms at k=8, 10.0 / 12.9 at k=32, 10.7 / 14.7 at
# k=64, 12.0 / 39.5 at k=128; fp32 (exact) 91 / 631 ms at k=64. Past the fused kernel's K_PAD (128),
# chunked / dense strategy (whole rows + torch.topk, 512 tokens a block; removed once the threshold
# strategy measured faster everywhere): bf16 10.66 / 26.49 ms at k=256, 13.75 / 26.93 at
# k=512, 18.19 / 28.39 at k=1024, 32.48 / 29.84 at k=2048, packed keys 272.8 (measured at k=2048:
# the chunked path without a selection tile) / 33.57 at k=4096; fp32 99.38 / 109.08 at k=1024.
# Fifteenth session (same H100 and shape, with bias), chunked / threshold (2048-token blocks, 8 warps
# a program) / cuBLAS + torch.topk with the bias added apart: bf16 9.67 / 9.94 / 16.08 ms at k=128,
# 10.42 / 10.57 / 16.24 at 256, 13.66 / 11.26 / 16.28 at 512, 18.35 / 12.50 / 16.32 at 1024,
# threshold 14.68 / 17.99 against 16.54 / 16.98 at 2048 / 4096 (dense, 512-token blocks: 30.86 /
# 33.74); fp32 chunked / threshold 100.07 / 91.40 at k=1024, threshold 93.48 at 2048. With 4 warps a
# program (THRESHOLD_TILE) the threshold strategy took 11.23 / 11.93 / 13.22 / 15.93 ms at k = 512 /
# 1024 / 2048 / 4096, against torch.addmm (the bias inside the GEMM) + torch.topk 13.72 / 13.77 /
# 14.01 / 14.44: a 10 % loss at 4096, the one K_PAD where the dispatcher still loses.
_H100 = "NVIDIA H100 80GB HBM3"
ENCODE_MEASURED: dict[tuple[str, torch.dtype, torch.dtype, int, int], str] = {
    **{(_H100, torch.bfloat16, torch.bfloat16, 2048, kp): "chunked" for kp in (8, 32, 64, 128, 256)},
    **{(_H100, torch.bfloat16, torch.bfloat16, 2048, kp): "threshold" for kp in (512, 1024, 2048, 4096)},
    (_H100, torch.float32, torch.float32, 2048, 64): "chunked",
    **{(_H100, torch.float32, torch.float32, 2048, kp): "threshold" for kp in (1024, 2048)},
}
# Predicted for CUDA shapes not measured, by math kind and K_PAD: chunked up to 256, threshold from
# 512 (and past the table), as measured at m = 2048 (above). Before any GPU ran, the H100 roofline
# (benchmarks/encoder_roofline.py) had chunked at 8.7-9.5 ms against fused 6.4-12.5 ms on tensor
# cores; measured, chunked won everywhere up to K_PAD 256. The threshold strategy had been
# predicted at ~9.7 / 10.3 / 11.6 ms at K_PAD 1024 / 2048 / 4096 (GEMM blocks ~7.3 ms plus one read
# of the fp32 rows); measured, its 512-token blocks took 15.1 / 18.0 / 22.1 ms (the GEMM 7.2 ms,
# the selection kernel 7.0 / 9.1 / 11.4, not ~1.5), and with 2048-token blocks and 4 warps a
# program 11.9 / 13.2 / 15.9 (RESULTS.md, "Measured on an NVIDIA H100 ... fifteenth session").
ENCODE_PREDICTED: dict[tuple[str, int], str] = {
    (kind, kp): "chunked" if kp <= 256 else "threshold"
    for kind in ("tensor", "fp32") for kp in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
}


def _math_kind(x_dtype: torch.dtype, w_dtype: torch.dtype) -> str:
    """"tensor" when the GEMM runs on tensor cores (a half type, or fp32 with TF32 allowed),
    "fp32" for exact fp32 on FMA units."""
    fp32 = x_dtype == torch.float32 and w_dtype == torch.float32
    return "fp32" if (fp32 and torch.get_float32_matmul_precision() == "highest") else "tensor"


def encode_strategy(B: int, m: int, n: int, k: int, x_dtype: torch.dtype, w_dtype: torch.dtype,
                    device: torch.device) -> str:
    """"fused", "chunked" or "threshold" for the Triton backend: a GPU measurement of
    this shape if there is one, else the prediction for CUDA tensors (threshold past the table).
    Elsewhere (the
    interpreter) the fused kernel runs, since proving it is the point, and the chunked strategy
    past the fused kernel's K_PAD limit (registers cannot hold more candidates per token)."""
    k_pad = pow2(k, lo=min(ENCODE_CONFIGS))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    measured = ENCODE_MEASURED.get((name, x_dtype, w_dtype, m, k_pad))
    if measured is not None and not (measured == "fused" and k_pad > MAX_FUSED_K_PAD):
        return measured
    if device.type == "cuda":
        return ENCODE_PREDICTED.get((_math_kind(x_dtype, w_dtype), k_pad), "threshold")
    return "fused" if k_pad <= MAX_FUSED_K_PAD else "chunked"


def _triton_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, out_dtype) -> tuple[Tensor, Tensor]:
    B, M = x.shape
    N = weight.shape[0]
    if B == 0:
        return x.new_empty(0, k, dtype=out_dtype), x.new_empty(0, k, dtype=torch.int64)
    strategy = encode_strategy(B, M, N, k, x.dtype, weight.dtype, x.device)
    if strategy == "threshold":
        return _threshold_forward(x, weight, bias, k, out_dtype)
    if strategy == "chunked":
        return _chunked_forward(x, weight, bias, k, out_dtype)
    return _fused_forward(x, weight, bias, k, out_dtype)


def _fused_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, out_dtype) -> tuple[Tensor, Tensor]:
    """The fused kernel's launch (B > 0, K_PAD <= MAX_FUSED_K_PAD)."""
    B, M = x.shape
    N = weight.shape[0]
    k_pad = pow2(k, lo=min(ENCODE_CONFIGS))
    tile_key = (_tile_kind(x.dtype, weight.dtype), k_pad, 90 if tensor_core_generation(x.device) >= 9 else 80)
    block_b, block_n, block_m, num_warps = ENCODE_TC_TILES.get(tile_key, ENCODE_CONFIGS[k_pad])
    block_m = min(block_m, pow2(M, lo=16))
    fp32_dot = x.dtype == torch.float32 and weight.dtype == torch.float32
    same_dtype = x.dtype == weight.dtype
    dot_dtype = _narrower_dot_dtype(x.dtype, weight.dtype)
    if dot_dtype and INTERPRET:
        # The interpreter rounds fp32 -> bf16 casts toward zero (compiled code rounds to nearest
        # even, like torch): round on the host there, so the tests see the GPU's numbers.
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dot_dtype]
        x, weight, dot_dtype, same_dtype = x.to(half), weight.to(half), "", True
    # fp32 follows the user's matmul precision, as cuBLAS does: "high"/"medium" allow TF32.
    precision = "tf32" if (fp32_dot and torch.get_float32_matmul_precision() != "highest") else "ieee"
    num_stages = 3  # Triton's default
    if fp32_dot and precision == "ieee":
        # An exact fp32 dot runs on FMA units at the same cost per column whatever the chunk:
        # with 32-column chunks and Triton's default 3 stages ptxas spilled 8-28 bytes at
        # K_PAD=4..128 (tests/gpu_compile.py); 16 columns and no pipelining spill none.
        block_m, num_stages = min(block_m, 16), 1
    options = dict(
        HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_M=block_m,
        K_PAD=k_pad, DOT_DTYPE=dot_dtype, CAST_FP32=INTERPRET or (dot_dtype == "" and not same_dtype),
        INPUT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages, **launch_options(),
    )
    n_tiles = triton.cdiv(N, block_n)
    token_blocks = triton.cdiv(B, block_b)
    bias_arg = bias if bias is not None else x
    ctas = resident_ctas(_encode_fwd_kernel, x.device,
                         (x, weight, bias_arg, x.new_empty(0, dtype=torch.int64), B, N, M, n_tiles, ALIGN), options)
    splits = latent_splits(token_blocks, n_tiles, x.device, ctas, _fill_cost_tiles(M, block_m, k_pad))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    cand = candidate_buffer(B, splits * k_pad, x.device)
    _encode_fwd_kernel[(token_blocks, splits)](
        x, weight, bias_arg, cand, B, N, M, tiles_per_split, cand.stride(0), **options,
    )
    return merge_candidates(cand, k, out_dtype)


def _fill_cost_tiles(m: int, block_m: int, k_pad: int) -> float:
    """A program's fixed cost in tiles: its first tiles insert K_PAD entries per row into empty
    slots, one ``fold_tile`` pass each. In the sm_90 SASS (bf16, K_PAD=64, 128 x 128 x 64) a
    pass is ~950 instructions per warp, a tensor-core k-step ~100 and a tile's other code ~700."""
    return k_pad * 950 / (100 * -(-m // block_m) + 700)


def _tile_kind(x_dtype: torch.dtype, w_dtype: torch.dtype) -> str:
    """Which tile table row applies: "half", "tf32", "mixed" (fp32 with a half type) or "fp32"
    (exact fp32 on FMA units, and bf16 with fp16, which meet in exact fp32)."""
    if x_dtype == w_dtype == torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if x_dtype == w_dtype:
        return "half"
    return "mixed" if _narrower_dot_dtype(x_dtype, w_dtype) else "fp32"


def _narrower_dot_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> str:
    """"bf16" / "fp16" when one input is fp32 and the other that half type (the dot then runs on
    tensor cores in the half type, fp32 accumulation); "" otherwise (same dtypes, or bf16 with
    fp16, which have no common narrower type and meet in fp32)."""
    if x_dtype == w_dtype or torch.float32 not in (x_dtype, w_dtype):
        return ""
    half = w_dtype if x_dtype == torch.float32 else x_dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[half]


# bf16 x and weight on a CPU with bf16 matrix units (AMX, AVX512-BF16): oneDNN's bf16 GEMM ran 6-7x
# faster than the fp32 GEMM of the widened operands here (B=1000, m=768, n=16384: 19-26 against
# 144 ms), but it rounds every pre-activation to bf16, 8 bits, which reorders near-ties that the
# selection contract (the top-k of fp32 pre-activations) must keep. So the bf16 GEMM only picks
# k + extra candidates a token; their pre-activations are computed again in fp32 from the gathered
# rows, and the k best of them are the answer wherever a bound proves that no other latent can
# beat the k-th (``_bf16_candidates_forward``). Latents within the bound of the threshold number
# about k t^2 / 128 for Gaussian pre-activations with the threshold t standard deviations out
# (n pdf(t) ~ k t latents a unit there, the bound ~ 2^-7 t wide), so extra = 16 + k / 4. Tokens
# the bound fails for try again with 4x the extra candidates, then (or at once with a NaN or an
# Inf) go through the fp32 path. Random tokens (x ~ N(0, 1), rows ~ N(0, 1/m), bias ~ N(0, 0.01))
# that needed the second try, of 1,000 at m=768, n=16384: 16 extra, 3 at k=32 (8 extra: 339), 37
# at k=128; 16 + k/4 extra, none at k = 8, 32, 128, nor at m = 100 or 2048, nor (256 tokens) at
# m=2048, n=65536, k=64.
# The candidates' fp32 pre-activations cost a gathered row each (~0.3 ns an element here), the
# fp32 GEMM they replace ~0.011 ns a multiply-add for n latents, and the two selections differ by
# a little per (token, latent) (the bf16 one is slower on short rows): so the route pays once m n
# >= BF16_MIN_WORK (k + extra) and n >= BF16_MIN_N. MEASURED (one thread, B=1000 unless said,
# medians of 5, this / the fp32 path; RESULTS.md, "Thirty-first session"): m=768: n=16384, k=128
# 0.48 (117 / 243 ms), k=512 0.86, k=640 0.93, k=1024 1.15 (m n / (k + extra) = 9984: not
# taken); n=4096, k=128 0.83; n=2048, k=32 0.74; n=1000, k=8 0.81 at B=1000 but 1.01 at B=200
# (below BF16_MIN_N); B=1, n=16384, k=8 0.68. m=512, n=2048, k=64 0.93 (10900: not taken), n=4096
# 0.75. m=128, n=8192, k=8 0.91; n=4096, k=32 1.07 (9362: not taken). m=100, n=16384, k=8 0.46;
# m=256, n=1000, k=8 1.64 and m=16, n=4096, k=8 1.43 (not taken). Until then the floor was n >=
# 128 (k + extra), set when the rescoring and the selection were slower.
BF16_MIN_WORK = 12000
BF16_MIN_N = 2048


def _bf16_extra(k: int) -> int:
    return 16 + k // 4


@functools.cache
def _bf16_matmul_units() -> bool:
    """Whether this CPU has bf16 matrix instructions (else a bf16 GEMM is no faster than fp32's)."""
    cpu = getattr(torch, "cpu", None)
    probes = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(bool(probe()) for probe in probes if probe is not None)
    except Exception:  # a private probe that changed: take the fp32 path
        return False


def _bf16_candidates_pay(x: Tensor, weight: Tensor, k: int, exact_keys: bool) -> bool:
    return (x.device.type == "cpu" and not exact_keys and x.dtype == weight.dtype == torch.bfloat16
            and weight.shape[0] >= max(BF16_MIN_N, k + _bf16_extra(k))
            and BF16_MIN_WORK * (k + _bf16_extra(k)) <= weight.shape[0] * weight.shape[1]
            and _bf16_matmul_units())


def _gemm_tile(B: int, n: int, m: int) -> tuple[int, int]:
    """(tokens, latents) a tile of the CPU GEMMs (the fp32 path's and the bf16 candidates'):
    CPU_GEMM_TILE_ELEMS pre-activations or the weight's elements, whichever is more, at most
    CPU_TILE_ELEMS, at least CPU_GEMM_MIN_BLOCK_B tokens; the token tiles split B evenly (a
    short last tile ran its GEMM at a worse rate)."""
    tile = min(CPU_TILE_ELEMS, max(CPU_GEMM_TILE_ELEMS, n * m))
    block_b, block_n = cpu_tile(B, n, tile, CPU_MAX_BLOCK_N, CPU_GEMM_MIN_BLOCK_B)
    tiles = -(-B // block_b)
    return -(-B // tiles), block_n


def _bf16_gemm_candidates(x: Tensor, weight: Tensor, bias: Optional[Tensor], kk: int) -> tuple[Tensor, Tensor]:
    """The kk largest values of the bf16 GEMM ``x @ weight.T (+ bias)`` per token (bf16 operands
    on CPU), in no order, and their latent ids: token x latent tiles into one reused buffer, a
    running top-kk across each token tile's latent blocks."""
    B, M = x.shape
    N = weight.shape[0]
    block_b, block_n = _gemm_tile(B, N, M)
    buf = torch.empty(block_b * block_n, device=x.device, dtype=torch.bfloat16)
    cand_v = torch.empty(B, kk, dtype=torch.bfloat16)
    cand_i = torch.empty(B, kk, dtype=torch.int64)
    for b0 in range(0, B, block_b):
        b1 = min(B, b0 + block_b)
        run_v = run_i = None
        for start in range(0, N, block_n):
            stop = min(N, start + block_n)
            tile = buf[: (b1 - b0) * (stop - start)].view(b1 - b0, stop - start)
            if bias is None:
                torch.mm(x[b0:b1], weight[start:stop].T, out=tile)
            else:
                torch.addmm(bias[start:stop], x[b0:b1], weight[start:stop].T, out=tile)
            v, i = _unordered_topk(tile, min(kk, stop - start))
            i = i + start
            if run_v is not None:
                v, i = torch.cat([run_v, v], 1), torch.cat([run_i, i], 1)
                v, pos = v.topk(kk, dim=1, sorted=False)
                i = i.gather(1, pos)
            run_v, run_i = v, i
        cand_v[b0:b1], cand_i[b0:b1] = run_v, run_i
    return cand_v, cand_i


# Token and row norms below NORM_FLOOR (or not finite) send tokens, or the call, to the fp32 GEMM
# in both candidate routes: fp32 sums of squares underflow below it, and a norm read as 0 would drop
# the bounds' terms that scale with it.
NORM_FLOOR = 2.0**-40


def _bias_bound(w_max: float, bias: Optional[Tensor]) -> Optional[float]:
    """max |b| for the candidate routes' bounds, over the finite entries (a bias of -inf masks its
    latent: its v and e are -inf too), 0 without a bias; None where the whole call takes the fp32
    GEMM: max ||w_j|| (``w_max``) below NORM_FLOOR or not finite, or a bias of NaN or +inf."""
    if not NORM_FLOOR <= w_max < math.inf:
        return None
    if bias is None:
        return 0.0
    if bool((bias.isnan() | (bias == math.inf)).any()):
        return None
    finite = bias[bias.isfinite()]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _normal_norms(norms: Tensor) -> Tensor:
    """Which token norms the candidate routes' bounds can use: at least NORM_FLOOR and finite."""
    return (norms >= NORM_FLOOR) & (norms < math.inf)


def _live_exact_values(x: Tensor, weight: Tensor, bias: Optional[Tensor], cand_i: Tensor, v: Tensor,
                       k: int, reach) -> Tensor:
    """``_exact_values`` of the candidates that can still be among the k best, -inf for the rest.
    Every candidate's exact value e_j is within ``reach(v_j)`` of its bf16 value v_j, and v - reach(v)
    grows with v, so the k candidates of the largest v all have e >= lo = v_k - reach(v_k) (v_k the
    k-th largest v); one with v_j + reach(v_j) < lo has e_j below all k of them and is not computed.
    Its -inf never ties a kept value: lo is then finite. NaN or Inf values (in v, or a lo of NaN)
    fail the comparison, so those candidates are kept. Random tokens at m=768, n=16384: 10 of 26
    candidates a token computed at k=8, 40 of 56 at k=32, 148 of 176 at k=128."""
    B, K = cand_i.shape
    v_k = v.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # NaN if any is NaN
    live = ~(v + reach(v) < v_k - reach(v_k))
    if bool(live.all()):
        return _exact_values(x, weight, bias, cand_i)
    tokens, slots = live.nonzero(as_tuple=True)
    ids = cand_i[tokens, slots]
    values = pairs_dot(x, weight, tokens, ids)
    if bias is not None:
        values += bias[ids]
    exact = torch.full((B, K), -math.inf, dtype=x.dtype)
    exact[tokens, slots] = values
    return exact


def _bf16_candidates_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, out_dtype,
                             extra: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """``_blocked_forward`` for bf16 x and weight on CPU, through a bf16 GEMM that picks candidates.

    Per token, the bf16 GEMM's k' = k + extra largest values v (bf16, bias added) name the
    candidates; their fp32 pre-activations e are computed from the gathered rows (bf16 products are
    exact in fp32) and the k best taken (ties to the lower id). A candidate the same bound rules
    out of the k best is not computed (``_live_exact_values``). Every other latent j has v_j <= c,
    the smallest candidate v. Its exact pre-activation P_j differs from v_j by the bf16 roundings
    (the sum's, the bias's cast, the biased sum's, whichever order oneDNN adds the bias in: at most
    2^-8 (2 |v_j| + 2 |b_j|) to first order, so a (|v_j| + max |b|) with a = 2^-7 * 1.02, which
    also covers the second order and e's own bias rounding) and by the fp32 accumulation of m
    products (at most A = m 2^-24 ||x|| max ||w_j||). As v + a|v| grows with v, P_j <= c + a (|c| +
    max |b|) + A for every j outside the candidates, and a chosen candidate's P is at least its e -
    A: where the k-th e exceeds c + a (|c| + max |b|) + 2A, the k chosen beat every other latent,
    and they are ordered among themselves to within fp32 accumulation, as the fp32 path orders
    them. Subnormals, which the GEMM may flush, add at most 2^-125 (m + 2 + sqrt(m) (||x|| + max
    ||w_j||)) (as in ``_fp32_candidates_forward``). Elsewhere (NaN or Inf too, whose comparisons
    fail, and a smallest candidate of -inf) the token tries again with 4x the extra candidates, and
    then goes through ``_blocked_forward``'s fp32 GEMM (at once where a value is NaN or infinite).

    Norms and bias as in ``_fp32_candidates_forward``: a token whose norm is below NORM_FLOOR or not
    finite takes the fp32 GEMM at once, and so does the whole call when max ||w_j|| is, or when a
    bias is NaN or +inf; a bias of -inf masks its latent and stays out of max |b| (it had made the
    bound infinite, and every token took two tries and the fp32 GEMM). ``out_dtype`` None: the fp32
    values before ReLU (for such a retry)."""
    B, M = x.shape
    N = weight.shape[0]
    extra = _bf16_extra(k) if extra is None else extra
    xf = x.float()
    bf = bias.float() if bias is not None else None
    # ||w_j|| from bf16's norm (fp32 sums, the result rounded to bf16, 2^-8 relative: measured at
    # most 2^-8.5 here), raised by 2^-6: 1.7 ms against 20 for the norms of a widened copy (n =
    # 16384, m = 768). A is a small part of the slack (a fifth at m = 2048), so this needs no more.
    w_max = (1 + 2.0**-6) * float(weight.norm(dim=1).max()) if N else 0.0
    b_max = _bias_bound(w_max, bias)
    if b_max is None:
        values, indices = _blocked_forward(x, weight, bias, k, torch.float32, fp32_gemm=True)
        return (values, indices) if out_dtype is None else (values.relu().to(out_dtype), indices)
    bb = bias.to(torch.bfloat16) if bias is not None else None
    cand_v, cand_i = _bf16_gemm_candidates(x, weight, bb, k + extra)
    x_norm = (1 + M * 2.0**-24) * xf.norm(dim=1, keepdim=True)
    normal = _normal_norms(x_norm)
    twice_a = (2 * M * 2.0**-24 * w_max) * x_norm
    tiny = 2.0**-125 * (M + 2 + M**0.5 * (x_norm + w_max))
    v = cand_v.float()

    def reach(val: Tensor) -> Tensor:  # |e_j - v_j| for a latent of bf16 value v_j: at most this
        return 2.0**-7 * 1.02 * (val.abs() + b_max) + twice_a + tiny

    exact = _live_exact_values(xf, weight, bf, cand_i, v, k, reach)
    values, indices = _exact_topk(exact, cand_i, k)
    c = v.amin(dim=1, keepdim=True)
    # NaN and Inf compare False: those tokens fail, and so does c = -inf (fewer than k + extra
    # latents not masked), which would accept anything.
    redo = ~((values[:, k - 1:] > c + reach(c)) & c.isfinite() & normal).squeeze(1)
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        if extra == _bf16_extra(k) and k + 4 * extra <= N:  # one second try, for finite tokens
            # (a failed token had no candidate pruned: its exact values are all computed)
            again = (torch.isfinite(cand_v[rows]).all(dim=1) & torch.isfinite(exact[rows]).all(dim=1)
                     & normal[rows, 0])
            if bool(again.any()):
                r = rows[again]
                values[r], indices[r] = _bf16_candidates_forward(x[r], weight, bias, k, None, 4 * extra)
                rows = rows[~again]
        if rows.numel():
            values[rows], indices[rows] = _blocked_forward(x[rows], weight, bias, k, torch.float32, fp32_gemm=True)
    if out_dtype is None:
        return values, indices
    return values.relu().to(out_dtype), indices


# fp32 x and weight take the same bf16 GEMM for candidates where it pays. Rounding the operands
# adds (2^-7 + 2^-15) ||x|| max ||w_j|| to the bound, ~10x the slack of bf16 operands on random
# data (Cauchy-Schwarz is ~sqrt(m) looser than the typical error), so more candidates are needed:
# of 1,000 random tokens at m=768, n=16384, k=32, 84 % failed the bound with 32 extra, 1.2 % with
# 64. The extra starts where Gaussian pre-activations would need it (``_fp32_extra``: it grows with
# m and n / k) and doubles whenever more than FP32_CANDIDATES_MAX_REDO of a probe chunk of
# FP32_CANDIDATES_CHUNK tokens fail; once k + extra no longer fits (``_fp32_candidates_fit``), the
# rest of the call takes the fp32 GEMM, and so do the tokens that failed. Its costs beside the bf16 GEMM:
# the weight rounded to bf16 once a call (a copy of at most WHOLE_WIDEN_ELEMS), and k + extra
# gathered fp32 rows a token (~0.7 ns an element here, against ~0.0095 ns for each multiply-add it
# saves on n latents). Hence its floors: FP32_CANDIDATES_MIN_TOKENS tokens, n >=
# FP32_CANDIDATES_MIN_RATIO (k + extra) and m n >= FP32_CANDIDATES_MIN_WORK (k + extra) with the
# first extra, and m >= FP32_CANDIDATES_MIN_M (a review measured 1.89x the fp32 path at B=512, m=7,
# n=16000, k=8, 1.41x at m=40, faster from m=64). MEASURED (one thread, ms, same-run medians, fp32 path / this; RESULTS.md, "Thirtieth
# session"): B=1000, m=768, n=16384, k=32: 184-206 / 109-143; k=8: 163-186 / 85-111; m=576:
# 157-166 / 91-94; B=512, m=768, k=32: 101 / 71-76; B=1024, m=2048, n=65536, k=64:
# 1721-1737 / 1029-1110.
# Where it lost, and is now below the floors: B=256, m=768, n=16384, k=32: 46-49 / 48-51; B=256,
# m=2048, n=65536, k=64: 439-451 / 564-580 (the first extra failed, and every probe's bf16 GEMM
# re-read the 256 MiB weight); B=1000, m=2048, n=16384, k=32: 460 / 515 (every extra failed).
# The floor was n >= 160 (k + extra) until the thirty-first session, which measured (B=1000, medians
# of 5, this / the fp32 path; m n / (k + extra) in brackets): m=2048, n=16384, k=32 0.66 (the first
# extra, 141, now passes) [194k]; k=64 0.95 [105k]; n=8192, k=16 0.69; m=768, n=16384, k=64 0.77
# [69k], k=96 0.86 [48k], k=128 1.05 [37k]; n=4096, k=32 0.92 [37k], k=8 0.70; m=512, n=4096,
# k=8 0.68 [52k]; m=256, n=4096, k=8 0.84 [26k]; m=128, n=4096, k=8 1.11 [13k], n=16384 0.68
# [52k]. So the route takes 48 latents a candidate and 40000 multiply-adds a candidate.
FP32_CANDIDATES_MIN_TOKENS = 512
FP32_CANDIDATES_MIN_RATIO = 48
FP32_CANDIDATES_MIN_WORK = 40000
FP32_CANDIDATES_MIN_M = 128
FP32_CANDIDATES_CHUNK = 64
FP32_CANDIDATES_MAX_REDO = 1 / 8


def _fp32_extra(k: int, m: int, n: int) -> int:
    """The first extra of the fp32 route: 1.5x what Gaussian pre-activations need, at least 32.
    There the operands' term R is ~2^-7 sqrt(m) 1.1 standard deviations (rows' norms 1.1x their
    mean at most), the k-th value sits z = sqrt(2 ln(n / k)) out, and the density of values grows
    about e^(z t) for t below it, so the bound's reach holds k (e^(z R) - 1) other latents.
    Measured first extras that passed (of 1,000 random tokens, < 1.2 % failing): 64 at m = 768,
    n = 16384, k = 32 (this gives 64); 64 at m = 576 (51); 96-128 at k = 64 (115); 256 at m = 2048,
    n = 65536, k = 64 (314). At m = 2048, n = 16384, k = 32 it asks for 141 (96 and 128 both
    failed there), which the floor of n >= 160 (k + extra) refused until the thirty-first session;
    now taken, it passes and runs 0.66x the fp32 path."""
    z = math.sqrt(2 * math.log(max(n / k, 1.0)))
    reach = 2.0**-7 * math.sqrt(m) * 1.1
    return max(32, math.ceil(1.5 * k * math.expm1(z * reach)))


def _fp32_candidates_fit(m: int, n: int, kk: int) -> bool:
    """Whether kk candidates a token leave enough latents and multiply-adds per candidate to pay."""
    return FP32_CANDIDATES_MIN_RATIO * kk <= n and FP32_CANDIDATES_MIN_WORK * kk <= m * n


def _fp32_candidates_pay(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, exact_keys: bool) -> bool:
    return (x.device.type == "cpu" and not exact_keys and x.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.shape[0] >= FP32_CANDIDATES_MIN_TOKENS
            and x.shape[1] >= FP32_CANDIDATES_MIN_M
            and _fp32_candidates_fit(x.shape[1], weight.shape[0], k + _fp32_extra(k, x.shape[1], weight.shape[0]))
            and weight.numel() <= WHOLE_WIDEN_ELEMS and _bf16_matmul_units())


def _fp32_candidates_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int,
                             out_dtype) -> tuple[Tensor, Tensor]:
    """``_blocked_forward`` for fp32 x and weight (and bias) on CPU, through the bf16 GEMM's
    candidates: ``_bf16_candidates_forward``'s argument with x and weight rounded to bf16 first.

    Per token, the bf16 GEMM of the rounded operands names k + extra candidates; their fp32
    pre-activations e come from the fp32 rows (``rows_dot``, then the bias) and the k best are
    taken (ties to the lower id). For any latent j, the bf16 value v_j differs from the exact P_j
    by the roundings of ``_bf16_candidates_forward``'s bound, a (|v_j| + max |b|) + A, plus the
    operands' roundings: each product x_i w_ji moves by at most (2^-7 + 2^-16) |x_i w_ji|, so R =
    (2^-7 + 2^-15) ||x|| max ||w_j|| in all. e differs from P by at most the fp32 rounding of m
    products and their sum: 2.1 (m + 2) 2^-24 ||x|| max ||w_j|| covers both A terms (5 % for the
    rounded operands). Subnormals, which bf16 keeps to a bit or two and the GEMM may flush, add at
    most 2^-125 (m + 2 + sqrt(m) (||x|| + max ||w_j||)) on either side. Where the k-th e exceeds
    c + a (|c| + max |b|) + 2A + R + that (c the smallest candidate v, finite), no latent outside
    the candidates can beat the k chosen; elsewhere, NaN and Inf included, the token goes through
    the fp32 GEMM.

    Norms: fp32 sums of squares underflow for norms below NORM_FLOOR, and a norm read as 0 would
    drop R (a review found wrong answers at x * 1e-25). So a token whose norm is below NORM_FLOOR or
    infinite takes the fp32 GEMM, and so does the whole call when max ||w_j|| is, or when a bias is
    NaN or +inf. A bias of -inf masks its latent and stays out of max |b|.

    Probe chunks of FP32_CANDIDATES_CHUNK tokens set the extra: after one where more than
    FP32_CANDIDATES_MAX_REDO of the tokens failed it doubles and the next chunk probes again; after
    one that passed, the rest go a tile at a time. Once k + extra no longer fits
    (``_fp32_candidates_fit``), the rest of the call takes the fp32 GEMM. The weight is rounded to
    bf16 once a call."""
    B, M = x.shape
    N = weight.shape[0]

    def fp32_path(rows):
        return _blocked_forward(x[rows], weight, bias, k, torch.float32, fp32_gemm=True)

    # fp32 norms: their sums of squares are exact to ~m 2^-24, and they do not underflow for norms
    # of 2^-40 and more (smaller ones lost every square and read 0, which dropped R and A).
    grow = 1 + M * 2.0**-24
    w_max = grow * float(weight.norm(dim=1).max())
    b_max = _bias_bound(w_max, bias)
    if b_max is None:
        values, indices = fp32_path(slice(None))
        return values.relu().to(out_dtype), indices
    x_norm = grow * x.norm(dim=1)
    redo = ~_normal_norms(x_norm)  # such tokens: the fp32 GEMM
    rows = None if not bool(redo.any()) else (~redo).nonzero().squeeze(1)
    xs, xns = (x, x_norm) if rows is None else (x[rows], x_norm[rows])
    wb = weight.to(torch.bfloat16)
    bb = bias.to(torch.bfloat16) if bias is not None else None
    S = xs.shape[0]
    sel_v = torch.empty(S, k, dtype=torch.float32)
    sel_i = torch.empty(S, k, dtype=torch.int64)
    sel_redo = torch.zeros(S, dtype=torch.bool)
    extra = _fp32_extra(k, M, N)
    chunk = FP32_CANDIDATES_CHUNK
    b0 = 0
    while b0 < S:
        if not _fp32_candidates_fit(M, N, k + extra):
            sel_redo[b0:] = True
            break
        b1 = min(S, b0 + chunk)
        xc, xn = xs[b0:b1], xns[b0:b1]
        cand_v, cand_i = _bf16_gemm_candidates(xc.to(torch.bfloat16), wb, bb, k + extra)
        exact = _exact_values(xc, weight, bias, cand_i)
        v, i = _exact_topk(exact, cand_i, k)
        c = cand_v.float().amin(dim=1)
        slack = (2.0**-7 * 1.02 * (c.abs() + b_max) + 2.1 * (M + 2) * 2.0**-24 * xn * w_max
                 + (2.0**-7 + 2.0**-15) * xn * w_max
                 + 2.0**-125 * (M + 2 + M**0.5 * (xn + w_max)))
        # NaN and Inf compare False: those tokens fail too, and so does c = -inf (all but fewer
        # than k + extra latents masked), which would accept anything.
        failed = ~((v[:, k - 1] > c + slack) & c.isfinite())
        sel_v[b0:b1], sel_i[b0:b1], sel_redo[b0:b1] = v, i, failed
        b0 = b1
        if float(failed.float().mean()) > FP32_CANDIDATES_MAX_REDO:
            extra, chunk = 2 * extra, FP32_CANDIDATES_CHUNK  # probe again with more candidates
        else:
            chunk = max(FP32_CANDIDATES_CHUNK, CPU_TILE_ELEMS // N)  # then whole tiles
    if rows is None:
        values, indices, redo = sel_v, sel_i, sel_redo
    else:  # scatter the route's tokens back among those sent to the fp32 GEMM up front
        values = torch.empty(B, k, dtype=torch.float32)
        indices = torch.empty(B, k, dtype=torch.int64)
        values[rows], indices[rows] = sel_v, sel_i
        redo[rows] = sel_redo
    if bool(redo.any()):
        bad = redo.nonzero().squeeze(1)
        values[bad], indices[bad] = fp32_path(bad)
    return values.relu().to(out_dtype), indices


def _blocked_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, out_dtype, exact_keys: bool = False,
    fp32_gemm: bool = False,
) -> tuple[Tensor, Tensor]:
    """Tiles of tokens x latents (``_topk.cpu_tile``): one GEMM each into a reused buffer, then a
    running top-k. Extra memory: the buffer plus O(B * k). bf16 operands on a CPU with bf16 matrix
    units go through ``_bf16_candidates_forward`` unless ``fp32_gemm`` (its fall-back, which takes
    the fp32 pre-activations back, before ReLU and the cast), and so do fp32 operands where
    ``_fp32_candidates_pay``."""
    if not fp32_gemm and _bf16_candidates_pay(x, weight, k, exact_keys):
        return _bf16_candidates_forward(x, weight, bias, k, out_dtype)
    if not fp32_gemm and _fp32_candidates_pay(x, weight, bias, k, exact_keys):
        return _fp32_candidates_forward(x, weight, bias, k, out_dtype)
    B, M = x.shape
    N = weight.shape[0]
    cd = compute_dtype(torch.promote_types(x.dtype, weight.dtype))
    xc = x.to(cd)
    bc = bias.to(cd) if bias is not None else None
    block_b, block_n = _gemm_tile(B, N, M)
    buf = torch.empty(block_b * block_n, device=x.device, dtype=cd)
    # A narrower weight (bf16, fp16) is widened CPU_WIDEN_ELEMS at a time into one reused buffer,
    # each piece multiplied while it is in cache; widening a whole block into a fresh tensor faulted
    # in its pages on every call (and again for every token tile).
    piece = N if weight.dtype == cd else max(1, CPU_WIDEN_ELEMS // M)
    wbuf = None if weight.dtype == cd else torch.empty(min(piece, N), M, device=x.device, dtype=cd)

    def pre_tile(b0: int, b1: int, start: int, stop: int) -> Tensor:
        out = buf[: (b1 - b0) * (stop - start)].view(b1 - b0, stop - start)
        for s in range(start, stop, piece):
            e = min(stop, s + piece)
            w = weight[s:e] if wbuf is None else wbuf[: e - s].copy_(weight[s:e])
            part = out[:, s - start:e - start]  # row stride stop - start: a GEMM output as it is
            if bc is None:
                torch.mm(xc[b0:b1], w.T, out=part)
            else:
                torch.addmm(bc[s:e], xc[b0:b1], w.T, out=part)
        return out

    values, indices = token_blocked_topk(pre_tile, B, N, k, block_n, block_b, exact_keys=exact_keys)
    if cd == torch.float64:
        values = _exact_values(xc, weight, bc, indices)
    if fp32_gemm:
        return values, indices
    return values.relu().to(out_dtype), indices


def _gemm_rows(x: Tensor, weight: Tensor, whole: bool = False):
    """``pre(rows, start, stop)``: the fp32 ``x[rows] @ weight[start:stop].T`` (no bias) of the
    chunked and threshold strategies, ``rows`` a slice. Like the fused kernel, mixed
    fp32 / half inputs multiply in the half type. Half inputs on CUDA: cuBLAS reads them as they
    are and writes fp32. Otherwise (fp32, bf16 with fp16, CPU) operands are widened to fp32, whose
    GEMMs are exact or TF32 as torch.get_float32_matmul_precision() says. A mixed-dtype weight is
    converted a chunk at a time, or once when ``whole`` (the threshold strategy reads all of it
    per block)."""
    narrow = _narrower_dot_dtype(x.dtype, weight.dtype)
    gemm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(narrow, x.dtype)
    native = x.device.type == "cuda" and gemm_dtype != torch.float32 and (bool(narrow) or x.dtype == weight.dtype)
    xc = x.to(gemm_dtype) if native else x.to(gemm_dtype).float()
    if narrow and whole:
        weight, narrow = weight.to(gemm_dtype), ""

    def pre(rows, start: int, stop: int) -> Tensor:
        w = weight[start:stop]
        if narrow:
            w = w.to(gemm_dtype)  # one chunk at a time: no copy of the whole weight
        if native:
            return torch.mm(xc[rows], w.T, out_dtype=torch.float32)
        return torch.mm(xc[rows], w.T.float())  # a copy only when weight is not fp32

    return pre


def _chunked_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, out_dtype) -> tuple[Tensor, Tensor]:
    """cuBLAS GEMM of a tile of tokens x a chunk of latents at a time, in fp32 (the fused kernel's
    accumulation), then one selection pass per chunk (``select_chunks``): bias, key packing and
    a running top-k that persists across chunks; stage 2 merges the splits. No [B, n] tensor, no
    host sync, extra memory one fp32 chunk of at most CHUNK_TILE_ELEMS + O(B * K_PAD * splits).
    Off the Triton backend, or at a K_PAD without a SELECT_CONFIGS tile, each chunk goes through
    packed keys and ``torch.topk`` instead."""
    B, M = x.shape
    N = weight.shape[0]
    if B == 0:
        return x.new_empty(0, k, dtype=out_dtype), x.new_empty(0, k, dtype=torch.int64)
    block_b = min(B, CHUNK_MAX_BLOCK_B)
    block_n = min(N, max(1, CHUNK_TILE_ELEMS // block_b))
    gemm = _gemm_rows(x, weight)

    def pre_tile(b0: int, b1: int, start: int, stop: int) -> Tensor:
        return gemm(slice(b0, b1), start, stop)

    return select_chunks(pre_tile, B, N, k, block_b, block_n, bias, x.device, out_dtype)


def _threshold_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, out_dtype,
                       timers: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Whole rows (a cuBLAS GEMM of THRESHOLD_TILE_ELEMS // n tokens x all n latents in fp32),
    ranked by ``_threshold_select_kernel``: one program per token finds its exact top k, usually in
    one read of its row, with the bias added on the fly and the package's tie and NaN rules; then
    one sort of the [B, k] keys orders them. No host sync. Extra memory: one fp32 block of at most
    max(THRESHOLD_TILE_ELEMS, n), the block's buffer and candidate scratch (``_threshold_sizes``)
    and the [B, k] int64 keys. ``timers``, a [B, 8] int64 tensor or None, turns on the
    kernel's phase timers (benchmarks/threshold_phases.py; compiled code only)."""
    B = x.shape[0]
    N = weight.shape[0]
    if B == 0:
        return x.new_empty(0, k, dtype=out_dtype), x.new_empty(0, k, dtype=torch.int64)
    block_b = min(B, _threshold_block_tokens(N))
    tile = dict(THRESHOLD_TILE)
    tile["SAMPLE"], tile["SAMPLE_TOP"], buf_len = _threshold_sizes(N, k, tile)
    keys = torch.empty(B, k, device=x.device, dtype=torch.int64)
    scratch = torch.empty(block_b, tile["CAP"], device=x.device, dtype=torch.int64)
    buf = torch.empty(block_b, buf_len, device=x.device, dtype=torch.int64)
    counters = torch.zeros(B, device=x.device, dtype=torch.int32)
    bias_arg = bias if bias is not None else scratch
    for b0, b1, pre in _threshold_blocks(x, weight):
        timers_at = timers[b0:b1] if timers is not None else scratch
        _threshold_select_kernel[(b1 - b0,)](pre, bias_arg, keys[b0:b1], scratch, buf, counters[b0:b1], timers_at,
                                             N, k, buf_len, HAS_BIAS=bias is not None, TIMERS=timers is not None,
                                             **tile, **launch_options())
    return merge_candidates(keys.sort(dim=1).values, k, out_dtype, ascending=True)


def _threshold_blocks(x: Tensor, weight: Tensor):
    """The threshold strategy's GEMMs: (b0, b1, pre) per block of _threshold_block_tokens(n)
    tokens, ``pre`` the contiguous fp32 [b1 - b0, n] ``x[b0:b1] @ weight.T`` (no bias)."""
    B, N = x.shape[0], weight.shape[0]
    gemm = _gemm_rows(x, weight, whole=True)
    block_b = min(B, _threshold_block_tokens(N))
    for b0 in range(0, B, block_b):
        b1 = min(B, b0 + block_b)
        yield b0, b1, gemm(slice(b0, b1), 0, N).contiguous()


def _threshold_sizes(n: int, k: int, tile: dict) -> tuple[int, int, int]:
    """(SAMPLE, SAMPLE_TOP, BUF) of a threshold-kernel launch. The probes reach down to sample rank
    mu - 1 + 2**(PROBES // 2 - 2) * SPREAD * (sqrt(mu) + 1), mu = k * SAMPLE / n; the sample's sorted top
    must cover it: ``tile["SAMPLE_TOP"]`` or the next power of two past that rank, at most the
    sample (ptxas: a top 64 of 2048 takes 61 registers on sm_90, a top 128 107; smaller samples
    for the same top were no better). BUF: room for the entries at or above the lowest probe,
    about (rank + 1) * n / SAMPLE, with a margin of as many again plus a tile (a row that overflows
    reads its row a second time)."""
    sample = min(n, tile["SAMPLE"])
    mu = k * sample / n
    rank = max(0.0, min(sample - 1, mu - 1 + 2 ** (tile["PROBES"] // 2 - 2) * tile["SPREAD"] * (mu ** 0.5 + 1)))
    top = min(pow2(sample), max(tile["SAMPLE_TOP"], pow2(int(rank) + 1)))
    return tile["SAMPLE"], top, min(n, int(2 * (int(rank) + 2) * n / sample) + tile["BLOCK"])


def select_chunks(pre_tile, B: int, N: int, k: int, block_b: int, block_n: int, bias: Optional[Tensor],
                  device: torch.device, out_dtype) -> tuple[Tensor, Tensor]:
    """The chunked strategies' running top-k (this module's and ``expander_encode``'s).

    ``pre_tile(b0, b1, start, stop)`` returns the fp32 pre-activations [b1 - b0, stop - start] of
    tokens [b0, b1) and latents [start, stop), without the bias; tiles are ``block_b`` tokens x
    ``block_n`` latents. One selection pass per tile adds the bias, packs keys and folds them into
    running candidates that persist across a token tile's chunks: ``_select_kernel`` (insertion)
    or ``_select_buffer_kernel`` (threshold, append, merge), as the K_PAD's SELECT_CONFIGS tile
    says; stage 2 merges the splits (a single buffer split is already sorted). Off the Triton
    backend (CPU without the interpreter) or at a K_PAD without a SELECT_CONFIGS tile, each tile
    goes through packed keys and ``torch.topk`` instead. No host sync."""
    k_pad = pow2(k, lo=min(SELECT_CONFIGS))
    # CPU tensors take the selection kernels only under the interpreter (which proves them).
    if not (HAS_TRITON and (device.type != "cpu" or INTERPRET) and k_pad in SELECT_CONFIGS):
        def with_bias(b0: int, b1: int, start: int, stop: int) -> Tensor:
            pre = pre_tile(b0, b1, start, stop)
            return pre if bias is None else pre.add_(bias[start:stop].float())

        values, indices = token_blocked_topk(with_bias, B, N, k, block_n, block_b, exact_keys=True)
        return values.relu().to(out_dtype), indices
    sel_b, sel_n, sel_warps, scheme = select_tile(k_pad)
    buffered = scheme == "buffer"
    kernel = _select_buffer_kernel if buffered else _select_kernel
    options = dict(HAS_BIAS=bias is not None, BLOCK_N=sel_n, K_PAD=k_pad, num_warps=sel_warps, **launch_options())
    cap = k_pad + max(k_pad, sel_n)  # the buffer kernel's keys per (token, split)
    if buffered:
        options["SPARE"] = cap - k_pad
        options["FINAL"] = False
        options["maxnreg"] = SELECT_MAXNREG.get(k_pad)
        options["AHEAD"] = SELECT_AHEAD
    else:
        options["BLOCK_B"] = sel_b
    token_blocks, chunk_tiles = triton.cdiv(block_b, sel_b), triton.cdiv(block_n, sel_n)
    scratch = torch.empty(0, device=device, dtype=torch.float32)
    bias_arg = bias if bias is not None else scratch
    ints = scratch.new_empty(0, dtype=torch.int64)
    # The launch's argument types (fp32 chunks) and small integers, for the occupancy query.
    probe = ((scratch, bias_arg, ints, scratch.new_empty(0, dtype=torch.int32), block_n, 0, chunk_tiles, sel_n)
             if buffered else (scratch, bias_arg, ints, block_b, block_n, 0, chunk_tiles, 1, k_pad))
    ctas = resident_ctas(kernel, device, probe, options)
    # Each split keeps its own candidates per row for the whole run, so every extra split repeats
    # the fill, spread over the run's chunks. Insertion: K_PAD passes or more per row, each about
    # 0.8 of a tile's other work in the sm_90 SASS (RESULTS.md, "Selection tiles of one warp");
    # without this charge 1-row programs took 32 splits of one tile (63 waves against 64). Buffer:
    # a split fills its own K_PAD held keys, appending and flushing more: a second split costs a
    # row 708 / 932 / 729 fast-path tiles with the default tiles at K_PAD 256 / 512 / 1024 in the
    # sm_90 model (RESULTS.md, "Selection by threshold, append and merge"). The former charge,
    # 0.15 x CAP (one flush, without the appends), took 4 splits at k = 256, B = 8192: 333K warp
    # instructions a row against 211K with one.
    fill_tiles = (800 if buffered else 0.8 * k_pad) * block_n / N
    splits = latent_splits(token_blocks, chunk_tiles, device, ctas, fill_tiles)
    keys = []
    for b0 in range(0, B, block_b):
        b1 = min(B, b0 + block_b)
        rows = b1 - b0
        if buffered:
            run = _empty_candidates(rows, splits * cap // k_pad, k_pad, device)
            state = torch.tensor([k_pad, -(2**31)], device=device, dtype=torch.int32).repeat(rows * splits)
        else:
            run = _empty_candidates(rows, splits, k_pad, device)
        for start in range(0, N, block_n):
            stop = min(N, start + block_n)
            pre = pre_tile(b0, b1, start, stop).contiguous()
            tiles_per_split = triton.cdiv(triton.cdiv(stop - start, sel_n), splits)
            bias_at = bias_arg[start:] if bias is not None else bias_arg
            if buffered:
                kernel[(rows, splits)](pre, bias_at, run, state, stop - start, start, tiles_per_split,
                                       splits * sel_n, **options)
            else:
                kernel[(triton.cdiv(rows, sel_b), splits)](pre, bias_at, run, rows, stop - start, start,
                                                           tiles_per_split, splits, splits * k_pad, **options)
        if buffered:
            # The final flush, a launch of its own without tiles (folded into the last chunk's, it
            # raised the loop's registers: 96 against 72 at K_PAD 256 on sm_90). It leaves each
            # split's exact top K_PAD, ascending, in its first K_PAD slots.
            kernel[(rows, splits)](scratch, bias_arg, run, state, 0, N, 0, splits * sel_n,
                                   **options | {"FINAL": True})
            run = run.view(rows, splits, cap)[:, :, :k_pad].reshape(rows, splits * k_pad)
        keys.append(run)
    # One buffer split per row is already the row's top K_PAD in order: stage 2 only slices it.
    return merge_candidates(torch.cat(keys), k, out_dtype, ascending=buffered and splits == 1)


def select_tile(k_pad: int) -> tuple[int, int, int, str]:
    """SELECT_CONFIGS[k_pad] as (BLOCK_B, BLOCK_N, num_warps, scheme): scheme "insert"
    (``_select_kernel``, the default of a 3-tuple) or "buffer" (``_select_buffer_kernel``, one
    row per program)."""
    tile = SELECT_CONFIGS[k_pad]
    rows, latents, warps, scheme = (*tile, "insert") if len(tile) == 3 else tile
    if scheme not in ("insert", "buffer"):
        raise ValueError(f"SELECT_CONFIGS[{k_pad}]: expected scheme 'insert' or 'buffer', got {scheme!r}")
    if scheme == "buffer" and rows != 1:
        raise ValueError(f"SELECT_CONFIGS[{k_pad}]: a 'buffer' tile takes 1 row, got {rows}")
    return rows, latents, warps, scheme


def _empty_candidates(rows: int, splits: int, k_pad: int, device: torch.device) -> Tensor:
    """[rows, splits * K_PAD] int64 running candidates with no entry yet: per split the distinct
    keys MIN_KEY + slot, as ``_topk.empty_slots`` makes them in registers."""
    slots = torch.arange(k_pad, device=device, dtype=torch.int64).repeat(splits) + MIN_KEY_VALUE
    return slots.expand(rows, splits * k_pad).contiguous()


def _exact_values(x: Tensor, weight: Tensor, bias: Optional[Tensor], indices: Tensor) -> Tensor:
    """Pre-activations [B, k] in x's dtype at the [B, k] latents ``indices``, from their rows: the
    fp64 winners' exact values (keys rank by fp32-rounded values), and the fp32 values of the bf16
    candidates (``_bf16_candidates_forward``). On CPU through ``_common.rows_dot`` (B=1000, k=56,
    m=768, bf16 weight: 13 ms against 39 for gathered rows and batched GEMVs); elsewhere the
    gathered [chunk, k, m] rows stay within half the tile budget."""
    if x.device.type == "cpu":
        values = rows_dot(x, weight, indices)
    else:
        B, k = indices.shape
        chunk = max(1, CPU_TILE_ELEMS // 2 // max(1, k * x.shape[1]))
        values = torch.empty(B, k, dtype=x.dtype, device=x.device)
        for b0 in range(0, B, chunk):
            rows = weight.index_select(0, indices[b0:b0 + chunk].reshape(-1)).view(-1, k, x.shape[1]).to(x.dtype)
            values[b0:b0 + chunk] = torch.bmm(rows, x[b0:b0 + chunk, :, None]).squeeze(2)
    if bias is not None:
        values += bias[indices]
    return values


def _torch_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, out_dtype) -> tuple[Tensor, Tensor]:
    if x.shape[0] == 0:
        return x.new_empty(0, k, dtype=out_dtype), x.new_empty(0, k, dtype=torch.int64)
    return _blocked_forward(x, weight, bias, k, out_dtype, exact_keys=x.device.type != "cpu")


# ---------------------------------------------------------------------------------------------
# torch.library registration: 2-D [B, m] inputs; the public function flattens leading dims.
# ---------------------------------------------------------------------------------------------

def _topk_encode_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, use_triton: bool
) -> tuple[Tensor, Tensor]:
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if use_triton:
        with on_device(x.device):
            return _triton_forward(x, weight, bias, k, out_dtype)
    return _torch_forward(x, weight, bias, k, out_dtype)


def _topk_encode_fake(x, weight, bias, k, use_triton):
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape[0], k, dtype=out_dtype), x.new_empty(x.shape[0], k, dtype=torch.int64)


def _topk_encode_backward_impl(
    grad_acts: Tensor, top_acts: Tensor, top_indices: Tensor, x: Tensor, weight: Tensor,
    need_x: bool, need_weight: bool, need_bias: bool, bias_dtype: Optional[torch.dtype], use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    n = weight.shape[0]
    # ReLU: only selected entries with positive pre-activation pass gradient.
    g = torch.where(top_acts > 0, grad_acts, torch.zeros((), dtype=grad_acts.dtype, device=grad_acts.device))
    g = g.contiguous()
    gx, gw, gb = (unused_grad(grad_acts) for _ in range(3))
    if use_triton:
        with on_device(x.device):
            if need_x:
                gx = decode_triton_forward(g, top_indices, weight, None, x.dtype)
            if need_weight:
                gw = decode_triton_grad_weight(x, g, top_indices, n, weight.dtype)
    elif x.device.type == "cpu" and dense_pays(x.shape[0], top_indices.shape[1], n, DENSE_BACKWARD_SHARE):
        # k a large share of n: the same decodes through dense [tokens, n] tiles and GEMMs, where the
        # sparse routines gather B * k rows of the weight and of x at gather speed.
        cd = compute_dtype(torch.promote_types(torch.promote_types(g.dtype, x.dtype), weight.dtype))
        if need_x:
            gx = dense_decode(g, top_indices, weight, None, cd).to(x.dtype)
        if need_weight:
            gw = dense_grad_weight(x, g, top_indices, n, cd).to(weight.dtype)
    else:
        if need_x:
            gx = decode_torch_forward(g, top_indices, weight, None, x.dtype)
        if need_weight:
            gw = decode_torch_grad_weight(x, g, top_indices, n, weight.dtype)
    if need_bias and bias_dtype is not None:
        gb = grad_bias(g, top_indices, n, bias_dtype)
    return gx, gw, gb


def _topk_encode_backward_fake(
    grad_acts, top_acts, top_indices, x, weight, need_x,
    need_weight, need_bias, bias_dtype, use_triton,
):
    gx = torch.empty_like(x) if need_x else unused_grad(grad_acts)
    gw = torch.empty_like(weight) if need_weight else unused_grad(grad_acts)
    need_gb = need_bias and bias_dtype is not None
    gb = weight.new_empty(weight.shape[0], dtype=bias_dtype) if need_gb else unused_grad(grad_acts)
    return gx, gw, gb


_topk_encode_backward_op = define_op(
    "topk_kernels::topk_encode_backward", _topk_encode_backward_impl, _topk_encode_backward_fake
)


def _setup_context(ctx, inputs, output):
    x, weight, bias, k, use_triton = inputs
    top_acts, top_indices = output
    ctx.save_for_backward(x, weight, top_acts, top_indices)
    ctx.use_triton = use_triton
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(top_indices)


def _backward(ctx, grad_acts, grad_indices):
    x, weight, top_acts, top_indices = ctx.saved_tensors
    need_x, need_weight, need_bias, _, _ = ctx.needs_input_grad
    gx, gw, gb = _topk_encode_backward_op(
        grad_acts, top_acts, top_indices, x, weight,
        need_x, need_weight, need_bias, ctx.bias_dtype, ctx.use_triton,
    )
    return (
        gx if need_x else None,
        gw if need_weight else None,
        gb if (need_bias and ctx.bias_dtype is not None) else None,
        None,
        None,
    )


_topk_encode_op = define_op(
    "topk_kernels::topk_encode", _topk_encode_impl, _topk_encode_fake, _setup_context, _backward
)


def topk_encode(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    k: int,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Encode each token to its k largest ReLU'd pre-activations, without forming [..., n].

    Args:
        x: [..., m] float inputs.
        weight: [n, m] encoder weights, one row per latent.
        bias: optional [n] encoder bias.
        k: latents kept per token, 1 <= k <= n.
        backend: None (automatic), "triton", "torch" or "reference".

    Returns:
        (top_acts [..., k] in the promoted dtype of x and weight, top_indices [..., k] int64):
        the k largest of ``pre = x @ weight.T + bias`` per token sorted descending (equal values:
        lower latent id first), ``top_acts = relu(pre)`` at those indices. float64 inputs are
        ranked by their pre-activations rounded to fp32 (values within an fp32 rounding, or past
        its range, count as equal) and return the winners' exact float64 values
        (``topk_kernels._common``); ``backend="reference"`` ranks the exact float64 values.
    """
    check_float("x", x)
    check_matrix("weight", weight)
    n, m = weight.shape
    if x.shape[-1] != m:
        raise ValueError(f"x: expected last dimension m = weight.shape[1] = {m}, got shape {tuple(x.shape)}")
    check_bias("bias", bias, n, "n = weight.shape[0]")
    check_k(k, n)
    check_same_device(x=x, weight=weight, bias=bias)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # every backend's (the bias's does not count)
    backend = resolve_backend(backend, weight.device, out_dtype, ("weight", n))
    if backend == "reference":
        # In the promoted dtype, as every backend computes: the reference's matmul takes one dtype.
        acts, idx = reference.topk_encode(x.to(out_dtype), weight.to(out_dtype), bias, k)
        return acts.to(out_dtype), idx
    lead = x.shape[:-1]
    top_acts, top_indices = _topk_encode_op(
        x.reshape(-1, m).contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        k,
        backend == "triton",
    )
    return top_acts.reshape(*lead, k), top_indices.reshape(*lead, k)
