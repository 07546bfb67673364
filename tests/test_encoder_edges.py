"""Edge cases of the encoders' top-k selections on every strategy: the fused TopK kernel
(insertion, ``_topk.fold_tile``), the chunked strategy (GEMM chunks + ``_select_kernel``'s
insertion with candidates persisted across chunks and interleaved splits, or
``_select_buffer_kernel``'s threshold, append and sort), the Expander kernel (gathers from
``transposed_tokens`` chunks) and the PyTorch paths. Exact cases build pre-activations that every backend computes without rounding
(an identity x, a zero weight, one-hot atoms), so the expected ids follow from a stable sort: NaN
above +inf, equal values (and -0.0 / +0.0) to the lower id. Random cases go against the fp64
reference. Sizes are small: the kernels run in the Triton interpreter."""

import importlib

import pytest
import torch

from helpers import HAS_TRITON, TOL, assert_close, assert_grads_match, assert_same_topk, force_fused
from topk_kernels import expander_encode, reference, topk_encode

te = importlib.import_module("topk_kernels.topk_encode")
ee = importlib.import_module("topk_kernels.expander_encode")

pytestmark = [pytest.mark.ops, pytest.mark.skipif(not HAS_TRITON, reason="no triton")]

NAN, INF = float("nan"), float("inf")
FP32_MAX = torch.finfo(torch.float32).max
STRATEGIES = ["torch", "fused", "chunked", "chunked-buffer"]


def _encode(strategy, monkeypatch, x, weight, bias, k, chunk_b=4):
    """topk_encode on one strategy. "chunked" takes GEMM chunks of chunk_b tokens x 130 latents
    (more latents when B < chunk_b) and 32-wide selection tiles: five per chunk, in three
    interleaved splits of two tiles (0, 3 / 1, 4 / 2); 150 latents span two chunks (the second
    leaves two splits without a tile) and B > chunk_b several token chunks. "chunked-buffer" takes
    the threshold-and-sort selection with 1-row tiles of 8 latents (wider than K_PAD 2 and 4): its
    max(K_PAD, 8) spare slots fill and are flushed into the held K_PAD many times in these rows.
    "fused" past its K_PAD limit goes to the chunked path, as the dispatcher says."""
    if strategy == "torch":
        return topk_encode(x, weight, bias, k, backend="torch")
    if strategy.startswith("chunked"):
        monkeypatch.setattr(te, "encode_strategy", lambda *args: "chunked")
        monkeypatch.setattr(te, "CHUNK_TILE_ELEMS", chunk_b * 130)
        monkeypatch.setattr(te, "CHUNK_MAX_BLOCK_B", chunk_b)
        tile = {"chunked": lambda kp: (chunk_b, 32, 4), "chunked-buffer": lambda kp: (1, 8, 1, "buffer")}
        monkeypatch.setattr(te, "SELECT_CONFIGS", {kp: tile[strategy](kp) for kp in te.SELECT_CONFIGS})
    else:
        force_fused(monkeypatch)
    return topk_encode(x, weight, bias, k, backend="triton")


def _expected(pre: torch.Tensor, k: int):
    """The package's order on fp32 pre-activations: a stable descending sort (NaN first, -0.0 ==
    +0.0, ties to the lower id), then ReLU."""
    return reference.topk_relu(pre.float(), k)


def _identity_inputs(table: torch.Tensor, bias=None):
    """x = I [B, B], weight = table.T [n, B]: pre = table (+ bias) with no rounding on any backend."""
    B = table.shape[0]
    return torch.eye(B), table.T.contiguous(), bias


def _assert_exact(acts, idx, pre, k, what):
    want_acts, want_idx = _expected(pre, k)
    assert torch.equal(idx, want_idx), f"{what}: ids {idx.tolist()} != {want_idx.tolist()}"
    assert torch.equal(acts.float().isnan(), want_acts.isnan()), f"{what}: NaN placement"
    ok = (acts == want_acts.to(acts.dtype)) | want_acts.isnan()
    assert ok.all(), f"{what}: values differ"


# --- exact cases: ids known without rounding ----------------------------------------------------

def _table(pattern: str, B: int, n: int) -> torch.Tensor:
    """[B, n] fp32 pre-activations of one pattern (each row its own when random)."""
    ids = torch.arange(n, dtype=torch.float32)
    if pattern == "equal":  # one value everywhere: ties across tiles, chunks and splits
        return torch.full((B, n), 0.75)
    if pattern == "rising":  # insertion's worst case: every entry displaces a running one
        return ids.expand(B, n) + torch.arange(B)[:, None]
    if pattern == "falling":  # nothing enters after the first tile
        return -ids.expand(B, n) - torch.arange(B)[:, None]
    if pattern == "few_values":  # ties straddling every boundary, and values near fp32 max
        choices = torch.tensor([-FP32_MAX, -1.0, -0.0, 0.0, 2.0, FP32_MAX / 2, FP32_MAX])
        return choices[torch.randint(0, len(choices), (B, n))]
    raise ValueError(pattern)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("pattern,B,n,k", [
    *[(pattern, 5, 150, 33) for pattern in ("equal", "rising", "falling", "few_values")],
    ("rising", 3, 70, 70), ("few_values", 3, 70, 70),  # k = n, with K_PAD - n empty slots left
    ("equal", 2, 1, 1),  # n = 1
])
def test_exact_patterns(strategy, pattern, B, n, k, monkeypatch):
    table = _table(pattern, B, n)
    acts, idx = _encode(strategy, monkeypatch, *_identity_inputs(table), k)
    _assert_exact(acts, idx, table, k, f"{strategy} {pattern}")


@pytest.mark.parametrize("strategy", ["fused"])  # the chunked GEMM on CPU widens to fp32 first
@pytest.mark.parametrize("pattern", ["rising", "few_values"])
def test_exact_patterns_bf16(strategy, pattern, monkeypatch):
    """bf16 inputs: the fused kernel's 128 x 128 tensor-core tiles (ENCODE_TC_TILES), 260 latents
    in three tiles (the last partial), 9 tokens in one 128-token block; rising ids above 256
    round to bf16 ties."""
    table = _table(pattern, 9, 260).clamp(-3e38, 3e38).bfloat16()  # fp32 max rounds to bf16 inf
    x, weight, _ = _identity_inputs(table)
    acts, idx = _encode(strategy, monkeypatch, x.bfloat16(), weight, None, 40)
    assert acts.dtype == torch.bfloat16
    _assert_exact(acts, idx, table.float(), 40, f"{strategy} bf16 {pattern}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n,k", [(150, 33), (5, 5)])
def test_all_neg_inf(strategy, n, k, monkeypatch):
    """pre = -inf everywhere (zero weight, -inf bias): real entries, above the empty slots, so
    stage 2 returns the lowest ids, and ReLU makes them 0."""
    bias = torch.full((n,), -INF)
    acts, idx = _encode(strategy, monkeypatch, torch.randn(5, 4), torch.zeros(n, 4), bias, k)
    _assert_exact(acts, idx, bias.expand(5, n), k, f"{strategy} -inf")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k", [1, 3, 63, 65, 129])  # K_PAD >= 2 (k = 1, 2 alike)
def test_every_k_pad_boundary(strategy, k, monkeypatch):
    """Random distinct values plus runs of ties, on both sides of K_PAD boundaries (k = 129 takes
    K_PAD = 256, the largest)."""
    B, n = 3, 200
    table = torch.randn(B, n)
    table[:, 40:90] = 0.5  # a run of ties across tiles
    table[:, 150:] = table[:, :50]  # the same values again at higher ids
    acts, idx = _encode(strategy, monkeypatch, *_identity_inputs(table), k)
    _assert_exact(acts, idx, table, k, f"{strategy} k={k}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k", [1, 40])
def test_nan_and_inf_columns(strategy, k, monkeypatch):
    """NaN of either sign ranks above +inf, +inf above every finite value, equal ranks to the lower
    id; -inf is still a real entry. The specials come in through the bias (column-wise)."""
    B, n = 5, 270
    table = torch.randn(B, n)
    bias = torch.zeros(n)
    bias[torch.tensor([250, 3, 130])] = INF
    bias[torch.tensor([260, 70])] = NAN
    bias[200] = -NAN  # sign bit set: must not sink below -inf
    bias[torch.tensor([5, 6, 129])] = -INF
    acts, idx = _encode(strategy, monkeypatch, *_identity_inputs(table, bias), k)
    _assert_exact(acts, idx, table + bias, k, f"{strategy} specials")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_of_nan_and_inf(strategy, monkeypatch):
    """Whole rows of NaN (both signs), of +inf, of -inf, and a NaN / +inf mix, made by the fp32
    accumulation itself (inf * w, inf - inf) from a single model coordinate."""
    n, k = 200, 7
    w = torch.randn(n, 1)
    w[torch.tensor([17, 150])] = 0.0  # inf * 0 = NaN on those latents only
    x = torch.tensor([[INF], [-INF], [NAN], [-NAN], [1.0]])
    acts, idx = _encode(strategy, monkeypatch, x, w, None, k)
    _assert_exact(acts, idx, x * w.T, k, f"{strategy} special rows")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_negative_zero_ties_positive_zero(strategy, monkeypatch):
    """-0.0 and +0.0 tie (lower id first). A GEMM writes -0.0 for -1 * 0 (m = 1, no bias), which the
    chunked strategy's selection kernel then sees; the fused kernel's accumulator starts at +0.0."""
    choices = torch.tensor([-0.0, 0.0, 1.0, -1.0])
    weight = choices[torch.randint(0, 4, (140, 1))]
    x = torch.tensor([[1.0], [-1.0], [-1.0]])
    acts, idx = _encode(strategy, monkeypatch, x, weight, None, 70)
    pre = x * weight.T
    assert (pre == 0).sum() > 70 and pre.signbit()[pre == 0].any() and not pre.signbit()[pre == 0].all()
    _assert_exact(acts, idx, pre, 70, f"{strategy} -0.0")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_inputs_whose_fp32_accumulation_overflows(strategy, monkeypatch):
    """bf16 reaches past fp32's range: every backend accumulates in fp32, so sums beyond it rank
    as +inf / -inf (ties to the lower id), not as the fp64 values. Each latent's two weights share
    a sign and bf16 products are exact in fp32, so the fp32 sum is the same in any order (with or
    without FMA); a sum of mixed signs (inf - inf or not) would depend on the order."""
    n, k = 150, 9
    x = torch.tensor([[2e38, 2e38], [-2e38, -1e38], [1.0, 1.0]]).bfloat16()
    weight = torch.randn(n, 2).abs() * torch.randn(n, 1).sign()
    weight = weight.bfloat16()
    acts, idx = _encode(strategy, monkeypatch, x, weight, None, k)
    xf, wf = x.float(), weight.float()
    pre = (xf[:, None, 0] * wf[None, :, 0]) + (xf[:, None, 1] * wf[None, :, 1])
    assert pre[:2].isinf().sum() > 2 * k  # ties among +inf beyond k, and -inf
    _assert_exact(acts, idx, pre, k, f"{strategy} overflow")
    assert acts.dtype == torch.bfloat16


@pytest.mark.parametrize("strategy", ["fused", "chunked", "chunked-buffer"])
def test_more_splits_than_tiles(strategy, monkeypatch):
    """Splits beyond the last tile hold only empty slots; stage 2 must never pick one."""
    monkeypatch.setattr(te, "latent_splits", lambda *args, **kwargs: 7)
    bias = torch.full((150,), -INF)
    bias[149] = 1.0
    acts, idx = _encode(strategy, monkeypatch, torch.randn(4, 3), torch.zeros(150, 3), bias, 150)
    _assert_exact(acts, idx, bias.expand(4, 150), 150, f"{strategy} splits > tiles")


# --- random inputs against the fp64 reference -------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("lead,m,n,k", [
    ((1,), 7, 1, 1),  # n = 1, B = 1
    ((11,), 19, 65, 65),  # k = n, n one past a tile, B spans token chunks
    ((2, 3, 2), 33, 257, 5),  # leading batch dims
    ((21,), 24, 150, 9),  # B not a multiple of any block, two GEMM chunks
])
def test_random_shapes_with_gradients(strategy, lead, m, n, k, monkeypatch):
    x = torch.randn(*lead, m)
    weight = torch.randn(n, m) / m**0.5
    bias = 0.1 * torch.randn(n)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    acts, idx = _encode(strategy, monkeypatch, *leaves, k, chunk_b=16)
    ref = [t.double().requires_grad_() for t in (x, weight, bias)]
    ref_acts, ref_idx = reference.topk_encode(*ref, k)
    pre = x.double() @ weight.double().T + bias.double()
    assert idx.shape == (*lead, k)
    assert_same_topk(idx, ref_idx, pre, TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")
    assert_grads_match(acts, ref_acts, leaves, ref, ("x", "weight", "bias"), 1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16])
def test_noncontiguous_inputs_and_bias_dtypes(strategy, bias_dtype, monkeypatch):
    x = torch.randn(12, 2, 21)[:, 1, :]  # strided rows
    weight = torch.randn(21, 140).T  # transposed: non-contiguous [n, m]
    bias = None if bias_dtype is None else (0.1 * torch.randn(280)[::2]).to(bias_dtype)
    acts, idx = _encode(strategy, monkeypatch, x, weight, bias, 33, chunk_b=16)
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), None if bias is None else bias.double(), 33)
    pre = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert acts.dtype == torch.float32
    assert_same_topk(idx, ref_idx, pre, TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")


# --- Expander encoder -----------------------------------------------------------------------------

def _expander(backend, monkeypatch, x, values, rows, bias, k):
    """expander_encode; the Triton kernel gathers from transposed copies of 32 tokens at a time."""
    if backend == "triton":
        monkeypatch.setattr(ee, "XT_CHUNK_BYTES", 1)  # one token block per transposed copy
    return expander_encode(x, values, rows, bias, k, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("k", [1, 2, 3, 129])
def test_expander_one_hot_atoms_exact(backend, k, monkeypatch):
    """d = 1, values = 1: pre[b, j] = x[b, rows[j]] exactly; 200 latents on 20 coordinates tie
    in groups across tiles and splits, and B = 40 spans two or three transposed chunks (the last
    partial)."""
    B, m, n = 40, 20, 200
    x = torch.randn(B, m)
    x[3] = 0.0
    x[4, ::2] = -0.0  # -0.0 ties +0.0
    x[5] = -INF
    rows = torch.randint(0, m, (n, 1))
    values = torch.ones(n, 1)
    acts, idx = _expander(backend, monkeypatch, x, values, rows, None, k)
    _assert_exact(acts, idx, x[:, rows[:, 0]], k, f"expander {backend} k={k}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expander_nan_inf_bias_and_rising(backend, monkeypatch):
    B, m, n, k = 33, 16, 280, 20
    x = torch.randn(B, m)
    rows = torch.stack([torch.randperm(m)[:3] for _ in range(n)])
    values = torch.zeros(n, 3)  # pre = bias exactly
    bias = torch.arange(n, dtype=torch.float32)  # rising with the id
    bias[torch.tensor([7, 100])] = NAN
    bias[250] = -NAN
    bias[torch.tensor([0, 1])] = INF
    acts, idx = _expander(backend, monkeypatch, x, values, rows, bias, k)
    _assert_exact(acts, idx, bias.expand(B, n), k, f"expander {backend}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lead,m,n,d,k", [((1,), 5, 1, 2, 1), ((3, 13), 40, 200, 4, 17), ((20,), 9, 40, 3, 40)])
def test_expander_random_with_gradients(backend, lead, m, n, d, k, monkeypatch):
    x = torch.randn(*lead, m)
    rows = torch.stack([torch.randperm(m)[:d] for _ in range(n)])
    values = torch.randn(n, d) / d**0.5
    bias = 0.1 * torch.randn(n)
    leaves = [t.clone().requires_grad_() for t in (x, values, bias)]
    acts, idx = _expander(backend, monkeypatch, leaves[0], leaves[1], rows, leaves[2], k)
    ref = [t.double().requires_grad_() for t in (x, values, bias)]
    ref_acts, ref_idx = reference.expander_encode(ref[0], ref[1], rows, ref[2], k)
    pre = reference.expander_dense(values.double(), rows, m)
    pre = x.double() @ pre.T + bias.double()
    assert_same_topk(idx, ref_idx, pre, TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")
    assert_grads_match(acts, ref_acts, leaves, ref, ("x", "values", "bias"), 1e-4)


@pytest.mark.parametrize("op", ["topk", "expander"])
def test_fp32_x_with_fp64_weights_keeps_fp64_gradients(op):
    """The output promotes to float64; the weight's (values') gradient, which gathers x, must
    accumulate in float64 too, not in x's float32."""
    g = torch.Generator().manual_seed(7)
    B, m, n, k, d = 37, 29, 53, 6, 5
    x = torch.randn(B, m, generator=g)
    if op == "topk":
        w = torch.randn(n, m, generator=g, dtype=torch.float64)
        encode, ref, args = topk_encode, reference.topk_encode, ()
    else:
        w = torch.randn(n, d, generator=g, dtype=torch.float64)
        rows = torch.stack([torch.randperm(m, generator=g)[:d] for _ in range(n)])
        encode, ref, args = expander_encode, reference.expander_encode, (rows,)
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    acts, idx = encode(x, w1, *args, bias, k, backend="torch")
    want, want_idx = ref(x.double(), w2, *args, bias, k)
    assert acts.dtype == torch.float64 and torch.equal(idx, want_idx)
    grad = torch.randn(acts.shape, generator=g, dtype=torch.float64)
    acts.backward(grad)
    want.backward(grad)
    assert_close(w1.grad, w2.grad, 1e-12, "weight grad")
