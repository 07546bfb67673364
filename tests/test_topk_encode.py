"""topk_encode: indices, values and all three gradients against the fp64 dense reference, on the
CPU path and on the Triton kernel under the interpreter; ties; errors; torch.library and
torch.compile. Also the shared top-k machinery of ``topk_kernels._topk``."""

import importlib

import pytest
import torch

from helpers import (
    BACKENDS, TF32_TOL, TOL, assert_close, assert_grads_match, assert_same_topk, cuda_only, force_fused,
)
from topk_kernels import _topk, reference, topk_encode
from topk_kernels._topk import (
    MIN_KEY_VALUE,
    SM_LIMITS_DEFAULT,
    blocked_topk,
    ctas_per_sm,
    latent_splits,
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
    """Make the CPU path tile even these small problems (several token and latent blocks), and
    the Triton backend take the fused kernel on CUDA too (the chunked strategy has its own tests)."""
    force_fused(monkeypatch)
    monkeypatch.setattr(te, "CPU_TILE_ELEMS", 16 * 64)
    monkeypatch.setattr(te, "CPU_MAX_BLOCK_N", 64)
    monkeypatch.setattr(te, "CPU_MIN_BLOCK_B", 16)
    monkeypatch.setattr(te, "CPU_GEMM_TILE_ELEMS", 16 * 64)
    monkeypatch.setattr(te, "CPU_GEMM_MIN_BLOCK_B", 16)


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

    assert_grads_match(acts, ref_acts, leaves, ref_leaves, ("x", "weight", "bias"), 1e-4)


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
    assert_grads_match(acts, ref_acts, leaves, ref_leaves, ("x", "weight", "bias"), TOL[dtype])


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
    keys[:, ::3] = MIN_KEY_VALUE + torch.arange(4)  # empty slots, as _topk.empty_slots makes them
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


@pytest.mark.parametrize("k", [1, 4, 9])
def test_blocked_topk_tie_of_several_straddling_the_kth_place(k):
    """Four entries equal to the k-th largest value: torch.topk(k + 1) keeps two of them, not
    necessarily the lowest ids, so a row whose smallest kept value appears just twice must still be
    re-ranked by packed keys (ties to the lower id), whatever the block size."""
    R, w = 48, 301
    pre = torch.randn(R, w)
    kth = pre.sort(dim=1, descending=True).values[:, k - 1 : k]
    for r in range(R):
        pre[r, torch.randperm(w)[:3]] = kth[r]
    expected = torch.sort(-pre, dim=1, stable=True).indices[:, :k]
    for block in (w, 97):
        values, indices = blocked_topk(lambda a, b: pre[:, a:b], w, k, block)
        assert torch.equal(indices, expected), f"block {block}"
        assert torch.equal(values, pre.gather(1, expected))


def _special_rows(case: str, R: int, w: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(w * 7 + k)
    if case == "ties":  # seven distinct values: ties at every rank
        return torch.randint(-3, 4, (R, w), generator=g).float()
    pre = torch.randn(R, w, generator=g)
    if case == "clustered":  # the largest entries crowd into two strided groups (columns 3 and 5 mod w // 8)
        G = w // _topk.PREFILTER_GROUP
        pre[:, 3:G * _topk.PREFILTER_GROUP:G] += 10
        pre[:, 5:G * _topk.PREFILTER_GROUP:G] += 10
        pre[:, -1] = 20  # a column past the last whole group (w not a multiple of 8)
    if case == "specials":  # NaNs of both signs, infinities, both zeros; some rows with more NaNs than k
        mask = torch.rand(R, w, generator=g)
        pre[mask < 0.01] = float("nan")
        pre[(mask > 0.5) & (mask < 0.51)] = -float("nan")
        pre[(mask > 0.2) & (mask < 0.205)] = float("inf")
        pre[(mask > 0.3) & (mask < 0.305)] = -float("inf")
        pre[(mask > 0.6) & (mask < 0.65)] = 0.0
        pre[(mask > 0.7) & (mask < 0.75)] = -0.0
        pre[0, : 3 * k] = float("nan")
    return pre


@pytest.mark.parametrize("w,k", [(333, 5), (1001, 17), (2500, 7), (4099, 64)])  # 2500: groups of groups
@pytest.mark.parametrize("case", ["random", "ties", "clustered", "specials"])
def test_cpu_topk_through_group_maxima(monkeypatch, w, k, case):
    """The CPU path's top-(k+1) through strided group maxima (``_topk._grouped_topk``, used on wide
    rows whose groups outnumber k + 1 by PREFILTER_MIN_RATIO): the same values as torch.topk, as a multiset,
    at ids that hold them; and blocked_topk's final ids are the exact order's (value descending, ties
    to the lower id, NaN first, -0.0 == +0.0), against a sort of packed keys."""
    monkeypatch.setattr(_topk, "PREFILTER_MIN_WIDTH", 0)  # the grouped path also at these narrower rows
    assert w // _topk.PREFILTER_GROUP >= _topk.PREFILTER_MIN_RATIO * (k + 1)  # and it runs
    pre = _special_rows(case, 13, w, k)
    vals, ids = _topk._grouped_topk(pre, k + 1)
    want = pre.topk(k + 1, dim=1).values
    canon = lambda v: torch.where(v.isnan(), float("inf"), v).sort(dim=1).values  # noqa: E731  NaN ranks top
    assert torch.equal(canon(vals), canon(want))
    assert torch.equal(pre.gather(1, ids).isnan(), vals.isnan())
    assert torch.equal(torch.nan_to_num(pre.gather(1, ids), nan=7.0), torch.nan_to_num(vals, nan=7.0))
    assert all(len(set(r.tolist())) == k + 1 for r in ids)  # distinct entries
    for view in (pre[:, 1:], pre.t().contiguous().t()):  # a column slice; a column-major tensor
        assert torch.equal(canon(_topk._grouped_topk(view, k + 1)[0]), canon(view.topk(k + 1, dim=1).values))
    values, indices = blocked_topk(lambda a, b: pre[:, a:b], w, k, w)
    col = torch.arange(w).expand_as(pre)
    expected = pack_keys_torch(pre, col).sort(dim=1, descending=True).values
    _, expected_ids = unpack_keys_torch(expected[:, :k])
    assert torch.equal(indices, expected_ids)


@pytest.mark.parametrize("w,k", [(37, 3), (5003, 9)])
def test_cpu_tie_check_passes_rows_holding_a_few_nans(w, k):
    """``_topk._topk_plus_one`` flags a row for re-ranking through packed keys only where torch.topk's
    choice may be wrong: a tie at the (k+1)-th value, or k + 1 NaNs (then it picked arbitrary NaNs).
    A row with fewer NaNs is not flagged (one NaN in a weight used to send every token's whole row
    through packed keys, 5.2x slower), and blocked_topk's ids still follow the exact order."""
    gen = torch.Generator().manual_seed(w + k)
    pre = torch.stack([torch.randperm(w, generator=gen).float() for _ in range(4 * (k + 3))])  # distinct
    nans = torch.arange(pre.shape[0]) % (k + 3)  # 0 .. k + 2 NaNs a row, at random columns
    for r, c in enumerate(nans.tolist()):
        pre[r, torch.randperm(w, generator=gen)[:c]] = float("nan") if r % 2 else -float("nan")
    _, _, suspect = _topk._topk_plus_one(pre, k)
    assert torch.equal(suspect, nans >= k + 1)
    tie = pre.clone()
    for r, c in enumerate(nans.tolist()):  # the row's k-th value lowered to tie its (k+1)-th
        if c < k:
            finite = tie[r][~tie[r].isnan()].sort(descending=True).values
            tie[r, (tie[r] == finite[k - 1 - c]).nonzero()[0]] = finite[k - c]
    _, _, suspect = _topk._topk_plus_one(tie, k)
    assert torch.equal(suspect, (nans >= k + 1) | (nans < k))
    for rows in (pre, tie):
        values, indices = blocked_topk(lambda a, b, rows=rows: rows[:, a:b], w, k, w)
        col = torch.arange(w).expand_as(rows)
        _, expected_ids = unpack_keys_torch(pack_keys_torch(rows, col).sort(dim=1, descending=True).values[:, :k])
        assert torch.equal(indices, expected_ids)


@pytest.mark.parametrize("op", ["topk_encode", "expander_encode"])
def test_float64_ranks_fp32_rounded_values_with_ties_to_the_lower_id(op):
    """In float64 the CPU path ranks fp32-rounded pre-activations (ties: lower id) and returns the
    winners' exact values. A winner by 1e-12 over seven entries that round to the same fp32 value
    used to hide their tie from the tie check, and k = 1 returned an arbitrary one of the eight."""
    from topk_kernels import expander_encode

    n = 4096
    w = -torch.ones(n, 1, dtype=torch.float64)
    w[2000] = 1 + 1e-12
    w[[1, 7, 100, 150, 250, 1001, 3000]] = 1
    x = torch.ones(1, 1, dtype=torch.float64)
    for k, want in ((1, [1]), (3, [1, 7, 100]), (8, [1, 7, 100, 150, 250, 1001, 2000, 3000])):
        if op == "topk_encode":
            acts, idx = topk_encode(x, w, None, k, backend="torch")
        else:
            acts, idx = expander_encode(x, w, torch.zeros(n, 1, dtype=torch.long), None, k, backend="torch")
        assert idx.tolist() == [want]
        assert torch.equal(acts, w[idx[0], 0][None])  # the exact values, not the rounded ones


# --- the chunked strategy (cuBLAS-style GEMM per chunk + running top-k) and the dispatcher -----

@pytest.fixture
def chunked(monkeypatch):
    """Make the Triton backend run the chunked strategy, with chunks small enough that these
    problems span several token blocks and latent chunks."""
    monkeypatch.setattr(te, "encode_strategy", lambda *args: "chunked")
    monkeypatch.setattr(te, "CHUNK_TILE_ELEMS", 16 * 40)
    monkeypatch.setattr(te, "CHUNK_MAX_BLOCK_B", 16)


@pytest.mark.usefixtures("chunked")
def test_chunked_strategy_without_bias():
    x, weight, _ = _inputs((29,), 36, 210)
    acts, idx = topk_encode(x, weight, None, 13, backend="triton")
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), None, 13)
    assert acts.dtype == torch.float32
    assert_same_topk(idx, ref_idx, _pre(x, weight, None), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")


@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize("tile,k", [(tile, k) for k in (3, 150) for tile in ("default", (2, 128, 1), (2, 256, 1))]
                         + [((1, 4, 1, "buffer"), 3), ((1, 2, 1, "buffer"), 3), ((1, 16, 1, "buffer"), 3),
                            ((1, 256, 1), 150),
                            ((1, 256, 1, "buffer"), 150), ("default", 400), ("default", 700), ("default", 1100)])
# K_PAD 4, 256, 512, 1024, 2048
def test_chunked_strategy_selection_tiles(monkeypatch, tile, k):
    """The selection kernels' tiles the GPU sweep compares. Insertion (3-tuples): every row of a
    block inserts on its own, a tile narrower than K_PAD fills the slots over several tiles.
    Threshold and sort ("buffer", the defaults from K_PAD 256 up): more than 2 * K_PAD latents a
    row, so the buffer is flushed (appended keys sorted, merged with the held ones) at least once,
    at K_PAD 4 dozens of times, with 4 to 16 spare slots (a 16-latent tile keeps the best 4 of
    16 sorted appends). Candidates persist across chunks of 40 latents."""
    kp = te.pow2(k, lo=min(te.SELECT_CONFIGS))
    if tile != "default":
        monkeypatch.setitem(te.SELECT_CONFIGS, kp, tile)
    if te.select_tile(kp)[3] == "buffer":
        n = {4: 187, 256: 1100, 512: 1500, 1024: 2500, 2048: 4300}[kp]  # more latents than 2 * K_PAD
    else:
        n = {4: 187, 256: 307}[kp]  # more latents than K_PAD slots
    x, weight, bias = _inputs((5,), 18, n)
    acts, idx = topk_encode(x, weight, bias, k, backend="triton")
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), bias.double(), k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")


@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize("splits,tile,k,ahead", [(2, (1, 16, 1, "buffer"), 3, True), (3, (1, 16, 1, "buffer"), 3, True),
                                                 (3, (1, 8, 1, "buffer"), 6, True), (2, "default", 40, True),
                                                 (3, (1, 16, 1, "buffer"), 3, False), (2, "default", 40, False)])
def test_chunked_buffer_selection_over_splits(monkeypatch, splits, tile, k, ahead):
    """The buffer kernel with several latent splits a row (the interpreter's own split count is
    1 here): each split reads every SPLITS-th tile of a chunk, one tile ahead of the one it ranks
    (or, ``SELECT_AHEAD`` off as in the GPU A/B runs, the tile it ranks), keeps its own buffer, and
    stage 2 merges the splits. Chunks of 40 latents and n = 187 make ragged last tiles and a ragged
    last chunk; at K_PAD 64 the 128-latent tile is wider than the chunk, so some splits get no tile
    at all."""
    monkeypatch.setattr(te, "latent_splits", lambda *args, **kwargs: splits)
    monkeypatch.setattr(te, "SELECT_AHEAD", ahead)
    kp = te.pow2(k, lo=min(te.SELECT_CONFIGS))
    if tile != "default":
        monkeypatch.setitem(te.SELECT_CONFIGS, kp, tile)
    assert te.select_tile(kp)[3] == "buffer"
    x, weight, bias = _inputs((7,), 18, 187)
    for b in (bias, None):
        acts, idx = topk_encode(x, weight, b, k, backend="triton")
        ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(),
                                                  None if b is None else b.double(), k)
        assert_same_topk(idx, ref_idx, _pre(x, weight, b), TOL[torch.float32], "top_indices")
        assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")


@pytest.mark.parametrize("k", [9, 300, 2100])  # insertion (K_PAD 16), threshold and sort (512), packed keys (4096)
def test_chunked_strategy_extra_memory_is_bounded(monkeypatch, k):
    """No pre-activation tile above CHUNK_TILE_ELEMS, so never a [B, n] tensor."""
    monkeypatch.setattr(te, "CHUNK_TILE_ELEMS", 24 * 50)
    monkeypatch.setattr(te, "CHUNK_MAX_BLOCK_B", 24)
    sizes = []
    blocked = te.token_blocked_topk

    def spy(pre_fn, *args, **kwargs):
        def recorded(*bounds):
            pre = pre_fn(*bounds)
            sizes.append(pre.numel())
            return pre
        return blocked(recorded, *args, **kwargs)

    class KernelSpy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(pre, *args, **kwargs):
                sizes.append(pre.numel())
                return self.kernel[grid](pre, *args, **kwargs)
            return launch

    monkeypatch.setattr(te, "token_blocked_topk", spy)
    for name in ("_select_kernel", "_select_buffer_kernel"):
        monkeypatch.setattr(te, name, KernelSpy(getattr(te, name)))
    monkeypatch.setattr(te, "resident_ctas", lambda *args: None)
    n = 333 if k < 2100 else 2201
    x, weight, bias = _inputs((70,), 20, n)
    acts, idx = te._chunked_forward(x, weight, bias, k, torch.float32)
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), bias.double(), k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")
    assert len(sizes) > 3 and max(sizes) <= 24 * 50 < 70 * n


# --- the strategies beside the fused kernel: chunked and threshold (whole rows) ---------------

def _spy_gemm_rows(monkeypatch):
    """Record the rows argument and the size of every pre-activation block a strategy forms."""
    seen = []
    real = te._gemm_rows

    def spy(x, weight, whole=False):
        gemm = real(x, weight, whole)

        def pre(rows, start, stop):
            out = gemm(rows, start, stop)
            seen.append((rows, out.numel()))
            return out
        return pre

    monkeypatch.setattr(te, "_gemm_rows", spy)
    return seen


# Small threshold-kernel tiles: a 32-entry sample, 32-entry tiles and at most 8 candidates, so
# that rows of a few hundred latents take the buffer, extra counting passes and the compaction.
SMALL_THRESHOLD_TILE = dict(BLOCK=32, SAMPLE=32, SAMPLE_TOP=16, PROBES=8, CAP=8, SPREAD=1.0, APPEND_SCAN=1,
                            num_warps=1)


@pytest.fixture
def threshold(monkeypatch):
    """Make the Triton backend run the threshold strategy, with small tiles and blocks of 7 tokens."""
    monkeypatch.setattr(te, "encode_strategy", lambda *args: "threshold")
    monkeypatch.setattr(te, "THRESHOLD_TILE_ELEMS", 7 * 1000)
    monkeypatch.setattr(te, "THRESHOLD_TILE", SMALL_THRESHOLD_TILE)


@pytest.fixture(params=["chunked", "threshold"])
def forced_strategy(request):
    """Each of the two strategies beside the fused kernel, through its fixture above."""
    request.getfixturevalue(request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,m,n,k", SHAPES)
def test_strategy_matches_dense_reference(forced_strategy, lead, m, n, k, dtype):
    x, weight, bias = _inputs(lead, m, n, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    acts, idx = topk_encode(*leaves, k, backend="triton")
    ref_leaves, ref_acts, ref_idx = _reference(x, weight, bias, k)
    assert acts.dtype == dtype and idx.dtype == torch.int64 and idx.shape == (*lead, k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[dtype], "top_acts")
    assert_grads_match(acts, ref_acts, leaves, ref_leaves, ("x", "weight", "bias"), max(TOL[dtype], 1e-4))


@pytest.mark.parametrize("forced_strategy,k,tokens", [("chunked", k, 21) for k in (5, 40, 300)]
                         + [("threshold", k, 9) for k in (5, 40, 299, 300)], indirect=["forced_strategy"])
def test_strategy_ties_go_to_the_lower_latent_id(forced_strategy, k, tokens):
    """Every token ties (x @ 0 + bias from five values, signed zeros among them). The threshold
    kernel's bracket ends on one value tied far more than CAP times, so it takes that value's
    entries from the row in index order (over two blocks of 7 tokens)."""
    n = 300
    weight = torch.zeros(n, 12)
    choices = torch.tensor([-1.0, -0.0, 0.0, 2.0, 3.5])
    bias = choices[torch.randint(0, len(choices), (n,))]
    expected = torch.sort(-bias, stable=True).indices[:k]
    acts, idx = topk_encode(torch.randn(tokens, 12), weight, bias, k, backend="triton")
    assert torch.equal(idx, expected.expand(tokens, k))
    assert torch.equal(acts, bias[expected].relu().expand(tokens, k))


@pytest.mark.usefixtures("threshold")
def test_threshold_strategy_bounds_its_blocks(monkeypatch):
    """Whole rows, THRESHOLD_TILE_ELEMS pre-activations a block at most (7 tokens here), so never a
    [B, n] tensor; one GEMM a block, every block a slice of tokens."""
    seen = _spy_gemm_rows(monkeypatch)
    B, m, n, k = 40, 16, 1000, 33
    x, weight, bias = _inputs((B,), m, n)
    acts, idx = topk_encode(x, weight, bias, k, backend="triton")
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), bias.double(), k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")
    assert all(isinstance(rows, slice) for rows, _ in seen)
    assert len(seen) == -(-B // 7) and max(size for _, size in seen) <= 7 * n < B * n


@pytest.mark.usefixtures("threshold")
@pytest.mark.parametrize("append_scan", [0, 1], ids=["atomic", "scan"])
@pytest.mark.parametrize("case", ["buffer", "buffer, one candidate slot", "overflow", "misled sample", "no bias",
                                  "narrow spread"])
def test_threshold_strategy_every_path(case, append_scan, monkeypatch):
    """The threshold kernel's paths against the fp64 reference: the usual one (the row read once
    into the buffer, then counting passes and the compaction over the buffer), with CAP = 1 (many
    counting passes), with a buffer of one slot (every row overflows: counting passes and the
    compaction over the row), a sample that misleads (latents sorted by bias, x small: the
    first SAMPLE latents are the row's best, so the floor is above the k-th value and the row is
    the source), and probes a tenth as far apart (SPREAD: a floor that is often above the k-th
    value, so rows mix both sources). Rows are 470 latents, k = 45 (the sample's floor is
    15 * 470 / 32 ~ 220 entries down). Each with either read (``APPEND_SCAN``): slots from the
    row's atomic counter or from a scan across the program's lanes."""
    B, m, n, k = 13, 10, 470, 45
    x, weight, bias = _inputs((B,), m, n)
    if case == "buffer, one candidate slot":
        monkeypatch.setattr(te, "THRESHOLD_TILE", SMALL_THRESHOLD_TILE | dict(CAP=1))
    if case == "narrow spread":
        monkeypatch.setattr(te, "THRESHOLD_TILE", SMALL_THRESHOLD_TILE | dict(SPREAD=0.1))
    if case == "overflow":
        monkeypatch.setattr(te, "_threshold_sizes", lambda n, k, tile: (32, 32, 1))
    monkeypatch.setattr(te, "THRESHOLD_TILE", te.THRESHOLD_TILE | dict(APPEND_SCAN=append_scan))
    if case == "misled sample":
        x, bias = 1e-3 * x, torch.linspace(3.0, -3.0, n)
    if case == "no bias":
        bias = None
    acts, idx = topk_encode(x, weight, bias, k, backend="triton")
    zero = torch.zeros(n)
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), (zero if bias is None else bias).double(), k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, zero if bias is None else bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")


def test_threshold_sizes_reach_the_outermost_probe():
    """The sample's sorted top covers the outermost probe's rank (mu - 1 + 4 * SPREAD * (sqrt(mu) +
    1) at PROBES = 8), is a power of two within the sample and at least the tile's; BUF has room
    for the entries down to that rank, with margin."""
    for spread in (te.THRESHOLD_TILE["SPREAD"], 0.5, 0.25):
        tile = te.THRESHOLD_TILE | dict(SPREAD=spread)
        for n, k in [(131072, 1024), (131072, 64), (131072, 4096), (131072, 30000), (2**20, 32), (500, 499),
                     (300, 1)]:
            sample, top, buf = te._threshold_sizes(n, k, tile)
            reach = min(n, sample)
            mu = k * reach / n
            rank = min(reach - 1, mu - 1 + 4 * spread * (mu ** 0.5 + 1))
            assert sample == tile["SAMPLE"] and top & (top - 1) == 0 and rank < top <= te.pow2(reach)
            assert top >= min(tile["SAMPLE_TOP"], te.pow2(reach))
            assert min(n, 1.4 * (rank + 1) * n / reach) <= buf <= n
    tile = te.THRESHOLD_TILE
    assert te._threshold_sizes(131072, 1024, tile)[1] == 64 and te._threshold_sizes(131072, 4096, tile)[1] == 128
    assert te._threshold_sizes(131072, 4096, tile | dict(SPREAD=0.5))[1] == 128  # rank 79.5


@pytest.mark.parametrize("other_read", [False, True], ids=["shipped", "other read"])
@pytest.mark.parametrize("k,dtype", [(513, torch.float32), (700, torch.bfloat16)])
def test_threshold_strategy_shipped_tile(monkeypatch, k, dtype, other_read):
    """The threshold strategy with the tile it ships (THRESHOLD_TILE: 128-entry tiles, a 2048-entry
    sample, CAP 256, 4 warps on CUDA), not the small test tile: rows of 4099 latents (four whole
    read steps of 1024 and a ragged tail; the sample's top 256 or 512), three blocks of tokens.
    Also with the read that is not shipped (``APPEND_SCAN`` flipped)."""
    monkeypatch.setattr(te, "encode_strategy", lambda *args: "threshold")
    if other_read:
        monkeypatch.setattr(te, "THRESHOLD_TILE", te.THRESHOLD_TILE | dict(APPEND_SCAN=1 - te.THRESHOLD_TILE["APPEND_SCAN"]))
    B, m, n = 7, 24, 4099
    monkeypatch.setattr(te, "THRESHOLD_TILE_ELEMS", 3 * n)
    seen = _spy_gemm_rows(monkeypatch)
    x, weight, bias = _inputs((B,), m, n, dtype)
    acts, idx = topk_encode(x, weight, bias, k, backend="triton")
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), bias.double(), k)
    assert len(seen) == 3 and acts.dtype == dtype
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[dtype], "top_acts")


def test_select_tile_rejects_a_malformed_entry(monkeypatch):
    """SELECT_CONFIGS entries name their scheme; a buffer tile takes one row per program."""
    monkeypatch.setitem(te.SELECT_CONFIGS, 512, (2, 128, 1, "buffer"))
    with pytest.raises(ValueError, match=r"SELECT_CONFIGS\[512\].*1 row, got 2"):
        te.select_tile(512)
    monkeypatch.setitem(te.SELECT_CONFIGS, 512, (1, 128, 1, "heap"))
    with pytest.raises(ValueError, match="scheme 'insert' or 'buffer', got 'heap'"):
        te.select_tile(512)
    assert te.select_tile(16)[3] == "insert" and te.select_tile(256)[3] == "buffer"


def test_encode_strategy_table(monkeypatch):
    cpu = torch.device("cpu")
    # The interpreter proves the fused kernel unless a measurement says otherwise.
    assert te.encode_strategy(64, 40, 999, 17, torch.float32, torch.float32, cpu) == "fused"
    # Past the fused kernel's K_PAD limit the chunked path runs there.
    k_big = 2 * te.MAX_FUSED_K_PAD
    assert te.encode_strategy(64, 40, 999, k_big, torch.float32, torch.float32, cpu) == "chunked"
    monkeypatch.setitem(te.ENCODE_MEASURED, ("cpu", torch.bfloat16, torch.bfloat16, 40, 32), "chunked")
    assert te.encode_strategy(64, 40, 999, 17, torch.bfloat16, torch.bfloat16, cpu) == "chunked"
    assert te.encode_strategy(64, 40, 999, 17, torch.float32, torch.float32, cpu) == "fused"
    # Every selection K_PAD has a predicted choice for both kinds of math.
    assert {(kind, kp) for kind in ("tensor", "fp32") for kp in te.SELECT_CONFIGS} <= set(te.ENCODE_PREDICTED)
    strategies = {"fused", "chunked", "threshold"}
    assert set(te.ENCODE_PREDICTED.values()) <= strategies and set(te.ENCODE_MEASURED.values()) <= strategies


def test_encode_strategy_on_cuda_follows_the_tables(monkeypatch):
    """A CUDA device (its name faked, so this runs anywhere): the prediction table by K_PAD, the
    threshold strategy past it, and a measurement over both; a measured "fused" past the kernel's
    limit is ignored."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    bf16 = (torch.bfloat16, torch.bfloat16, cuda)
    for k in (5, 64, 300, 1500, 2048, 5000):
        kp = te.pow2(k, lo=min(te.ENCODE_CONFIGS))
        assert te.encode_strategy(8, 40, 9999, k, *bf16) == te.ENCODE_PREDICTED.get(("tensor", kp), "threshold")
    assert te.encode_strategy(8, 40, 9999, 5000, *bf16) == "threshold"
    monkeypatch.setitem(te.ENCODE_MEASURED, ("a GPU", torch.bfloat16, torch.bfloat16, 40, 64), "fused")
    monkeypatch.setitem(te.ENCODE_MEASURED, ("a GPU", torch.bfloat16, torch.bfloat16, 40, 8192), "fused")
    monkeypatch.setitem(te.ENCODE_MEASURED, ("a GPU", torch.bfloat16, torch.bfloat16, 40, 2048), "chunked")
    assert te.encode_strategy(8, 40, 9999, 64, *bf16) == "fused"
    assert te.encode_strategy(8, 40, 9999, 5000, *bf16) == "threshold"
    assert te.encode_strategy(8, 40, 9999, 2048, *bf16) == "chunked"


def test_fp32_precision_follows_matmul_precision(monkeypatch):
    """The fused kernel's fp32 dots are TF32 exactly when torch.get_float32_matmul_precision()
    allows it (what cuBLAS does), checked on the launch's INPUT_PRECISION."""
    seen = []
    kernel = te._encode_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["INPUT_PRECISION"])
                return kernel[grid](*args, **{**kwargs, "INPUT_PRECISION": "ieee"})  # interpreter: exact
            return launch

        def warmup(self, *args, **kwargs):  # the launcher's occupancy query (CUDA)
            return kernel.warmup(*args, **kwargs)

    monkeypatch.setattr(te, "_encode_fwd_kernel", Spy())
    x, weight, bias = _inputs((5,), 16, 70)
    ref_acts, ref_idx = reference.topk_encode(x.double(), weight.double(), bias.double(), 3)
    for precision, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda p=precision: p)
        acts, idx = te._fused_forward(x, weight, bias, 3, torch.float32)  # TF32: its own tile row
        assert seen[-1] == want
        assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], precision)
        assert_close(acts, ref_acts, TOL[torch.float32], precision)


@pytest.mark.parametrize("strategy", ["fused", "chunked", "threshold"])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_mixed_dtypes_multiply_in_the_narrower_type(strategy, x_dtype, w_dtype, monkeypatch):
    """fp32 with a half type: both strategies round the fp32 operand to the half type and
    accumulate in fp32, i.e. they match the fp64 reference of the rounded inputs to fp32 accuracy."""
    monkeypatch.setattr(te, "encode_strategy", lambda *args: strategy)
    x, weight, bias = _inputs((23,), 40, 150)
    x, weight = x.to(x_dtype), weight.to(w_dtype)
    half = x_dtype if w_dtype == torch.float32 else w_dtype
    acts, idx = topk_encode(x, weight, bias, 7, backend="triton")
    rx, rw = x.to(half).double(), weight.to(half).double()
    ref_acts, ref_idx = reference.topk_encode(rx, rw, bias.double(), 7)
    assert acts.dtype == torch.float32
    assert_same_topk(idx, ref_idx, _pre(rx, rw, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")


@pytest.mark.parametrize("pattern", ["rising", "hot", "equal", "falling"])
def test_fused_insertion_worst_cases(pattern, monkeypatch):
    """``_topk.fold_tile`` on the inputs that stress insertion: values rising with the latent id
    (every tile's entries displace the running ones), one latent on top for every token, all
    values equal (ties to the lowest ids), and falling (nothing enters after the first tile).
    pre = bias exactly (zero weight), so the expected ids are known without rounding."""
    monkeypatch.setattr(te, "latent_splits", lambda *args, **kwargs: 3)
    B, m, n, k = 21, 16, 331, 19
    x = torch.randn(B, m)
    weight = torch.zeros(n, m)
    bias = {"rising": torch.arange(n, dtype=torch.float32), "falling": -torch.arange(n, dtype=torch.float32),
            "equal": torch.zeros(n), "hot": torch.randn(n)}[pattern]
    if pattern == "hot":
        bias[n - 2] = 100.0
    acts, idx = topk_encode(x, weight, bias, k, backend="triton")
    expected = sorted(range(n), key=lambda j: (-bias[j].item(), j))[:k]
    assert idx.tolist() == [expected] * B
    assert torch.equal(acts, bias[expected].relu().expand(B, k))


def test_latent_splits_finish_in_the_fewest_waves(monkeypatch):
    """The split count from the compiled occupancy minimises waves x (tiles per program + the
    fixed fill cost) over every possible split count (brute force), then the fewest splits."""
    import topk_kernels._topk as topk_mod

    monkeypatch.setattr(topk_mod, "multiprocessor_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    for token_blocks, n_tiles, ctas, fill in [(64, 1024, 1, 16.0), (1, 1024, 1, 16.0), (8, 1000, 2, 4.0),
                                              (3, 7, 1, 0.0), (200, 333, 1, 30.0)]:
        chosen = latent_splits(token_blocks, n_tiles, cuda, ctas, fill)

        def span(splits):
            per = -(-n_tiles // splits)
            return -(-token_blocks * splits // (132 * ctas)) * (per + fill)

        assert 1 <= chosen <= n_tiles
        best = min(span(s) for s in range(1, n_tiles + 1))
        assert span(chosen) == best
        assert all(span(s) > best for s in range(1, chosen))
    assert latent_splits(64, 1024, cuda, 1, 16.0) == 2  # 128 programs: one wave on 132 SMs


def test_occupancy_from_registers_and_shared_memory():
    """CTAs per SM as the CUDA occupancy calculator gives them (registers per warp rounded up to
    256, 1 KiB reserved per CTA); the cases of the encoder's compiled builds."""
    assert ctas_per_sm(255, 98304, 8, SM_LIMITS_DEFAULT) == 1  # 128 x 128 tile: registers
    assert ctas_per_sm(128, 32768, 8, SM_LIMITS_DEFAULT) == 2  # 64 x 64 exact fp32: registers
    assert ctas_per_sm(32, 120 * 1024, 4, SM_LIMITS_DEFAULT) == 1  # shared memory
    assert ctas_per_sm(16, 0, 4, SM_LIMITS_DEFAULT) == 16  # threads: 2048 / 128


def test_resident_ctas_reads_the_compiled_kernel(monkeypatch):
    """``_topk.resident_ctas`` on CUDA: compiles through ``warmup`` (no launch), loads the binary
    (Triton learns the register count lazily) and applies the occupancy rule; cached per launch."""
    import types

    import topk_kernels._topk as topk_mod

    def kernel(regs, shared, warps, calls):
        class Compiled:
            metadata = types.SimpleNamespace(shared=shared, num_warps=warps)

            def _init_handles(self):
                self.n_regs = regs

        class Kernel:
            def warmup(self, *args, grid, **kwargs):
                calls.append(kwargs)
                return Compiled()

        return Kernel()

    props = types.SimpleNamespace(regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472,
                                  max_threads_per_multi_processor=2048)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda, calls = torch.device("cuda", 0), []
    big = kernel(255, 98304, 8, calls)  # the 128 x 128 encoder tile: registers allow one CTA
    assert topk_mod.resident_ctas(big, cuda, (1, 2), {"BLOCK": 128, "num_warps": 8}) == 1
    assert topk_mod.resident_ctas(big, cuda, (1, 2), {"BLOCK": 128, "num_warps": 8}) == 1
    assert len(calls) == 1  # cached
    small = kernel(64, 32768, 4, calls)  # shared memory allows 233472 // (32768 + 1024) = 6
    assert topk_mod.resident_ctas(small, cuda, (1, 2), {"BLOCK": 64, "num_warps": 4}) == 6
    assert topk_mod.resident_ctas(small, torch.device("cpu"), (1, 2), {"BLOCK": 64}) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,tile", [(100, None), (45, None), (399, 4 * 400)])
def test_cpu_backward_through_a_dense_gradient_when_k_is_a_large_share_of_n(monkeypatch, dtype, k, tile):
    """From k = n / DENSE_BACKWARD_SHARE on (and B * k >= n), the CPU backward scatters the gradient
    into dense [tokens, n] tiles and runs GEMMs (k = 100 and 399 of n = 400 take it, 45 does not);
    with a small tile budget (399) over several token tiles. Every gradient against the fp64
    reference."""
    if tile is not None:
        monkeypatch.setattr(importlib.import_module("topk_kernels._common"), "DENSE_TILE_ELEMS", tile)
    calls = []
    dense_decode = te.dense_decode
    monkeypatch.setattr(te, "dense_decode", lambda *a: calls.append(1) or dense_decode(*a))
    x, weight, bias = _inputs((13,), 24, 400, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    acts, idx = topk_encode(*leaves, k, backend="torch")
    ref_leaves, ref_acts, ref_idx = _reference(x, weight, bias, k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_grads_match(acts, ref_acts, leaves, ref_leaves, ("x", "weight", "bias"), TOL[dtype])
    assert len(calls) == (k * te.DENSE_BACKWARD_SHARE >= 400 and 13 * k >= 400)


@pytest.mark.usefixtures("small_cpu_blocks")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_weight_widened_in_pieces(monkeypatch, dtype):
    """A narrower weight on the CPU path is widened a few rows at a time into one reused buffer
    (7 rows a piece here, across the fixture's 64-latent blocks and 16-token tiles): indices and
    values against the fp64 reference."""
    monkeypatch.setattr(te, "CPU_WIDEN_ELEMS", 7 * 40)
    x, weight, bias = _inputs((37,), 40, 150, dtype)
    acts, idx = topk_encode(x, weight, bias, 9, backend="torch")
    _, ref_acts, ref_idx = _reference(x, weight, bias, 9)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[dtype], "top_acts")


def _record_fp32_fallbacks(monkeypatch, calls):
    """Spy on ``_blocked_forward``: each fp32-GEMM fall-back appends ("fp32", tokens, None)."""
    blocked = te._blocked_forward

    def spy_blocked(x, *args, **kwargs):
        if kwargs.get("fp32_gemm"):
            calls.append(("fp32", x.shape[0], None))
        return blocked(x, *args, **kwargs)

    monkeypatch.setattr(te, "_blocked_forward", spy_blocked)


@pytest.fixture
def bf16_candidates(monkeypatch):
    """The CPU path's bf16-GEMM candidates at small sizes, on any CPU (bf16 matrix units or not):
    a list that records each call's (tokens, extra) and each fp32 fall-back's tokens."""
    monkeypatch.setattr(te, "_bf16_matmul_units", lambda: True)
    monkeypatch.setattr(te, "BF16_MIN_WORK", 4 * 16)  # at m = 16: n >= 4 (k + extra)
    monkeypatch.setattr(te, "BF16_MIN_N", 50)
    calls = []
    candidates = te._bf16_candidates_forward

    def spy_candidates(x, weight, bias, k, out_dtype, extra=None):
        calls.append(("bf16", x.shape[0], extra))
        return candidates(x, weight, bias, k, out_dtype, extra)

    monkeypatch.setattr(te, "_bf16_candidates_forward", spy_candidates)
    _record_fp32_fallbacks(monkeypatch, calls)
    return calls


@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,m,n,k", [((37,), 40, 700, 5), ((3, 11), 24, 1001, 9), ((1,), 96, 333, 1)])
def test_cpu_bf16_candidates_match_the_reference(bf16_candidates, bias_dtype, lead, m, n, k):
    """bf16 x and weight on CPU: the bf16 GEMM's candidates, rescored in fp32, give the fp64
    reference's top-k (ties within fp32 rounding aside) and its values; gradients unchanged. With
    an fp32 bias beside bf16 operands too."""
    x, weight, bias = _inputs(lead, m, n, torch.bfloat16)
    bias = None if bias_dtype is None else bias.to(bias_dtype)
    _candidates_match_the_reference(bf16_candidates, x, weight, bias, k, TOL[torch.bfloat16])


def _candidates_match_the_reference(calls, x, weight, bias, k, tol):
    """A candidate route's call (``calls``: its fixture's record, whose first entry must be the bf16
    GEMM) against the fp64 reference: ids (ties within fp32 rounding aside), values and gradients
    within ``tol``."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    acts, idx = topk_encode(*leaves, k, backend="torch")
    assert calls and calls[0][0] == "bf16", calls
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    ref_acts, ref_idx = reference.topk_encode(*ref_leaves, k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, tol, "top_acts")
    assert_grads_match(acts, ref_acts, leaves, ref_leaves, ("x", "weight", "bias"), tol)


@pytest.mark.parametrize("crowd,tries", [(40, ["bf16", "bf16"]), (200, ["bf16", "bf16", "fp32"])])
def test_cpu_bf16_candidates_near_ties_bf16_cannot_order(bf16_candidates, crowd, tries):
    """A crowd of latents whose pre-activations differ by multiples of 2^-10 around 12, where bf16's
    step is 2^-4: the bf16 GEMM rounds them to a few values and cannot order them, fp32 can. The
    bound sends the tokens to a second try with 4x the extra candidates (k + 4 * 17 = 75: a crowd of
    40 fits it, not the first 24) and then to the fp32 GEMM (a crowd of 200 fits neither); either way the top-k is exactly the fp64
    reference's, which has no ties here."""
    torch.manual_seed(0)
    B, m, n, k = 5, 32, 1500, 7
    x = torch.randn(B, m).to(torch.bfloat16)
    x[:, 0] = 1
    weight = (0.1 * torch.randn(n, m)).to(torch.bfloat16)
    base = torch.zeros(m)
    base[1:] = torch.randn(m - 1)
    ids = torch.randperm(n)[:crowd]
    weight[ids] = base.to(torch.bfloat16)
    weight[ids, 0] = (torch.randperm(crowd) + 1).to(torch.bfloat16) * 2**-10  # exact in bf16
    bias = torch.zeros(n, dtype=torch.bfloat16)
    bias[ids] = (12 - (x[:, 1:].float() @ base[1:]).mean()).to(torch.bfloat16)  # the crowd near 12 ...
    x[:, 1:] = x[0, 1:]  # ... for every token (same x but the first coordinate, which is 1)
    acts, idx = topk_encode(x, weight, bias, k, backend="torch")
    pre = _pre(x, weight, bias)
    ref_vals, ref_idx = pre.topk(k, dim=1)
    assert torch.equal(idx, ref_idx)
    assert_close(acts, ref_vals.relu(), TOL[torch.bfloat16], "top_acts")
    assert [c[:2] for c in bf16_candidates] == [(t, B) for t in tries], bf16_candidates


def test_cpu_bf16_candidates_rescore_only_those_that_can_win(bf16_candidates, monkeypatch):
    """Of the bf16 GEMM's k + extra candidates, only those the bound leaves among the k best get
    fp32 values (``_live_exact_values``): fewer pairs than all of them on random tokens, and the
    same ids and values, bit for bit, as rescoring every candidate. Tokens 0-2 hold a pair that bf16
    orders wrongly by one step (2^-4 at 12) through the bias's cast and the sum's rounding: latent
    K = 100 reads 12.0625 in bf16 and is 12.0022, latent j = 200 reads 12.0 and is 12.0618, so the
    k = 1 answer is j, a candidate below the k-th bf16 value that must be kept."""
    torch.manual_seed(5)
    B, m, n, k = 30, 48, 900, 1
    x, weight, bias = _inputs((B,), m, n, torch.bfloat16)
    bias = bias.float()
    K, j = 100, 200
    x[:, 0] = -1000  # the pair sits near -20 for tokens 3 and up
    x[:3, 0] = 1
    weight[:, 0] = 0
    weight[[K, j]] = 0
    weight[K, 0], bias[K] = 2.0**-5 + 2.0**-10, 12 - 0.03  # bias cast to 12.0, sum rounds up
    weight[j, 0], bias[j] = 2.0**-5 - 2.0**-11, 12 + 2.0**-5 - 2.0**-12  # bias cast 12.0, sum down
    pairs = []
    dot = te.pairs_dot
    monkeypatch.setattr(te, "pairs_dot", lambda *a: pairs.append(len(a[3])) or dot(*a))
    acts, idx = topk_encode(x, weight, bias, k, backend="torch")
    assert [c[:2] for c in bf16_candidates] == [("bf16", B)], bf16_candidates
    assert torch.equal(idx[:3, 0], torch.tensor([j] * 3))
    _, ref_acts, ref_idx = _reference(x, weight, bias, k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.bfloat16], "top_acts")
    extra = te._bf16_extra(k)
    assert len(pairs) == 1 and B * k <= pairs[0] < B * (k + extra) // 2, pairs
    monkeypatch.setattr(te, "_live_exact_values", lambda x, w, b, ids, *_: te._exact_values(x, w, b, ids))
    every_acts, every_idx = topk_encode(x, weight, bias, k, backend="torch")
    assert torch.equal(idx, every_idx) and torch.equal(acts, every_acts)


def test_cpu_bf16_candidates_not_taken_past_n(bf16_candidates):
    """k + extra > n refuses the route (a review found that the work floor alone let it through at
    a large m, and the candidates' [B, k + extra] buffer failed to take n columns)."""
    x, weight, bias = _inputs((5,), 200, 60, torch.bfloat16)
    k = 40  # k + extra = 66 > 60, while 64 * 66 <= 200 * 60
    acts, idx = topk_encode(x, weight, bias, k, backend="torch")
    assert not any(c[0] == "bf16" for c in bf16_candidates), bf16_candidates
    _, ref_acts, ref_idx = _reference(x, weight, bias, k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.bfloat16], "top_acts")


@pytest.mark.parametrize("case", ["x tiny", "weight tiny", "rows tiny"])
def test_cpu_bf16_candidates_subnormal_pre_activations(bf16_candidates, case):
    """Pre-activations the bf16 GEMM flushes or keeps to a bit (a review found every token of
    x * 2^-100 with wrong ids: the GEMM gave 0 for all, and the bound, with no absolute term,
    accepted arbitrary candidates). Tokens of norm below NORM_FLOOR and a call whose largest row is
    below it take the fp32 GEMM; with a few normal rows among rows * 2^-130, the bound's absolute
    terms send tokens whose k-th value is subnormal there too. All give the fp64 reference's ids,
    which have no ties here. (Above NORM_FLOOR the accumulation term m 2^-24 ||x|| max ||w_j|| >=
    m 2^-104 dwarfs the subnormal term, which is kept as the fp32 route keeps it.)"""
    torch.manual_seed(3)
    B, m, n, k = 12, 64, 300, 6
    x, weight, _ = _inputs((B,), m, n)
    if case == "x tiny":
        x = x * 2.0**-100
    elif case == "weight tiny":
        weight = weight * 2.0**-130
    else:
        weight[3:] *= 2.0**-130  # the top k holds 3 normal rows and 3 of these, subnormal
    x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
    acts, idx = topk_encode(x, weight, None, k, backend="torch")
    pre = _pre(x, weight, None)
    assert torch.equal(idx, pre.topk(k, dim=1).indices)
    assert any(c[0] == "fp32" for c in bf16_candidates), bf16_candidates


def test_cpu_bf16_candidates_minus_inf_bias_masks(bf16_candidates):
    """A bias of -inf masks its latent and stays out of max |b| (it made the bound infinite, so every
    token took a second try and then the fp32 GEMM: 3.1x slower); NaN or +inf in the bias sends the
    whole call to the fp32 GEMM."""
    x, weight, bias = _inputs((20,), 48, 900, torch.bfloat16)
    bias[torch.randperm(900)[:90]] = -float("inf")
    acts, idx = topk_encode(x, weight, bias, 5, backend="torch")
    assert [c[:2] for c in bf16_candidates] == [("bf16", 20)], bf16_candidates
    _, ref_acts, ref_idx = _reference(x, weight, bias, 5)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.bfloat16], "top_acts")
    for bad in (float("nan"), float("inf")):
        bf16_candidates.clear()
        biased = bias.clone()
        biased[7] = bad
        acts, idx = topk_encode(x, weight, biased, 5, backend="torch")
        assert [c[:2] for c in bf16_candidates] == [("bf16", 20), ("fp32", 20)], bf16_candidates
        want_vals, want_idx = te._blocked_forward(x, weight, biased, 5, torch.float32, fp32_gemm=True)
        assert torch.equal(idx, want_idx)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cpu_bf16_candidates_non_finite_tokens_take_the_fp32_path(bf16_candidates, bad):
    """A token with a NaN or an infinite input goes straight to the fp32 GEMM, whose NaN order and
    tie rule it keeps: that token's ids and values are the fp32 path's, bit for bit; the others are
    the fp64 reference's."""
    x, weight, bias = _inputs((9,), 20, 500, torch.bfloat16)
    x[4, 3] = bad
    acts, idx = topk_encode(x, weight, bias, 6, backend="torch")
    assert [c[:2] for c in bf16_candidates] == [("bf16", 9), ("fp32", 1)], bf16_candidates
    want_vals, want_idx = te._blocked_forward(x, weight, bias, 6, torch.float32, fp32_gemm=True)
    assert torch.equal(idx[4], want_idx[4])
    torch.testing.assert_close(acts[4], want_vals[4].relu().to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
    others = torch.arange(9) != 4
    _, ref_acts, ref_idx = _reference(x[others], weight, bias, 6)
    assert_same_topk(idx[others], ref_idx, _pre(x[others], weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts[others], ref_acts, TOL[torch.bfloat16], "top_acts")


def test_cpu_bf16_candidates_only_where_they_pay(bf16_candidates, monkeypatch):
    """Taken for bf16 x and weight on CPU with m n >= BF16_MIN_WORK (k + extra), n >= BF16_MIN_N
    and bf16 matrix units; not for fp32 or mixed operands, a narrower m n or n, or a CPU without
    the units."""
    x, weight, bias = _inputs((6,), 16, 100, torch.bfloat16)
    topk_encode(x, weight, bias, 3, backend="torch")                 # 4 * 16 * (3 + 16) <= 16 * 100
    topk_encode(x, weight, bias, 9, backend="torch")                 # 4 * 16 * (9 + 18) > 16 * 100
    topk_encode(x[:, :8], weight[:, :8], bias, 3, backend="torch")   # 4 * 16 * (3 + 16) > 8 * 100
    monkeypatch.setattr(te, "BF16_MIN_N", 101)
    topk_encode(x, weight, bias, 3, backend="torch")
    monkeypatch.setattr(te, "BF16_MIN_N", 50)
    topk_encode(x.float(), weight.float(), bias, 3, backend="torch")
    topk_encode(x.float(), weight, bias, 3, backend="torch")
    monkeypatch.setattr(te, "_bf16_matmul_units", lambda: False)
    topk_encode(x, weight, bias, 3, backend="torch")
    assert [c[0] for c in bf16_candidates] == ["bf16"], bf16_candidates


@pytest.fixture
def fp32_candidates(monkeypatch):
    """fp32 operands through the bf16 GEMM's candidates at small sizes, on any CPU: probe chunks of
    5 tokens; a list that records each candidate GEMM's (tokens, k + extra) and each fp32
    fall-back's tokens."""
    monkeypatch.setattr(te, "_bf16_matmul_units", lambda: True)
    monkeypatch.setattr(te, "FP32_CANDIDATES_MIN_RATIO", 4)
    monkeypatch.setattr(te, "FP32_CANDIDATES_MIN_WORK", 0)
    monkeypatch.setattr(te, "FP32_CANDIDATES_MIN_TOKENS", 8)
    monkeypatch.setattr(te, "FP32_CANDIDATES_MIN_M", 2)
    monkeypatch.setattr(te, "FP32_CANDIDATES_CHUNK", 5)
    calls = []
    gemm = te._bf16_gemm_candidates

    def spy_gemm(x, weight, bias, kk):
        calls.append(("bf16", x.shape[0], kk))
        return gemm(x, weight, bias, kk)

    monkeypatch.setattr(te, "_bf16_gemm_candidates", spy_gemm)
    _record_fp32_fallbacks(monkeypatch, calls)
    return calls


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("lead,m,n,k", [((37,), 40, 700, 5), ((3, 11), 24, 1001, 9), ((9,), 96, 333, 1)])
def test_cpu_fp32_candidates_match_the_reference(fp32_candidates, with_bias, lead, m, n, k):
    """fp32 x, weight and bias on CPU through the rounded operands' bf16 GEMM: the fp64
    reference's top-k (ties within fp32 rounding aside), its values within fp32 rounding and its
    gradients."""
    x, weight, bias = _inputs(lead, m, n)
    _candidates_match_the_reference(fp32_candidates, x, weight, bias if with_bias else None, k, TOL[torch.float32])


def _fp32_crowd(B, m, n, crowd, seed=0):
    """fp32 tokens whose top latents are a crowd 2^-12 apart around 12: bf16 (a step of 2^-4
    there) rounds them to a few values, fp32 orders them (the fp64 reference has no ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m, generator=g)
    x[:, 0] = 1
    x[:, 1:] = x[0, 1:]
    weight = 0.1 * torch.randn(n, m, generator=g)
    base = torch.randn(m, generator=g)
    base[0] = 0
    ids = torch.randperm(n, generator=g)[:crowd]
    weight[ids] = base
    weight[ids, 0] = (torch.randperm(crowd, generator=g) + 1).float() * 2**-12
    bias = torch.zeros(n)
    bias[ids] = 12 - float(x[0].double() @ base.double())
    return x, weight, bias


@pytest.mark.parametrize("crowd,kks", [
    (30, [39, 39]),                  # 7 + 32 candidates hold the crowd: one probe, then a tile
    (60, [39, 71, 71]),              # the first probe fails, 7 + 64 hold it
    (200, [39, 71, 135, 263, 263]),  # three probes fail
])
def test_cpu_fp32_candidates_near_ties_bf16_cannot_order(fp32_candidates, crowd, kks):
    """A crowd of latents 2^-12 apart around 12 (where bf16 steps by 2^-4), every token alike:
    probes of 5 tokens fail while k + extra cannot hold the crowd, the extra doubles after each,
    and the first probe that passes sends the rest (12 tokens) in one tile. The failed probes'
    tokens take the fp32 GEMM. Either way the top-k is exactly the fp64 reference's."""
    B, m, n, k = 17 + 5 * (len(kks) - 2), 32, 1500, 7
    x, weight, bias = _fp32_crowd(B, m, n, crowd)
    acts, idx = topk_encode(x, weight, bias, k, backend="torch")
    ref_vals, ref_idx = _pre(x, weight, bias).topk(k, dim=1)
    assert torch.equal(idx, ref_idx)
    assert_close(acts, ref_vals.relu(), TOL[torch.float32], "top_acts")
    failed = 5 * (len(kks) - 2)
    want = [("bf16", 5, kk) for kk in kks[:-1]] + [("bf16", 12, kks[-1])]
    want += [("fp32", failed, None)] if failed else []
    assert fp32_candidates == want, fp32_candidates


def test_cpu_fp32_candidates_give_up_where_too_few_latents_a_candidate(fp32_candidates):
    """A crowd of 400: after probes with 39, 71, 135 and 263 candidates, 7 + 512 would pass
    n / FP32_CANDIDATES_MIN_RATIO = 375, so the rest of the call and every failed probe take the fp32 GEMM:
    the fp64 reference's top-k exactly."""
    B, m, n, k = 23, 32, 1500, 7
    x, weight, bias = _fp32_crowd(B, m, n, 400, seed=1)
    acts, idx = topk_encode(x, weight, bias, k, backend="torch")
    ref_vals, ref_idx = _pre(x, weight, bias).topk(k, dim=1)
    assert torch.equal(idx, ref_idx)
    assert_close(acts, ref_vals.relu(), TOL[torch.float32], "top_acts")
    assert fp32_candidates == [("bf16", 5, kk) for kk in (39, 71, 135, 263)] + [("fp32", B, None)], fp32_candidates


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cpu_fp32_candidates_non_finite_tokens_take_the_fp32_path(fp32_candidates, bad):
    """A token with a NaN or an infinite input fails the bound and goes through the fp32 GEMM,
    whose NaN order and tie rule it keeps: its ids and values are the fp32 path's, bit for bit;
    the others are the fp64 reference's."""
    x, weight, bias = _inputs((19,), 20, 500)
    x[13, 3] = bad
    acts, idx = topk_encode(x, weight, bias, 6, backend="torch")
    assert ("fp32", 1, None) in fp32_candidates, fp32_candidates
    want_vals, want_idx = te._blocked_forward(x, weight, bias, 6, torch.float32, fp32_gemm=True)
    assert torch.equal(idx[13], want_idx[13])
    torch.testing.assert_close(acts[13], want_vals[13].relu(), rtol=0, atol=0, equal_nan=True)
    others = torch.arange(19) != 13
    _, ref_acts, ref_idx = _reference(x[others], weight, bias, 6)
    assert_same_topk(idx[others], ref_idx, _pre(x[others], weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts[others], ref_acts, TOL[torch.float32], "top_acts")


def test_cpu_fp32_candidates_only_where_they_pay(fp32_candidates, monkeypatch):
    """Taken for fp32 x, weight and bias on CPU with enough tokens, m >= FP32_CANDIDATES_MIN_M,
    n >= FP32_CANDIDATES_MIN_RATIO * (k + extra), m n >= FP32_CANDIDATES_MIN_WORK * (k + extra), a
    weight within WHOLE_WIDEN_ELEMS (it is rounded to bf16 whole) and bf16 matrix units; not
    otherwise."""
    x, weight, bias = _inputs((9,), 16, 200)

    def taken(*args):
        fp32_candidates.clear()
        topk_encode(*args, backend="torch")
        return any(c[0] == "bf16" for c in fp32_candidates)

    assert taken(x, weight, bias, 3)                        # 4 * (3 + 32) <= 200
    assert taken(x, weight, None, 3)
    assert not taken(x, weight, bias, 19)                   # 4 * (19 + 32) > 200
    monkeypatch.setattr(te, "FP32_CANDIDATES_MIN_WORK", 16 * 200 // 35 + 1)
    assert not taken(x, weight, bias, 3)                    # 92 * (3 + 32) > 16 * 200
    monkeypatch.setattr(te, "FP32_CANDIDATES_MIN_WORK", 16 * 200 // 35)
    assert taken(x, weight, bias, 3)
    assert not taken(x[:7], weight, bias, 3)                # 7 tokens < 8
    monkeypatch.setattr(te, "FP32_CANDIDATES_MIN_M", 17)
    assert not taken(x, weight, bias, 3)                    # m = 16 < 17
    monkeypatch.setattr(te, "FP32_CANDIDATES_MIN_M", 16)
    assert taken(x, weight, bias, 3)
    assert not taken(x, weight, bias.bfloat16(), 3)         # a bias of another dtype
    assert not taken(x.double(), weight.double(), bias.double(), 3)
    monkeypatch.setattr(te, "WHOLE_WIDEN_ELEMS", 200 * 16 - 1)
    assert not taken(x, weight, bias, 3)
    monkeypatch.setattr(te, "WHOLE_WIDEN_ELEMS", 200 * 16)
    assert taken(x, weight, bias, 3)
    monkeypatch.setattr(te, "_bf16_matmul_units", lambda: False)
    assert not taken(x, weight, bias, 3)


def test_cpu_fp32_candidates_bound_covers_the_rounded_operands(fp32_candidates):
    """Rounding the operands to bf16 can hide the winner: x = (1 + 2^-10, 1) rounds to (1, 1), so
    latent A = (1, -1), exactly 2^-10, scores 0 in the bf16 GEMM, below 33 candidates: W = (2^-12,
    0) (exactly 2^-12 (1 + 2^-10)) and 32 at 2^-20. Without the operands' term in the bound, W
    would pass as the top 1 (its e is far above the smallest candidate's 2^-20); with it the
    probe fails, 1 + 64 candidates would pass n / 4 = 50, and every token takes the fp32 GEMM,
    which finds A."""
    n, B = 200, 8
    weight = torch.tensor([-1.0, -1.0]).repeat(n, 1)
    weight[0] = torch.tensor([1.0, -1.0])           # A
    weight[1] = torch.tensor([2.0**-12, 0.0])       # W
    weight[2:34] = torch.tensor([2.0**-20, 0.0])    # 32 fillers
    x = torch.tensor([1 + 2.0**-10, 1.0]).repeat(B, 1)
    acts, idx = topk_encode(x, weight, None, 1, backend="torch")
    assert torch.equal(idx, torch.zeros(B, 1, dtype=torch.int64))
    assert torch.equal(acts, torch.full((B, 1), 2.0**-10))
    assert fp32_candidates == [("bf16", 5, 33), ("fp32", B, None)], fp32_candidates


def test_cpu_fp32_candidates_at_the_default_floors(monkeypatch):
    """At the shipped floors (FP32_CANDIDATES_MIN_TOKENS tokens, m just above FP32_CANDIDATES_MIN_M,
    m n just above FP32_CANDIDATES_MIN_WORK * (k + extra)): the route is taken with its real probe chunk and
    tiles, and gives the fp64 reference's top-k and values."""
    monkeypatch.setattr(te, "_bf16_matmul_units", lambda: True)
    calls = []
    gemm = te._bf16_gemm_candidates
    monkeypatch.setattr(te, "_bf16_gemm_candidates", lambda x, *a: calls.append(x.shape[0]) or gemm(x, *a))
    k = 11
    B, m, n = te.FP32_CANDIDATES_MIN_TOKENS, te.FP32_CANDIDATES_MIN_M + 3, 13301
    assert te._fp32_candidates_fit(m, n, k + te._fp32_extra(k, m, n))
    assert not te._fp32_candidates_fit(m, n - 200, k + te._fp32_extra(k, m, n - 200))
    x, weight, bias = _inputs((B,), m, n)
    acts, idx = topk_encode(x, weight, bias, k, backend="torch")
    assert calls and calls[0] == te.FP32_CANDIDATES_CHUNK and sum(calls) >= B - te.FP32_CANDIDATES_CHUNK, calls
    _, ref_acts, ref_idx = _reference(x, weight, bias, k)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")


@pytest.mark.parametrize("scaled", ["x", "weight"])
def test_cpu_fp32_candidates_norms_that_underflow(fp32_candidates, scaled):
    """x or W scaled by 1e-25: fp32 sums of squares underflow and the norms would read 0, which
    would drop the operands' rounding from the bound, while the bf16 rounding of large cancelling
    products (W's first two columns, +-100..200) still reorders latents (a review found 224 of 512
    such tokens wrong). Norms below NORM_FLOOR send the tokens (a tiny x) or the call (a tiny W) to
    the fp32 GEMM: the fp64 reference's top-k."""
    g = torch.Generator().manual_seed(0)
    B, m, n, k = 40, 32, 2000, 8
    x = torch.randn(B, m, generator=g)
    x[:, :2] = 1
    big = 100 * (1 + torch.rand(n, generator=g))
    weight = 0.01 * torch.randn(n, m, generator=g)
    weight[:, 0], weight[:, 1] = big, -big + torch.randn(n, generator=g)
    if scaled == "x":
        x = x * 1e-25
    else:
        weight = weight * 1e-25
    acts, idx = topk_encode(x, weight, None, k, backend="torch")
    ref_vals, ref_idx = _pre(x, weight, None).topk(k, dim=1)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(acts.double(), ref_vals.relu(), rtol=1e-5, atol=0)
    assert fp32_candidates == [("fp32", B, None)], fp32_candidates


def test_cpu_fp32_candidates_subnormal_bias(fp32_candidates):
    """A bias of subnormals (multiples of 2^-133, where bf16 keeps a bit or two or flushes to zero)
    and x = 0: every bf16 value is 0 or 2^-133, so the candidates are arbitrary, and a relative
    bound would pass the wrong latent (a review found one). x's zero norm sends every token to the
    fp32 GEMM: latent 29, the largest bias. With x = 2^-30 the products dwarf the bias and the
    route's answer is the reference's too."""
    s = 2.0**-133
    B, m, n = 12, 8, 1500
    bias = torch.full((n,), 0.3 * s)
    bias[:30] = 1.2 * s
    bias[29] = 1.4 * s
    weight = torch.randn(n, m)
    for x in (torch.zeros(B, m), torch.full((B, m), 2.0**-30)):
        fp32_candidates.clear()
        acts, idx = topk_encode(x, weight, bias, 1, backend="torch")
        ref_vals, ref_idx = _pre(x, weight, bias).topk(1, dim=1)
        assert torch.equal(idx, ref_idx), (idx.flatten()[:4], ref_idx.flatten()[:4])
        torch.testing.assert_close(acts.double(), ref_vals.relu(), rtol=1e-5, atol=0)
        if not x.any():
            assert fp32_candidates == [("fp32", B, None)], fp32_candidates


def test_cpu_fp32_candidates_minus_inf_bias_masks(fp32_candidates):
    """A bias of -inf masks latents (1 in 10 here): they never win, and the bound still holds over
    the finite biases, so the tokens pass it instead of all falling back (a review measured 1.2x
    the fp32 path when -inf made the bias term infinite)."""
    x, weight, bias = _inputs((30,), 48, 900)
    bias[::10] = -float("inf")
    acts, idx = topk_encode(x, weight, bias, 5, backend="torch")
    assert all(c[0] == "bf16" for c in fp32_candidates), fp32_candidates
    _, ref_acts, ref_idx = _reference(x, weight, bias, 5)
    assert_same_topk(idx, ref_idx, _pre(x, weight, bias), TOL[torch.float32], "top_indices")
    assert_close(acts, ref_acts, TOL[torch.float32], "top_acts")
