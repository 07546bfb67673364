"""Row gradients of a dictionary indexed by latent, written once: the sorted-segment machinery.

Three backward passes share one shape: the decoder's weight gradient
(``gw[j, :] += top_acts[b, s] * grad[b, :]`` for ``j = top_indices[b, s]``), the encoder's weight
gradient (the same with ``x`` and the masked activation gradient) and the expander decoder's value
gradient (``gvalues[j, t] += top_acts[b, s] * grad[b, rows[j, t]]``). Scattering them with atomics
costs a zero-filled fp32 [n, m] buffer, a cast pass and one atomic per element; here the entries
are instead sorted by latent once (``sort_by_latent``, shareable by the encoder's and the
decoder's backward of one step) and every row is accumulated in fp32 registers and written once,
in the output's dtype:

1. ``_rowgrad_chunk_kernel``: program p owns the sorted entries ``[lo + p*CHUNK, lo + (p+1)*CHUNK)``
   (a fixed-size chunk, so a latent used by every token is spread over many programs, never one
   straggler). A latent whose entries all lie in the chunk gets its row written directly; a
   latent cut by a chunk edge leaves an fp32 partial row in one of the chunk's two scratch slots
   (slot 2p: the segment that began before the chunk; 2p+1: the one that runs past it). With
   ``FUSE_ACTS`` (whole rows per program) it also writes each entry's activation gradient
   ``grad[b] . atom[j]`` from the row it has just loaded, saving the decoder a second gather.
2. ``_rowgrad_finish_kernel``: one program per block of latents writes the rows nobody else
   does: zeros for inactive latents, and for each cut latent the sum of its partial rows in chunk
   order (deterministic by construction).

No atomics, no [n, m] fp32 intermediate (scratch is [2 * ceil(nnz / chunk), C] fp32, where
``chunk_size`` doubles CHUNK until it fits PART_BYTES), bit-identical
results across runs. The index contract of :mod:`topk_kernels._common` holds: entries whose latent
lies outside [0, n) sort outside ``[bounds[0], bounds[n])`` and are never touched (their
activation gradient is 0); gathered rows outside [0, m) are masked; with ``TOPK_KERNELS_DEBUG=1``
both are ``tl.device_assert``-ed. Every launch passes ``**launch_options()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._common import HAS_TRITON, launch_options, on_device, pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rowgrad_chunk_kernel(
        src_ptr, scale_ptr, sorted_ptr, order_ptr, bounds_ptr, atom_ptr, cols_ptr,
        out_ptr, part_ptr, gscale_ptr,
        N, M, C, K, CHUNK,
        GATHER: tl.constexpr, FUSE_ACTS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """out[j, c] = sum over sorted entries e of latent j: scale[e] * src[token(e), col(j, c)],
        col = c, or cols[j, c] with GATHER; chunk-cut rows go to part; FUSE_ACTS also writes
        gscale[e] = sum_c src[token(e), col(j, c)] * atom[j, c] (needs BLOCK_C >= C)."""
        p = tl.program_id(0).to(tl.int64)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        lo = tl.load(bounds_ptr)
        hi = tl.load(bounds_ptr + N)
        start = lo + p * CHUNK
        end = tl.minimum(start + CHUNK, hi)
        # -1 marks "no neighbour": every latent inside [lo, hi) is >= 0.
        prev = tl.load(sorted_ptr + start - 1, mask=(start > lo) & (start < end), other=-1)
        cur = tl.load(sorted_ptr + start, mask=start < end, other=-1)
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        atom = tl.zeros((BLOCK_C,), dtype=tl.float32)
        col = offs_c.to(tl.int64)
        live = mask_c
        started = cur != prev
        for i in range(start, end):
            nxt = tl.load(sorted_ptr + i + 1, mask=i + 1 < hi, other=-1)
            row = cur.to(tl.int64) * C
            if (cur != prev) | (i == start):  # a new segment, or this chunk's part of one
                started = cur != prev
                acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
                if GATHER:  # this latent's columns, loaded once per segment
                    col = tl.load(cols_ptr + row + offs_c, mask=mask_c, other=0).to(tl.int64)
                    live = mask_c & (col >= 0) & (col < M)
                    tl.device_assert(live | ~mask_c, "rows: expected every row in [0, m)")
                if FUSE_ACTS:
                    atom = tl.load(atom_ptr + row + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            e = tl.load(order_ptr + i)
            g = tl.load(src_ptr + (e // K) * M + col, mask=live, other=0.0).to(tl.float32)
            acc += tl.load(scale_ptr + e).to(tl.float32) * g
            if FUSE_ACTS:
                tl.store(gscale_ptr + e, tl.sum(g * atom).to(gscale_ptr.dtype.element_ty))
            seg_end = nxt != cur
            final = seg_end & started
            # Uniform branches: the row's store (and any layout change for it) runs once per segment.
            if final:
                tl.store(out_ptr + row + offs_c, acc.to(out_ptr.dtype.element_ty), mask=mask_c)
            elif seg_end | (i == end - 1):
                slot = 2 * p + started.to(tl.int64)
                tl.store(part_ptr + slot * C + offs_c, acc, mask=mask_c)
            prev = cur
            cur = nxt

    @triton.jit
    def _rowgrad_finish_kernel(
        bounds_ptr, part_ptr, out_ptr,
        N, C, NNZ, CHUNK,
        ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Rows of latents [pid*ROWS, (pid+1)*ROWS): zeros where inactive, the ordered sum of the
        partial rows where a chunk edge cut the segment; rows the chunk kernel wrote are left."""
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        lo = tl.load(bounds_ptr)
        hi = tl.load(bounds_ptr + N)  # dead unless TOPK_KERNELS_DEBUG=1 keeps the assertion
        tl.device_assert((lo == 0) & (hi == NNZ), "top_indices: expected every index in [0, n)")
        for r in range(ROWS):
            j = tl.program_id(0).to(tl.int64) * ROWS + r
            in_range = j < N
            s = tl.load(bounds_ptr + j, mask=in_range, other=0)
            e = tl.load(bounds_ptr + j + 1, mask=in_range, other=0)
            c0 = (s - lo) // CHUNK
            c1 = tl.maximum(e - 1 - lo, 0) // CHUNK
            cut = (e > s) & (c1 > c0)
            acc = tl.load(part_ptr + (2 * c0 + 1) * C + offs_c, mask=mask_c & cut, other=0.0)
            for c in range(c0 + 1, tl.where(cut, c1 + 1, c0 + 1)):
                acc += tl.load(part_ptr + 2 * c * C + offs_c, mask=mask_c, other=0.0)
            write = in_range & ((e == s) | cut)
            tl.store(out_ptr + j * C + offs_c, acc.to(out_ptr.dtype.element_ty), mask=mask_c & write)


# Launch parameters (tests/gpu_compile.py compiles exactly these).
CHUNK = 128  # sorted entries per chunk program: 4096 programs (~4 waves on an H100) at B*k = 2^19
PART_BYTES = 256 * 2**20  # scratch bound: at B*k = 2^26, m = 8192 chunks grow to 16,384 entries
MAX_BLOCK_C = 4096  # widest row one program holds (fp32 acc + atom + loaded row in registers)
FINISH_ROWS = 16  # latents per finish program: most rows are written by the chunk kernel
FINISH_BLOCK_C = 1024


def chunk_size(nnz: int, width: int) -> int:
    """Sorted entries per chunk program: CHUNK, doubled while the two fp32 partial rows per chunk
    would exceed PART_BYTES (without it the scratch is nnz * width / 64 floats: 32 GiB at
    B*k = 2^26, m = 8192, more than the fp32 [n, m] buffer this module avoids)."""
    chunk = CHUNK
    while chunk < nnz and 2 * -(-nnz // chunk) * width * 4 > PART_BYTES:
        chunk *= 2
    return chunk


def block_c(C: int) -> int:
    """Column block of the chunk kernel: the whole row up to MAX_BLOCK_C."""
    return pow2(C, lo=16, hi=MAX_BLOCK_C)


def chunk_warps(block: int) -> int:
    """One warp per 512 columns (16 fp32 per thread), 1 to 8."""
    return max(1, min(8, block // 512))


@dataclass(frozen=True)
class LatentSort:
    """(token, slot) entries of ``top_indices [B, k]`` sorted by latent.

    sorted_latents [nnz] int32: ascending, entries outside [0, n) clamped to -1 or n;
    order [nnz] int64: the flat position ``b*k + s`` of each sorted entry (stable: ties by position);
    bounds [n + 1] int64: latent j owns sorted positions ``[bounds[j], bounds[j+1])``.
    """

    sorted_latents: Tensor
    order: Tensor
    bounds: Tensor
    n: int


_last_sort: Optional[tuple] = None  # (key, indices kept alive, LatentSort)


def _sort_key(indices: Tensor, n: int):
    try:
        version = indices._version
    except RuntimeError:  # inference tensors carry no version counter: never cached
        return None
    return (indices.device, indices.data_ptr(), tuple(indices.shape), tuple(indices.stride()),
            indices.dtype, version, n)


def sort_by_latent(indices: Tensor, n: int) -> LatentSort:
    """Sort ``indices [B, k]`` by latent, reusing the previous sort when called on the same,
    unmodified index tensor (the encoder's and the decoder's backward of one training step).

    The cache holds a reference to ``indices``, so its storage (and address) cannot be reused
    while cached, and an in-place write through torch bumps ``_version``. Writes that bypass the
    version counter (through ``.data``, a NumPy or DLPack alias, a kernel) are not seen: an index
    tensor must not be changed that way between the encoder's forward and its backward (the
    weight and bias gradients of one backward would then both use the old ids).
    """
    global _last_sort
    capturing = indices.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = None if capturing else _sort_key(indices, n)
    if key is not None and _last_sort is not None and _last_sort[0] == key:
        return _last_sort[2]
    flat = indices.reshape(-1)
    # Clamp before narrowing to int32, so that no out-of-range index wraps into [0, n).
    sorted_latents, order = torch.sort(flat.clamp(-1, n).to(torch.int32), stable=True)
    bounds = torch.searchsorted(
        sorted_latents, torch.arange(n + 1, device=flat.device, dtype=torch.int32)
    )
    result = LatentSort(sorted_latents, order, bounds, n)
    _last_sort = (key, indices, result) if key is not None else None
    return result


def segment_sums(values: Tensor, plan: LatentSort) -> Tensor:
    """``out[j] = sum of values[b, s] over the entries of latent j`` ([n], fp64), without atomics:
    one fp64 prefix sum over the entries in ``plan``'s sorted order, differenced at each latent's
    bounds (so deterministic, and exact to fp64 rounding). Entries outside [0, n) are left out.
    The encoders' bias gradient on CUDA, sharing the sort of the weight gradient (``row_grad``)."""
    prefix = torch.cumsum(values.reshape(-1)[plan.order].double(), 0)
    prefix = torch.cat([prefix.new_zeros(1), prefix])
    return prefix[plan.bounds[1:]] - prefix[plan.bounds[:-1]]


def row_grad(
    src: Tensor,
    scale: Tensor,
    plan: LatentSort,
    out_dtype: torch.dtype,
    width: int,
    *,
    cols: Optional[Tensor] = None,
    atom: Optional[Tensor] = None,
    gscale_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Row gradient ``out [n, width]`` in ``out_dtype``, and optionally the activation gradient.

    src [B, M] (the gathered rows: output gradient or x), scale [B, k] (activations);
    ``out[j, c] = sum_{(b, s): idx[b, s] = j} scale[b, s] * src[b, col]`` with ``col = c``, or
    ``cols[j, c]`` when ``cols [n, width]`` is given (the expander's rows). With ``atom [n, width]``
    (the weight or the values) and ``width <= MAX_BLOCK_C`` it also returns
    ``gscale[b, s] = sum_c src[b, col] * atom[j, c]`` in ``gscale_dtype`` (zero for entries whose
    index lies outside [0, n)); otherwise the second result is None.
    """
    # The kernels index flat memory; a no-op for the ops, which pass contiguous tensors.
    src, scale = src.contiguous(), scale.contiguous()
    cols = cols.contiguous() if cols is not None else None
    atom = atom.contiguous() if atom is not None else None
    B, K = scale.shape
    M = src.shape[1]
    n, nnz = plan.n, B * K
    out = torch.empty(n, width, device=src.device, dtype=out_dtype)
    block = block_c(width)
    fuse = atom is not None and block >= width
    gscale = torch.zeros(B, K, device=src.device, dtype=gscale_dtype) if fuse else None
    if n == 0 or width == 0:
        return out, gscale
    options = launch_options()
    chunk = chunk_size(nnz, width)
    chunks = triton.cdiv(nnz, chunk)
    part = torch.empty(2 * chunks, width, device=src.device, dtype=torch.float32)
    with on_device(src.device):
        if nnz:
            _rowgrad_chunk_kernel[(chunks, triton.cdiv(width, block))](
                src, scale, plan.sorted_latents, plan.order, plan.bounds,
                atom if fuse else src, cols if cols is not None else plan.order,
                out, part, gscale if fuse else scale,
                n, M, width, K, chunk,
                GATHER=cols is not None, FUSE_ACTS=fuse, BLOCK_C=block,
                num_warps=chunk_warps(block), **options,
            )
        finish_block = min(FINISH_BLOCK_C, block)
        _rowgrad_finish_kernel[(triton.cdiv(n, FINISH_ROWS), triton.cdiv(width, finish_block))](
            plan.bounds, part, out, n, width, nnz, chunk,
            ROWS=FINISH_ROWS, BLOCK_C=finish_block,
            # Warps sized to the row, as the chunk kernel's: Triton's default 4 warps ran 128
            # threads on a 16-wide expander row, 4x the instructions (benchmarks/decoder_roofline.py).
            num_warps=chunk_warps(finish_block), **options,
        )
    return out, gscale
