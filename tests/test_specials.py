"""Special values and bad indices, on every backend: the NaN order and the index contract of
``topk_kernels._common``.

- The top-k never returns an id outside [0, n) for inputs full of NaN (both sign bits), +-inf and
  ties, at n not a multiple of any block, and the Triton kernels, the PyTorch path and the
  reference return the same ids (one order: value descending, NaN above +inf, ties to the lower id);
  so do topk_encode's chunked strategy (GEMM per chunk + running top-k) and its threshold strategy
  (whole rows, a sampled floor, exact counts).
- An out-of-range or negative index handed straight to the Triton launchers (no API check in
  front) contributes nothing and touches no memory outside its tensors; with
  ``TOPK_KERNELS_DEBUG=1`` the kernels raise. (The expander encoder's out-of-range rows are
  tested with its transposed gather in tests/test_expander_encode.py.)
- expander ops: repeated rows in a latent are a clear error on every backend; ``check_rows=False``
  skips the check; bias-only gradients work; float64 is refused on the Triton path.
"""

import importlib

import pytest
import torch

from helpers import BACKENDS, DEVICE, HAS_TRITON, TOL, assert_close, interpreter_only
from topk_kernels import check_expander_rows, expander_decode, expander_encode, reference, sparse_decode, topk_encode

pytestmark = pytest.mark.ops
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no triton")
RUNNABLE = ["torch", "reference"] + (["triton"] if HAS_TRITON else [])
ALL_BACKENDS = [*BACKENDS, "reference"]
NAN = float("nan")
INF = float("inf")
N = 77  # not a multiple of 64, 32, 16 or 8: every kernel tile has padded columns


def _specials(shape, extra=()):
    """Random entries from NaN of both signs, +-inf, signed zeros and a few small integers (ties)."""
    choices = torch.tensor([NAN, -NAN, INF, -INF, 0.0, -0.0, 1.0, -2.0, 3.0, 1.0, *extra])
    return choices[torch.randint(0, len(choices), shape)]


def _assert_same_topk(results, n, k):
    """Every backend's (acts, idx) pair: ids in [0, n), identical ids, identical acts (NaN == NaN)."""
    (_, ref_idx), ref_acts = results["reference"], results["reference"][0]
    for backend, (acts, idx) in results.items():
        assert idx.dtype == torch.int64 and idx.shape[-1] == k
        assert ((idx >= 0) & (idx < n)).all(), f"{backend}: an id outside [0, {n}): {idx.max()}"
        assert torch.equal(idx, ref_idx), f"{backend} ids differ from the reference:\n{idx}\n{ref_idx}"
        torch.testing.assert_close(acts.double(), ref_acts.double(), equal_nan=True, rtol=0, atol=0)


def _spec_order(pre, k):
    """The documented order, written out: value descending, NaN above +inf, ties to the lower id."""
    def rank(row, j):
        v = row[j].item()
        return (0, 0.0, j) if v != v else (1, -v, j)
    return torch.tensor([sorted(range(len(row)), key=lambda j: rank(row, j))[:k] for row in pre])


@pytest.mark.parametrize("k", [1, 2, 3, 17, N])
def test_topk_encode_specials_every_backend_same_ids(k, monkeypatch):
    # Token rows 0..5: finite x, pre = small-integer dot + special bias (ties, NaN, inf).
    # Token rows 6..9: x holds +inf in two columns, so pre mixes inf - inf (a sign-bit NaN on
    # x86), 0 * inf = NaN and +-inf: all-NaN tokens included.
    m = 6
    x = torch.randint(-2, 3, (10, m)).float()
    x[6:, :2] = INF
    x[8, 2] = -INF
    weight = torch.randint(-1, 2, (N, m)).float()
    weight[::3] = 0.0
    bias = _specials((N,))
    results = {b: topk_encode(x, weight, bias, k, backend=b) for b in RUNNABLE}
    if HAS_TRITON:
        results["triton, chunked"] = _chunked_topk_encode(monkeypatch, x, weight, bias, k)
    if HAS_TRITON:
        results["threshold strategy"] = _threshold_topk_encode(monkeypatch, x, weight, bias, k)
    _assert_same_topk(results, N, k)
    pre = x.double() @ weight.double().T + bias.double()
    assert torch.equal(results["reference"][1], _spec_order(pre, k))


def _chunked_topk_encode(monkeypatch, x, weight, bias, k):
    """topk_encode's Triton backend forced onto its chunked strategy (GEMM per chunk + running
    top-k), with chunks small enough to split these tokens and latents several ways."""
    te = importlib.import_module("topk_kernels.topk_encode")
    with monkeypatch.context() as patch:
        patch.setattr(te, "encode_strategy", lambda *args: "chunked")
        patch.setattr(te, "CHUNK_TILE_ELEMS", 4 * 20)
        patch.setattr(te, "CHUNK_MAX_BLOCK_B", 4)
        return topk_encode(x, weight, bias, k, backend="triton")


def _threshold_topk_encode(monkeypatch, x, weight, bias, k):
    """topk_encode's threshold strategy (whole rows, the threshold kernel), three tokens a block,
    with a sample and tiles small enough for these rows to take the buffer."""
    te = importlib.import_module("topk_kernels.topk_encode")
    with monkeypatch.context() as patch:
        patch.setattr(te, "THRESHOLD_TILE_ELEMS", 3 * weight.shape[0])
        patch.setattr(te, "THRESHOLD_TILE", dict(BLOCK=8, SAMPLE=8, SAMPLE_TOP=8, PROBES=8, CAP=4, SPREAD=1.0,
                                                     APPEND_SCAN=1, num_warps=1))
        return te._threshold_forward(x, weight, bias, k, torch.float32)


@pytest.mark.parametrize("k", [1, 2, 3, 17, N])
def test_expander_encode_specials_every_backend_same_ids(k):
    # x finite (so the dense reference's zeros multiply no inf); specials enter through the values
    # (+-inf, NaN: inf - inf, 0 * inf) and the bias.
    m, d = 9, 3
    x = torch.randint(-2, 3, (8, m)).float()
    values = _specials((N, d))
    rows = torch.rand(N, m).argsort(dim=1)[:, :d]
    bias = _specials((N,))
    results = {b: expander_encode(x, values, rows, bias, k, backend=b) for b in RUNNABLE}
    _assert_same_topk(results, N, k)
    pre = x.double() @ reference.expander_dense(values.double(), rows, m).T + bias.double()
    assert torch.equal(results["reference"][1], _spec_order(pre, k))


@pytest.mark.parametrize("backend", [*ALL_BACKENDS, pytest.param("chunked", marks=needs_triton),
                                     pytest.param("threshold", marks=needs_triton)])
def test_all_nan_tokens_return_the_lowest_ids(backend, monkeypatch):
    x = torch.full((3, 5), NAN)
    x[1] = -NAN
    weight, bias = torch.randn(N, 5), torch.randn(N)
    if backend == "chunked":
        acts, idx = _chunked_topk_encode(monkeypatch, x, weight, bias, 4)
    elif backend == "threshold":
        acts, idx = _threshold_topk_encode(monkeypatch, x, weight, bias, 4)
    else:
        acts, idx = topk_encode(x, weight, bias, 4, backend=backend)
    assert torch.equal(idx, torch.arange(4).expand(3, 4))
    assert acts.isnan().all()


# --- the index contract: Triton launchers given bad indices directly ------------------------

sd = importlib.import_module("topk_kernels.sparse_decode")
ed = importlib.import_module("topk_kernels.expander_decode")
ee = importlib.import_module("topk_kernels.expander_encode")


def _guarded(rows, cols, pad=3, fill=1e6):
    """A [rows, cols] view in the middle of a buffer whose other entries are ``fill``: any read or
    write through an out-of-range index lands in the guard band."""
    big = torch.full((rows + 2 * pad, cols), fill)
    return big, big[pad:pad + rows]


def _bad_indices(B, k, n):
    idx = torch.randint(0, n, (B, k))
    idx[0, 0], idx[1, 1], idx[2, 0], idx[3, 2] = -1, n, -(2**40), n + 5
    ok = (idx >= 0) & (idx < n)
    return idx, ok


@needs_triton
def test_sparse_decode_kernels_ignore_out_of_range_indices():
    B, k, n, m = 6, 3, 11, 20
    big, weight = _guarded(n, m)
    weight.copy_(torch.randn(n, m))
    before = big.clone()
    acts = torch.rand(B, k) + 0.5
    idx, ok = _bad_indices(B, k, n)
    out = sd.triton_forward(acts, idx, weight, None, torch.float32)
    kept = torch.where(ok, acts, 0.0).double()
    assert_close(out, reference.sparse_decode(kept, idx.clamp(0, n - 1), weight.double()), 1e-6, "forward")
    grad = torch.randn(B, m)
    gacts = sd.triton_grad_acts(grad, idx, weight, torch.float32)
    want = torch.where(ok, (grad[:, None, :] * weight[idx.clamp(0, n - 1)]).sum(-1), 0.0)
    assert_close(gacts, want, 1e-5, "grad of acts")
    assert torch.equal(big, before)


@needs_triton
def test_expander_decode_forward_ignores_out_of_range_indices_and_rows():
    B, k, n, m, d = 6, 3, 9, 10, 4
    acts = torch.rand(B, k) + 0.5
    idx, ok = _bad_indices(B, k, n)
    values = torch.randn(n, d)
    rows = torch.rand(n, m).argsort(dim=1)[:, :d].contiguous()
    rows[2, 1], rows[5, 0], rows[7, 3] = m, -1, m + 100  # bad rows write nowhere
    row_ok = (rows >= 0) & (rows < m)
    out = ed.triton_forward(acts, idx, values, rows, m, None, torch.float32)
    kept_values = torch.where(row_ok, values, 0.0).double()
    want = reference.expander_decode(
        torch.where(ok, acts, 0.0).double(), idx.clamp(0, n - 1), kept_values, rows.clamp(0, m - 1), m
    )
    assert_close(out, want, 1e-6, "forward")


@needs_triton
@interpreter_only  # on a GPU a failed device assert ends the CUDA context
@pytest.mark.parametrize("launch", ["sparse_decode", "sparse_decode_grad_acts", "expander_decode", "expander_encode"])
def test_debug_switch_makes_kernels_assert(monkeypatch, launch):
    n, m, d = 9, 10, 3
    idx = torch.tensor([[0, n], [1, 2]])
    rows = torch.rand(n, m).argsort(dim=1)[:, :d].contiguous()
    bad_rows = rows.clone()
    bad_rows[4, 1] = -3
    calls = {
        "sparse_decode": lambda: sd.triton_forward(torch.ones(2, 2), idx, torch.randn(n, m), None, torch.float32),
        "sparse_decode_grad_acts": lambda: sd.triton_grad_acts(torch.ones(2, m), idx, torch.randn(n, m), torch.float32),
        "expander_decode": lambda: ed.triton_forward(
            torch.ones(2, 2), torch.tensor([[4, 0], [1, 2]]), torch.randn(n, d), bad_rows, m, None, torch.float32),
        "expander_encode": lambda: ee._triton_forward(torch.randn(2, m), torch.randn(n, d), bad_rows, None, 2, torch.float32),
    }
    calls[launch]()  # debug off: masked, no error
    monkeypatch.setenv("TOPK_KERNELS_DEBUG", "1")
    from triton.runtime.errors import InterpreterError  # the interpreter wraps the AssertionError

    with pytest.raises(InterpreterError, match=r"(top_indices|rows): an index outside"):
        calls[launch]()
    monkeypatch.delenv("TOPK_KERNELS_DEBUG")
    calls[launch]()  # and off again


# --- expander rows: checked once or on every call, an error on every backend -----------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_repeated_rows_are_an_error_on_every_backend(backend):
    m, n, d = 12, 8, 3
    rows = torch.rand(n, m).argsort(dim=1)[:, :d].contiguous()
    rows[5, 2] = rows[5, 0]
    acts, idx = torch.rand(4, 2), torch.randint(0, n, (4, 2))
    with pytest.raises(ValueError, match=r"rows: expected distinct rows within each latent, latent 5 repeats"):
        expander_decode(acts, idx, torch.randn(n, d), rows, m, backend=backend)
    with pytest.raises(ValueError, match=r"rows: expected distinct rows within each latent, latent 5 repeats"):
        expander_encode(torch.randn(4, m), torch.randn(n, d), rows, None, 2, backend=backend)


def test_check_expander_rows():
    rows = torch.rand(20, 16).argsort(dim=1)[:, :5]
    check_expander_rows(rows, 16)
    with pytest.raises(IndexError, match=r"rows: expected every index in \[0, m=15\), found 15"):
        check_expander_rows(torch.where(rows == 15, 15, rows), 15)
    with pytest.raises(TypeError, match="rows: expected an int64"):
        check_expander_rows(rows.float(), 16)
    # m is checked too (public: a caller's own m), named, not compared as whatever came
    for bad, error in ((5.5, TypeError), (True, TypeError), ("16", TypeError), (None, TypeError), (0, ValueError)):
        with pytest.raises(error, match=r"^m: expected"):
            check_expander_rows(rows, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_rows_false_skips_the_check(backend, monkeypatch):
    m, n, d = 12, 8, 3
    rows = torch.rand(n, m).argsort(dim=1)[:, :d].contiguous()
    acts, idx, values = torch.rand(4, 2), torch.randint(0, n, (4, 2)), torch.randn(n, d)
    calls = []
    monkeypatch.setattr(ed, "check_expander_rows", lambda *a, **kw: calls.append(a))
    out = expander_decode(acts, idx, values, rows, m, backend=backend, check_rows=False)
    assert not calls
    expander_decode(acts, idx, values, rows, m, backend=backend)
    assert len(calls) == 1
    assert_close(out, reference.expander_decode(acts.double(), idx, values.double(), rows, m), 1e-5, "forward")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", ["expander_decode", "sparse_decode"])
def test_only_bias_requires_grad(backend, op):
    m, n, d = 10, 7, 3
    acts, idx = torch.rand(5, 2), torch.randint(0, n, (5, 2))
    bias = torch.randn(m, requires_grad=True)
    if op == "expander_decode":
        rows = torch.rand(n, m).argsort(dim=1)[:, :d].contiguous()
        out = expander_decode(acts, idx, torch.randn(n, d), rows, m, bias, backend=backend)
    else:
        out = sparse_decode(acts, idx, torch.randn(n, m), bias, backend=backend)
    grad = torch.randn(5, m)
    out.backward(grad)
    assert_close(bias.grad, grad.sum(0), 1e-6, "grad bias")


@needs_triton
@pytest.mark.parametrize("op", ["topk_encode", "sparse_decode", "expander_encode", "expander_decode"])
def test_float64_is_refused_on_the_triton_path(op):
    n, m, d = 7, 5, 2
    x, acts, idx = torch.randn(3, m).double(), torch.rand(3, 2).double(), torch.randint(0, n, (3, 2))
    rows = torch.rand(n, m).argsort(dim=1)[:, :d].contiguous()
    calls = {
        "topk_encode": lambda b: topk_encode(x, torch.randn(n, m).double(), None, 2, backend=b),
        "sparse_decode": lambda b: sparse_decode(acts, idx, torch.randn(n, m).double(), backend=b),
        "expander_encode": lambda b: expander_encode(x, torch.randn(n, d).double(), rows, None, 2, backend=b),
        "expander_decode": lambda b: expander_decode(acts, idx, torch.randn(n, d).double(), rows, m, backend=b),
    }
    with pytest.raises(TypeError, match=r"backend='triton': expected float32/bfloat16/float16 inputs, got float64"):
        calls[op]("triton")
    out = calls[op](None)  # the automatic choice computes float64 exactly on the PyTorch path
    assert (out[0] if isinstance(out, tuple) else out).dtype == torch.float64


def test_float64_gradcheck_on_the_default_path():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: topk_encode(*a, 3)[0], (x, weight, bias))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensors_on_a_second_gpu_run_there():
    n, m = 50, 24
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        x, weight = torch.randn(8, m, device=dev), torch.randn(n, m, device=dev)
        acts, idx = topk_encode(x, weight, None, 5, backend="triton")
        out = sparse_decode(acts, idx, weight, backend="triton")
    want_acts, want_idx = reference.topk_encode(x.double(), weight.double(), None, 5)
    assert acts.device == dev and out.device == dev
    assert_close(out, reference.sparse_decode(want_acts, want_idx, weight.double()), 1e-4, "decode on cuda:1")


def test_sorted_bias_gradient_equals_the_scatter_add():
    """grad_bias on CUDA sums without atomics (``_rowgrad.segment_sums``: sorted segments, fp64
    prefix sums); the same function on CPU tensors against index_add_ in fp64, with repeated,
    absent and out-of-range ids (left out, as the index contract says)."""
    from topk_kernels._rowgrad import segment_sums, sort_by_latent

    n = 37
    idx = torch.randint(0, n - 5, (50, 6))  # ids n-5..n-1 never occur: their gradient is 0
    idx[:, 0] = 3  # one id in every row
    g = torch.randn(50, 6)
    want = torch.zeros(n, dtype=torch.float64).index_add_(0, idx.reshape(-1), g.reshape(-1).double())
    got = segment_sums(g, sort_by_latent(idx, n))
    assert got.dtype == torch.float64 and got.shape == (n,)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got, segment_sums(g, sort_by_latent(idx.clone(), n)))
    bad = idx.clone()
    bad[0, 1], bad[1, 2] = -4, n + 9
    keep = (bad >= 0) & (bad < n)
    want = torch.zeros(n, dtype=torch.float64).index_add_(0, bad[keep], g[keep].double())
    assert torch.allclose(segment_sums(g, sort_by_latent(bad, n)), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, bias_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_every_backend_returns_the_dtype_of_its_inputs_not_of_a_wider_bias(dtype, bias_dtype):
    g = torch.Generator().manual_seed(3)
    B, m, n, k, d = 5, 12, 17, 3, 4
    x = torch.randn(B, m, generator=g).to(DEVICE, dtype)
    w = torch.randn(n, m, generator=g).to(DEVICE, dtype)
    v = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    rows = torch.stack([torch.randperm(m, generator=g)[:d] for _ in range(n)]).to(DEVICE)
    acts = torch.rand(B, k, generator=g).to(DEVICE, dtype)
    idx = torch.randint(0, n, (B, k), generator=g).to(DEVICE)
    bn, bm = torch.randn(n, dtype=bias_dtype, device=DEVICE), torch.randn(m, dtype=bias_dtype, device=DEVICE)
    calls = {"topk_encode": lambda be: topk_encode(x, w, bn, k, backend=be)[0],
             "expander_encode": lambda be: expander_encode(x, v, rows, bn, k, backend=be)[0],
             "sparse_decode": lambda be: sparse_decode(acts, idx, w, bm, backend=be),
             "expander_decode": lambda be: expander_decode(acts, idx, v, rows, m, bm, backend=be)}
    backends = ["torch", "reference"] + (["triton"] if HAS_TRITON else [])
    for name, call in calls.items():
        got = {be: call(be).dtype for be in backends}
        assert set(got.values()) == {dtype}, (name, got)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.bfloat16)])
def test_reference_backend_takes_mixed_dtypes_like_the_others(x_dtype, w_dtype):
    """Every backend takes x (top_acts) and weight (values) of two float dtypes and computes in their
    promoted dtype; backend="reference" too (it had passed them as they came to a matmul, which
    refuses two dtypes). Outputs and gradients against the fp64 reference, in the leaves' dtypes."""
    g = torch.Generator().manual_seed(11)
    B, m, n, k, d = 6, 10, 15, 4, 3
    x = torch.randn(B, m, generator=g).to(DEVICE, x_dtype)
    w = (torch.randn(n, m, generator=g) / m**0.5).to(DEVICE, w_dtype)
    v = torch.randn(n, d, generator=g).to(DEVICE, w_dtype)
    rows = torch.stack([torch.randperm(m, generator=g)[:d] for _ in range(n)]).to(DEVICE)
    acts = torch.rand(B, k, generator=g).to(DEVICE, x_dtype)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]).to(DEVICE)
    bn = torch.randn(n, generator=g).to(DEVICE, w_dtype)
    calls = {
        "topk_encode": (lambda a, b, be: topk_encode(a, b, bn, k, backend=be)[0], x, w),
        "expander_encode": (lambda a, b, be: expander_encode(a, b, rows, bn, k, backend=be)[0], x, v),
        "sparse_decode": (lambda a, b, be: sparse_decode(a, idx, b, backend=be), acts, w),
        "expander_decode": (lambda a, b, be: expander_decode(a, idx, b, rows, m, backend=be), acts, v),
    }
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    tol = TOL[torch.float32]  # the promoted dtype is fp32 or fp64 here; the inputs are exact in it
    for name, (call, a, b) in calls.items():
        leaves = [t.clone().requires_grad_() for t in (a, b)]
        ref_leaves = [t.double().clone().requires_grad_() for t in (a, b)]
        out = call(*leaves, "reference")
        want = call(*ref_leaves, "reference")
        assert out.dtype == out_dtype, (name, out.dtype)
        assert_close(out, want, tol, f"{name} forward")
        grad = torch.randn(want.shape, generator=g).to(DEVICE, out_dtype)
        out.backward(grad)
        want.backward(grad.double())
        for leaf, ref_leaf, what in zip(leaves, ref_leaves, ("input", "weight")):
            assert leaf.grad.dtype == leaf.dtype, (name, what, leaf.grad.dtype)
            assert_close(leaf.grad, ref_leaf.grad, max(tol, TOL[leaf.dtype]), f"{name} grad {what}")


def test_meta_tensors_give_shapes_without_reading_values():
    """On the meta device (shape inference, deferred init) the ops and the models skip their value
    checks and return meta results of the right shapes."""
    from sae.models import ExpanderSAE, TopKSAE

    B, m, n, k, d = 5, 12, 30, 3, 4
    meta = dict(device="meta")
    x, w, v = torch.empty(B, m, **meta), torch.empty(n, m, **meta), torch.empty(n, d, **meta)
    rows = torch.empty(n, d, dtype=torch.int64, **meta)
    acts, idx = topk_encode(x, w, None, k)
    assert acts.shape == idx.shape == (B, k) and acts.is_meta
    assert sparse_decode(acts, idx, w).shape == (B, m)
    acts, idx = expander_encode(x, v, rows, None, k)
    assert expander_decode(acts, idx, v, rows, m).shape == (B, m)
    for sae in (TopKSAE(m, n, k, **meta), ExpanderSAE(m, n, k, d, **meta)):
        out = sae(x)
        assert out.x_hat.shape == (B, m) and out.x_hat.is_meta
