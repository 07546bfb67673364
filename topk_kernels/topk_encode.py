"""Fused TopK encoder: ``pre = x @ weight.T + bias``, keep the k largest per token, ReLU them.

The [B, n] pre-activations are never written to memory. The Triton kernel runs one program per
(token block, latent split): it computes [BLOCK_B, BLOCK_N] tiles of ``pre`` with ``tl.dot`` over
m (fp32 accumulation), keeps the best K_PAD = next_pow2(k) candidates per token as packed int64
keys (``_topk``), and writes them; a second stage merges the candidates of all splits into the
final k. The CPU path computes ``pre`` a block of latents at a time with one GEMM per block into a
reused buffer and keeps a running top-k, so its extra memory is O(B * block) instead of O(B * n).
Ties go to the lower latent id on every backend.

Backward (only through the selected entries with positive pre-activation, as ReLU dictates):
``grad x`` is a sparse decode of the masked gradient against ``weight``, ``grad weight`` touches
only the active rows (row idx += g * x[token]), ``grad bias`` is a scatter-add; all three reuse the
decoder's kernels and CPU routines in :mod:`topk_kernels.sparse_decode`.

All of it (kernel, CPU path, ``torch.library`` registration with fake and autograd) lives here,
like the decoder.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._common import (
    HAS_TRITON,
    INTERPRET,
    check_bias,
    check_float,
    check_k,
    check_matrix,
    check_same_device,
    compute_dtype,
    grad_bias,
    launch_options,
    on_device,
    pow2,
    resolve_backend,
    unused_grad,
)
from ._topk import cpu_tile, latent_splits, merge_candidates, token_blocked_topk
from .sparse_decode import (
    torch_grad_weight as decode_torch_grad_weight,
    triton_grad_weight as decode_triton_grad_weight,
    torch_forward as decode_torch_forward,
    triton_forward as decode_triton_forward,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._topk import empty_keys, update_topk_keys

    @triton.jit
    def _encode_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, cand_ptr,
        B, N, M, TILES_PER_SPLIT, C,
        HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
        K_PAD: tl.constexpr, CAST_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """Program (token block, latent split): the split's top K_PAD keys per token -> cand[:, split]."""
        pid_b = tl.program_id(0)
        split = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        x_rows = offs_b.to(tl.int64) * M
        running = empty_keys(BLOCK_B, K_PAD)
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
                if CAST_FP32:  # the interpreter multiplies bf16/fp16 dot operands wrongly
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(xt, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            # Padded latents become -inf with ids >= N: they lose even against a real -inf.
            acc = tl.where(mask_n[None, :], acc, float("-inf"))
            running = update_topk_keys(running, acc, offs_n, K_PAD)
        out = cand_ptr + offs_b.to(tl.int64)[:, None] * C + split * K_PAD + tl.arange(0, K_PAD)[None, :]
        tl.store(out, running, mask=mask_b[:, None])


# Launch configurations of the fused kernel, by K_PAD: (BLOCK_B, BLOCK_N, BLOCK_M, num_warps).
# BLOCK_N >= K_PAD (a tile's top-K_PAD needs that many columns); the [BLOCK_B, BLOCK_N] int64 key
# tile and its bitonic network must stay in registers, so wider K_PAD takes fewer tokens. K_PAD
# starts at 2: with one candidate, ptxas spilled a few bytes on sm_80 at every shape tried.
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

# CPU path tiles: at most CPU_TILE_ELEMS fp32 pre-activations (128 MiB) exist at a time, which
# bounds the extra memory. Tiles are wide in latents and short in tokens because torch.topk costs
# less per element on long rows (measured here: 2.5 ns/element at 65536 wide, 4.3 at 8192, 15 at
# 2048); at least CPU_MIN_BLOCK_B tokens per tile keep the GEMM compute-bound.
CPU_TILE_ELEMS = 32 * 2**20
CPU_MAX_BLOCK_N = 65536
CPU_MIN_BLOCK_B = 256


def _triton_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, out_dtype) -> tuple[Tensor, Tensor]:
    B, M = x.shape
    N = weight.shape[0]
    if B == 0:
        return x.new_empty(0, k, dtype=out_dtype), x.new_empty(0, k, dtype=torch.int64)
    k_pad = pow2(k, lo=min(ENCODE_CONFIGS))
    if k_pad > MAX_FUSED_K_PAD:
        # Registers cannot hold that many candidates per token: blocked GEMM + exact key top-k,
        # still without a [B, n] tensor and without host syncs.
        return _blocked_forward(x, weight, bias, k, out_dtype, exact_keys=True)
    block_b, block_n, block_m, num_warps = ENCODE_CONFIGS[k_pad]
    block_m = min(block_m, pow2(M, lo=16))
    n_tiles = triton.cdiv(N, block_n)
    token_blocks = triton.cdiv(B, block_b)
    splits = latent_splits(token_blocks, n_tiles, x.device)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    cand = torch.empty(B, splits * k_pad, device=x.device, dtype=torch.int64)
    fp32_dot = x.dtype == torch.float32 and weight.dtype == torch.float32
    precision = "tf32" if (fp32_dot and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    num_stages = 3  # Triton's default
    if fp32_dot and precision == "ieee":
        # An exact fp32 dot runs on FMA units at the same cost per column whatever the chunk:
        # with 32-column chunks and Triton's default 3 stages ptxas spilled 8-28 bytes at
        # K_PAD=4..128 (tests/gpu_compile.py); 16 columns and no pipelining spill none.
        block_m, num_stages = min(block_m, 16), 1
    _encode_fwd_kernel[(token_blocks, splits)](
        x, weight, bias if bias is not None else x, cand,
        B, N, M, tiles_per_split, splits * k_pad,
        HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_M=block_m,
        K_PAD=k_pad, CAST_FP32=INTERPRET or not (fp32_dot or x.dtype == weight.dtype),
        INPUT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages, **launch_options(),
    )
    return merge_candidates(cand, k, out_dtype)


def _blocked_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, out_dtype, exact_keys: bool = False
) -> tuple[Tensor, Tensor]:
    """Tiles of tokens x latents (``_topk.cpu_tile``): one GEMM each into a reused buffer, then a
    running top-k. Extra memory: the buffer plus O(B * k)."""
    B, M = x.shape
    N = weight.shape[0]
    cd = compute_dtype(torch.promote_types(x.dtype, weight.dtype))
    xc = x.to(cd)
    bc = bias.to(cd) if bias is not None else None
    block_b, block_n = cpu_tile(B, N, CPU_TILE_ELEMS, CPU_MAX_BLOCK_N, CPU_MIN_BLOCK_B)
    buf = torch.empty(block_b * block_n, device=x.device, dtype=cd)

    def pre_tile(b0: int, b1: int, start: int, stop: int) -> Tensor:
        out = buf[: (b1 - b0) * (stop - start)].view(b1 - b0, stop - start)
        w = weight[start:stop].to(cd)  # a copy only when weight is not already in cd
        if bc is None:
            return torch.mm(xc[b0:b1], w.T, out=out)
        return torch.addmm(bc[start:stop], xc[b0:b1], w.T, out=out)

    values, indices = token_blocked_topk(pre_tile, B, N, k, block_n, block_b, exact_keys=exact_keys)
    if cd == torch.float64:
        values = _exact_values(xc, weight, bc, indices)
    return values.relu().to(out_dtype), indices


def _exact_values(x: Tensor, weight: Tensor, bias: Optional[Tensor], indices: Tensor) -> Tensor:
    """fp64 pre-activations [B, k] at the selected [B, k] latents (keys rank by fp32-rounded values).
    Token chunks keep the gathered [chunk, k, m] rows within the CPU tile budget."""
    B, k = indices.shape
    chunk = max(1, CPU_TILE_ELEMS // (2 * k * x.shape[1]))
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    for b0 in range(0, B, chunk):
        rows = weight[indices[b0:b0 + chunk]].to(x.dtype)  # [chunk, k, m]
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

@torch.library.custom_op("topk_kernels::topk_encode", mutates_args=())
def _topk_encode_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, use_triton: bool
) -> tuple[Tensor, Tensor]:
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if use_triton:
        with on_device(x.device):
            return _triton_forward(x, weight, bias, k, out_dtype)
    return _torch_forward(x, weight, bias, k, out_dtype)


@_topk_encode_op.register_fake
def _(x, weight, bias, k, use_triton):
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape[0], k, dtype=out_dtype), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("topk_kernels::topk_encode_backward", mutates_args=())
def _topk_encode_backward_op(
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
    else:
        if need_x:
            gx = decode_torch_forward(g, top_indices, weight, None, x.dtype)
        if need_weight:
            gw = decode_torch_grad_weight(x, g, top_indices, n, weight.dtype)
    if need_bias and bias_dtype is not None:
        gb = grad_bias(g, top_indices, n, bias_dtype)
    return gx, gw, gb


@_topk_encode_backward_op.register_fake
def _(grad_acts, top_acts, top_indices, x, weight, need_x, need_weight, need_bias, bias_dtype, use_triton):
    gx = torch.empty_like(x) if need_x else unused_grad(grad_acts)
    gw = torch.empty_like(weight) if need_weight else unused_grad(grad_acts)
    need_gb = need_bias and bias_dtype is not None
    gb = weight.new_empty(weight.shape[0], dtype=bias_dtype) if need_gb else unused_grad(grad_acts)
    return gx, gw, gb


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


_topk_encode_op.register_autograd(_backward, setup_context=_setup_context)


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
        lower latent id first), ``top_acts = relu(pre)`` at those indices.
    """
    check_float("x", x)
    check_matrix("weight", weight)
    n, m = weight.shape
    if x.shape[-1] != m:
        raise ValueError(f"x: expected last dimension m = weight.shape[1] = {m}, got shape {tuple(x.shape)}")
    check_bias("bias", bias, n, "n = weight.shape[0]")
    check_k(k, n)
    check_same_device(x=x, weight=weight, bias=bias)
    backend = resolve_backend(backend, weight.device, torch.promote_types(x.dtype, weight.dtype))
    if backend == "reference":
        return reference.topk_encode(x, weight, bias, k)
    lead = x.shape[:-1]
    top_acts, top_indices = _topk_encode_op(
        x.reshape(-1, m).contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        k,
        backend == "triton",
    )
    return top_acts.reshape(*lead, k), top_indices.reshape(*lead, k)
