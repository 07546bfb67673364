"""expander_encode: selected latents, their activations and the gradients of x, values and bias
against the fp64 dense reference, on the CPU path and on the Triton kernel under the interpreter;
tie order; blocked CPU tiles; the kernel's transposed gather (padded token blocks, every
coordinate, out-of-range rows) and its predicted sector traffic; errors; torch.library and
torch.compile."""

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_compile
from helpers import BACKENDS, TOL, assert_close, assert_grads_match
from topk_kernels._common import HAS_TRITON
from topk_kernels import expander_encode, reference
from topk_kernels._topk import cpu_tile

ee = importlib.import_module("topk_kernels.expander_encode")  # the module; the package exports the function

pytestmark = pytest.mark.ops

SHAPES = [  # (leading shape, m, n, d, k)
    ((33,), 100, 999, 7, 17),  # odd sizes
    ((3, 5), 24, 130, 3, 9),  # a leading shape
    ((9,), 20, 37, 4, 37),  # k = n
    ((11,), 6, 50, 6, 8),  # d = m
    ((17,), 30, 200, 1, 12),  # d = 1
]


@pytest.fixture(autouse=True)
def fused_strategy(monkeypatch):
    """The Triton backend takes the fused kernel in these tests, on CUDA too (where the dispatcher
    picks the chunked strategy); the chunked strategy has its own tests below."""
    monkeypatch.setattr(ee, "expander_strategy", lambda *args: "fused")


def _rows(n, m, d):
    """d distinct model coordinates per latent, uniformly at random."""
    return torch.rand(n, m).argsort(dim=1)[:, :d]


def _inputs(lead, m, n, d, dtype=torch.float32):
    x = torch.randn(*lead, m).to(dtype)
    values = torch.randn(n, d).to(dtype)
    rows = _rows(n, m, d)
    bias = (0.5 * torch.randn(n)).to(dtype)
    return x, values, rows, bias


def _reference_pre(x, values, rows, bias):
    """fp64 dense pre-activations [..., n]."""
    pre = x.double() @ reference.expander_dense(values.double(), rows, x.shape[-1]).T
    return pre if bias is None else pre + bias.double()


def _assert_topk_matches(acts, idx, pre, k, tol, what=""):
    """acts/idx [..., k] against the fp64 pre-activations [..., n]: the same latents in the same
    order as the exact top-k (a swap is tolerated only between near-tied reference values, which
    the working precision cannot order), activations relu(pre) within tol, sorted descending."""
    ref_vals, ref_idx = pre.topk(min(k + 1, pre.shape[-1]), dim=-1)
    scale = max(1.0, pre.abs().max().item())
    near = torch.zeros_like(ref_idx[..., :k], dtype=torch.bool)
    gaps = (ref_vals[..., 1:] - ref_vals[..., :-1]).abs() < 100 * tol * scale
    near[..., : gaps.shape[-1]] |= gaps[..., :k]
    near[..., 1:] |= gaps[..., : k - 1]
    mismatch = (idx != ref_idx[..., :k]) & ~near
    assert not mismatch.any(), f"{what}: {int(mismatch.sum())} selected latents differ from the exact top-k"
    chosen = pre.gather(-1, idx)
    assert_close(chosen, ref_vals[..., :k], tol, f"{what} pre at selected latents")
    assert_close(acts, chosen.relu(), tol, f"{what} top_acts")
    assert (chosen[..., 1:] <= chosen[..., :-1] + tol * scale).all(), f"{what}: not sorted descending"


def _check_against_reference(x, values, rows, bias, k, backend, tol):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, values, bias)]
    acts, idx = expander_encode(leaves[0], leaves[1], rows, leaves[2], k, backend=backend)
    assert acts.dtype == x.dtype and idx.dtype == torch.int64
    assert acts.shape == idx.shape == (*x.shape[:-1], k)
    pre = _reference_pre(x, values, rows, bias)
    _assert_topk_matches(acts, idx, pre, k, tol, "forward")

    # Gradients of the fp64 reference at the same selection: a ReLU'd gather of pre.
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, values, bias)]
    ref_acts = _reference_pre(ref_leaves[0], ref_leaves[1], rows, ref_leaves[2]).gather(-1, idx).relu()
    assert_grads_match(acts, ref_acts, leaves, ref_leaves, ("x", "values", "bias"), tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,m,n,d,k", SHAPES)
def test_matches_dense_reference(backend, lead, m, n, d, k):
    _check_against_reference(*_inputs(lead, m, n, d), k, backend, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    x, values, rows, bias = _inputs((21,), 50, 300, 5, torch.bfloat16)
    _check_against_reference(x, values, rows, bias, 11, backend, TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias(backend):
    x, values, rows, _ = _inputs((19,), 40, 150, 3)
    _check_against_reference(x, values, rows, None, 6, backend, TOL[torch.float32])


def test_reference_backend_matches_dense_reference():
    x, values, rows, bias = _inputs((7,), 30, 90, 4)
    acts, idx = expander_encode(x.double(), values.double(), rows, bias.double(), 5, backend="reference")
    want_acts, want_idx = reference.topk_relu(_reference_pre(x, values, rows, bias), 5)
    assert torch.equal(idx, want_idx)
    assert_close(acts, want_acts, TOL[torch.float64], "reference backend")


def test_cpu_tiles_and_blocks_merge(monkeypatch):
    """The CPU path's running top-k across several token tiles and latent blocks, each tile
    computed in several embedding_bag pieces (the defaults are larger than any test input)."""
    monkeypatch.setattr(ee, "CPU_TILE_ELEMS", 8 * 70)
    monkeypatch.setattr(ee, "CPU_PIECE_ELEMS", 8 * 9 + 3)  # 9 latents a piece (15 in the last tile)
    monkeypatch.setattr(ee, "CPU_MAX_BLOCK_N", 70)
    monkeypatch.setattr(ee, "CPU_MIN_BLOCK_B", 1)
    assert cpu_tile(29, 333, ee.CPU_TILE_ELEMS, ee.CPU_MAX_BLOCK_N, ee.CPU_MIN_BLOCK_B) == (8, 70)
    _check_against_reference(*_inputs((29,), 60, 333, 5), 13, "torch", TOL[torch.float32])


@pytest.mark.parametrize("dtype,B", [(torch.float32, 131), (torch.float64, 67)])
def test_cpu_padded_token_tables(monkeypatch, dtype, B):
    """Token tiles of 512 bytes a row or more are padded (``_token_table``): embedding_bag then
    computes padded token columns, which must never be read as tokens. Tiles of 131 / 67 tokens in
    pieces of 23 latents (200 is not a multiple)."""
    monkeypatch.setattr(ee, "CPU_PIECE_ELEMS", B * 23)
    x, values, rows, bias = (t.to(dtype) if t.is_floating_point() else t for t in _inputs((B,), 37, 200, 5))
    _check_against_reference(x, values, rows, bias, 9, "torch", TOL[dtype])


@pytest.mark.parametrize("b", [1, 31, 127, 128, 129, 682, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_table_layout(b, dtype):
    """x.T with rows an odd number of 64-byte lines apart from 512 bytes on, unpadded below."""
    x = torch.randn(b, 6, dtype=dtype)
    xt = ee._token_table(x, dtype)
    ld = xt.shape[1]
    assert torch.equal(xt[:, :b], x.T) and not xt[:, b:].any()
    if b * dtype.itemsize < 512:
        assert ld == b
    else:
        assert ld * dtype.itemsize % 64 == 0 and (ld * dtype.itemsize // 64) % 2 == 1
        assert ld - b < 2 * 64 // dtype.itemsize


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_beyond_register_candidates(backend):
    """k_pad > 256: the Triton launcher falls back to blocked gathers with exact keys."""
    _check_against_reference(*_inputs((5,), 30, 400, 3), 300, backend, TOL[torch.float32])


def test_float64_winners_recomputed_in_token_chunks(monkeypatch):
    """fp64 inputs: the exact values of the selected latents are gathered a few tokens at a time
    (here 2 tokens of k * d = 15 taps per chunk), and still equal the fp64 dense reference."""
    monkeypatch.setattr(ee, "CPU_TILE_ELEMS", 2 * 5 * 3)
    chunks = []
    gather = torch.Tensor.gather
    monkeypatch.setattr(torch.Tensor, "gather", lambda t, *a: chunks.append(t.shape[0]) or gather(t, *a))
    x, values, rows, bias = _inputs((7,), 11, 23, 3, torch.float64)
    acts, idx = ee._torch_forward(x, values, rows, bias, 5, torch.float64)
    assert chunks == [2, 2, 2, 1]
    ref_acts, ref_idx = reference.expander_encode(x, values, rows, bias, 5)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(acts, ref_acts, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lower_latent_id(backend):
    """Equal pre-activations are ordered by latent id, the same on every backend."""
    x, values, rows, _ = _inputs((6,), 16, 8, 2)
    copies = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1, 3, 0])  # latents 0, 2, 5, 10 are identical
    values, rows = values[copies].contiguous(), rows[copies].contiguous()
    acts, idx = expander_encode(x, values, rows, None, 7, backend=backend)
    pre = _reference_pre(x, values, rows, None).float()
    for b in range(x.shape[0]):
        order = sorted(range(len(copies)), key=lambda j: (-pre[b, j].item(), j))[:7]
        assert idx[b].tolist() == order


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no triton")


# --- the chunked strategy (gather kernel into fp32 chunks + topk_encode's selection kernel) ----

@pytest.fixture
def chunked(monkeypatch):
    """The Triton backend runs the chunked strategy, with chunks small enough that these problems
    span several token tiles and latent chunks, and a gather tile of 16 tokens x 32 latents."""
    monkeypatch.setattr(ee, "expander_strategy", lambda *args: "chunked")
    monkeypatch.setattr(ee, "EXPANDER_CHUNK_ELEMS", 16 * 40)
    monkeypatch.setattr(ee, "EXPANDER_CHUNK_MAX_BLOCK_B", 16)
    monkeypatch.setattr(ee, "EXPANDER_GATHER_TILE", (16, 32, 4))


@needs_triton
@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize("lead,m,n,d,k", [
    ((33,), 100, 301, 7, 17),  # odd sizes: three token tiles (the last padded), eight chunks
    ((3, 5), 24, 130, 3, 9),  # a leading shape
    ((9,), 20, 37, 4, 37),  # k = n
    ((5,), 30, 307, 3, 150),  # K_PAD 256: the 1-row selection tile, more latents than slots
])
def test_chunked_strategy_matches_dense_reference(lead, m, n, d, k):
    _check_against_reference(*_inputs(lead, m, n, d), k, "triton", TOL[torch.float32])


@needs_triton
@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_strategy_dtypes_and_no_bias(dtype):
    x, values, rows, _ = _inputs((21,), 50, 170, 5, dtype)
    _check_against_reference(x, values, rows, None, 11, "triton", TOL[dtype])


@needs_triton
@pytest.mark.usefixtures("chunked")
def test_chunked_strategy_ties_and_out_of_range_rows():
    """Ties go to the lower latent id across chunks, and rows outside [0, m) contribute nothing,
    as in the fused kernel."""
    x, values, rows, _ = _inputs((6,), 16, 8, 2)
    copies = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1, 3, 0] * 5)  # identical latents in every chunk
    values, rows = values[copies].contiguous(), rows[copies].contiguous()
    acts, idx = expander_encode(x, values, rows, None, 7, backend="triton")
    pre = _reference_pre(x, values, rows, None).float()
    for b in range(x.shape[0]):
        assert idx[b].tolist() == sorted(range(len(copies)), key=lambda j: (-pre[b, j].item(), j))[:7]
    rows = rows.clone()
    rows[3, 0], rows[40, 1] = -1, 16
    row_ok = (rows >= 0) & (rows < 16)
    acts, idx = ee._triton_forward(x, values, rows, None, 7, torch.float32)  # past the public id check
    pre = x.double() @ reference.expander_dense(torch.where(row_ok, values, 0.0).double(), rows.clamp(0, 15), 16).T
    want_acts, want_idx = reference.topk_relu(pre, 7)
    assert torch.equal(idx, want_idx)
    assert_close(acts, want_acts, 1e-5, "top_acts")


@needs_triton
@pytest.mark.usefixtures("chunked")
def test_chunked_strategy_transposes_within_xt_chunk_bytes(monkeypatch):
    """The chunked strategy's token tiles keep their transposed copy within XT_CHUNK_BYTES, as the
    fused strategy's launches do (here tiles of 16, 16 and 5 tokens; EXPANDER_CHUNK_MAX_BLOCK_B
    alone would allow 32)."""
    monkeypatch.setattr(ee, "XT_CHUNK_BYTES", 45 * 4 * 16)
    monkeypatch.setattr(ee, "EXPANDER_CHUNK_MAX_BLOCK_B", 32)
    copies = []
    transpose = ee.transposed_tokens
    monkeypatch.setattr(ee, "transposed_tokens", lambda x, b: copies.append(x.shape[0]) or transpose(x, b))
    x, values, rows, bias = _inputs((37,), 45, 50, 4)
    acts, idx = ee._triton_forward(x, values, rows.contiguous(), bias, 7, torch.float32)
    assert copies == [16, 16, 5]
    _assert_topk_matches(acts, idx, _reference_pre(x, values, rows, bias), 7, TOL[torch.float32], "chunked")


@needs_triton
@pytest.mark.usefixtures("chunked")
def test_chunked_strategy_keeps_latent_tiles_within_grid_axis_1(monkeypatch):
    """Latent tiles run on grid axis 1, which CUDA caps at 65,535: a few tokens must not make one
    chunk span more (B=1, n=2^24 would be 131,072 tiles). Here the cap is 2 tiles of 32 latents,
    so 2 tokens and 301 latents take five chunks instead of one."""
    monkeypatch.setattr(ee, "MAX_GRID_Y", 2)
    monkeypatch.setattr(ee, "EXPANDER_CHUNK_ELEMS", 2 * 4096)
    grids = []
    kernel = ee._expander_pre_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(ee, "_expander_pre_kernel", Spy())
    x, values, rows, bias = _inputs((2,), 40, 301, 5)
    _check_against_reference(x, values, rows, bias, 9, "triton", TOL[torch.float32])
    assert len(grids) == 5 and max(g[1] for g in grids) == 2, grids


def test_expander_strategy_table(monkeypatch):
    monkeypatch.undo()  # the real dispatcher, not this file's fused default
    cpu = torch.device("cpu")
    assert ee.expander_strategy(64, torch.float32, cpu) == "fused"  # the interpreter proves the fused kernel
    monkeypatch.setitem(ee.EXPANDER_MEASURED, ("cpu", torch.float32, 64), "chunked")
    assert ee.expander_strategy(50, torch.float32, cpu) == "chunked"
    assert ee.EXPANDER_PREDICTED in ("fused", "chunked")


@needs_triton
@pytest.mark.parametrize("d", [1, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gathers_over_token_blocks_and_tiles(monkeypatch, dtype, d):
    """Small tiles, so that B=37 spans three token blocks (the last padded), n=70 several latent
    tiles and splits; m=45 is not a power of two and most latents use coordinates 0 and m - 1 (the
    first and last row of x.T). Odd and even d, with the odd degree apart (bf16) and as a dead
    second degree (fp32): ``odd_apart``."""
    monkeypatch.setitem(ee.EXPANDER_ENCODE_CONFIGS, 16, (16, 16, 4))
    assert ee.odd_apart(dtype, fused=True) == (dtype != torch.float32)
    x, values, _, bias = _inputs((37,), 45, 70, d, dtype)
    order = torch.rand(70, 45)
    order[::2, 44], order[::3, 0] = -2.0, -1.0  # drawn first: distinct rows that include them
    rows = order.argsort(dim=1)[:, :d]
    assert (rows == 44).any(1)[::2].all() and (rows == 0).any(1)[3::6].all()
    _check_against_reference(x, values, rows, bias, 9, "triton", TOL[dtype])


@needs_triton
def test_kernel_ignores_out_of_range_rows_in_padded_blocks(monkeypatch):
    """The index contract through the transposed gather (B=21: two token blocks, the last padded):
    rows outside [0, m) contribute nothing: m and m + 1 (just past x.T), negative ones, one whose
    offset r * LD would wrap in int32, and int64 rows that would wrap into range as int32."""
    monkeypatch.setitem(ee.EXPANDER_ENCODE_CONFIGS, 8, (16, 16, 4))
    B, n, m, d, k = 21, 60, 13, 3, 5
    x = torch.randn(B, m)
    values = torch.randn(n, d)
    rows = _rows(n, m, d).contiguous()
    rows[0, 0], rows[7, 2], rows[31, 1], rows[59, 0], rows[44, 2] = -1, m, 2**31 // B, -(2**40), m + 1
    rows[20, 1] = 2**33  # wraps to coordinate 0 if cast to int32 before the range check
    row_ok = (rows >= 0) & (rows < m)
    acts, idx = ee._triton_forward(x, values, rows, None, k, torch.float32)
    pre = x.double() @ reference.expander_dense(torch.where(row_ok, values, 0.0).double(), rows.clamp(0, m - 1), m).T
    want_acts, want_idx = reference.topk_relu(pre, k)
    assert torch.equal(idx, want_idx)
    assert_close(acts, want_acts, 1e-5, "top_acts")


@needs_triton
def test_k_beyond_register_candidates_ignores_out_of_range_rows():
    """The index contract past the fused kernel's K_PAD (k > 256, the blocked gathers the Triton
    backend falls back to): rows outside [0, m) contribute nothing there too, where embedding_bag
    raised on them (on CUDA a device-side assert, which ends the process's CUDA context)."""
    B, n, m, d, k = 5, 400, 30, 3, 300
    x = torch.randn(B, m)
    values = torch.randn(n, d)
    rows = _rows(n, m, d).contiguous()
    rows[0, 0], rows[7, 2], rows[31, 1], rows[399, 0] = -1, m, 2**33, -(2**40)
    row_ok = (rows >= 0) & (rows < m)
    acts, idx = ee._triton_forward(x, values, rows, None, k, torch.float32)  # past the public row check
    pre = x.double() @ reference.expander_dense(torch.where(row_ok, values, 0.0).double(), rows.clamp(0, m - 1), m).T
    _assert_topk_matches(acts, idx, pre, k, TOL[torch.float32], "out-of-range rows, k > 256")


@needs_triton
def test_transposed_tokens_pads_with_zeros():
    x = torch.randn(37, 45)
    xt = ee.transposed_tokens(x, 16)
    assert xt.shape == (46, 48) and xt.stride() == (48, 1)
    assert torch.equal(xt[:45, :37], x.T) and not xt[:, 37:].any() and not xt[45].any()


@needs_triton
def test_transposed_tokens_refuses_offsets_past_int32():
    """The kernels' row offsets r * LD are int32: a copy of x.T past 2**31 elements is an error
    naming x, not a wrapped offset (meta tensors: nothing is allocated)."""
    ee.transposed_tokens(torch.empty(32, 2**26 - 2, device="meta"), 32)  # (m + 1) * 32 < 2**31
    with pytest.raises(ValueError, match="x: expected"):
        ee.transposed_tokens(torch.empty(32, 2**26, device="meta"), 32)


@pytest.mark.parametrize("rows_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pack_taps_holds_fp32_values_and_rows_with_out_of_range_as_minus_one(monkeypatch, rows_dtype, dtype):
    """taps[t, j]: the fp32 bits of values[j, t] above rows[j, t] (as int32), -1 for a row outside
    [0, m), including int64 rows that would wrap into range as int32; packed in chunks of 16
    latents here (the last one short)."""
    monkeypatch.setattr(ee, "PACK_CHUNK", 16)
    n, d, m = 41, 5, 30
    values = torch.randn(n, d).to(dtype)
    values[3, 1], values[4, 2] = float("-inf"), -0.0
    rows = _rows(n, m, d).to(rows_dtype)
    rows[0, 0], rows[5, 4] = -1, m
    if rows_dtype == torch.int64:
        rows[6, 2] = 2**32 + 3
    taps = ee.pack_taps(values, rows, m)
    assert taps.shape == (d, n) and taps.dtype == torch.int64 and taps.is_contiguous()
    got_values = (taps >> 32).to(torch.int32).view(torch.float32)
    assert torch.equal(got_values.view(torch.int32), values.float().T.contiguous().view(torch.int32))
    ok = (rows >= 0) & (rows < m)
    assert torch.equal(taps.to(torch.int32), torch.where(ok, rows, -1).to(torch.int32).T)


@needs_triton
def test_kernel_transposes_large_batches_in_chunks(monkeypatch):
    """Tokens beyond XT_CHUNK_BYTES of x.T go to further launches (here 3 of 16, 16 and 5 tokens),
    which share one ``pack_taps`` (n * d * 8 bytes, rebuilt per launch until the 23rd session)."""
    monkeypatch.setattr(ee, "XT_CHUNK_BYTES", 45 * 4 * 16)
    monkeypatch.setitem(ee.EXPANDER_ENCODE_CONFIGS, 8, (16, 16, 4))
    launches, packs = [], []
    fused, pack = ee._fused_forward, ee.pack_taps
    monkeypatch.setattr(ee, "_fused_forward", lambda x, *a: launches.append(x.shape[0]) or fused(x, *a))
    monkeypatch.setattr(ee, "pack_taps", lambda *a: packs.append(1) or pack(*a))
    x, values, rows, bias = _inputs((37,), 45, 50, 4)
    acts, idx = ee._triton_forward(x, values, rows.contiguous(), bias, 7, torch.float32)  # as the op passes it
    assert launches == [16, 16, 5] and len(packs) == 1
    _assert_topk_matches(acts, idx, _reference_pre(x, values, rows, bias), 7, TOL[torch.float32], "chunked")


def _recorded_launch(monkeypatch, *args) -> dict:
    """The fused kernel's launch arguments by name, from ``_triton_forward(*args)`` (nothing runs)."""
    names = list(inspect.signature(ee._expander_encode_fwd_kernel.fn).parameters)
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append({**dict(zip(names, a)), **kw})

    monkeypatch.setattr(ee, "_expander_encode_fwd_kernel", Recorder())
    ee._triton_forward(*args)
    assert len(calls) == 1
    return calls[0]


@needs_triton
@pytest.mark.parametrize("dt", gpu_compile.DTYPES)
def test_gather_sector_traffic_is_at_most_a_quarter_of_a_row_major_gather(monkeypatch, dt):
    """Issue 9's must-show, from the real launch at the benchmark size (meta tensors): the kernel
    gathers from x.T, BLOCK_B aligned contiguous tokens per latent, and the model of
    ``gpu_compile.expander_encode_plan`` predicts at most 1/4 of the sectors per gathered value of
    the gather from x row-major (one 32-byte sector per value) that the kernel used to do."""
    B, m, n, d, k = (gpu_compile.EXPANDER[key] for key in ("B", "m", "n", "d", "k"))
    x = gpu_compile._t(B, m, dtype=dt)
    args = _recorded_launch(monkeypatch, x, gpu_compile._t(n, d, dtype=dt), gpu_compile._t(n, d, dtype="i64"),
                            gpu_compile._t(n, dtype=dt), k, x.dtype)
    xt, block_b = args["xt_ptr"], args["BLOCK_B"]
    assert xt.shape[0] == m + 1 and xt.shape[1] % block_b == 0 and xt.stride(1) == 1  # row m: zeros
    plan = gpu_compile.expander_encode_plan(args)
    row_major = gpu_compile.gather_sectors_per_value(x.stride(0), 1, x.element_size(), aligned=True)
    assert row_major == 1.0
    assert plan["sectors_per_value"] <= row_major / 4, plan
    assert plan["gather_bytes_l2"] <= B * n * d * gpu_compile.SECTOR_BYTES / 4


@needs_triton
@pytest.mark.gpu_compile
def test_compiled_gather_puts_tokens_along_lanes_in_vector_loads():
    """Compiled for sm_90 exactly as launched: the gather's layout holds contiguous tokens per
    latent (order fastest along tokens, >= 16 tokens per warp-wide load), its SASS loads are
    16-byte vectors, the sectors per value from that layout are at most 1/4 of a row-major
    gather's, and the gather loop issues all its loads before it waits on any (two degrees a
    trip)."""
    code = (
        "import json, gpu_compile as gc\n"
        "out = {}\n"
        "for spec in gc._expander_encode_specs():\n"
        "    if spec.label.endswith(',K_PAD=64'):\n"
        "        launch = gc.capture(spec, 90)[0]  # the chunked strategy's first launch: its gather kernel\n"
        "        out[spec.label] = gc.expander_gather_layout(launch, 90)\n"
        "        if not spec.label.startswith('chunked'):\n"
        "            out[spec.label]['plan'] = gc.expander_encode_plan(gc.launch_arguments(launch))\n"
        "print(json.dumps(out))\n"
    )
    tests = Path(__file__).parent
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {f"{s}{dt},K_PAD=64" for dt in gpu_compile.DTYPES for s in ("", "chunked,")}
    for label, r in report.items():  # the fused kernel and the chunked strategy's gather kernel
        elt = {"fp32": 4, "bf16": 2}[label.split(",")[-2]]
        assert r["order"][0] == 0 and r["size_per_thread"][0] * elt == gpu_compile.VECTOR_BYTES, (label, r)
        assert r["tokens_per_warp_load"] >= 16, (label, r)
        assert r["global_loads"].get("LDG.E.128", 0) >= 1, (label, r)
        compiled = gpu_compile.gather_sectors_per_value(1, r["tokens_per_warp_load"], elt, aligned=True)
        assert compiled <= 1 / 4, (label, r)
        if "plan" in r:
            assert r["plan"]["elt_bytes"] == elt and compiled == r["plan"]["sectors_per_value"], (label, r)
        # Two degrees a trip, each wait paid once per trip: both taps (8-byte loads) are issued
        # before the first layout conversion's barrier, and both degrees' gathers (16-byte loads,
        # BLOCK_B * BLOCK_N * elt / (16 * threads) per degree and thread) before the first FFMA.
        loop = r["gather_loop"]
        taps = [i for i, op in loop["loads"] if op == "LDG.E.64"]
        gathers = [i for i, op in loop["loads"] if op == "LDG.E.128"]
        assert len(taps) == 2 and max(taps) < loop["first_barrier"], (label, loop)
        bb, bn, warps = ee.EXPANDER_GATHER_TILE if label.startswith("chunked") else ee.EXPANDER_ENCODE_CONFIGS[64]
        assert len(gathers) == 2 * bb * bn * elt // (16 * 32 * warps) and max(gathers) < loop["first_ffma"], (label, loop)


def test_triton_values_grad_bit_identical_across_runs():
    """The value gradient goes through topk_kernels._rowgrad: written once per atom, fixed order."""
    x, values, rows, bias = _inputs((23,), 20, 12, 4)  # few latents: many tokens share each
    grad = torch.randn(23, 6)

    def values_grad():
        v = values.clone().requires_grad_()
        expander_encode(x, v, rows, bias, 6, backend="triton")[0].backward(grad)
        return v.grad

    first, second = values_grad(), values_grad()
    assert torch.equal(first, second)
    v64 = values.double().requires_grad_()
    idx = expander_encode(x, values, rows, bias, 6, backend="torch")[1]
    _reference_pre(x, v64, rows, bias).gather(-1, idx).relu().backward(grad.double())
    assert_close(first, v64.grad, 1e-5, "values grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, values, rows, bias = _inputs((0,), 8, 10, 3)
    acts, idx = expander_encode(x, values, rows, bias, 4, backend=backend)
    assert acts.shape == idx.shape == (0, 4)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, v, r, b, k: (x, v[:, :-1], r, b, k), r"rows: expected the shape of values \(999, 6\)"),
        (lambda x, v, r, b, k: (x, v, r[:-1], b, k), r"rows: expected the shape of values \(999, 7\)"),
        (lambda x, v, r, b, k: (x, v, r + 100, b, k), r"rows: expected every index in \[0, m = x.shape\[-1\]=100\)"),
        (lambda x, v, r, b, k: (x, v, r - 100, b, k), r"rows: .* found -"),
        (lambda x, v, r, b, k: (x[:, :50], v, r, b, k), r"rows: expected every index in \[0, m = x.shape\[-1\]=50\)"),
        (lambda x, v, r, b, k: (x[:, :5], v, r, b, k), r"expected degree d <= m=5"),
        (lambda x, v, r, b, k: (x, v, r, b, 0), r"k: expected 1 <= k <= n_latents=999, got 0"),
        (lambda x, v, r, b, k: (x, v, r, b, 1000), r"k: expected 1 <= k <= n_latents=999, got 1000"),
        (lambda x, v, r, b, k: (x, v, r, b[:-1], k), r"bias: expected shape \(999,\)"),
        (lambda x, v, r, b, k: (x, v, r.float(), b, k), r"rows: expected an int64"),
        (lambda x, v, r, b, k: (x.long(), v, r, b, k), r"x: expected a float"),
        (lambda x, v, r, b, k: (x, v[0], r, b, k), r"values: expected a 2-D tensor"),
        (lambda x, v, r, b, k: (x, v, r.index_copy(1, torch.tensor([1]), r[:, :1]), b, k),
         r"rows: expected distinct rows within each latent, latent 0 repeats one"),
    ],
)
def test_bad_input_raises_naming_the_argument(mutate, match):
    x, values, rows, bias = _inputs((33,), 100, 999, 7)
    with pytest.raises((ValueError, IndexError, TypeError), match=match):
        expander_encode(*mutate(x, values, rows, bias, 17))


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        expander_encode(*_inputs((3,), 4, 5, 2), 2, backend="cuda")


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(use_triton):
    x, values, rows, bias = _inputs((7,), 12, 40, 3)
    args = (x.requires_grad_(), values.requires_grad_(), rows, bias.requires_grad_(), 5, use_triton, True)
    torch.library.opcheck(torch.ops.topk_kernels.expander_encode.default, args)


def test_torch_compile_cpu():
    x, values, rows, bias = _inputs((19,), 32, 120, 5)
    values.requires_grad_()
    x.requires_grad_()
    compiled = torch.compile(
        lambda x, v, r, b: expander_encode(x, v, r, b, 9)[0].square().sum(), fullgraph=True
    )
    loss = compiled(x, values, rows, bias)
    gx, gv = torch.autograd.grad(loss, (x, values))
    idx = expander_encode(x, values, rows, bias, 9)[1]
    x64, v64 = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    ref = _reference_pre(x64, v64, rows, bias).gather(-1, idx).relu().square().sum()
    ref.backward()
    assert_close(loss.detach().reshape(1), ref.detach().reshape(1), 1e-5, "compiled loss")
    assert_close(gx, x64.grad, 1e-5, "compiled x grad")
    assert_close(gv, v64.grad, 1e-5, "compiled values grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_through_the_dense_dictionary(monkeypatch, dtype):
    """A degenerate Expander (d = m, k close to n): the CPU backward's gradients of x and values
    go through the decoder's dense [n, m] dictionary (expander_decode.DENSE_ATOM_SHARE), against
    the fp64 reference."""
    ed = importlib.import_module("topk_kernels.expander_decode")
    built = []
    dense_dictionary = ed._dense_dictionary
    monkeypatch.setattr(ed, "_dense_dictionary", lambda *a: built.append(1) or dense_dictionary(*a))
    x, values, rows, bias = _inputs((13,), 16, 40, 16, dtype)
    _check_against_reference(x, values, rows, bias, 39, "torch", TOL[dtype])
    assert built, "the dense dictionary was not used"


@pytest.mark.parametrize("route", ["gathers", "dense rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead,m,n,d,k", SHAPES)
def test_cpu_routes_match_the_reference(monkeypatch, route, dtype, lead, m, n, d, k):
    """Both CPU routes, whichever EXPANDER_DENSE_SHARE would pick for the shape: the gathers
    (embedding_bag), and a degenerate Expander's dense masked rows and GEMMs, in pieces of three
    latents' rows (DENSE_PIECE_ELEMS); forward and gradients against the fp64 reference, with and
    without a bias."""
    monkeypatch.setattr(ee, "EXPANDER_DENSE_SHARE", 0 if route == "gathers" else 10**9)
    monkeypatch.setattr(ee, "DENSE_PIECE_ELEMS", 3 * m)
    x, values, rows, bias = _inputs(lead, m, n, d, dtype)
    _check_against_reference(x, values, rows, bias, k, "torch", TOL[dtype])
    _check_against_reference(x, values, rows, None, k, "torch", TOL[dtype])


def test_cpu_dense_rows_add_repeated_rows_up(monkeypatch):
    """An atom naming one row twice (check_rows=False) counts both entries on the dense route, as
    the gathers and the reference do."""
    monkeypatch.setattr(ee, "EXPANDER_DENSE_SHARE", 10**9)
    x, values, rows, bias = _inputs((13,), 12, 40, 4)
    rows[:, 1] = rows[:, 0]
    dense = expander_encode(x, values, rows, bias, 5, backend="torch", check_rows=False)
    monkeypatch.setattr(ee, "EXPANDER_DENSE_SHARE", 0)
    gathers = expander_encode(x, values, rows, bias, 5, backend="torch", check_rows=False)
    pre = x.double() @ reference.expander_dense(values.double(), rows, 12).T + bias.double()
    _assert_topk_matches(dense[0], dense[1], pre, 5, TOL[torch.float32], "dense rows")
    _assert_topk_matches(gathers[0], gathers[1], pre, 5, TOL[torch.float32], "gathers")
