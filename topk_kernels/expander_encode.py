"""Expander encoder: ``pre[..., j] = sum_t values[j, t] * x[..., rows[j, t]] + bias[j]``, then TopK + ReLU.

An Expander SAE's (tied) encoder row j lives on the same d of the m model coordinates as its
decoder atom, stored compactly as ``values [n, d]`` on ``rows [n, d]``. Each pre-activation is a
gather of d inputs and a d-term dot product, so encoding costs O(B*n*d) instead of the dense GEMM's
O(B*n*m); the cost that remains is choosing the top k of n per token.

The Triton kernel runs one program per (token block, latent split): per [BLOCK_B, BLOCK_N] tile it
gathers ``x[b, rows[j, t]]`` two degrees t at a time (fp32 accumulation), adds the bias and folds
the tile into running top-K_PAD keys with the shared helpers of :mod:`topk_kernels._topk`; stage 2
merges the splits. The [B, n] pre-activations are never written. On CUDA a second strategy,
"chunked", writes the gathered pre-activations one bounded chunk at a time and selects with
topk_encode's selection kernel (``expander_strategy`` picks; see the tables there). Both gather
from x transposed (``transposed_tokens``, a copy of at most XT_CHUNK_BYTES of tokens per launch,
plus a zero row that out-of-range rows read), so that the lanes reading one latent read
consecutive tokens of one model coordinate: 16-byte vector loads and 1/16 (bf16) or 1/8 (fp32) of
a 32-byte sector per value, where x row-major costs a sector per value (benchmarks/RESULTS.md,
"coalesced gathers"). Rows and values reach the kernels packed per degree (``pack_taps``: [d, n]
int64, made per call), one coalesced load per degree and tile; both degrees' packed loads, then
both gathers, are issued before the trip waits on any (RESULTS.md, "two degrees a trip").

The CPU path computes pre-activations a (token tile x latent block) at a time with
``F.embedding_bag`` over the transposed token tile (a latent is a bag of d rows of ``x.T``,
weighted by its values) and keeps a running top-k with ``_topk.token_blocked_topk``, so extra
memory stays O(tile) instead of O(B*n). A degenerate Expander, its atoms a large share of m (d *
EXPANDER_DENSE_SHARE >= m), goes through its dense masked rows, a few latents at a time, and GEMMs
instead of the gathers.

Backward (only through selected entries with positive pre-activation, as ReLU dictates), with g the
masked gradient of ``top_acts``: ``grad x`` is exactly an expander decode of g, and ``grad values``
(``+= g * x[b, rows[j, t]]``) is exactly the expander decoder's value gradient with x in the role
of the output gradient, so both reuse :mod:`topk_kernels.expander_decode`'s kernels and CPU
routines (the value gradient sorted by latent and written once per atom, deterministic);
``grad bias`` is a scatter-add of g.

Kernel, CPU path and the ``torch.library`` registration (fake + autograd) all live here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from ._common import (
    HAS_TRITON,
    MAX_GRID_Y,
    check_bias,
    check_expander,
    check_expander_rows,
    check_float,
    check_k,
    check_same_device,
    compute_dtype,
    define_op,
    grad_bias,
    launch_options,
    on_device,
    pow2,
    resolve_backend,
    unused_grad,
)
from ._topk import (
    ALIGN,
    candidate_buffer,
    cpu_tile,
    latent_splits,
    merge_candidates,
    resident_ctas,
    token_blocked_topk,
)
from .expander_decode import (
    torch_backward as decode_torch_backward,
    triton_backward as decode_triton_backward,
    torch_forward as decode_torch_forward,
    triton_forward as decode_triton_forward,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._topk import empty_slots, fold_tile

    @triton.jit
    def _tap(degree_ptr, offs_n, live, M, LD):
        """One degree of the tile's latents from its row of ``taps`` ([D, N] int64, fp32 value
        bits << 32 | row; see ``pack_taps``): (offset of the row in x transposed, value). A row
        outside [0, M) (``pack_taps`` makes it -1, and so is a dead lane's) reads row M of x
        transposed, which is all zeros: it contributes nothing (the index contract of
        ``_common``) and the gather needs no mask, hence no mask to move between layouts."""
        tap = tl.load(degree_ptr + offs_n, mask=live, other=0xFFFFFFFF)
        r = tap.to(tl.int32)
        ok = (r >= 0) & (r < M)
        tl.device_assert(ok | ~live, "rows: an index outside [0, m)")
        v = (tap >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        return tl.where(ok, r, M) * LD, v

    # Degrees per trip of ``_gather_tile``'s loop (its body is written for two; the instruction
    # model in benchmarks/expander_encode_model.py reads this and ``odd_apart``).
    DEGREES_PER_TRIP = 2

    @triton.jit
    def _gather_tile(xt_blk, taps_ptr, offs_n, mask_n, M, N, D, LD,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, ODD_APART: tl.constexpr):
        """fp32 [BLOCK_B, BLOCK_N] pre-activations (no bias) of one token block x latent tile:
        pre[b, j] = sum_t values[j, t] * xt[rows[j, t], b]. xt_blk points at the block's first
        token of coordinate 0 of x transposed ([M, LD]): the lanes reading one latent read
        consecutive tokens of one coordinate (contiguous, aligned, vector loads). Two degrees per
        trip: both taps are loaded, then both gathers issued, before anything waits, so a warp
        waits on two L2 round trips per two degrees, not four. Nothing loaded is carried across
        trips (a carried bf16 tile costs register moves that wait on the load). Registers hold
        two gathered tiles, never a cube. With ODD_APART an odd D's first degree runs alone
        before the loop; without it, the last trip's second degree is a dead one (row M, value 0)
        that still loads and multiplies (``odd_apart`` chooses)."""
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        t0 = 0
        if ODD_APART:
            if D % 2 == 1:
                off0, v0 = _tap(taps_ptr, offs_n, mask_n, M, LD)
                acc = tl.load(xt_blk + off0[None, :]).to(tl.float32) * v0[None, :]
            t0 = D % 2
        degree_ptr = taps_ptr + t0 * N  # advanced by N at a time: 64-bit pointer steps, no int32 t * N
        for t in range(t0, D, 2):
            live1 = mask_n
            if not ODD_APART:
                live1 = mask_n & (t + 1 < D)
            off0, v0 = _tap(degree_ptr, offs_n, mask_n, M, LD)
            degree_ptr += N
            off1, v1 = _tap(degree_ptr, offs_n, live1, M, LD)
            degree_ptr += N
            x0 = tl.load(xt_blk + off0[None, :])
            x1 = tl.load(xt_blk + off1[None, :])
            # One statement (FMUL + FFMA + FADD an element pair): as two FFMA statements the loop is
            # 30 instructions shorter, but sm_90 bf16 needs 151 registers (3 CTAs) or spills at 128.
            acc += x0.to(tl.float32) * v0[None, :] + x1.to(tl.float32) * v1[None, :]
        return acc

    # TILES_PER_SPLIT not specialised and C a multiple of 16, so that the occupancy query's build
    # is the launch's (as topk_encode's _encode_fwd_kernel).
    @triton.jit(do_not_specialize=["TILES_PER_SPLIT"])
    def _expander_encode_fwd_kernel(
        xt_ptr, taps_ptr, bias_ptr, cand_ptr,
        B, N, M, D, LD, TILES_PER_SPLIT, C,
        HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
        ODD_APART: tl.constexpr,
    ):
        """Fused strategy, program (token block, latent split): the split's top K_PAD keys per
        token -> cand[:, split]. xt is x transposed, [M, LD] with LD a multiple of BLOCK_B (padded
        tokens are zeros), gathered by ``_gather_tile``."""
        pid_b = tl.program_id(0)
        split = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        # Tokens of this block: no mask (LD is padded), and along dim 0, the contiguous one.
        xt_blk = xt_ptr + (pid_b * BLOCK_B + tl.arange(0, BLOCK_B))[:, None]
        running = empty_slots(BLOCK_B, K_PAD)
        n_first = split * TILES_PER_SPLIT * BLOCK_N
        for tile in range(0, TILES_PER_SPLIT):
            offs_n = n_first + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            acc = _gather_tile(xt_blk, taps_ptr, offs_n, mask_n, M, N, D, LD, BLOCK_B, BLOCK_N, ODD_APART)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            running = fold_tile(running, acc, offs_n, mask_n)
        out = cand_ptr + offs_b.to(tl.int64)[:, None] * C + split * K_PAD + tl.arange(0, K_PAD)[None, :]
        tl.store(out, running, mask=(offs_b < B)[:, None])

    @triton.jit
    def _expander_pre_kernel(
        xt_ptr, taps_ptr, pre_ptr,
        B, NC, N0, N, M, D, LD,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, ODD_APART: tl.constexpr,
    ):
        """Chunked strategy, program (token block, latent tile): the fp32 pre-activations (no
        bias) of latents N0 + [0, NC) -> pre [B, NC], row-major, for the selection kernels."""
        pid_b = tl.program_id(0)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        xt_blk = xt_ptr + offs_b[:, None]
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < NC
        acc = _gather_tile(xt_blk, taps_ptr, N0 + cols, mask_n, M, N, D, LD, BLOCK_B, BLOCK_N, ODD_APART)
        out = pre_ptr + offs_b.to(tl.int64)[:, None] * NC + cols[None, :]
        tl.store(out, acc, mask=(offs_b < B)[:, None] & mask_n[None, :])


# Launch configurations of the fused kernel, by K_PAD = next_pow2(k): (BLOCK_B, BLOCK_N, num_warps).
# BLOCK_N >= K_PAD (a tile's top-K_PAD needs that many columns). The gather puts tokens along lanes
# (16-byte vectors, then lanes along latents, warps along latents), so a tile's cost per
# pre-activation falls with BLOCK_N (rows/values loads and fold_tile's reductions are per column
# or per row), while fold_tile's insertion passes per tile grow with BLOCK_B (the slowest row sets
# the count). Chosen on sm_90 by warp instructions per pre-activation (from the SASS, with simulated
# insertion passes) at B=4096, m=2048, n=2**20, d=7 (benchmarks/RESULTS.md, "coalesced
# gathers"); K_PAD=256 takes 16 tokens and 8 warps for 2 CTAs per SM. tests/gpu_compile.py
# compiles every entry for sm_80 / sm_90 and checks for spills.
EXPANDER_ENCODE_CONFIGS = {
    1: (32, 128, 4),
    2: (32, 128, 4),
    4: (32, 128, 4),
    8: (32, 128, 4),
    16: (32, 128, 4),
    32: (32, 128, 4),
    64: (32, 128, 4),
    128: (32, 128, 4),
    256: (16, 256, 8),
}
MAX_FUSED_K_PAD = max(EXPANDER_ENCODE_CONFIGS)
# Register caps (ptxas ``maxnreg``) by (dtype of x, K_PAD), where the uncapped build would lose a
# resident CTA per SM that a capped one keeps without spilling: fp32 at K_PAD=64 takes 188
# registers on sm_90 uncapped (2 CTAs of 4 warps) and 168 capped (3 CTAs, 0 spills, as on sm_80).
# Only where it helps: a cap lets ptxas use up to it (bf16 at K_PAD=64 goes from 128 registers to
# 160 under a 168 cap). tests/gpu_compile.py compiles every entry and checks for spills.
EXPANDER_ENCODE_MAXNREG = {(torch.float32, 64): 168}

# CPU path tiles: embedding_bag writes a tile's pre-activations as [block_n, block_b] and they are
# transposed into a reused [block_b, block_n] buffer, so CPU_TILE_ELEMS fp32 (8 MiB) plus one
# piece (below) exist at a time. Tiles are wide in latents (one block spans all n up to
# CPU_MAX_BLOCK_N): torch.topk costs less per element on long rows (1.4 ns at 65536 vs 2.9 at 4096
# here), so a tile is narrow in tokens instead: at least CPU_MIN_BLOCK_B. A small tile pays twice:
# (1) glibc serves an allocation of 32 MiB or more from a fresh mmap, so a 64 MiB buffer faulted
# in its pages on every call (B=1000, m=768, n=16384, d=7, k=32: 95.7 -> 69.5 ms with malloc's
# mmap threshold raised, against 46.5 ms with this tile); (2) a tile of 32-128 tokens keeps the
# transposed token table (m x block_b) and the piece being transposed in L2. Medians, one thread,
# the old budget (16 Mi elements, 128 tokens at least) against this one (ms): B=1000, m=768,
# n=16384, k=8, d=3: 76.6 / 34.4; k=32, d=7: 98.5 / 51.1; B=4096, m=2048, n=65536, k=64, d=7:
# 906 / 708-737; B=1024, m=576, n=4608, k=32, d=7: 25.3 / 21.4. A floor of 64 tokens won at d=30
# (B=512, m=2048, n=131072: 256 against 286) and lost at d=7 (755-778 against 708); RESULTS.md,
# "Thirtieth session". The dense-rows route below (a GEMM, which wants many tokens a tile) and
# other devices keep the large tiles: d=100 at m=768 (B=2048, k=32) took 435 ms with them and 531
# with these.
CPU_TILE_ELEMS = 2 * 2**20
CPU_MAX_BLOCK_N = 65536
CPU_MIN_BLOCK_B = 32
WIDE_TILE_ELEMS = 16 * 2**20
WIDE_MIN_BLOCK_B = 128
# embedding_bag writes a tile CPU_PIECE_ELEMS pre-activations (1 MiB fp32) at a time, each piece
# transposed while it is still in cache (L2, 2 MiB a core on this machine). Writing the whole
# [block_n, block_b] tile and then transposing it went to DRAM and back twice: same-run medians of
# one 682 x 24576 tile (m=768, d=8, fp32) 74 ms whole, 21 ms in 384-latent pieces; the whole
# forward, B=4096 m=768 n=24576 d=8 k=32, 645-776 ms before, 286-342 ms after (RESULTS.md).
CPU_PIECE_ELEMS = 2**18
# A degenerate Expander, whose atoms cover a large share of m (d * EXPANDER_DENSE_SHARE >= m), is
# encoded on CPU through its dense masked rows, built a piece of DENSE_PIECE_ELEMS at a time, and a
# GEMM. With the gather path's small tiles (above) the gathers win to d ~ m / 3: same-run medians
# (ms, one thread, B=1000, n=16384, dense / gathers) at m=768, k=32: d=96 223 / 109, d=192 224 /
# 180, d=384 213 / 299; at m=100, k=8: d=25 75 / 44, d=50 77 / 58; m=16, n=1000, d=8: 3.7 / 5.1.
# (With the old 64 MiB tiles the crossover had measured at d ~ m / 10.) A real Expander SAE (d = 7
# to 100 at m = 2048) keeps the gathers.
EXPANDER_DENSE_SHARE = 3
DENSE_PIECE_ELEMS = 2**20


# The kernel gathers from x transposed; that copy is made for XT_CHUNK_BYTES of tokens at a time
# (one launch each), which bounds the extra memory on large batches: 64 MiB is 8192 tokens at
# m=2048 in fp32, so training batches take one launch.
XT_CHUNK_BYTES = 64 * 2**20


def transposed_tokens(x: Tensor, block_b: int) -> Tensor:
    """x [B, m] -> x.T as [m + 1, LD], LD = B rounded up to a multiple of block_b, padded tokens
    and row m zero: the kernels' gather reads block_b consecutive tokens of one coordinate,
    aligned and unmasked, and reads row m for a row outside [0, m)."""
    B, M = x.shape
    ld = triton.cdiv(B, block_b) * block_b
    if (M + 1) * ld > 2**31 - 1:  # the kernels' row offsets are int32 (launches hold XT_CHUNK_BYTES)
        raise ValueError(f"x: expected (m + 1) * {ld} < 2**31 elements of x.T per launch of the Triton "
                         f"expander encoder (int32 offsets), got m = {M}")
    return _padded_transpose(x, M + 1, ld, x.dtype)


def _padded_transpose(x: Tensor, rows: int, ld: int, dtype: torch.dtype) -> Tensor:
    """x [b, m] -> [rows, ld] in dtype (rows >= m, ld >= b): x.T in the top-left corner, zeros in
    the padding. Both token tables (the kernels' ``transposed_tokens``, the CPU path's
    ``_token_table``) are this with their own padding."""
    b, m = x.shape
    xt = x.new_empty(rows, ld, dtype=dtype)
    xt[:m, :b].copy_(x.T)
    xt[:m, b:].zero_()
    xt[m:].zero_()
    return xt


# --- which strategy runs on CUDA -----------------------------------------------------------------
# "fused" (``_expander_encode_fwd_kernel``: gather and fold_tile in one kernel, 32-token tiles) or
# "chunked" (``_chunked_forward``: ``_expander_pre_kernel`` writes a chunk of fp32 pre-activations,
# then topk_encode's ``select_chunks`` folds it with its selection kernel). Measured on a GPU,
# (device name, dtype of x, K_PAD) -> strategy: only a measurement goes here. H100, bf16 B=4096,
# m=2048, n=2**20, d=7, k=64 (benchmarks/encode_sweep.py --expander; RESULTS.md, "Expander encoder,
# fused against chunked, measured"): fused 25.74 / 25.55 ms in two runs; chunked 29.35 with the
# 8 x 128 insertion selection tile and 28.54 with the 1 x 128 buffer tile (32 Mi pre-activations a
# chunk; 8 Mi: 33.68 / 46.73).
EXPANDER_MEASURED: dict[tuple[str, torch.dtype, int], str] = {
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 64): "fused",
}
# PREDICTED for CUDA where nothing was measured: fused. The earlier prediction (chunked, ~11-15 ms
# against the fused kernel's 25.5: the fused kernel's insertion pass holds 12 BAR.SYNC and 852
# instructions a warp in the sm_90 SASS; the chunked strategy pays ~10 ms of HBM traffic for its
# pre-activations and selects with small tiles) was off by 2x: the measured chunked strategy's
# gather kernel writing fp32 pre-activations and the selection took 28.5 ms, not 11-15.
EXPANDER_PREDICTED = "fused"
# Chunked strategy tiles: at most EXPANDER_CHUNK_ELEMS fp32 pre-activations at a time (128 MiB:
# fewer, larger chunks keep the two launches per chunk ahead of the GPU), up to
# EXPANDER_CHUNK_MAX_BLOCK_B tokens; the gather runs the fused kernel's tile without the fold.
EXPANDER_CHUNK_ELEMS = 32 * 2**20
EXPANDER_CHUNK_MAX_BLOCK_B = 8192
EXPANDER_GATHER_TILE = (32, 128, 4)


def expander_strategy(k: int, x_dtype: torch.dtype, device: torch.device) -> str:
    """"fused" or "chunked" for the Triton backend: a GPU measurement if there is one, else the
    prediction on CUDA; the interpreter runs the fused kernel (proving it is the point; the tests
    force the chunked one too). Past the fused kernel's K_PAD both take the blocked path."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    measured = EXPANDER_MEASURED.get((name, x_dtype, pow2(k)))
    if measured is not None:
        return measured
    return EXPANDER_PREDICTED if device.type == "cuda" else "fused"


def odd_apart(x_dtype: torch.dtype, fused: bool) -> bool:
    """The kernels' ODD_APART: whether ``_gather_tile`` runs an odd d's first degree alone before
    its loop, instead of as a dead second degree (row m, value 0) in its last trip that still
    loads and multiplies. At d=7 that is 3 trips and a lone degree for 4 trips: sm_90 bf16 K_PAD=64,
    266 x 3 + 112 against 269 x 4 instructions a tile's gather (-15 %), the same 8 waits. Not in the
    fused kernel on fp32 x: there L2 bytes bound it, not instructions (the dead degree's gather
    reads the zero row, from L1), and at K_PAD=64 the lone degree spills 8 bytes on sm_80 under
    the 168-register cap (RESULTS.md, "odd degree apart")."""
    return not fused or x_dtype != torch.float32


PACK_CHUNK = 2**18  # latents per step of pack_taps: its temporaries stay ~2 MiB x d


def pack_taps(values: Tensor, rows: Tensor, m: int) -> Tensor:
    """values, rows [n, d] -> taps [d, n] int64, what the kernels read per degree: the fp32 bits of
    values[j, t] in the high half, rows[j, t] in the low half, and -1 there for a row outside
    [0, m) (the kernels read a zero row for it). One coalesced load per degree and tile gives
    both, and two layout conversions (not three with the mask) put them where the gather needs
    them. Made per call (n * d * 8 bytes: 58 MB at n = 2**20, d = 7, freed when the forward
    returns), PACK_CHUNK latents at a time; values are rounded to fp32 as the kernels'
    accumulation does."""
    n, d = rows.shape
    taps = torch.empty(d, n, device=rows.device, dtype=torch.int64)
    for j0 in range(0, n, PACK_CHUNK):  # temporaries of one chunk, not of all n
        block, r = taps[:, j0:j0 + PACK_CHUNK], rows[j0:j0 + PACK_CHUNK]
        block.copy_(values[j0:j0 + PACK_CHUNK].float().view(torch.int32).T)
        block.bitwise_left_shift_(32)
        low = torch.where((r >= 0) & (r < m), r, -1).to(torch.int64).bitwise_and_(0xFFFFFFFF)
        block.bitwise_or_(low.T)
    return taps


def _xt_tokens(x: Tensor, block_b: int) -> int:
    """Tokens of x per transposed copy: a multiple of block_b whose copy fits XT_CHUNK_BYTES."""
    return max(1, XT_CHUNK_BYTES // (x.shape[1] * x.element_size() * block_b)) * block_b


def _triton_forward(x: Tensor, values: Tensor, rows: Tensor, bias: Optional[Tensor], k: int, out_dtype):
    """x [B, m], values/rows [n, d], bias [n] or None -> (top_acts [B, k], top_indices [B, k])."""
    B = x.shape[0]
    k_pad = pow2(k)
    if k_pad > MAX_FUSED_K_PAD:
        # Registers cannot hold that many candidates per token: blocked gathers + exact key
        # top-k, still without a [B, n] tensor and without host syncs. zero_row keeps the
        # kernels' index contract there (embedding_bag fails on a row outside [0, m)).
        return _blocked_forward(x, values, rows, bias, k, out_dtype, exact_keys=True, zero_row=True)
    if B > 0 and expander_strategy(k, x.dtype, x.device) == "chunked":
        return _chunked_forward(x, values, rows, bias, k, out_dtype)
    chunk = _xt_tokens(x, EXPANDER_ENCODE_CONFIGS[k_pad][0])
    taps = pack_taps(values, rows, x.shape[1])  # once for every launch of this call
    parts = [_fused_forward(x[b0:b0 + chunk], taps, bias, k, out_dtype) for b0 in range(0, B, chunk)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _fused_forward(x: Tensor, taps: Tensor, bias: Optional[Tensor], k: int, out_dtype):
    """One launch of the fused kernel over the tokens of x (and stage 2); taps [d, n] from ``pack_taps``."""
    B, M = x.shape
    D, N = taps.shape
    k_pad = pow2(k)
    block_b, block_n, num_warps = EXPANDER_ENCODE_CONFIGS[k_pad]
    n_tiles = triton.cdiv(N, block_n)
    token_blocks = triton.cdiv(B, block_b)
    xt = transposed_tokens(x, block_b)
    bias_arg = bias if bias is not None else xt  # any pointer: HAS_BIAS=False never reads it
    options = dict(HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_N=block_n, K_PAD=k_pad,
                   ODD_APART=odd_apart(x.dtype, fused=True), num_warps=num_warps,
                   maxnreg=EXPANDER_ENCODE_MAXNREG.get((x.dtype, k_pad)), **launch_options())
    ctas = resident_ctas(_expander_encode_fwd_kernel, x.device, (xt, taps, bias_arg, taps.new_empty(
        0, dtype=torch.int64), B, N, M, D, token_blocks * block_b, n_tiles, ALIGN), options)
    splits = latent_splits(token_blocks, n_tiles, x.device, ctas, _fill_cost_tiles(D, k_pad))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    cand = candidate_buffer(B, splits * k_pad, x.device)
    _expander_encode_fwd_kernel[(token_blocks, splits)](
        xt, taps, bias_arg, cand,
        B, N, M, D, token_blocks * block_b, tiles_per_split, cand.stride(0), **options,
    )
    return merge_candidates(cand, k, out_dtype)


def _chunked_forward(x: Tensor, values: Tensor, rows: Tensor, bias: Optional[Tensor], k: int, out_dtype):
    """Chunks of at most EXPANDER_CHUNK_ELEMS pre-activations: ``_expander_pre_kernel`` gathers a
    (token tile x latent chunk) into an fp32 buffer, topk_encode's ``select_chunks`` folds it into
    running candidates with its selection kernel. Extra memory: x transposed for one token tile,
    one chunk, O(B * K_PAD * splits). No host sync."""
    from .topk_encode import select_chunks

    B, M = x.shape
    N, D = rows.shape
    g_b, g_n, g_warps = EXPANDER_GATHER_TILE
    # Token tiles: their transposed copy within XT_CHUNK_BYTES, as in the fused strategy.
    block_b = min(B, EXPANDER_CHUNK_MAX_BLOCK_B, _xt_tokens(x, g_b))
    # Latent tiles run on grid axis 1, which CUDA caps at 65,535: with few tokens a chunk of
    # EXPANDER_CHUNK_ELEMS would otherwise span more (B=1, n=2^24: 131,072 tiles).
    block_n = min(N, max(1, EXPANDER_CHUNK_ELEMS // block_b), MAX_GRID_Y * g_n)
    taps = pack_taps(values, rows, M)
    tile: dict = {}  # the current token tile, transposed

    def pre_tile(b0: int, b1: int, start: int, stop: int) -> Tensor:
        if tile.get("b0") != b0:
            tile.clear()
            tile["b0"], tile["xt"] = b0, transposed_tokens(x[b0:b1], g_b)
        xt = tile["xt"]
        pre = torch.empty(b1 - b0, stop - start, device=x.device, dtype=torch.float32)
        _expander_pre_kernel[(triton.cdiv(b1 - b0, g_b), triton.cdiv(stop - start, g_n))](
            xt, taps, pre, b1 - b0, stop - start, start, N, M, D, xt.shape[1],
            BLOCK_B=g_b, BLOCK_N=g_n, ODD_APART=odd_apart(x.dtype, fused=False), num_warps=g_warps,
            **launch_options(),
        )
        return pre

    return select_chunks(pre_tile, B, N, k, block_b, block_n, bias, x.device, out_dtype)


def _fill_cost_tiles(d: int, k_pad: int) -> float:
    """A program's fixed cost in tiles: its first tiles insert K_PAD entries per row into empty
    slots, one ``fold_tile`` pass each. In the sm_90 SASS (bf16, K_PAD=64, 32 x 128 tiles, odd
    degree apart; ``benchmarks/expander_encode_model.py``) a pass is ~857 instructions per warp, a
    trip of two degrees ~266, an odd d's lone degree ~110 and a tile's other code ~628. (Until the
    fourteenth session: 850 / (141 d + 950), from older SASS; the split counts at the measured
    shapes, B = 512..8192 and n = 2^16..2^20, are the same under both.)"""
    return k_pad * 857 / (266 * (d // 2) + 110 * (d % 2) + 628)


# ---------------------------------------------------------------------------------------------
# CPU path. For a tile of tokens, x_tile.T [m, tile] is an embedding table whose rows are model
# coordinates; latent j is the bag rows[j, :] weighted by values[j, :], so one embedding_bag call
# yields pre.T for a block of latents. Measured against a CSR sparse matmul per block, blocked
# gathers x[:, rows].mul(values).sum(-1) and a torch.compile'd gather-reduce, it was the fastest
# (see benchmarks/RESULTS.md); the top-k over the blocks then dominates.
# ---------------------------------------------------------------------------------------------

def _exact_values(x: Tensor, values: Tensor, rows: Tensor, bias: Optional[Tensor], idx: Tensor) -> Tensor:
    """Pre-activations at the selected latents idx [B, k], in x's dtype: O(B*k*d) gathers, in token
    chunks whose [chunk, k, d] gathered rows and values stay within the CPU tile budget (all B at
    once would be 16 GiB of int64 rows at B*k*d = 2**31)."""
    B, K = idx.shape
    D = rows.shape[1]
    chunk = max(1, CPU_TILE_ELEMS // (K * D))
    pre = torch.empty(B, K, dtype=x.dtype, device=x.device)
    for b0 in range(0, B, chunk):
        sel = idx[b0:b0 + chunk]
        xs = x[b0:b0 + chunk].gather(1, rows[sel].flatten(1)).view(sel.shape[0], K, D)
        pre[b0:b0 + chunk] = (xs * values[sel]).sum(-1)
    return pre + bias[idx] if bias is not None else pre


def _token_table(x_tile: Tensor, dtype: torch.dtype, extra_rows: int = 0) -> Tensor:
    """x_tile [b, m] -> x_tile.T [m + extra_rows, ld] in dtype, zero beyond column b and in the
    extra rows: the embedding table of a token tile. From 512 bytes a row on, ld * itemsize is an
    odd multiple of 64 bytes, so the transposing copy, which reads a piece's column across rows ld
    apart, spreads them over every cache set (the padding, under two lines a row, adds 1.6 % to
    embedding_bag's work at b = 1024 in fp32 and at most a quarter at 512 bytes a row). With 2^j
    cache lines a row they fall in a few sets: a 1 MiB fp32 piece took 480-740 us to transpose here
    at b = 1024, 2048, 4096 against 200-240 us with 16 columns of padding, and 235-258 us against
    105-110 us at b = 128, 256, 512 (rows 65536 latents long)."""
    b, m = x_tile.shape
    line = max(1, 64 // dtype.itemsize)
    ld = b
    if b * dtype.itemsize >= 512:
        ld = -(-b // line) * line
        ld += line * (1 - (ld // line) % 2)
    return _padded_transpose(x_tile, m + extra_rows, ld, dtype)


def _blocked_forward(x, values, rows, bias, k, out_dtype, exact_keys: bool = False, zero_row: bool = False):
    """Tiles of tokens x latents (``_topk.cpu_tile``) through embedding_bag, then a running top-k.
    Extra memory: one tile buffer, one piece and the transposed token tile, plus O(B * k).
    ``zero_row`` (the Triton backend's fallback): a row outside [0, m) reads an extra zero row m
    of the token table, as the kernels do (``_tap``), so it contributes nothing (the index
    contract of ``_common``) instead of failing in embedding_bag; costs a copy of ``rows``."""
    B, M = x.shape
    N, D = rows.shape
    if zero_row:
        rows = torch.where((rows >= 0) & (rows < M), rows, M)
    cd = compute_dtype(out_dtype)
    vals = values.to(cd)
    bc = bias.to(cd) if bias is not None else None
    dense = x.device.type == "cpu" and not zero_row and D * EXPANDER_DENSE_SHARE >= M
    if x.device.type == "cpu" and not dense:
        block_b, block_n = cpu_tile(B, N, CPU_TILE_ELEMS, CPU_MAX_BLOCK_N, CPU_MIN_BLOCK_B)
    else:
        block_b, block_n = cpu_tile(B, N, WIDE_TILE_ELEMS, CPU_MAX_BLOCK_N, WIDE_MIN_BLOCK_B)
    buf = torch.empty(block_b * block_n, device=x.device, dtype=cd)
    table = {}  # the current token tile, transposed: one [m, tile] table reused by every block
    if dense:
        step = max(1, DENSE_PIECE_ELEMS // max(1, M))
        dense_rows = torch.empty(min(step, N), M, device=x.device, dtype=cd)

        def pre_tile(b0: int, b1: int, start: int, stop: int) -> Tensor:  # noqa: F811
            if table.get("b0") != b0:
                table.clear()
                table["b0"], table["x"] = b0, x[b0:b1].to(cd)
            out = buf[: (b1 - b0) * (stop - start)].view(b1 - b0, stop - start)
            for s in range(start, stop, step):
                e = min(stop, s + step)
                # the atoms' dense rows: repeated rows add up, as embedding_bag's gathers do
                w = dense_rows[: e - s].zero_().scatter_add_(1, rows[s:e], vals[s:e])
                part = out[:, s - start:e - start]
                if bc is None:
                    torch.mm(table["x"], w.T, out=part)
                else:
                    torch.addmm(bc[s:e], table["x"], w.T, out=part)
            return out

        top_vals, top_idx = token_blocked_topk(pre_tile, B, N, k, block_n, block_b, exact_keys=exact_keys)
        if cd == torch.float64:
            top_vals = _exact_values(x.to(cd), vals, rows, bc, top_idx)
        return top_vals.relu().to(out_dtype), top_idx

    def pre_tile(b0: int, b1: int, start: int, stop: int) -> Tensor:
        if table.get("b0") != b0:
            table.clear()
            table["b0"], table["xt"] = b0, _token_table(x[b0:b1], cd, int(zero_row))
        out = buf[: (b1 - b0) * (stop - start)].view(b1 - b0, stop - start)
        # embedding_bag writes latent-major rows; torch.topk is fastest along a contiguous dim, so
        # each piece is transposed into token-major rows while it is still in cache.
        step = max(1, CPU_PIECE_ELEMS // (b1 - b0)) if x.device.type == "cpu" else stop - start
        for s in range(start, stop, step):
            e = min(stop, s + step)
            pre_t = F.embedding_bag(rows[s:e], table["xt"], per_sample_weights=vals[s:e], mode="sum")
            if bc is not None:
                pre_t += bc[s:e, None]
            out[:, s - start:e - start].copy_(pre_t[:, : b1 - b0].T)
        return out

    top_vals, top_idx = token_blocked_topk(pre_tile, B, N, k, block_n, block_b, exact_keys=exact_keys)
    if cd == torch.float64:  # keys rank fp32-rounded values; return the exact winners
        top_vals = _exact_values(x.to(cd), vals, rows, bc, top_idx)
    return top_vals.relu().to(out_dtype), top_idx


def _torch_forward(x, values, rows, bias, k, out_dtype):
    return _blocked_forward(x, values, rows, bias, k, out_dtype, exact_keys=x.device.type != "cpu")


# ---------------------------------------------------------------------------------------------
# torch.library registration: 2-D [B, m] inputs; the public function flattens leading dims.
# ---------------------------------------------------------------------------------------------

def _expander_encode_impl(
    x: Tensor, values: Tensor, rows: Tensor, bias: Optional[Tensor], k: int, use_triton: bool,
    check_rows: bool,
) -> tuple[Tensor, Tensor]:
    # Checked here, inside the op, so it also runs (eagerly) under torch.compile.
    if check_rows:
        check_expander_rows(rows, x.shape[1], "m = x.shape[-1]")
    out_dtype = torch.promote_types(x.dtype, values.dtype)
    if x.shape[0] == 0:
        return x.new_empty(0, k, dtype=out_dtype), x.new_empty(0, k, dtype=torch.int64)
    if use_triton:
        with on_device(x.device):
            return _triton_forward(x, values, rows, bias, k, out_dtype)
    return _torch_forward(x, values, rows, bias, k, out_dtype)


def _expander_encode_fake(x, values, rows, bias, k, use_triton, check_rows):
    out_dtype = torch.promote_types(x.dtype, values.dtype)
    return x.new_empty(x.shape[0], k, dtype=out_dtype), x.new_empty(x.shape[0], k, dtype=torch.int64)


def _expander_encode_backward_impl(
    grad_acts: Tensor, top_acts: Tensor, top_indices: Tensor, x: Tensor, values: Tensor, rows: Tensor,
    need_x: bool, need_values: bool, need_bias: bool, bias_dtype: Optional[torch.dtype], use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    n = values.shape[0]
    m = x.shape[1]
    # ReLU: only selected entries with positive pre-activation pass gradient.
    zero = torch.zeros((), dtype=grad_acts.dtype, device=grad_acts.device)
    g = torch.where(top_acts > 0, grad_acts, zero).contiguous()
    gx, gv, gb = (unused_grad(grad_acts) for _ in range(3))
    if use_triton:
        with on_device(x.device):
            if need_x:  # out[b, rows[j, t]] += g[b, s] * values[j, t]: the expander decoder itself
                gx = decode_triton_forward(g, top_indices, values, rows, m, None, x.dtype)
            if need_values:  # += g[b, s] * x[b, rows[j, t]]: the decoder's value grad, x as its grad
                gv = decode_triton_backward(x, g, top_indices, values, rows, False, True)[1]
    else:
        if need_x:
            gx = decode_torch_forward(g, top_indices, values, rows, m, None, x.dtype)
        if need_values:
            gv = decode_torch_backward(x, g, top_indices, values, rows, False, True)[1]
    if need_values:
        gv = gv.to(values.dtype)
    if need_bias and bias_dtype is not None:
        gb = grad_bias(g, top_indices, n, bias_dtype)
    return gx, gv, gb


def _expander_encode_backward_fake(
    grad_acts, top_acts, top_indices, x, values, rows,
    need_x, need_values, need_bias, bias_dtype, use_triton,
):
    gx = torch.empty_like(x) if need_x else unused_grad(grad_acts)
    gv = torch.empty_like(values) if need_values else unused_grad(grad_acts)
    gb = (values.new_empty(values.shape[0], dtype=bias_dtype) if (need_bias and bias_dtype is not None)
          else unused_grad(grad_acts))
    return gx, gv, gb


_expander_encode_backward_op = define_op(
    "topk_kernels::expander_encode_backward", _expander_encode_backward_impl, _expander_encode_backward_fake
)


def _setup_context(ctx, inputs, output):
    x, values, rows, bias, k, use_triton, _ = inputs
    top_acts, top_indices = output
    ctx.save_for_backward(x, values, rows, top_acts, top_indices)
    ctx.use_triton = use_triton
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(top_indices)


def _backward(ctx, grad_acts, grad_indices):
    x, values, rows, top_acts, top_indices = ctx.saved_tensors
    need_x, need_values, _, need_bias, _, _, _ = ctx.needs_input_grad
    gx, gv, gb = _expander_encode_backward_op(
        grad_acts, top_acts, top_indices, x, values, rows,
        need_x, need_values, need_bias, ctx.bias_dtype, ctx.use_triton,
    )
    return (
        gx if need_x else None,
        gv if need_values else None,
        None,
        gb if (need_bias and ctx.bias_dtype is not None) else None,
        None,
        None,
        None,
    )


_expander_encode_op = define_op(
    "topk_kernels::expander_encode", _expander_encode_impl, _expander_encode_fake, _setup_context, _backward
)


def expander_encode(
    x: Tensor,
    values: Tensor,
    rows: Tensor,
    bias: Optional[Tensor],
    k: int,
    *,
    backend: Optional[str] = None,
    check_rows: bool = True,
) -> tuple[Tensor, Tensor]:
    """Encode each token through an expander (d-sparse) dictionary to its k largest ReLU'd
    pre-activations, without forming [..., n].

    Args:
        x: [..., m] float inputs.
        values: [n, d] float encoder values (an Expander SAE's tied, normalised atoms).
        rows: [n, d] int64 model coordinates in [0, m) of those values, distinct within each
            latent (as ``sae.masks.expander_mask`` draws them). An integer buffer: no gradient.
        bias: optional [n] encoder bias.
        k: latents kept per token, 1 <= k <= n.
        backend: None (automatic), "triton", "torch" or "reference".
        check_rows: check ``rows`` with ``topk_kernels.check_expander_rows`` on every call (one
            host sync on CUDA); False for a caller that checked its fixed ``rows`` once.

    Returns:
        (top_acts [..., k] in the promoted dtype of x and values, top_indices [..., k] int64): the
        k largest of ``pre[..., j] = sum_t values[j, t] * x[..., rows[j, t]] + bias[j]`` per token,
        sorted descending (equal values: lower latent id first; NaN above +inf, see
        ``topk_kernels._common``), ``top_acts = relu(pre)`` there. float64 inputs are ranked by
        their pre-activations rounded to fp32 (values within an fp32 rounding, or past its range,
        count as equal) and return the winners' exact float64 values (``backend="reference"``
        ranks the exact float64 values). Gradients flow to x, values
        and bias through the selected, positive entries.
    """
    check_float("x", x)
    m = check_expander(values, rows, x.shape[-1])
    n = values.shape[0]
    check_bias("bias", bias, n, "n = values.shape[0]")
    check_k(k, n)
    check_same_device(x=x, values=values, rows=rows, bias=bias)
    out_dtype = torch.promote_types(x.dtype, values.dtype)  # every backend's (the bias's does not count)
    backend = resolve_backend(backend, values.device, out_dtype, ("values", n))
    if backend == "reference":
        if check_rows:
            check_expander_rows(rows, m, "m = x.shape[-1]")
        # In the promoted dtype, as every backend computes: the reference's matmul takes one dtype.
        acts, idx = reference.expander_encode(x.to(out_dtype), values.to(out_dtype), rows.long(), bias, k)
        return acts.to(out_dtype), idx
    lead = x.shape[:-1]
    top_acts, top_indices = _expander_encode_op(
        x.reshape(-1, m).contiguous(),
        values.contiguous(),
        rows.long().contiguous(),
        bias.contiguous() if bias is not None else None,
        k,
        backend == "triton",
        check_rows,
    )
    return top_acts.reshape(*lead, k), top_indices.reshape(*lead, k)
