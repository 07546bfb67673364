"""sparse_decode: forward and all three gradients against the fp64 dense reference, on the CPU path
and on the Triton kernels under the interpreter; errors; torch.library and torch.compile."""

import importlib

import pytest
import torch

from helpers import BACKENDS, DEVICE, TOL, assert_close
from topk_kernels import reference, sparse_decode

pytestmark = pytest.mark.ops

SHAPES = [  # (leading shape, m, n, k)
    ((37,), 100, 1000, 17),
    ((5, 7), 33, 129, 5),
    ((4,), 1, 3, 3),
]


def _inputs(lead, m, n, k, dtype):
    acts = torch.randn(*lead, k).abs().to(dtype)
    idx = torch.randint(0, n, (*lead, k))
    weight = torch.randn(n, m).to(dtype)
    bias = torch.randn(m).to(dtype)
    return acts, idx, weight, bias


def _check_against_reference(acts, idx, weight, bias, backend, tol):
    leaves = [t.detach().clone().requires_grad_() for t in (acts, weight, bias)]
    out = sparse_decode(leaves[0], idx, leaves[1], leaves[2], backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in (acts, weight, bias)]
    ref = reference.sparse_decode(ref_leaves[0], idx, ref_leaves[1], ref_leaves[2])
    assert out.dtype == acts.dtype
    assert_close(out, ref, tol, "forward")
    grad_out = torch.randn_like(ref)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    for name, got, want in zip(("top_acts", "weight", "bias"), leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        assert_close(got.grad, want.grad, tol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_dense_reference(backend, lead, m, n, k, dtype):
    _check_against_reference(*_inputs(lead, m, n, k, dtype), backend, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_indices_add_up(backend):
    acts, idx, weight, bias = _inputs((9,), 20, 6, 8, torch.float32)  # k > n forces repeats
    idx[:, 1] = idx[:, 0]
    _check_against_reference(acts, idx, weight, bias, backend, TOL[torch.float32])


def _Widened():
    """A ``TorchDispatchMode`` recording the size of every bf16 -> fp32 copy (a widened weight)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widened(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and (args[0].dtype, out.dtype) == (torch.bfloat16,
                                                                                         torch.float32):
                self.sizes.append(out.numel())
            return out

    return Widened()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path's conversion of used rows only")
@pytest.mark.parametrize("tokens_per_chunk", [13, 4])
def test_cpu_half_weight_converts_only_the_rows_used(monkeypatch, tokens_per_chunk):
    """A bf16 weight on the CPU path: only the rows the ids use are widened to fp32 (forward and
    grad of the activations), never the whole [n, m] weight, a token chunk at a time (13 tokens: one
    chunk; 4: four, the last of one token); duplicates within a token add up."""
    sd_module = importlib.import_module("topk_kernels.sparse_decode")  # the package re-exports the function
    n, m = 500, 24
    monkeypatch.setattr(sd_module, "WIDEN_ELEMS", tokens_per_chunk * 6 * m)
    acts, idx, weight, bias = _inputs((13,), m, n, 6, torch.bfloat16)
    idx[:, 1] = idx[:, 0]
    grad = torch.randn(13, m).to(torch.bfloat16)
    spy = _Widened()
    with spy:  # the CPU routines themselves: the custom op is opaque to a dispatch mode
        out = sd_module.torch_forward(acts.float(), idx, weight, bias, torch.float32)  # fp32 acts: widened rows
        gacts = sd_module.torch_grad_acts(grad, idx, weight, torch.bfloat16)
    assert spy.sizes and max(spy.sizes) <= tokens_per_chunk * 6 * m, spy.sizes
    a, w = acts.double().requires_grad_(), weight.double()
    ref = reference.sparse_decode(a, idx, w, bias.double())
    ref.backward(grad.double())
    assert_close(out, ref, TOL[torch.bfloat16], "forward")
    assert_close(gacts, a.grad, TOL[torch.bfloat16], "grad top_acts")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias(backend):
    acts, idx, weight, _ = _inputs((11,), 24, 50, 4, torch.float32)
    out = sparse_decode(acts, idx, weight, backend=backend)
    assert_close(out, reference.sparse_decode(acts.double(), idx, weight.double()), 1e-5, "no bias")


def test_triton_weight_grad_bit_identical_across_runs():
    """Written once per row in a fixed order (topk_kernels._rowgrad): no run-to-run difference,
    whatever torch.use_deterministic_algorithms says."""
    acts, idx, weight, bias = _inputs((23,), 40, 7, 9, torch.float32)  # many repeats per latent
    grad_out = torch.randn(23, 40)

    def weight_grad():
        w = weight.clone().requires_grad_()
        sparse_decode(acts, idx, w, bias, backend="triton").backward(grad_out)
        return w.grad

    first, second = weight_grad(), weight_grad()
    assert torch.equal(first, second)
    w64 = weight.double().requires_grad_()
    reference.sparse_decode(acts.double(), idx, w64, bias.double()).backward(grad_out.double())
    assert_close(first, w64.grad, 1e-5, "weight grad")


def test_empty_batch():
    acts, idx, weight, bias = _inputs((0,), 8, 10, 3, torch.float32)
    assert sparse_decode(acts, idx, weight, bias).shape == (0, 8)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, i, w, b: (a, i + 1000, w, b), r"top_indices: expected every index in \[0, n_latents=1000\)"),
        (lambda a, i, w, b: (a, i - 1000, w, b), r"top_indices: .* found -"),
        (lambda a, i, w, b: (a[:, :-1], i, w, b), r"top_indices: expected the shape of top_acts"),
        (lambda a, i, w, b: (a, i, w, b[:-1]), r"bias: expected shape \(100,\)"),
        (lambda a, i, w, b: (a, i, w[0], b), r"weight: expected a 2-D tensor"),
        (lambda a, i, w, b: (a, i.float(), w, b), r"top_indices: expected an int64"),
        (lambda a, i, w, b: (a.long(), i, w, b), r"top_acts: expected a float"),
    ],
)
def test_bad_input_raises_naming_the_argument(mutate, match):
    args = mutate(*_inputs((37,), 100, 1000, 17, torch.float32))
    with pytest.raises((ValueError, IndexError, TypeError), match=match):
        sparse_decode(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_indices_false_only_drops_the_device_sync(backend):
    """Default: an out-of-range id is an IndexError on every device. ``check_indices=False`` skips
    the check's host sync on CUDA, where the id then contributes nothing to the Triton kernels (the
    index contract); CPU ids are checked either way (it costs no sync)."""
    acts, idx, weight, bias = _inputs((9,), 12, 40, 4, torch.float32)
    idx[2, 1] = 40 + 7
    with pytest.raises(IndexError, match=r"top_indices: expected every index in \[0, n_latents=40\), found 47"):
        sparse_decode(acts, idx, weight, bias, backend=backend)
    if DEVICE.type == "cpu":
        with pytest.raises(IndexError, match="top_indices"):
            sparse_decode(acts, idx, weight, bias, backend=backend, check_indices=False)
        return
    if backend == "torch":
        return  # unchecked on CUDA, the PyTorch path is embedding_bag's (a device-side assert)
    out = sparse_decode(acts, idx, weight, bias, backend=backend, check_indices=False)
    kept = torch.where(idx < 40, acts, 0.0).double()
    want = reference.sparse_decode(kept, idx.clamp(max=39), weight.double(), bias.double())
    assert_close(out, want, TOL[torch.float32], "out-of-range id dropped")


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        sparse_decode(*_inputs((3,), 4, 5, 2, torch.float32), backend="cuda")


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(use_triton):
    acts, idx, weight, bias = _inputs((13,), 24, 40, 5, torch.float32)
    args = (acts.requires_grad_(), idx, weight.requires_grad_(), bias.requires_grad_(), use_triton)
    torch.library.opcheck(torch.ops.topk_kernels.sparse_decode.default, args)


def test_cpu_backend_triton_without_the_interpreter_is_refused():
    """TOPK_KERNELS_CPU_BACKEND=triton asks CPU tensors to run the Triton kernels, which needs the
    interpreter: without it every op refuses, as backend="triton" does, instead of silently taking
    the PyTorch path (which it did: the user believed the kernels ran)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, topk_kernels as tk\n"
        "x, w = torch.randn(3, 4), torch.randn(5, 4)\n"
        "vals, rows = torch.randn(5, 2), torch.tensor([[0, 1]] * 5)\n"
        "acts, idx = torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.long)\n"
        "calls = [lambda: tk.topk_encode(x, w, None, 2), lambda: tk.sparse_decode(acts, idx, w),\n"
        "         lambda: tk.expander_encode(x, vals, rows, None, 2), lambda: tk.expander_decode(acts, idx, vals, rows, 4)]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "        print('ran')\n"
        "    except RuntimeError as exc:\n"
        "        print('refused:', exc)\n"
        "print(tk.topk_encode(x.double(), w.double(), None, 2, backend=None)[1].shape)  # float64: torch path\n"
    )
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TOPK_KERNELS_CPU_BACKEND"] = "triton"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5, proc.stdout
    for line in lines[:4]:
        assert line.startswith("refused: TOPK_KERNELS_CPU_BACKEND=triton") and "TRITON_INTERPRET=1" in line, line


def test_torch_compile_cpu():
    acts, idx, weight, bias = _inputs((19,), 32, 64, 6, torch.float32)
    weight.requires_grad_()
    compiled = torch.compile(lambda a, i, w, b: sparse_decode(a, i, w, b).square().sum(), fullgraph=True)
    loss = compiled(acts, idx, weight, bias)
    (grad,) = torch.autograd.grad(loss, weight)
    w64 = weight.detach().double().requires_grad_()
    ref = reference.sparse_decode(acts.double(), idx, w64, bias.double()).square().sum()
    ref.backward()
    assert_close(loss.detach().reshape(1), ref.detach().reshape(1), 1e-5, "compiled loss")
    assert_close(grad, w64.grad, 1e-5, "compiled weight grad")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path's conversion of a narrower weight")
@pytest.mark.parametrize("whole_cap", [None, 50 * 24 - 1])
@pytest.mark.parametrize("k", [20, 13])
def test_cpu_half_weight_widened_once_when_the_ids_cover_n(monkeypatch, k, whole_cap):
    """A bf16 weight on the CPU path whose k rows a token exceed WIDEN_ELEMS, with B * k >= n: the
    whole weight is widened once, where chunks of one token would widen their k rows each (k = 20
    and 13 of n = 50, below the dense forward's n / 2); the weight's gradient comes back in bf16.
    Forward and every gradient against the fp64 reference. A weight larger than WHOLE_WIDEN_ELEMS is
    widened a token's rows at a time instead (no [n, m] fp32 copy)."""
    sd_module = importlib.import_module("topk_kernels.sparse_decode")
    n, m, B = 50, 24, 6
    monkeypatch.setattr(sd_module, "WIDEN_ELEMS", k * m - 1)  # one token a chunk, over the budget
    if whole_cap is not None:
        monkeypatch.setattr(sd_module, "WHOLE_WIDEN_ELEMS", whole_cap)
    acts, _, weight, bias = _inputs((B,), m, n, k, torch.bfloat16)
    idx = torch.rand(B, n).argsort(1)[:, :k]
    spy = _Widened()
    with spy:
        sd_module.torch_forward(acts.float(), idx, weight, bias, torch.float32)  # fp32 acts: the widened path
    if whole_cap is None:
        assert spy.sizes.count(n * m) == 1 and max(spy.sizes) == n * m, spy.sizes
    else:
        assert spy.sizes and max(spy.sizes) == k * m, spy.sizes  # a token's k rows at a time
    _check_against_reference(acts, idx, weight, bias, "torch", TOL[torch.bfloat16])


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path's dense tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,tile", [(70, None), (30, None), (139, 3 * 140)])
def test_cpu_dense_tiles_when_k_is_a_large_share_of_n(monkeypatch, dtype, k, tile):
    """From k = n / DENSE_FORWARD_SHARE on (the backward: n / DENSE_BACKWARD_SHARE), with B * k >= n,
    the CPU path decodes through dense [tokens, n] tiles and GEMMs: k = 70 and 139 of n = 140 take
    both, k = 30 the backward only; with a small tile budget (139) over several token tiles; ids
    repeat within a token. Forward and every gradient against the fp64 reference."""
    common = importlib.import_module("topk_kernels._common")
    sd_module = importlib.import_module("topk_kernels.sparse_decode")
    if tile is not None:
        monkeypatch.setattr(common, "DENSE_TILE_ELEMS", tile)
    latents = []
    dense_latents = common.dense_latents
    monkeypatch.setattr(common, "dense_latents", lambda *a: latents.append(a[0].shape[0]) or dense_latents(*a))
    n, B = 140, 11
    acts, _, weight, bias = _inputs((B,), 24, n, k, dtype)
    idx = torch.rand(B, n).argsort(1)[:, :k]
    idx[:, 1] = idx[:, 0]
    _check_against_reference(acts, idx, weight, bias, "torch", TOL[dtype])
    forward = k * common.DENSE_FORWARD_SHARE >= n
    assert sum(latents) == B * (1 + forward), latents  # the backward's tiles, and the forward's


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path's weight gradient of a narrower weight")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_weight_gradient_of_the_used_rows(dtype):
    """A narrower weight with at most a quarter of its rows used (B * k * 4 <= n): its gradient is
    summed for the used rows only and written into zeros of the weight's dtype; repeated ids add
    up, unused rows are exactly zero. Against the fp64 reference."""
    acts, idx, weight, bias = _inputs((3, 2), 16, 100, 4, dtype)
    idx[0, 0, 1] = idx[0, 0, 0]
    idx[1, 1, 2] = idx[0, 1, 3]
    _check_against_reference(acts, idx, weight, bias, "torch", TOL[dtype])


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path's bf16 embedding bag")
@pytest.mark.parametrize("bias_route", [None, "copy", "chunks"])
def test_cpu_bf16_forward_rounds_once(monkeypatch, bias_route):
    """bf16 acts, weight and output on CPU: each output within half a bf16 step of the fp64 value
    (fp32 accumulation, one rounding; plus the accumulation's own error), the bias included in the
    fp32 sum: one more row of the bag's table, appended to a copy of the weight (B * k >= n) or to
    each token chunk's gathered rows (here 5 tokens a chunk, the last of 2). A bias added to the
    bag's rounded sums would round twice and fail the bound. Never a widened copy. Repeated ids
    add up."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sd_module = importlib.import_module("topk_kernels.sparse_decode")
    B, m, n, k = 37, 48, 301, 17

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.widened, self.copied = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 and args[0].dim() == 2:
                self.widened += args[0].numel()
            if func is torch.ops.aten.cat.default:
                self.copied = max(self.copied, sum(t.numel() for t in args[0]))
            return func(*args, **(kwargs or {}))

    if bias_route == "chunks":
        monkeypatch.setattr(sd_module, "WHOLE_WIDEN_ELEMS", n * m - 1)
        monkeypatch.setattr(sd_module, "WIDEN_ELEMS", 5 * (k + 1) * m)
    acts, idx, weight, bias = _inputs((B,), m, n, k, torch.bfloat16)
    idx[:, 2] = idx[:, 1]
    bias = bias if bias_route else None
    spy = Copies()
    with spy:
        out = sd_module.torch_forward(acts, idx, weight, bias, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and spy.widened == 0
    assert (spy.copied == (n + 1) * m) == (bias_route == "copy"), spy.copied  # the weight and its bias
    want = reference.sparse_decode(acts.double(), idx, weight.double(), None if bias is None else bias.double())
    magnitude = reference.sparse_decode(acts.double().abs(), idx, weight.double().abs(),
                                        None if bias is None else bias.double().abs())
    accumulation = 18 * 2.0**-24 * magnitude  # fp32 sums of 17 exact products (and the bias), any order
    bound = 2.0**-8 * (want.abs() + accumulation) * 1.001 + accumulation  # half of bf16's spacing 2^-7
    assert bool(((out.double() - want).abs() <= bound).all())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path's bf16 embedding bags")
def test_cpu_bf16_gradients_sum_the_bf16_rows_in_fp32():
    """bf16 gradient, acts and weight on CPU: the activations' and the weight's gradients come from
    the bf16 rows as they are (no widened copy, no [n, m] fp32 buffer), each within half a bf16
    step of the fp64 value plus the fp32 accumulation's error. Repeated ids add up."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sd_module = importlib.import_module("topk_kernels.sparse_decode")

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32 = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.fp32 = max(self.fp32, t.numel())
            return out

    B, m, n, k = 29, 40, 211, 9
    acts, idx, weight, _ = _inputs((B,), m, n, k, torch.bfloat16)
    idx[:, 3] = idx[:, 2]
    idx[1] = idx[0]
    grad = torch.randn(B, m).to(torch.bfloat16)
    spy = Allocations()
    with spy:
        gacts = sd_module.torch_grad_acts(grad, idx, weight, torch.bfloat16)
        gw = sd_module.torch_grad_weight(grad, acts, idx, n, torch.bfloat16)
    assert gacts.dtype == gw.dtype == torch.bfloat16 and spy.fp32 < m, spy.fp32

    def exact(a, w, g):
        a = a.double().requires_grad_()
        w = w.double().requires_grad_()
        reference.sparse_decode(a, idx, w).backward(g.double())
        return a.grad, w.grad

    want_acts, want_w = exact(acts, weight, grad)
    mag_acts, mag_w = exact(acts.abs(), weight.abs(), grad.abs())
    for got, want, mag, terms in ((gacts, want_acts, mag_acts, m), (gw, want_w, mag_w, B * k)):
        accumulation = terms * 2.0**-24 * mag
        bound = 2.0**-8 * (want.abs() + accumulation) * 1.001 + accumulation
        assert bool(((got.double() - want).abs() <= bound).all())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU helper behind the gradients and the encoder's values")
@pytest.mark.parametrize("route", ["same dtype", "fp64", "pieces", "chunks"])
def test_cpu_rows_dot_every_route(monkeypatch, route):
    """``_common.rows_dot``: vectors[b] . weight[idx[b, s]] against fp64, within fp32
    accumulation of the exact products: a weight in the vectors' dtype read as it is (fp32, fp64),
    a bf16 one widened in latent pieces of 7 rows (B * K >= n: many pieces, a partial last one,
    pieces no pair names) or a chunk of 3 tokens at a time (B * K < n, a partial last chunk), never
    as a [B * K, m] copy of the rows. Ids repeat within and across tokens."""
    from helpers import StorageAllocations

    common = importlib.import_module("topk_kernels._common")
    m, K = 23, 5
    B, n = (37, 150) if route != "chunks" else (37, 1000)
    monkeypatch.setattr(common, "ROWS_DOT_PIECE_ELEMS", 7 * m if route == "pieces" else 3 * K * m)
    dtype, wdtype = {"same dtype": (torch.float32,) * 2, "fp64": (torch.float64,) * 2}.get(
        route, (torch.float32, torch.bfloat16))
    vectors = torch.randn(B, m, dtype=dtype)
    weight = torch.randn(n, m).to(wdtype)
    idx = torch.randint(0, n if route != "pieces" else n - 20, (B, K))  # the last pieces unnamed
    idx[:, 1] = idx[:, 0]
    idx[5] = idx[4]
    spy = StorageAllocations()
    with spy:
        got = common.rows_dot(vectors, weight, idx)
    assert got.dtype == dtype and got.shape == (B, K)
    budget = 4 * common.ROWS_DOT_PIECE_ELEMS
    assert spy.largest <= max(B * K * 8, budget), spy.sizes  # ids, a piece or chunk: no copy of every pair's row
    products = vectors.double()[:, None, :] * weight.double()[idx]
    err = (got.double() - products.sum(-1)).abs()
    eps = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    assert bool((err <= (m + 1) * eps * products.abs().sum(-1) * 1.01).all()), err.max()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU helper behind the gradients and the encoder's values")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int32_ids_through_the_registered_op_and_rows_dot(monkeypatch, dtype):
    """The registered op takes int32 ids (its index check allows them), and its CPU backward's
    ``rows_dot`` read them beside int64 bag numbers: every route but the token chunks failed with
    "expected scalar type Int but found Long" (the previous gradient, through unique's int64 ids,
    took them). Same values as with int64 ids, for the op's gradient and for each rows_dot route."""
    common = importlib.import_module("topk_kernels._common")
    acts, idx, weight, _ = _inputs((6,), 8, 50, 3, dtype)
    got, want = [], []
    for ids, out in ((idx.int(), got), (idx, want)):
        a, w = acts.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.ops.topk_kernels.sparse_decode(a, ids, w, None, False).square().sum().backward()
        out += [a.grad, w.grad]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    vectors, m = torch.randn(37, 23), 23
    for wdtype, n, piece in ((torch.float32, 150, 2**19), (torch.bfloat16, 150, 7 * m), (torch.bfloat16, 1000, 3 * 5 * m)):
        monkeypatch.setattr(common, "ROWS_DOT_PIECE_ELEMS", piece)
        w = torch.randn(n, m).to(wdtype)
        ids = torch.randint(0, n, (37, 5))
        assert torch.equal(common.rows_dot(vectors, w, ids.int()), common.rows_dot(vectors, w, ids))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path's bf16 embedding bag")
@pytest.mark.parametrize("tokens", [25, 99, 100])  # B * k: n, just under 4n, 4n
def test_cpu_bf16_bias_large_weight_copied_only_from_4n_ids(monkeypatch, tokens):
    """bf16 with a bf16 bias: a weight past BAG_COPY_ELEMS (32 MiB of bf16) is copied whole, its
    bias appended, only when the tokens name at least 4n ids. A fresh copy that size is mapped and
    faulted in on every call (0.9 against 0.3 ns an element here): at B * k = n the copy cost 2.7-3x
    the token chunks' gathered rows (n=65536 m=768 k=32 B=2048: 58 against 22 ms; n=32768 m=2048
    k=64 B=512: 74 against 25, and 58 before 85f9f87) and broke even at 4n. Same bound either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sd_module = importlib.import_module("topk_kernels.sparse_decode")
    m, n, k = 12, 100, 4
    monkeypatch.setattr(sd_module, "BAG_COPY_ELEMS", n * m - 1, raising=False)

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copied = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.cat.default:
                self.copied = max(self.copied, sum(t.numel() for t in args[0]))
            return func(*args, **(kwargs or {}))

    acts, idx, weight, bias = _inputs((tokens,), m, n, k, torch.bfloat16)
    spy = Copies()
    with spy:
        out = sd_module.torch_forward(acts, idx, weight, bias, torch.bfloat16)
    assert (spy.copied == (n + 1) * m) == (tokens * k >= 4 * n), spy.copied
    want = reference.sparse_decode(acts.double(), idx, weight.double(), bias.double())
    magnitude = reference.sparse_decode(acts.double().abs(), idx, weight.double().abs(), bias.double().abs())
    accumulation = (k + 1) * 2.0**-24 * magnitude
    assert bool(((out.double() - want).abs() <= 2.0**-8 * (want.abs() + accumulation) * 1.001 + accumulation).all())
