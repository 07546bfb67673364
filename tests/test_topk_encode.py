"""topk_encode: indices, values and all three gradients against the fp64 dense reference, on the
CPU path and on the Triton kernel under the interpreter; ties; errors; torch.library and
torch.compile. Also the shared top-k machinery of ``topk_kernels._topk``."""

import importlib

import pytest
import torch

from helpers import BACKENDS, TF32_TOL, TOL, assert_close, assert_same_topk, cuda_only
from topk_kernels import reference, topk_encode
from topk_kernels._topk import (
    MIN_KEY_VALUE,
    blocked_topk,
    merge_candidates,
    pack_keys_torch,
    unpack_keys_torch,
)

te = importlib.import_module("topk_kernels.topk_encode")  # the package re-exports the function

pytestmark = pytest.mark.ops

SHAPES = [  # (leading shape, m, n, k)
    ((33,), 100, 999, 17),
    ((3, 5), 40, 200, 8),
    ((9,), 24, 77, 77),  # k = n inside the fused kernel (K_PAD = 128)
    ((7,), 16, 300, 300),  # k = n past the fused kernel's K_PAD limit: blocked fallback
    ((6,), 8, 5, 1),
]


@pytest.fixture
def small_cpu_blocks(monkeypatch):
    """Make the CPU path tile even these small problems (several token and latent blocks)."""
    monkeypatch.setattr(te, "CPU_TILE_ELEMS", 16 * 64)
    monkeypatch.setattr(te, "CPU_MAX_BLOCK_N", 64)
    monkeypatch.setattr(te, "CPU_MIN_BLOCK_B", 16)


def _inputs(lead, m, n, dtype=torch.float32):
    x = torch.randn(*lead, m).to(dtype)
    weight = (torch.randn(n, m) / m**0.5).to(dtype)
    bias = (0.1 * torch.randn(n)).to(dtype)
    return x, weight, bias


def _pre(x, weight, bias):
    """fp64 pre-activations [..., n]: the values the reference ranks."""
    pre = x.double() @ weight.double().T
    return pre if bias is None else pre + bias.double()


def _reference(x, weight, bias, k):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    acts, idx = reference.topk_encode(leaves[0], leaves[1], leaves[2], k)
    return leaves, acts, idx


@pytest.mark.usefixtures("small_cpu_blocks")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,m,n,k", SHAPES)
def test_matches_dense_reference(backend, lead, m, n, k):
    x, weight, bias = _inputs(lead, m, n)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    acts, idx = topk_encode(*leaves, k, backend=backend)
    ref_leaves, ref_acts, ref_idx = _reference(x, weight, bias, k)

    assert acts.shape == idx.shape == (*lead, k)
    assert acts.dtype == torch.float32 and idx.dtype == torch.int64
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")
    assert (acts[..., :-1] >= acts[..., 1:]).all(), "not sorted descending"

    grad = torch.randn_like(ref_acts)
    acts.backward(grad.float())
    ref_acts.backward(grad)
    for name, got, want in zip(("x", "weight", "bias"), leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        assert_close(got.grad, want.grad, 1e-4, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_cpu_blocks_without_bias(backend):
    x, weight, _ = _inputs((21,), 48, 130)
    acts, idx = topk_encode(x, weight, None, 6, backend=backend)
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), None, 6)
    assert_same_topk(idx, ref_idx, _pre(x, weight, None), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "no bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    x, weight, bias = _inputs((19,), 64, 150, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    acts, idx = topk_encode(*leaves, 9, backend=backend)
    ref_leaves, ref_acts, ref_idx = _reference(x, weight, bias, 9)  # same rounded inputs
    assert acts.dtype == dtype
    # fp32 accumulation ranks like fp64 except on near-ties
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[dtype], "top_acts")
    grad = torch.randn_like(ref_acts)
    acts.backward(grad.to(dtype))
    ref_acts.backward(grad)
    for name, got, want in zip(("x", "weight", "bias"), leaves, ref_leaves):
        assert got.grad.dtype == dtype
        assert_close(got.grad, want.grad, TOL[dtype], f"grad {name}")


@cuda_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_tf32_where_enabled(backend, monkeypatch):
    """With TF32 matmuls allowed, the Triton kernel's dots and cuBLAS run in TF32: indices may
    swap only on near-ties at TF32 precision, values stay within TF32's tolerance."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x, weight, bias = _inputs((33,), 256, 999)
    acts, idx = topk_encode(x, weight, bias, 17, backend=backend)
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), bias.double(), 17)
    pre = _pre(x, weight, bias)
    assert_same_topk(idx, ref_idx, pre, TF32_TOL, "tf32 top_indices")
    assert_close(acts, pre.gather(-1, idx).relu(), TF32_TOL, "tf32 top_acts")


def test_float64_on_the_cpu_path():
    x, weight, bias = (t.double() for t in _inputs((17,), 30, 120))
    acts, idx = topk_encode(x, weight, bias, 11, backend="torch")
    ref_acts, ref_idx = reference.topk_encode(x, weight, bias, 11)
    assert acts.dtype == torch.float64
    assert torch.equal(idx, ref_idx)
    assert_close(acts, ref_acts, TOL[torch.float64], "fp64 top_acts")


@pytest.mark.usefixtures("small_cpu_blocks")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [5, 40, 300])
def test_ties_go_to_the_lower_latent_id(backend, k):
    # weight = 0 makes pre = bias for every token; bias takes few distinct values (and both
    # zeros), so ties straddle the k boundary and every block boundary.
    n = 300
    x = torch.randn(10, 12)
    weight = torch.zeros(n, 12)
    choices = torch.tensor([-1.0, -0.0, 0.0, 2.0, 3.5])
    bias = choices[torch.randint(0, len(choices), (n,))]
    expected = torch.sort(-bias, stable=True).indices[:k]  # value desc, then id asc
    acts, idx = topk_encode(x, weight, bias, k, backend=backend)
    assert torch.equal(idx, expected.expand(10, k))
    assert torch.equal(acts, bias[expected].relu().expand(10, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_through_positive_selected_entries(backend):
    x, weight, bias = _inputs((8,), 16, 40)
    bias = bias - 10.0  # every pre-activation negative: all selected acts are ReLU'd to zero
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    acts, _ = topk_encode(*leaves, 4, backend=backend)
    assert (acts == 0).all()
    acts.sum().backward()
    for t in leaves:
        assert (t.grad == 0).all()


def test_empty_batch():
    x, weight, bias = _inputs((0,), 8, 10)
    acts, idx = topk_encode(x, weight, bias, 3)
    assert acts.shape == idx.shape == (0, 3)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, w, b, k: (x, w, b, 0), r"k: expected 1 <= k <= n_latents=50, got 0"),
        (lambda x, w, b, k: (x, w, b, 51), r"k: expected 1 <= k <= n_latents=50, got 51"),
        (lambda x, w, b, k: (x, w, b, 2.0), r"k: expected an int"),
        (lambda x, w, b, k: (x[:, :-1], w, b, k), r"x: expected last dimension m = weight.shape\[1\] = 12"),
        (lambda x, w, b, k: (x, w, b[:-1], k), r"bias: expected shape \(50,\)"),
        (lambda x, w, b, k: (x.long(), w, b, k), r"x: expected a float"),
        (lambda x, w, b, k: (x, w[0], b, k), r"weight: expected a 2-D tensor"),
    ],
)
def test_bad_input_raises_naming_the_argument(mutate, match):
    x, weight, bias = _inputs((7,), 12, 50)
    with pytest.raises((ValueError, TypeError), match=match):
        topk_encode(*mutate(x, weight, bias, 5))


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(use_triton):
    x, weight, bias = _inputs((13,), 24, 70)
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), 6, use_triton)
    torch.library.opcheck(torch.ops.topk_kernels.topk_encode.default, args)


def test_torch_compile_cpu():
    x, weight, bias = _inputs((19,), 32, 90)
    weight.requires_grad_()

    def loss_fn(x, w, b):
        acts, idx = topk_encode(x, w, b, 7)
        return (acts * (idx % 3 + 1)).square().sum()

    loss = torch.compile(loss_fn, fullgraph=True)(x, weight, bias)
    (grad,) = torch.autograd.grad(loss, weight)
    w64 = weight.detach().double().requires_grad_()
    ref_acts, ref_idx = reference.topk_encode(x.double(), w64, bias.double(), 7)
    ref = (ref_acts * (ref_idx % 3 + 1)).square().sum()
    ref.backward()
    assert_close(loss.detach().reshape(1), ref.detach().reshape(1), 1e-5, "compiled loss")
    assert_close(grad, w64.grad, 1e-4, "compiled weight grad")


# --- the shared top-k machinery (topk_kernels._topk) -----------------------------------------

def test_keys_order_like_values_then_lower_id():
    values = torch.tensor([3.0, -float("inf"), -2.5, -0.0, 0.0, 1e-40, float("inf"), 3.0, -1e-40])
    ids = torch.arange(len(values)) * 1000 + 7
    keys = pack_keys_torch(values, ids)
    order = torch.argsort(keys, descending=True)
    expected = sorted(range(len(values)), key=lambda i: (-values[i].item(), ids[i].item()))
    assert order.tolist() == expected
    back_values, back_ids = unpack_keys_torch(keys)
    assert torch.equal(back_ids, ids)
    assert torch.equal(back_values, torch.where(values == 0, 0.0, values))  # -0.0 folds into +0.0
    assert (keys > MIN_KEY_VALUE).all()


def test_merge_candidates_ignores_padding_and_relus():
    values = torch.randn(5, 12)
    ids = torch.randint(0, 10**6, (5, 12))
    keys = pack_keys_torch(values, ids)
    keys[:, ::3] = MIN_KEY_VALUE  # padding slots
    acts, idx = merge_candidates(keys, 4, torch.bfloat16)
    real = torch.ones(12, dtype=torch.bool)
    real[::3] = False
    v, order = values[:, real].sort(dim=1, descending=True)
    assert torch.equal(idx, ids[:, real].gather(1, order[:, :4]))
    assert torch.equal(acts, v[:, :4].relu().bfloat16())


@pytest.mark.parametrize("block", [1, 7, 64, 500])
def test_blocked_topk_matches_exact_topk(block):
    pre = torch.randn(11, 333)
    pre[:, 100:140] = 0.5  # a run of ties across block boundaries
    calls = []

    def pre_block(start, stop):
        calls.append(stop - start)
        return pre[:, start:stop]

    values, indices = blocked_topk(pre_block, 333, 60, block)
    expected = torch.sort(-pre, dim=1, stable=True).indices[:, :60]
    assert torch.equal(indices, expected)
    assert torch.equal(values, pre.gather(1, expected))
    assert max(calls) <= block
    keyed_values, keyed_indices = blocked_topk(pre_block, 333, 60, block, exact_keys=True)
    assert torch.equal(keyed_indices, expected) and torch.equal(keyed_values, values)
