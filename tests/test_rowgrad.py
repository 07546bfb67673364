"""_rowgrad: the decoders' weight / value gradients, sorted by latent and written once per row.

Through the Triton kernels under the interpreter: no fp32 [n, m] buffer is allocated for a bf16
weight (an allocation spy), every row is written (fresh buffers are NaN-poisoned), results are
bit-identical across runs and match the fp64 reference, also when one latent is used by every
token and chunks are small enough that its segment is cut many times; indices outside [0, n) and
expander rows outside [0, m) contribute nothing; the sort is shared by the encoder's and the
decoder's backward of one step.
"""

import pytest
import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import TOL, assert_close
from topk_kernels import _rowgrad, expander_decode, reference, sparse_decode, topk_encode
from topk_kernels._common import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="no triton")


class AllocationSpy(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an op returns, also inside our custom ops; fills
    fresh ``empty`` float buffers with NaN, so a row no kernel writes cannot pass as zero."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = _maybe_get_opdef(func) if func.namespace == "topk_kernels" else None
        if opdef is not None:  # run our custom op's body under the spy too
            with self:
                out = opdef._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((tuple(t.shape), t.dtype))
                if func.overloadpacket is torch.ops.aten.empty and t.is_floating_point():
                    t.fill_(float("nan"))
        return out


def _decode_inputs(B, m, n, k, dtype, hot=None):
    acts = torch.randn(B, k).abs().to(dtype)
    idx = torch.randint(0, n, (B, k))
    if hot is not None:
        idx[:, 0] = hot  # one latent used by every token
    weight = torch.randn(n, m).to(dtype)
    return acts, idx, weight


def _decode_grads(acts, idx, weight, grad_out):
    a, w = acts.clone().requires_grad_(), weight.clone().requires_grad_()
    sparse_decode(a, idx, w, backend="triton").backward(grad_out)
    return a.grad, w.grad


def _decode_reference(acts, idx, weight, grad_out):
    a, w = acts.double().requires_grad_(), weight.double().requires_grad_()
    reference.sparse_decode(a, idx, w).backward(grad_out.double())
    return a.grad, w.grad


def test_bf16_weight_grad_allocates_no_fp32_n_by_m_buffer():
    B, m, n, k = 37, 48, 300, 5
    acts, idx, weight = _decode_inputs(B, m, n, k, torch.bfloat16)
    grad_out = torch.randn(B, m).to(torch.bfloat16)
    spy = AllocationSpy()
    with spy:
        gacts, gw = _decode_grads(acts, idx, weight, grad_out)
    assert ((n, m), torch.bfloat16) in spy.outputs  # the spy sees the op's own allocations
    big_fp32 = [o for o in spy.outputs if o[1] == torch.float32 and torch.Size(o[0]).numel() >= n * m]
    assert not big_fp32, f"fp32 buffers of >= n*m elements: {big_fp32}"
    ref_acts, ref_w = _decode_reference(acts, idx, weight, grad_out)
    assert gw.dtype == torch.bfloat16
    assert_close(gw, ref_w, TOL[torch.bfloat16], "grad weight")
    assert_close(gacts, ref_acts, TOL[torch.bfloat16], "grad acts")


@pytest.mark.parametrize("chunk", [3, 8, 128])  # 3 and 8 cut the hot latent's segment many times
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hot_latent_bit_identical_and_matches_reference(monkeypatch, chunk, dtype):
    monkeypatch.setattr(_rowgrad, "CHUNK", chunk)
    B, m, n, k = 61, 40, 97, 6
    acts, idx, weight = _decode_inputs(B, m, n, k, dtype, hot=13)
    idx[::5, 1] = 13  # repeats of the hot latent within a token add up too
    grad_out = torch.randn(B, m).to(dtype)
    with AllocationSpy():  # NaN-poisoned buffers: every row must be written
        first = _decode_grads(acts, idx, weight, grad_out)
    second = _decode_grads(acts, idx.clone(), weight, grad_out)  # a fresh sort
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    ref_acts, ref_w = _decode_reference(acts, idx, weight, grad_out)
    assert_close(first[1], ref_w, TOL[dtype], "grad weight")
    assert_close(first[0], ref_acts, TOL[dtype], "grad acts")
    inactive = torch.ones(n, dtype=torch.bool)
    inactive[idx.reshape(-1)] = False
    assert inactive.any() and torch.equal(first[1][inactive], torch.zeros_like(first[1][inactive]))


def test_scratch_bound_grows_the_chunks(monkeypatch):
    """The partial-row scratch stays within PART_BYTES: chunks double until it fits, and the result
    still matches the reference (and stays bit-identical) with a hot latent cut many times."""
    assert _rowgrad.chunk_size(2**19, 2048) == _rowgrad.CHUNK  # the benchmark shape: 64 MiB of scratch
    assert _rowgrad.chunk_size(2**26, 8192) == 2**14  # 32 GiB at CHUNK = 128, 256 MiB at 2^14
    monkeypatch.setattr(_rowgrad, "CHUNK", 4)
    monkeypatch.setattr(_rowgrad, "PART_BYTES", 2 * 10 * 40 * 4)  # 10 chunks' partial rows of m = 40
    B, m, n, k = 61, 40, 97, 6
    nnz = B * k
    assert _rowgrad.chunk_size(nnz, m) == 64 and -(-nnz // 64) <= 10  # 4 -> 64: 6 chunks
    acts, idx, weight = _decode_inputs(B, m, n, k, torch.float32, hot=13)
    grad_out = torch.randn(B, m)
    spy = AllocationSpy()
    with spy:
        first = _decode_grads(acts, idx, weight, grad_out)
    assert ((2 * 6, m), torch.float32) in spy.outputs  # two partial rows per chunk: 1,920 bytes
    assert ((2 * -(-nnz // 4), m), torch.float32) not in spy.outputs, spy.outputs  # CHUNK's 29,440
    second = _decode_grads(acts, idx.clone(), weight, grad_out)
    assert torch.equal(first[1], second[1])
    ref_acts, ref_w = _decode_reference(acts, idx, weight, grad_out)
    assert_close(first[1], ref_w, TOL[torch.float32], "grad weight")
    assert_close(first[0], ref_acts, TOL[torch.float32], "grad acts")


def test_rows_wider_than_one_program(monkeypatch):
    """Column blocks: the weight grad without the fused activation grad (its own kernel)."""
    monkeypatch.setattr(_rowgrad, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(_rowgrad, "CHUNK", 5)
    B, m, n, k = 23, 40, 30, 4
    acts, idx, weight = _decode_inputs(B, m, n, k, torch.float32, hot=2)
    grad_out = torch.randn(B, m)
    with AllocationSpy():
        gacts, gw = _decode_grads(acts, idx, weight, grad_out)
    ref_acts, ref_w = _decode_reference(acts, idx, weight, grad_out)
    assert_close(gw, ref_w, TOL[torch.float32], "grad weight")
    assert_close(gacts, ref_acts, TOL[torch.float32], "grad acts")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expander_value_grad_hot_latent(monkeypatch, dtype):
    monkeypatch.setattr(_rowgrad, "CHUNK", 4)
    B, m, n, d, k = 29, 30, 41, 7, 5
    acts = torch.randn(B, k).abs().to(dtype)
    idx = torch.randint(0, n, (B, k))
    idx[:, 2] = 40
    values = torch.randn(n, d).to(dtype)
    rows = torch.rand(n, m).argsort(dim=1)[:, :d]
    grad_out = torch.randn(B, m).to(dtype)

    def grads():
        a, v = acts.clone().requires_grad_(), values.clone().requires_grad_()
        expander_decode(a, idx.clone(), v, rows, m, backend="triton").backward(grad_out)
        return a.grad, v.grad

    with AllocationSpy():
        first = grads()
    second = grads()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    a64, v64 = acts.double().requires_grad_(), values.double().requires_grad_()
    reference.expander_decode(a64, idx, v64, rows, m).backward(grad_out.double())
    assert_close(first[1], v64.grad, TOL[dtype], "grad values")
    assert_close(first[0], a64.grad, TOL[dtype], "grad acts")


def test_bf16_value_grad_allocates_no_fp32_n_by_d_buffer():
    B, m, n, d, k = 29, 30, 300, 7, 5  # n*d above the [B, m] tensors of the forward
    acts = torch.randn(B, k).abs().to(torch.bfloat16).requires_grad_()
    values = torch.randn(n, d).to(torch.bfloat16).requires_grad_()
    idx = torch.randint(0, n, (B, k))
    rows = torch.rand(n, m).argsort(dim=1)[:, :d]
    spy = AllocationSpy()
    with spy:
        expander_decode(acts, idx, values, rows, m, backend="triton").square().sum().backward()
    assert ((n, d), torch.bfloat16) in spy.outputs
    big_fp32 = [o for o in spy.outputs if o[1] == torch.float32 and torch.Size(o[0]).numel() >= n * d]
    assert not big_fp32, f"fp32 buffers of >= n*d elements: {big_fp32}"
    assert values.grad.dtype == torch.bfloat16 and torch.isfinite(values.grad).all()


def _row_grad_dense(src, scale, idx, n, cols=None):
    """fp64 scatter of the same sum, skipping entries whose index (or column) is out of range."""
    width = cols.shape[1] if cols is not None else src.shape[1]
    out = torch.zeros(n, width, dtype=torch.float64)
    for b in range(idx.shape[0]):
        for s in range(idx.shape[1]):
            j = int(idx[b, s])
            if not 0 <= j < n:
                continue
            if cols is None:
                out[j] += scale[b, s].double() * src[b].double()
            else:
                ok = (cols[j] >= 0) & (cols[j] < src.shape[1])
                out[j, ok] += scale[b, s].double() * src[b, cols[j, ok]].double()
    return out


def test_indices_outside_range_contribute_nothing(monkeypatch):
    monkeypatch.setattr(_rowgrad, "CHUNK", 4)
    B, m, n, k = 17, 24, 20, 3
    src, scale = torch.randn(B, m), torch.randn(B, k)
    idx = torch.randint(0, n, (B, k))
    idx[0, 0], idx[3, 1], idx[5, 2], idx[6, 0] = -1, n, -(2**40), 2**33 + 4  # 2**33 + 4 wraps to 4 in int32
    atom = torch.randn(n, m)
    plan = _rowgrad.sort_by_latent(idx, n)
    out, gscale = _rowgrad.row_grad(src, scale, plan, torch.float32, m, atom=atom, gscale_dtype=torch.float32)
    assert_close(out, _row_grad_dense(src, scale, idx, n), 1e-5, "row grad")
    valid = (idx >= 0) & (idx < n)
    want = torch.where(valid, (src[:, None, :] * atom[idx.clamp(0, n - 1)]).sum(-1), torch.zeros(()))
    assert_close(gscale, want, 1e-5, "activation grad")


def test_expander_rows_outside_range_contribute_nothing():
    B, m, n, d, k = 9, 12, 6, 4, 3
    src, scale = torch.randn(B, m), torch.randn(B, k)
    idx = torch.randint(0, n, (B, k))
    cols = torch.rand(n, m).argsort(dim=1)[:, :d]
    cols[1, 0], cols[2, 3] = -5, m + 7
    plan = _rowgrad.sort_by_latent(idx, n)
    out, _ = _rowgrad.row_grad(src, scale, plan, torch.float32, d, cols=cols)
    assert_close(out, _row_grad_dense(src, scale, idx, n, cols), 1e-5, "value grad")


def test_debug_mode_asserts_out_of_range_index(monkeypatch):
    idx = torch.tensor([[0, 5], [1, 2]])
    plan = _rowgrad.sort_by_latent(idx, 4)
    args = (torch.randn(2, 8), torch.randn(2, 2), plan, torch.float32, 8)
    _rowgrad.row_grad(*args)  # debug off: the entry is skipped, no error
    monkeypatch.setenv("TOPK_KERNELS_DEBUG", "1")
    try:
        with pytest.raises(Exception, match=r"top_indices: expected every index in \[0, n\)"):
            _rowgrad.row_grad(*args)
    finally:
        monkeypatch.delenv("TOPK_KERNELS_DEBUG")
        _rowgrad.row_grad(*args)  # switches the interpreter's debug mode back off


def test_sort_is_reused_only_for_the_same_unmodified_indices():
    idx = torch.randint(0, 50, (7, 3))
    first = _rowgrad.sort_by_latent(idx, 50)
    assert _rowgrad.sort_by_latent(idx.view(7, 3), 50) is first
    assert _rowgrad.sort_by_latent(idx, 51) is not first
    again = _rowgrad.sort_by_latent(idx, 50)
    idx[0, 0] = (idx[0, 0] + 1) % 50  # an in-place write bumps the version: a fresh sort
    fresh = _rowgrad.sort_by_latent(idx, 50)
    assert fresh is not again
    order = torch.argsort(idx.reshape(-1), stable=True)
    assert torch.equal(fresh.order, order)
    assert torch.equal(fresh.bounds, torch.searchsorted(idx.reshape(-1).sort().values, torch.arange(51)))


def test_encoder_and_decoder_backward_share_one_sort(monkeypatch):
    sorts = []

    class CountingSort(_rowgrad.LatentSort):
        def __init__(self, *args):
            super().__init__(*args)
            sorts.append(self)

    monkeypatch.setattr(_rowgrad, "LatentSort", CountingSort)
    B, m, n, k = 11, 16, 40, 4
    x = torch.randn(B, m)
    enc = torch.randn(n, m).requires_grad_()
    dec = torch.randn(n, m).requires_grad_()
    acts, indices = topk_encode(x, enc, None, k, backend="triton")
    sparse_decode(acts, indices, dec, backend="triton").square().sum().backward()
    assert len(sorts) == 1
    x64, e64, d64 = x.double(), enc.detach().double().requires_grad_(), dec.detach().double().requires_grad_()
    pre = x64 @ e64.T
    dense = torch.zeros_like(pre).scatter(1, indices, pre.gather(1, indices).relu())
    (dense @ d64).square().sum().backward()
    assert_close(enc.grad, e64.grad, 1e-5, "encoder weight grad")
    assert_close(dec.grad, d64.grad, 1e-5, "decoder weight grad")


def test_debug_mode_asserts_out_of_range_expander_row(monkeypatch):
    idx = torch.tensor([[0, 1], [1, 2]])
    cols = torch.tensor([[0, 3], [1, 9], [2, 4]])  # 9 >= m = 8
    plan = _rowgrad.sort_by_latent(idx, 3)
    args = (torch.randn(2, 8), torch.randn(2, 2), plan, torch.float32, 2)
    monkeypatch.setenv("TOPK_KERNELS_DEBUG", "1")
    try:
        with pytest.raises(Exception, match=r"rows: expected every row in \[0, m\)"):
            _rowgrad.row_grad(*args, cols=cols)
    finally:
        monkeypatch.delenv("TOPK_KERNELS_DEBUG")
        _rowgrad.row_grad(*args, cols=cols)
