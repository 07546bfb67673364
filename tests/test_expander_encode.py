"""expander_encode: selected latents, their activations and the gradients of x, values and bias
against the fp64 dense reference, on the CPU path and on the Triton kernel under the interpreter;
tie order; blocked CPU tiles; errors; torch.library and torch.compile."""

import importlib

import pytest
import torch

from helpers import BACKENDS, TOL, assert_close
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
    grad = torch.randn_like(ref_acts)
    acts.backward(grad.to(acts.dtype))
    ref_acts.backward(grad)
    for name, got, want in zip(("x", "values", "bias"), leaves, ref_leaves):
        if got is None:
            continue
        assert got.grad.dtype == got.dtype
        assert_close(got.grad, want.grad, tol, f"grad {name}")


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
    """The CPU path's running top-k across several token tiles and latent blocks (the default
    tiles are larger than any test input)."""
    monkeypatch.setattr(ee, "CPU_TILE_ELEMS", 8 * 70)
    monkeypatch.setattr(ee, "CPU_MAX_BLOCK_N", 70)
    monkeypatch.setattr(ee, "CPU_MIN_BLOCK_B", 1)
    assert cpu_tile(29, 333, ee.CPU_TILE_ELEMS, ee.CPU_MAX_BLOCK_N, ee.CPU_MIN_BLOCK_B) == (8, 70)
    _check_against_reference(*_inputs((29,), 60, 333, 5), 13, "torch", TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_beyond_register_candidates(backend):
    """k_pad > 256: the Triton launcher falls back to blocked gathers with exact keys."""
    _check_against_reference(*_inputs((5,), 30, 400, 3), 300, backend, TOL[torch.float32])


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
