"""expander_decode: forward and the gradients of top_acts, values and bias against the fp64 dense
reference (the [n, m] dictionary built from values on rows), on the CPU path and on the Triton
kernels under the interpreter; value gradient bit-identical across runs; errors; torch.library and compile."""

import sys

import pytest
import torch

from helpers import BACKENDS, TOL, assert_close
from topk_kernels import expander_decode, reference

pytestmark = pytest.mark.ops

SHAPES = [  # (leading shape, m, n, d, k)
    ((37,), 100, 999, 7, 17),
    ((5, 7), 33, 129, 5, 5),
    ((4,), 3, 4, 3, 4),  # tiny, d == m
    ((6,), 70, 50, 45, 3),  # d above the kernels' 32-wide atom tile: the d loop runs twice
]


def _rows(n, m, d):
    """d distinct random rows per latent, unsorted (the op must not rely on sorted rows)."""
    return torch.rand(n, m).argsort(dim=1)[:, :d]


def _inputs(lead, m, n, d, k, dtype):
    acts = torch.randn(*lead, k).abs().to(dtype)
    idx = torch.randint(0, n, (*lead, k))
    values = torch.randn(n, d).to(dtype)
    rows = _rows(n, m, d)
    bias = torch.randn(m).to(dtype)
    return acts, idx, values, rows, bias


def _check_against_reference(acts, idx, values, rows, bias, backend, tol):
    m = bias.shape[0]
    leaves = [t.detach().clone().requires_grad_() for t in (acts, values, bias)]
    out = expander_decode(leaves[0], idx, leaves[1], rows, m, leaves[2], backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in (acts, values, bias)]
    ref = reference.expander_decode(ref_leaves[0], idx, ref_leaves[1], rows, m, ref_leaves[2])
    assert out.dtype == acts.dtype
    assert_close(out, ref, tol, "forward")
    grad_out = torch.randn_like(ref)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    for name, got, want in zip(("top_acts", "values", "bias"), leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        assert_close(got.grad, want.grad, tol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,m,n,d,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_dense_reference(backend, lead, m, n, d, k, dtype):
    _check_against_reference(*_inputs(lead, m, n, d, k, dtype), backend, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_indices_and_shared_rows_add_up(backend):
    # k > n forces repeated latents per token; m = 2d makes atoms of different latents overlap.
    acts, idx, values, rows, bias = _inputs((9,), 12, 5, 6, 8, torch.float32)
    idx[:, 1] = idx[:, 0]
    _check_against_reference(acts, idx, values, rows, bias, backend, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias_and_int32_rows(backend):
    acts, idx, values, rows, _ = _inputs((11,), 24, 50, 4, 6, torch.float32)
    out = expander_decode(acts, idx.int(), values, rows.int(), 24, backend=backend)
    assert_close(out, reference.expander_decode(acts.double(), idx, values.double(), rows, 24), 1e-5, "no bias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_values_need_grad(backend):
    acts, idx, values, rows, bias = _inputs((13,), 40, 30, 5, 4, torch.float32)
    v = values.clone().requires_grad_()
    expander_decode(acts, idx, v, rows, 40, bias, backend=backend).square().sum().backward()
    v64 = values.double().requires_grad_()
    reference.expander_decode(acts.double(), idx, v64, rows, 40, bias.double()).square().sum().backward()
    assert_close(v.grad, v64.grad, 1e-5, "grad values")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_acts_need_grad(backend):
    """values frozen: the activation gradient alone (on Triton its own kernel, not the row-gradient
    pass that serves the value gradient), over several programs of (token, slot) entries."""
    acts, idx, values, rows, bias = _inputs((23,), 41, 29, 5, 7, torch.float32)
    a = acts.clone().requires_grad_()
    expander_decode(a, idx, values, rows, 41, bias, backend=backend).square().sum().backward()
    a64 = acts.double().requires_grad_()
    reference.expander_decode(a64, idx, values.double(), rows, 41, bias.double()).square().sum().backward()
    assert_close(a.grad, a64.grad, 1e-5, "grad top_acts")


@pytest.mark.parametrize("chunk_entries", [1, 5 * 7 * 3 + 4])  # one token a chunk; 3 tokens, 37 = 12 x 3 + 1
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need", ["both", "acts", "values"])
def test_cpu_path_over_token_chunks(monkeypatch, chunk_entries, dtype, need):
    """The CPU path walks tokens in chunks of ~_CHUNK_ENTRIES atom entries through scratch buffers
    that every chunk reuses (a last chunk shorter than the buffers included): forward and each
    backward branch against the fp64 reference."""
    ed_module = sys.modules["topk_kernels.expander_decode"]  # the package exports the function by that name
    monkeypatch.setattr(ed_module, "_CHUNK_ENTRIES", chunk_entries)
    acts, idx, values, rows, bias = _inputs((37,), 60, 80, 7, 5, dtype)
    a = acts.clone().requires_grad_(need in ("both", "acts"))
    v = values.clone().requires_grad_(need in ("both", "values"))
    out = expander_decode(a, idx, v, rows, 60, bias, backend="torch")
    a64 = acts.double().requires_grad_(a.requires_grad)
    v64 = values.double().requires_grad_(v.requires_grad)
    ref = reference.expander_decode(a64, idx, v64, rows, 60, bias.double())
    assert_close(out, ref, TOL[dtype], "forward")
    grad_out = torch.randn(37, 60)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out.double())
    for name, got, want in (("top_acts", a, a64), ("values", v, v64)):
        if got.requires_grad:
            assert_close(got.grad, want.grad, TOL[dtype], f"grad {name}")
        else:
            assert got.grad is None


def test_reference_backend_matches():
    acts, idx, values, rows, bias = _inputs((7,), 20, 15, 3, 4, torch.float64)
    out = expander_decode(acts, idx, values, rows, 20, bias, backend="reference")
    dense = reference.expander_dense(values, rows, 20)
    assert_close(out, reference.sparse_decode(acts, idx, dense, bias), 1e-12, "reference backend")


def test_triton_value_grad_bit_identical_across_runs():
    """Written once per atom in a fixed order (topk_kernels._rowgrad): no run-to-run difference."""
    acts, idx, values, rows, bias = _inputs((23,), 40, 7, 6, 9, torch.float32)  # many repeats per latent
    grad_out = torch.randn(23, 40)

    def grads():
        a, v = acts.clone().requires_grad_(), values.clone().requires_grad_()
        expander_decode(a, idx, v, rows, 40, bias, backend="triton").backward(grad_out)
        return a.grad, v.grad

    (acts1, first), (acts2, second) = grads(), grads()
    assert torch.equal(first, second) and torch.equal(acts1, acts2)
    a64, v64 = acts.double().requires_grad_(), values.double().requires_grad_()
    reference.expander_decode(a64, idx, v64, rows, 40, bias.double()).backward(grad_out.double())
    assert_close(first, v64.grad, 1e-5, "value grad")
    assert_close(acts1, a64.grad, 1e-5, "grad acts")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    acts, idx, values, rows, bias = _inputs((0,), 8, 10, 3, 2, torch.float32)
    v = values.clone().requires_grad_()
    out = expander_decode(acts, idx, v, rows, 8, bias, backend=backend)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(values))


def _bad(**changes):
    def mutate(a, i, v, r, m, b):
        args = dict(top_acts=a, top_indices=i, values=v, rows=r, m=m, bias=b)
        args.update({k: f(args) for k, f in changes.items()})
        return args
    return mutate


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (_bad(rows=lambda a: a["rows"][:, :-1]), ValueError, r"rows: expected the shape of values \(999, 7\)"),
        (_bad(rows=lambda a: a["rows"] + 100), IndexError, r"rows: expected every index in \[0, m=100\)"),
        (_bad(rows=lambda a: a["rows"] - 100), IndexError, r"rows: .* found -"),
        (_bad(rows=lambda a: a["rows"].float()), TypeError, r"rows: expected an int64"),
        (_bad(m=lambda a: 6), ValueError, r"expected degree d <= m=6 .* got d=7"),
        (_bad(m=lambda a: 0), ValueError, r"m: expected m >= 1, got 0"),
        (_bad(m=lambda a: 100.0), TypeError, r"m: expected an int, got float"),
        (_bad(top_indices=lambda a: a["top_indices"] + 999), IndexError,
         r"top_indices: expected every index in \[0, n_latents=999\)"),
        (_bad(top_acts=lambda a: a["top_acts"][:, :-1]), ValueError, r"top_indices: expected the shape of top_acts"),
        (_bad(bias=lambda a: a["bias"][:-1]), ValueError, r"bias: expected shape \(100,\)"),
        (_bad(values=lambda a: a["values"][0]), ValueError, r"values: expected a 2-D tensor"),
        (_bad(top_acts=lambda a: a["top_acts"].long()), TypeError, r"top_acts: expected a float"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bad_input_raises_naming_the_argument(mutate, err, match, backend):
    acts, idx, values, rows, bias = _inputs((37,), 100, 999, 7, 17, torch.float32)
    with pytest.raises(err, match=match):
        expander_decode(**mutate(acts, idx, values, rows, 100, bias), backend=backend)


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(use_triton):
    acts, idx, values, rows, bias = _inputs((13,), 24, 40, 5, 6, torch.float32)
    args = (acts.requires_grad_(), idx, values.requires_grad_(), rows, 24, bias.requires_grad_(), use_triton, True)
    torch.library.opcheck(torch.ops.topk_kernels.expander_decode.default, args)
    args = (acts, idx, values, rows, 24, None, use_triton, True)
    torch.library.opcheck(torch.ops.topk_kernels.expander_decode.default, args)


def test_torch_compile_cpu():
    acts, idx, values, rows, bias = _inputs((19,), 32, 64, 6, 5, torch.float32)
    values.requires_grad_()
    compiled = torch.compile(
        lambda a, i, v, r, b: expander_decode(a, i, v, r, 32, b).square().sum(), fullgraph=True
    )
    loss = compiled(acts, idx, values, rows, bias)
    (grad,) = torch.autograd.grad(loss, values)
    v64 = values.detach().double().requires_grad_()
    ref = reference.expander_decode(acts.double(), idx, v64, rows, 32, bias.double()).square().sum()
    ref.backward()
    assert_close(loss.detach().reshape(1), ref.detach().reshape(1), 1e-5, "compiled loss")
    assert_close(grad, v64.grad, 1e-5, "compiled value grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,d,tile", [(29, 20, None), (6, 3, None), (25, 12, 2 * 30)])
def test_cpu_dense_dictionary_when_atoms_and_k_are_large_shares(monkeypatch, dtype, k, d, tile):
    """A degenerate Expander (d a large share of m, k of n) decodes on the CPU path through the
    dense masked [n, m] dictionary and GEMMs (DENSE_ATOM_SHARE): k = 29 of n = 30 with d = m = 20,
    and k = 25 with d = 12 over token tiles of two; k = 6 with d = 3 stays on the scatters. Ids repeat within
    a token. Forward and the gradients of top_acts, values and bias against the fp64 reference."""
    import importlib

    ed = importlib.import_module("topk_kernels.expander_decode")
    if tile is not None:
        monkeypatch.setattr(importlib.import_module("topk_kernels._common"), "DENSE_TILE_ELEMS", tile)
    built = []
    dense_dictionary = ed._dense_dictionary
    monkeypatch.setattr(ed, "_dense_dictionary", lambda *a: built.append(1) or dense_dictionary(*a))
    n, m, B = 30, 20, 9
    acts, _, values, rows, bias = _inputs((B,), m, n, d, k, dtype)
    idx = torch.rand(B, n).argsort(1)[:, :k]
    idx[:, 1] = idx[:, 0]
    _check_against_reference(acts, idx, values, rows, bias, "torch", TOL[dtype])
    dense = B * k >= 2 * n and k * d * ed.DENSE_ATOM_SHARE >= n * m
    assert dense == (d != 3) and len(built) == 2 * dense  # the forward's and the backward's
