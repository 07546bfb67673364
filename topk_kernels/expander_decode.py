"""Expander decoder: ``out[..., rows[j, t]] += top_acts[..., s] * values[j, t]`` for ``j = top_indices[..., s]``.

An Expander SAE's decoder atom j lives on only d of the m model coordinates, stored compactly as
``values [n, d]`` on ``rows [n, d]`` (see ``sae.masks.expander_mask``). Decoding k active latents
therefore touches k*d entries per token: every pass here costs O(B*k*d) (plus writing the dense
[B, m] output), against O(B*k*m) for a dense sparse decode and O(B*n*m) for the dense GEMM. (On the
CPU path a degenerate Expander, with d a large share of m and k of n, goes through the dense masked
[n, m] dictionary and GEMMs instead: ``DENSE_ATOM_SHARE``.)

This file holds the whole op: the Triton kernels (forward; the activation gradient alone; the
value gradient, with the activation gradient from the same gathers, written once per atom by
:mod:`topk_kernels._rowgrad`), the CPU path built on gather + ``scatter_add_`` / ``index_add_``, and
the ``torch.library`` registration with fake and autograd rules.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _rowgrad, reference
from ._common import (
    HAS_TRITON,
    check_bias,
    check_decode_args,
    check_expander,
    check_expander_rows,
    check_decode_ids,
    check_indices,
    check_same_device,
    compute_dtype,
    define_op,
    dense_decode,
    dense_grad_acts,
    dense_grad_weight,
    launch_options,
    on_device,
    pow2,
    resolve_backend,
    unused_grad,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _expander_decode_fwd_kernel(
        acts_ptr, idx_ptr, values_ptr, rows_ptr, bias_ptr, acc_ptr, out_ptr,
        B, N, M, K, D,
        HAS_BIAS: tl.constexpr, CAST_OUT: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """One program per BLOCK_B tokens, owning their fp32 output rows ``acc[b, :]``.

        Race-free without atomics: each step read-modify-writes the d entries of one latent for
        every token of the block (distinct addresses: distinct tokens, distinct rows within a
        latent) and a CTA barrier separates steps, so repeats across latents of a token add in a
        fixed order; the price is k dependent round trips per program instead of one atomic burst.
        A latent id outside [0, N) or a row outside [0, M) contributes nothing (``_common``).
        """
        pid = tl.program_id(0)
        offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        out_row = offs_b.to(tl.int64) * M
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask = mask_b[:, None] & (offs_m < M)[None, :]
            init = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
                init += bias[None, :]
            tl.store(acc_ptr + out_row[:, None] + offs_m[None, :], init, mask=mask)
        tl.debug_barrier()
        offs_d = tl.arange(0, BLOCK_D)
        entry = offs_b.to(tl.int64) * K
        for s in range(0, K):
            j = tl.load(idx_ptr + entry + s, mask=mask_b, other=0).to(tl.int64)
            ok_j = mask_b & (j >= 0) & (j < N)
            tl.device_assert(ok_j | ~mask_b, "top_indices: an index outside [0, n)")
            a = tl.load(acts_ptr + entry + s, mask=ok_j, other=0.0).to(tl.float32)
            for d0 in range(0, D, BLOCK_D):
                od = d0 + offs_d
                mask = ok_j[:, None] & (od < D)[None, :]
                atom = j[:, None] * D + od[None, :]
                r = tl.load(rows_ptr + atom, mask=mask, other=0)
                ok_r = (r >= 0) & (r < M)
                tl.device_assert(ok_r | ~mask, "rows: an index outside [0, m)")
                mask = mask & ok_r
                v = tl.load(values_ptr + atom, mask=mask, other=0.0).to(tl.float32)
                ptrs = acc_ptr + out_row[:, None] + r
                # .cg reads from L2, where this CTA's earlier stores landed (L1 is not coherent).
                cur = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(ptrs, cur + a[:, None] * v, mask=mask)
            tl.debug_barrier()
        if CAST_OUT:
            for m0 in range(0, M, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                mask = mask_b[:, None] & (offs_m < M)[None, :]
                offs = out_row[:, None] + offs_m[None, :]
                acc = tl.load(acc_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _expander_decode_bwd_kernel(
        grad_ptr, idx_ptr, values_ptr, rows_ptr, gacts_ptr,
        NNZ, N, M, K, D,
        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per BLOCK_E (token, slot) entries: the activation gradient alone,
        gacts[b, s] = sum_t grad[b, rows[j, t]] * values[j, t] (the value gradient, and this one
        with it, is :mod:`topk_kernels._rowgrad`'s). A latent id outside [0, N) gives 0; a row
        outside [0, M) contributes nothing (``_common``)."""
        offs_e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = offs_e < NNZ
        j = tl.load(idx_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
        ok_j = mask_e & (j >= 0) & (j < N)
        tl.device_assert(ok_j | ~mask_e, "top_indices: an index outside [0, n)")
        grad_row = (offs_e // K) * M
        gacc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            od = d0 + offs_d
            mask = ok_j[:, None] & (od < D)[None, :]
            atom = j[:, None] * D + od[None, :]
            r = tl.load(rows_ptr + atom, mask=mask, other=0)
            ok_r = (r >= 0) & (r < M)
            tl.device_assert(ok_r | ~mask, "rows: an index outside [0, m)")
            mask = mask & ok_r
            g = tl.load(grad_ptr + grad_row[:, None] + r, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(values_ptr + atom, mask=mask, other=0.0).to(tl.float32)
            gacc += tl.sum(g * v, axis=1)
        tl.store(gacts_ptr + offs_e, gacc.to(gacts_ptr.dtype.element_ty), mask=mask_e)


# Largest block shapes the launchers use (tests/gpu_compile.py compiles exactly these).
BLOCK_B = 16  # tokens per forward program: 16 tokens x 8 atom entries = one per thread of 4 warps
BLOCK_M = 128  # output columns per chunk of the forward's init / cast loops
BLOCK_D = 32  # atom entries per step (d is padded to a power of two up to this, then looped)
BLOCK_E = 64  # (token, slot) entries per backward program at d <= 8; fewer for wider atoms


def _block_d(d: int) -> int:
    return min(BLOCK_D, pow2(d))


def _block_e(block_d: int) -> int:
    """Keep the backward tile at <= 512 entries (BLOCK_E=64 x 32 sat at 255 registers)."""
    return min(BLOCK_E, 512 // block_d)


def triton_forward(acts, idx, values, rows, m, bias, out_dtype) -> Tensor:
    """acts/idx [B, k], values/rows [n, d], bias [m] or None -> [B, m] out_dtype."""
    B, K = idx.shape
    N, D = rows.shape
    out = torch.empty(B, m, device=acts.device, dtype=out_dtype)
    if B == 0:
        return out
    cast = out_dtype != torch.float32
    acc = torch.empty(B, m, device=acts.device, dtype=torch.float32) if cast else out
    _expander_decode_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
        acts, idx, values, rows, bias if bias is not None else acts, acc, out, B, N, m, K, D,
        HAS_BIAS=bias is not None, CAST_OUT=cast,
        BLOCK_B=BLOCK_B, BLOCK_D=_block_d(D), BLOCK_M=min(BLOCK_M, pow2(m, lo=16)),
        num_stages=1,  # no software pipelining across the read-modify-write steps
        **launch_options(),
    )
    return out


def triton_backward(grad, acts, idx, values, rows, need_acts, need_values):
    """grad [B, m], acts/idx [B, k], values/rows [n, d] -> (gacts [B, k] or None, gvalues [n, d] or None)."""
    B, K = idx.shape
    n, D = rows.shape
    m = grad.shape[1]
    gacts = gvalues = None
    if need_values:  # sorted by latent, each atom's d values written once; gacts from the same gathers
        plan = _rowgrad.sort_by_latent(idx, n)
        gvalues, gacts = _rowgrad.row_grad(
            grad, acts, plan, values.dtype, D, cols=rows,
            atom=values if need_acts else None, gscale_dtype=acts.dtype,
        )
    if need_acts and gacts is None:
        gacts = torch.empty(B, K, device=grad.device, dtype=acts.dtype)
        if B * K:
            block_d = _block_d(D)
            block_e = _block_e(block_d)
            _expander_decode_bwd_kernel[(triton.cdiv(B * K, block_e),)](
                grad, idx, values, rows, gacts, B * K, n, m, K, D, BLOCK_E=block_e, BLOCK_D=block_d,
                **launch_options(),
            )
    return gacts, gvalues


# ---------------------------------------------------------------------------------------------
# CPU path: gather the active atoms ([chunk, k, d] rows and scaled values), then one scatter_add_
# into the output rows; backward gathers the output gradient at the same rows. Tokens go in
# chunks of about _CHUNK_ENTRIES atom entries, and every chunk reuses the same scratch buffers
# (``out=`` and in-place ops). Before, each chunk allocated its own 8-17 MiB intermediates (2^21
# entries): they streamed through L3 and DRAM, and whenever the allocator had returned that memory
# to the OS they faulted in page by page (one process: 18,330 minor faults per forward + backward
# and 52 ms; another: none and 28 ms; now none and 14-15 ms). 2^19 entries keep the scratch at 2-4
# MiB. Interleaved medians, B=1024 m=576 n=4608 d=100 k=64, 2 threads: forward 8.4-28.5 -> 5.2-5.4
# ms, backward 14.2-30.7 -> 8.4-8.6 ms; an ExpanderSAE CPU train step 98-128 -> 68-70 ms
# (benchmarks/RESULTS.md, "Expander decoder, CPU path: reused chunk buffers").
# ---------------------------------------------------------------------------------------------

_CHUNK_ENTRIES = 1 << 19


def _token_chunks(B: int, K: int, D: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ENTRIES // max(1, K * D))
    return [(b0, min(B, b0 + step)) for b0 in range(0, B, step)]


def _scratch(chunks, K: int, D: int, dtype: torch.dtype, device) -> Tensor:
    """[entries of the largest chunk, D] scratch, reused by every chunk."""
    return torch.empty((chunks[0][1] - chunks[0][0]) * K, D, device=device, dtype=dtype)


# CPU: the scatters above cost ~2-3 ns an atom entry here, B * k * d of them; the dense masked
# dictionary costs one [n, m] scatter of n * d entries and GEMMs of B * n * m FMAs at ~0.04 ns
# each. So with atoms a large share of m and k of n (a degenerate Expander: d = m is a dense
# dictionary) dense wins: B=64 m=768 n=1000 k=999 d=768 (check_rows=False), forward 112.6 ms
# against 1.8 for the dense masked decoder, forward + backward 397.6 against 4.3; B=64 m=100 n=64
# k=63 d=100, 0.85 against 0.02 ms. At k=8, d=384 (B * k < n) ours and dense tie (0.63 / 0.60 ms).
# Dense from B * k >= 2n (the [n, m] dictionary is built once a call) and k * d * DENSE_ATOM_SHARE
# >= n * m (the GEMMs' FMAs within that many times the atom entries); a real Expander SAE (m=1024,
# n=16384, d=7, k=32: k * d = 224 against n * m / 32 = 524288) never goes there.
DENSE_ATOM_SHARE = 32


def _dense_pays(B: int, K: int, n: int, m: int, D: int, device: torch.device) -> bool:
    return device.type == "cpu" and B * K >= 2 * n and K * D * DENSE_ATOM_SHARE >= n * m


def _dense_dictionary(values: Tensor, rows: Tensor, m: int, cd: torch.dtype) -> Tensor:
    """values [n, d] on rows [n, d] -> the dense masked [n, m] dictionary in cd."""
    return torch.zeros(values.shape[0], m, device=values.device, dtype=cd).scatter_add_(1, rows, values.to(cd))


def torch_forward(acts, idx, values, rows, m, bias, out_dtype) -> Tensor:
    """The PyTorch path of ``triton_forward`` (any device), same shapes."""
    B, K = idx.shape
    D = rows.shape[1]
    cd = compute_dtype(out_dtype)
    if _dense_pays(B, K, rows.shape[0], m, D, acts.device):
        return dense_decode(acts, idx, _dense_dictionary(values, rows, m, cd), bias, cd).to(out_dtype)
    if bias is not None:
        out = bias.to(cd).repeat(B, 1)  # one write pass; a fresh buffer, never a view of bias
    else:
        out = torch.zeros(B, m, device=acts.device, dtype=cd)
    chunks = _token_chunks(B, K, D)
    if not chunks:
        return out.to(out_dtype)
    vals, scale = values.to(cd), acts.to(cd)
    contrib = _scratch(chunks, K, D, cd, acts.device)
    where = _scratch(chunks, K, D, rows.dtype, acts.device)
    for b0, b1 in chunks:
        e = (b1 - b0) * K
        j = idx[b0:b1].reshape(-1)  # index_select: ~4x faster than advanced indexing on CPU
        c = torch.index_select(vals, 0, j, out=contrib[:e])
        c.view(b1 - b0, K, D).mul_(scale[b0:b1, :, None])
        w = torch.index_select(rows, 0, j, out=where[:e])
        out[b0:b1].scatter_add_(1, w.view(b1 - b0, K * D), c.view(b1 - b0, K * D))
    return out.to(out_dtype)


def torch_backward(grad, acts, idx, values, rows, need_acts, need_values):
    """The PyTorch path of ``triton_backward`` (any device), same shapes (fp32/fp64 results)."""
    B, K = idx.shape
    n, D = rows.shape
    # Every factor's dtype: the encoder's backward passes x as ``grad``, fp32 beside fp64 values.
    cd = compute_dtype(torch.promote_types(torch.promote_types(grad.dtype, acts.dtype), values.dtype))
    gacts = torch.empty(B, K, device=grad.device, dtype=cd) if need_acts else None
    if (need_acts or need_values) and _dense_pays(B, K, n, grad.shape[1], D, grad.device):
        # Dense tiles (see DENSE_ATOM_SHARE): gacts = (grad @ W.T) at the ids, and the values'
        # gradient is that of the dense dictionary, G.T @ grad, at the atoms' rows.
        if need_acts:
            gacts = dense_grad_acts(grad, idx, _dense_dictionary(values, rows, grad.shape[1], cd), cd)
        return gacts, dense_grad_weight(grad, acts, idx, n, cd).gather(1, rows) if need_values else None
    gvalues = torch.zeros(n, D, device=grad.device, dtype=cd) if need_values else None
    chunks = _token_chunks(B, K, D)
    if not chunks or not (need_acts or need_values):
        return gacts, gvalues
    vals = values.to(cd) if need_acts else None
    scale = acts.to(cd) if need_values else None
    where = _scratch(chunks, K, D, rows.dtype, grad.device)
    gathered = _scratch(chunks, K, D, cd, grad.device)
    atoms = _scratch(chunks, K, D, cd, grad.device) if need_acts else None
    for b0, b1 in chunks:
        b, e = b1 - b0, (b1 - b0) * K
        j = idx[b0:b1].reshape(-1)
        w = torch.index_select(rows, 0, j, out=where[:e]).view(b, K * D)
        g = torch.gather(grad[b0:b1].to(cd), 1, w, out=gathered[:e].view(b, K * D)).view(b, K, D)
        if need_acts:
            v = torch.index_select(vals, 0, j, out=atoms[:e]).view(b, K, D)
            torch.sum(v.mul_(g), -1, out=gacts[b0:b1])
        if need_values:
            gvalues.index_add_(0, j, g.mul_(scale[b0:b1, :, None]).view(e, D))
    return gacts, gvalues


# ---------------------------------------------------------------------------------------------
# torch.library registration: 2-D [B, k] inputs; the public function flattens leading dims.
# ---------------------------------------------------------------------------------------------

def _expander_decode_impl(
    top_acts: Tensor, top_indices: Tensor, values: Tensor, rows: Tensor, m: int,
    bias: Optional[Tensor], use_triton: bool, check_rows: bool,
) -> Tensor:
    # Checked here, inside the op, so it also runs (eagerly) under torch.compile.
    check_indices("top_indices", top_indices, values.shape[0], "n_latents")
    if check_rows:
        check_expander_rows(rows, m)
    out_dtype = torch.promote_types(top_acts.dtype, values.dtype)
    # The kernels index flat memory; a no-op for the public function, which passes contiguous inputs.
    top_acts, top_indices, values, rows = (t.contiguous() for t in (top_acts, top_indices, values, rows))
    bias = bias.contiguous() if bias is not None else None
    if use_triton:
        with on_device(values.device):
            return triton_forward(top_acts, top_indices, values, rows, m, bias, out_dtype)
    return torch_forward(top_acts, top_indices, values, rows, m, bias, out_dtype)


def _expander_decode_fake(top_acts, top_indices, values, rows, m, bias, use_triton, check_rows):
    out_dtype = torch.promote_types(top_acts.dtype, values.dtype)
    return top_acts.new_empty(top_acts.shape[0], m, dtype=out_dtype)


def _expander_decode_backward_impl(
    grad: Tensor, top_acts: Tensor, top_indices: Tensor, values: Tensor, rows: Tensor,
    need_acts: bool, need_values: bool, use_triton: bool,
) -> tuple[Tensor, Tensor]:
    grad, top_acts, top_indices, values, rows = (
        t.contiguous() for t in (grad, top_acts, top_indices, values, rows)
    )
    impl = triton_backward if use_triton else torch_backward
    with on_device(values.device):
        gacts, gvalues = impl(grad, top_acts, top_indices, values, rows, need_acts, need_values)
    gacts = gacts.to(top_acts.dtype) if need_acts else unused_grad(grad)
    gvalues = gvalues.to(values.dtype) if need_values else unused_grad(grad)
    return gacts, gvalues


def _expander_decode_backward_fake(grad, top_acts, top_indices, values, rows, need_acts, need_values, use_triton):
    gacts = torch.empty_like(top_acts) if need_acts else unused_grad(grad)
    gvalues = torch.empty_like(values) if need_values else unused_grad(grad)
    return gacts, gvalues


_expander_decode_backward_op = define_op(
    "topk_kernels::expander_decode_backward", _expander_decode_backward_impl, _expander_decode_backward_fake
)


def _setup_context(ctx, inputs, output):
    top_acts, top_indices, values, rows, m, bias, use_triton, _ = inputs
    ctx.save_for_backward(top_acts, top_indices, values, rows)
    ctx.use_triton = use_triton
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    top_acts, top_indices, values, rows = ctx.saved_tensors
    need_acts, _, need_values, _, _, need_bias, _, _ = ctx.needs_input_grad
    gacts, gvalues = _expander_decode_backward_op(
        grad, top_acts, top_indices, values, rows, need_acts, need_values, ctx.use_triton
    )
    gbias = grad.sum(0).to(ctx.bias_dtype) if (ctx.bias_dtype is not None and need_bias) else None
    return (gacts if need_acts else None), None, (gvalues if need_values else None), None, None, gbias, None, None


_expander_decode_op = define_op(
    "topk_kernels::expander_decode", _expander_decode_impl, _expander_decode_fake, _setup_context, _backward
)


def expander_decode(
    top_acts: Tensor,
    top_indices: Tensor,
    values: Tensor,
    rows: Tensor,
    m: int,
    bias: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
    check_rows: bool = True,
    check_indices: bool = True,
) -> Tensor:
    """Decode k active latents per token through an expander (d-sparse) dictionary.

    Args:
        top_acts: [..., k] float activations of the active latents.
        top_indices: [..., k] int64 latent ids in [0, n); duplicates within a token add up.
            Checked on every device unless ``check_indices=False``; unchecked on CUDA, an id
            outside [0, n) contributes nothing to the Triton kernels (``TOPK_KERNELS_DEBUG=1``
            makes them assert), see ``topk_kernels._common``.
        values: [n, d] float atom values.
        rows: [n, d] int64 model coordinates in [0, m) of those values, distinct within each
            latent (as ``sae.masks.expander_mask`` draws them). An integer buffer: no gradient.
        m: model dimension (width of the output).
        bias: optional [m].
        backend: None (automatic), "triton", "torch" or "reference".
        check_rows: check ``rows`` with ``topk_kernels.check_expander_rows`` (range and
            distinctness; one host sync on CUDA) on every call. A caller whose ``rows`` are fixed
            and were checked once (``sae.ExpanderSAE`` at construction and load) passes False.
        check_indices: check every id of ``top_indices`` is in [0, n) (one host sync on CUDA,
            skipped while torch.compile traces). A caller whose ids come from its own encoder
            (``sae``'s models) passes False. CPU ids are checked either way (no sync), and so
            are the ids given to ``backend="reference"`` (which would fail on them).

    Returns:
        [..., m]: out[..., rows[j, t]] += top_acts[..., s] * values[j, t] for j = top_indices[..., s]
        (+ bias). Gradients flow to top_acts, values and bias.

    Raises:
        ValueError: a latent repeats a row (on every backend, when ``check_rows``).
    """
    m = check_expander(values, rows, m)
    check_decode_args(top_acts, top_indices)
    check_bias("bias", bias, m, "m")
    check_same_device(top_acts=top_acts, top_indices=top_indices, values=values, rows=rows, bias=bias)
    out_dtype = torch.promote_types(top_acts.dtype, values.dtype)  # every backend's (the bias's does not count)
    backend = resolve_backend(backend, values.device, out_dtype, ("values", values.shape[0]))
    check_decode_ids(top_indices, values.shape[0], backend, check_indices)
    if backend == "reference":
        if check_rows:
            check_expander_rows(rows, m)
        # In the promoted dtype, as every backend computes: the reference's matmul takes one dtype.
        return reference.expander_decode(top_acts.to(out_dtype), top_indices.long(), values.to(out_dtype), rows.long(),
                                         m, bias).to(out_dtype)
    lead, k = top_acts.shape[:-1], top_acts.shape[-1]
    out = _expander_decode_op(
        top_acts.reshape(-1, k).contiguous(),
        top_indices.reshape(-1, k).long().contiguous(),
        values.contiguous(),
        rows.long().contiguous(),
        m,
        bias.contiguous() if bias is not None else None,
        backend == "triton",
        check_rows,
    )
    return out.reshape(*lead, m)
