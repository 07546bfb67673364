"""Sparse-gather decoder of a TopK SAE: ``out = sum_s top_acts[..., s] * weight[top_indices[..., s]]``.

Only the k active rows of ``weight [n, m]`` are read per token, and the backward touches only
those rows, so every pass costs O(B*k*m) instead of the dense O(B*n*m). Never forms [..., n],
except on the CPU path when k is a large share of n (``_common.dense_pays``: k >= n/2 in the
forward, n/8 in the backward, and B * k >= n), where dense [tokens, n] tiles and GEMMs cost less
than the gathers.

This file holds the whole op family: the Triton kernels (forward, grad of the activations; the
grad of the weight, fused with that of the activations when rows fit one program, is written once
per row by :mod:`topk_kernels._rowgrad`), the CPU path built on
``F.embedding_bag``, and the ``torch.library`` registration with fake and autograd rules.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _rowgrad, reference
from ._common import (
    DENSE_BACKWARD_SHARE,
    DENSE_FORWARD_SHARE,
    HAS_TRITON,
    check_bias,
    check_decode_args,
    check_decode_ids,
    check_indices,
    check_matrix,
    check_same_device,
    compute_dtype,
    define_op,
    dense_decode,
    dense_grad_acts,
    dense_grad_weight,
    dense_pays,
    launch_options,
    on_device,
    pow2,
    resolve_backend,
    rows_dot,
    unused_grad,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_fwd_kernel(
        acts_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr,
        B, N, M, K,
        HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """One program per (token block, column block): acc[b, :] += acts[b, s] * W[idx[b, s], :].
        An index outside [0, N) contributes nothing (the index contract of ``_common``)."""
        pid_b = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_b = offs_b < B
        mask_m = offs_m < M
        mask = mask_b[:, None] & mask_m[None, :]
        row = offs_b.to(tl.int64) * K
        acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
        for s in range(0, K):
            # A vector of BLOCK_B indices per step; each active row segment is read once.
            idx = tl.load(idx_ptr + row + s, mask=mask_b, other=0).to(tl.int64)
            ok = mask_b & (idx >= 0) & (idx < N)
            tl.device_assert(ok | ~mask_b, "top_indices: an index outside [0, n)")
            a = tl.load(acts_ptr + row + s, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + idx[:, None] * M + offs_m[None, :], mask=ok[:, None] & mask_m[None, :], other=0.0)
            acc += a[:, None] * w.to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            acc += bias[None, :]
        out_offs = offs_b.to(tl.int64)[:, None] * M + offs_m[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_bwd_acts_kernel(
        grad_ptr, idx_ptr, w_ptr, gacts_ptr,
        N, M, K,
        BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """One program per (token, block of k): gacts[b, s] = grad[b, :] . W[idx[b, s], :]
        (0 for an index outside [0, N))."""
        b = tl.program_id(0).to(tl.int64)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        ok = mask_k & (idx >= 0) & (idx < N)
        tl.device_assert(ok | ~mask_k, "top_indices: an index outside [0, n)")
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            g = tl.load(grad_ptr + b * M + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + idx[:, None] * M + offs_m[None, :],
                mask=ok[:, None] & mask_m[None, :], other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w * g[None, :], axis=1)
        tl.store(gacts_ptr + b * K + offs_k, acc.to(gacts_ptr.dtype.element_ty), mask=mask_k)


# Largest block shapes the launchers use (tests/gpu_compile.py compiles exactly these).
BLOCK_B = 16  # tokens per forward program
BLOCK_M = 128  # model columns per program
BLOCK_K_ACTS = 32  # active latents per program in the activation grad
BLOCK_M_ACTS = 64  # its column chunk: BLOCK_K_ACTS x BLOCK_M_ACTS stays within registers


def triton_forward(acts: Tensor, idx: Tensor, weight: Tensor, bias: Optional[Tensor], out_dtype) -> Tensor:
    """acts [B, k], idx [B, k] (int64), weight [n, m], bias [m] or None -> [B, m] out_dtype."""
    B, K = acts.shape
    N, M = weight.shape
    out = torch.empty(B, M, device=acts.device, dtype=out_dtype)
    if B == 0:
        return out
    block_b, block_m = BLOCK_B, min(BLOCK_M, pow2(M, lo=16))
    grid = (triton.cdiv(B, block_b), triton.cdiv(M, block_m))
    _decode_fwd_kernel[grid](
        acts, idx, weight, bias if bias is not None else acts, out, B, N, M, K,
        HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_M=block_m, **launch_options(),
    )
    return out


def triton_grad_acts(grad: Tensor, idx: Tensor, weight: Tensor, acts_dtype) -> Tensor:
    """grad [B, m], idx [B, k], weight [n, m] -> gacts [B, k] = grad . weight[idx]."""
    B, K = idx.shape
    N, M = weight.shape
    gacts = torch.empty(B, K, device=grad.device, dtype=acts_dtype)
    if B == 0:
        return gacts
    block_k = min(BLOCK_K_ACTS, pow2(K))
    block_m = min(BLOCK_M_ACTS, pow2(M, lo=16))
    _decode_bwd_acts_kernel[(B, triton.cdiv(K, block_k))](
        grad, idx, weight, gacts, N, M, K, BLOCK_K=block_k, BLOCK_M=block_m, **launch_options()
    )
    return gacts


def triton_grad_weight(grad: Tensor, acts: Tensor, idx: Tensor, n: int, weight_dtype) -> Tensor:
    """gw[j] = sum over entries of latent j of acts * grad[token]: each row written once (_rowgrad)."""
    plan = _rowgrad.sort_by_latent(idx, n)
    return _rowgrad.row_grad(grad, acts, plan, weight_dtype, grad.shape[1])[0]


def _triton_grad_acts_and_weight(grad: Tensor, acts: Tensor, idx: Tensor, weight: Tensor):
    """Both gradients from one pass over the sorted entries when a program holds whole rows."""
    plan = _rowgrad.sort_by_latent(idx, weight.shape[0])
    gw, gacts = _rowgrad.row_grad(
        grad, acts, plan, weight.dtype, weight.shape[1], atom=weight, gscale_dtype=acts.dtype
    )
    return (gacts if gacts is not None else triton_grad_acts(grad, idx, weight, acts.dtype)), gw


# ---------------------------------------------------------------------------------------------
# CPU path. The forward is an embedding bag; the grad of the activations is embedding_bag's own
# per-sample-weights backward; the grad of the weight is an embedding bag with the roles swapped:
# latents become the bags (entries sorted by latent) and the rows of the incoming gradient the
# table, so empty bags write the zero rows and no dense [B, n] or [B*k, m] tensor exists.
# ---------------------------------------------------------------------------------------------

# Widened rows per token chunk on the CPU path, in fp32 elements (4 MiB; a bf16 chunk's gathered
# rows, 2 MiB): small enough for the allocator to reuse. One [B * k, m] buffer per call cost more in
# page faults than the math.
WIDEN_ELEMS = 2**20
# The most elements a whole-weight copy for one call may hold (512 MiB widened to fp32, 256 MiB for
# a bf16 weight with its bias appended): past it, a dictionary such as n = 2^20, m = 4096 (16 GiB
# in fp32) is read a chunk of tokens' rows at a time even where one copy would be faster.
WHOLE_WIDEN_ELEMS = 2**27
# The largest bf16 weight ``_bf16_bag_forward`` copies whole (its bias appended) once the tokens
# name n ids, in elements (32 MiB): the allocator serves a block that size again from its heap, but
# maps a larger one fresh each call and faults its pages in (0.9 against 0.3 ns an element here).
# A larger weight is copied from 4n ids on, where the copy broke even with the token chunks (n=65536
# m=768 k=32: at B * k = n 58 against 22 ms, at 4n 86 against 91).
BAG_COPY_ELEMS = 2**24


def _widened(weight: Tensor, idx: Tensor, cd: torch.dtype):
    """Yields (b0, b1, table, ids): for tokens [b0, b1), a dictionary in the accumulation dtype
    ``cd`` and their ids into it. A weight already in ``cd`` is used as it is, in one piece. Otherwise
    on CPU only the rows a token chunk uses are widened, O(B * k * m) in all instead of O(n * m) a
    call: widening a whole bf16 [65536, 2048] weight made a B=256, k=32 decode 733 ms against 13
    in fp32 (benchmarks/RESULTS.md). But when one token's k rows alone exceed WIDEN_ELEMS, every
    chunk is one token widening its own k rows into a fresh tensor: at k = n - 1 the whole weight
    once per token (a bf16 B=64 m=768 n=16384 k=8192 decode, forward + backward, took 980 ms
    against 16 for the dense GEMM before such shapes went to the dense tiles). Then, if the
    tokens name at least n ids (B * k >= n), the whole weight is widened once, n * m elements
    (up to WHOLE_WIDEN_ELEMS).
    (Multi-token chunks stay: at B=1024 k=32 m=768 n=24576 the chunks' rows, deduplicated and in
    reused heap memory, cost less than one fresh [n, m] fp32 copy.) Elsewhere (the CUDA fallback)
    the whole weight is widened: ``torch.unique`` would cost a host sync."""
    B, K = idx.shape
    whole = (B * K >= weight.shape[0] and K * weight.shape[1] > WIDEN_ELEMS
             and weight.shape[0] * weight.shape[1] <= WHOLE_WIDEN_ELEMS)
    if weight.dtype == cd or weight.device.type != "cpu" or B == 0 or whole:
        yield 0, B, weight.to(cd) if B else weight[:0].to(cd), idx
        return
    step = max(1, WIDEN_ELEMS // max(1, K * weight.shape[1]))
    for b0 in range(0, B, step):
        used, local = torch.unique(idx[b0:b0 + step], return_inverse=True)
        yield b0, min(B, b0 + step), weight.index_select(0, used).to(cd), local


def _bf16_bag_forward(acts: Tensor, idx: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """bf16 acts, weight, bias and output on CPU: embedding bags read the bf16 rows as they are and
    sum in fp32, each output rounded once. The result equals the widened rows' fp32 sum rounded to
    bf16 except at exact ties. There ATen's bf16 bag rounds away from zero, where ``.to(bfloat16)``
    and the kernels round to even: all 33 of the 32,000 outputs that differed here were ties
    (B=2000, m=16, k=4, bf16 bias), and either neighbour is within half a step. Widening the
    used rows first (torch.unique, index_select, a copy) took 4-11x as long (B=1000, n=16384, k=8:
    8.8 against 1.5 ms at m=768, 1.77 against 0.16 at m=100).

    A bias must join the fp32 sum before the one rounding, as in the kernels and a latent-sharded
    SAE's partial sums (adding it to the bag's rounded sums, as ``F.embedding_bag(...) + b`` does,
    rounds twice). So it is one more row of the bag's table, with weight 1: appended to a copy of
    the whole weight when the tokens name at least n ids (B * k >= n, 4n past BAG_COPY_ELEMS; up
    to WHOLE_WIDEN_ELEMS), else appended to the rows a chunk of tokens uses, gathered in bf16
    (index_select, no widening). Copying the weight costs ~0.15 ns an element here, gathering a
    row's elements ~0.2 plus a second read: B=1000 m=768 n=16384 k=32, 18.7 ms through widened
    rows, 9.2 through gathered chunks, 4.3 through the copy, against 2.7 for the baseline that
    rounds twice."""
    if bias is None:
        return F.embedding_bag(idx, weight, per_sample_weights=acts, mode="sum")
    B, K = idx.shape
    n, m = weight.shape
    if B == 0:
        return acts.new_empty(0, m)
    if B * K >= (n if n * m <= BAG_COPY_ELEMS else 4 * n) and n * m <= WHOLE_WIDEN_ELEMS:
        table = torch.cat([weight, bias[None]])
        ids = torch.cat([idx, idx.new_full((B, 1), n)], 1)
        return F.embedding_bag(ids, table, per_sample_weights=torch.cat([acts, acts.new_ones(B, 1)], 1), mode="sum")
    step = min(B, max(1, WIDEN_ELEMS // max(1, (K + 1) * m)))
    table = weight.new_empty(step * K + 1, m)  # a chunk's rows, then the bias (the last row)
    table[step * K] = bias
    ids = torch.cat([torch.arange(step * K, device=idx.device).view(step, K), idx.new_full((step, 1), step * K)], 1)
    weights = acts.new_ones(step, K + 1)
    out = acts.new_empty(B, m)
    for b0 in range(0, B, step):
        c = min(B, b0 + step) - b0
        torch.index_select(weight, 0, idx[b0:b0 + c].reshape(-1), out=table[:c * K])
        weights[:c, :K] = acts[b0:b0 + c]
        out[b0:b0 + c] = F.embedding_bag(ids[:c], table, per_sample_weights=weights[:c], mode="sum")
    return out


def torch_forward(acts: Tensor, idx: Tensor, weight: Tensor, bias: Optional[Tensor], out_dtype) -> Tensor:
    """The PyTorch path of ``triton_forward`` (any device), same shapes. On CPU with k a large
    share of n (``_common.dense_pays``), a GEMM of dense [tokens, n] tiles: at k = n - 1, B = 64,
    m = 768, n = 16384 the embedding bag took 251 ms, the dense GEMM 19."""
    cd = compute_dtype(out_dtype)
    B, K = idx.shape
    n = weight.shape[0]
    if idx.device.type == "cpu" and dense_pays(B, K, n, DENSE_FORWARD_SHARE):
        return dense_decode(acts, idx, weight, bias, cd).to(out_dtype)
    if (idx.device.type == "cpu" and acts.dtype == weight.dtype == out_dtype == torch.bfloat16
            and (bias is None or bias.dtype == torch.bfloat16)):
        return _bf16_bag_forward(acts, idx, weight, bias)
    parts = [F.embedding_bag(ids, table, per_sample_weights=acts[b0:b1].to(cd), mode="sum")
             for b0, b1, table, ids in _widened(weight, idx, cd)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if bias is not None:
        out = out + bias.to(cd)
    return out.to(out_dtype)


def torch_grad_acts(grad: Tensor, idx: Tensor, weight: Tensor, acts_dtype) -> Tensor:
    if idx.device.type == "cpu" and grad.dtype == weight.dtype == acts_dtype == torch.bfloat16:
        # bf16 throughout: the bf16 rows as they are (the dot products are summed in fp32 and
        # rounded once: bit-equal to the widened rows' fp32 dots rounded to bf16 on 8,000 of 8,000
        # here, 1.7 ms against 5.8 for widening them at B=1000, m=768, n=16384, k=8).
        return rows_dot(grad, weight, idx).to(acts_dtype)
    cd = compute_dtype(grad.dtype)
    # On CPU rows_dot widens only the rows the ids name; elsewhere (the CUDA fallback) the whole
    # weight once, since its narrower-weight routes would sync with the host.
    return rows_dot(grad.to(cd), weight if idx.device.type == "cpu" else weight.to(cd), idx).to(acts_dtype)


def torch_grad_weight(grad: Tensor, acts: Tensor, idx: Tensor, n: int, weight_dtype) -> Tensor:
    """The PyTorch path of ``triton_grad_weight`` (any device), same shapes."""
    B, K = idx.shape
    # Both factors' dtype: the encoder's backward passes x as ``grad``, fp32 beside fp64 activations.
    cd = compute_dtype(torch.promote_types(grad.dtype, acts.dtype))
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n)
    offsets = torch.zeros(n, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    if idx.device.type == "cpu" and grad.dtype == acts.dtype == weight_dtype == torch.bfloat16:
        # bf16 throughout: the bag sums the bf16 gradient rows in fp32 and rounds each row once, as
        # the fp32 path's cast does, without its [n, m] fp32 buffer and cast pass (B=1000, m=768,
        # n=16384, k=8: 26.8 ms before; see torch_forward for the measured equality).
        return F.embedding_bag(order // K, grad, offsets, mode="sum", per_sample_weights=acts.reshape(-1)[order])
    weights = acts.reshape(-1)[order].to(cd)
    if weight_dtype == cd or idx.device.type != "cpu" or 4 * B * K > n:
        gw = F.embedding_bag(order // K, grad.to(cd), offsets, mode="sum", per_sample_weights=weights)
        return gw.to(weight_dtype)
    # A narrower weight (bf16, fp16) on CPU of which at most a quarter of the rows are used: only
    # those are summed in cd and narrowed, then written into a zeroed gradient of the weight's
    # dtype, where the whole [n, m] fp32 gradient, narrowed afterwards, wrote and read n * m fp32
    # more and faulted its pages in. (With most rows used, B=1024 k=32 m=768 n=24576, this was
    # 1.3x slower than the whole gradient.) Skipping empty bags changes no sum: the entries are
    # sorted by latent, so each used latent's bag still holds exactly its own entries.
    used = counts.nonzero().squeeze(1)
    rows = F.embedding_bag(order // K, grad.to(cd), offsets[used], mode="sum", per_sample_weights=weights)
    gw = torch.zeros(n, grad.shape[1], device=grad.device, dtype=weight_dtype)
    return gw.index_copy_(0, used, rows.to(weight_dtype))


# ---------------------------------------------------------------------------------------------
# torch.library registration: 2-D [B, k] inputs; the public function flattens leading dims.
# ---------------------------------------------------------------------------------------------

def _sparse_decode_impl(
    top_acts: Tensor, top_indices: Tensor, weight: Tensor, bias: Optional[Tensor], use_triton: bool
) -> Tensor:
    # Checked here, inside the op, so it also runs (eagerly) under torch.compile.
    check_indices("top_indices", top_indices, weight.shape[0], "n_latents")
    out_dtype = torch.promote_types(top_acts.dtype, weight.dtype)
    top_acts, top_indices, weight = top_acts.contiguous(), top_indices.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if use_triton:
        with on_device(weight.device):
            return triton_forward(top_acts, top_indices, weight, bias, out_dtype)
    return torch_forward(top_acts, top_indices, weight, bias, out_dtype)


def _sparse_decode_fake(top_acts, top_indices, weight, bias, use_triton):
    out_dtype = torch.promote_types(top_acts.dtype, weight.dtype)
    return top_acts.new_empty(top_acts.shape[0], weight.shape[1], dtype=out_dtype)


def _sparse_decode_backward_impl(
    grad: Tensor, top_acts: Tensor, top_indices: Tensor, weight: Tensor,
    need_acts: bool, need_weight: bool, use_triton: bool,
) -> tuple[Tensor, Tensor]:
    grad, top_acts, top_indices, weight = (t.contiguous() for t in (grad, top_acts, top_indices, weight))
    if use_triton:
        with on_device(weight.device):
            if need_acts and need_weight:
                gacts, gw = _triton_grad_acts_and_weight(grad, top_acts, top_indices, weight)
            else:
                gacts = triton_grad_acts(grad, top_indices, weight, top_acts.dtype) if need_acts else unused_grad(grad)
                gw = (triton_grad_weight(grad, top_acts, top_indices, weight.shape[0], weight.dtype)
                      if need_weight else unused_grad(grad))
    elif grad.device.type == "cpu" and dense_pays(*top_indices.shape, weight.shape[0], DENSE_BACKWARD_SHARE):
        gacts, gw = _dense_backward(grad, top_acts, top_indices, weight, need_acts, need_weight)
    else:
        gacts = torch_grad_acts(grad, top_indices, weight, top_acts.dtype) if need_acts else unused_grad(grad)
        gw = (torch_grad_weight(grad, top_acts, top_indices, weight.shape[0], weight.dtype)
              if need_weight else unused_grad(grad))
    return gacts, gw


def _dense_backward(grad: Tensor, acts: Tensor, idx: Tensor, weight: Tensor, need_acts: bool,
                    need_weight: bool) -> tuple[Tensor, Tensor]:
    """The CPU backward with k a large share of n (``_common.dense_pays``), in dense [tokens, n]
    tiles: ``grad @ weight.T`` gathered at the ids, and ``G.T @ grad`` for the weight."""
    cd = compute_dtype(torch.promote_types(torch.promote_types(grad.dtype, acts.dtype), weight.dtype))
    return (dense_grad_acts(grad, idx, weight, cd).to(acts.dtype) if need_acts else unused_grad(grad),
            dense_grad_weight(grad, acts, idx, weight.shape[0], cd).to(weight.dtype) if need_weight
            else unused_grad(grad))


def _sparse_decode_backward_fake(grad, top_acts, top_indices, weight, need_acts, need_weight, use_triton):
    gacts = torch.empty_like(top_acts) if need_acts else grad.new_empty(0)
    gw = torch.empty_like(weight) if need_weight else grad.new_empty(0)
    return gacts, gw


_sparse_decode_backward_op = define_op(
    "topk_kernels::sparse_decode_backward", _sparse_decode_backward_impl, _sparse_decode_backward_fake
)


def _setup_context(ctx, inputs, output):
    top_acts, top_indices, weight, bias, use_triton = inputs
    ctx.save_for_backward(top_acts, top_indices, weight)
    ctx.use_triton = use_triton
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    top_acts, top_indices, weight = ctx.saved_tensors
    need_acts, _, need_weight, need_bias, _ = ctx.needs_input_grad
    gacts, gw = _sparse_decode_backward_op(
        grad, top_acts, top_indices, weight, need_acts, need_weight, ctx.use_triton
    )
    gbias = grad.sum(0).to(ctx.bias_dtype) if (ctx.bias_dtype is not None and need_bias) else None
    return (gacts if need_acts else None), None, (gw if need_weight else None), gbias, None


_sparse_decode_op = define_op(
    "topk_kernels::sparse_decode", _sparse_decode_impl, _sparse_decode_fake, _setup_context, _backward
)


def sparse_decode(
    top_acts: Tensor,
    top_indices: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
    check_indices: bool = True,
) -> Tensor:
    """Decode k active latents per token.

    Args:
        top_acts: [..., k] float activations of the active latents.
        top_indices: [..., k] int64 latent ids in [0, n); duplicates within a token add up.
            Checked on every device unless ``check_indices=False``; unchecked on CUDA, an id
            outside [0, n) contributes nothing to the Triton kernels (``TOPK_KERNELS_DEBUG=1``
            makes them assert), see ``topk_kernels._common``.
        weight: [n, m] decoder dictionary, one row per latent.
        bias: optional [m].
        backend: None (automatic), "triton", "torch" or "reference".
        check_indices: check every id of ``top_indices`` is in [0, n) (one host sync on CUDA,
            skipped while torch.compile traces). A caller whose ids come from its own encoder
            (``sae``'s models) passes False. CPU ids are checked either way (no sync), and so
            are the ids given to ``backend="reference"`` (which would fail on them).

    Returns:
        [..., m] = sum_s top_acts[..., s] * weight[top_indices[..., s]] (+ bias).
    """
    check_matrix("weight", weight)
    n, m = weight.shape
    check_decode_args(top_acts, top_indices)
    check_bias("bias", bias, m, "m = weight.shape[1]")
    check_same_device(top_acts=top_acts, top_indices=top_indices, weight=weight, bias=bias)
    out_dtype = torch.promote_types(top_acts.dtype, weight.dtype)  # every backend's (the bias's does not count)
    backend = resolve_backend(backend, weight.device, out_dtype, ("weight", n))
    check_decode_ids(top_indices, n, backend, check_indices)
    if backend == "reference":
        # In the promoted dtype, as every backend computes: the reference's matmul takes one dtype.
        return reference.sparse_decode(top_acts.to(out_dtype), top_indices, weight.to(out_dtype), bias).to(out_dtype)
    lead, k = top_acts.shape[:-1], top_acts.shape[-1]
    out = _sparse_decode_op(
        top_acts.reshape(-1, k).contiguous(),
        top_indices.reshape(-1, k).long().contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        backend == "triton",
    )
    return out.reshape(*lead, m)
