"""expander_mask: a left-d-regular bipartite graph with distinct rows per latent, every row used,
balanced row degrees, deterministic per seed, fast at SAE scale; mask_diagnostics measures it."""

import hashlib
import time

import pytest
import torch

from sae.masks import (_repair_duplicates, _replace_sorted, _row_holds, _sorted_holds, expander_mask,
                       mask_diagnostics)

SIZES = [  # (m, n, d)
    (37, 101, 5),  # odd sizes, n*d not a multiple of m
    (37, 101, 18),  # d just under m/2: most latents straddle two permutations
    (37, 101, 30),  # d > m/2: drawn through the complement
    (37, 5, 37),  # d == m
    (36, 4, 9),  # n*d == m: a partition of the rows
    (100, 3, 34),  # n*d barely above m
    (2048, 3000, 7),
]


def _assert_valid(rows, m, n, d):
    assert rows.shape == (n, d) and rows.dtype == torch.int64
    assert int(rows.min()) >= 0 and int(rows.max()) < m
    # Sorted strictly ascending within each latent <=> distinct within each latent.
    assert (rows[:, 1:] > rows[:, :-1]).all(), "rows repeat (or are unsorted) within a latent"
    degree = torch.bincount(rows.reshape(-1), minlength=m)
    assert int(degree.min()) >= 1, "some row is used by no latent"
    assert int(degree.max() - degree.min()) <= 1, f"row degrees {int(degree.min())}..{int(degree.max())}"
    assert int(degree.sum()) == n * d


@pytest.mark.parametrize("m,n,d", SIZES)
def test_graph_is_left_regular_covering_and_balanced(m, n, d):
    _assert_valid(expander_mask(m, n, d, seed=3), m, n, d)


def test_every_small_configuration_and_seed():
    """Exhaustive over small m and every feasible d, at the smallest and a few larger n."""
    for m in range(1, 14):
        for d in range(1, m + 1):
            n_min = -(-m // d)
            for n in sorted({n_min, n_min + 1, 2 * n_min + 1, 23}):
                for seed in range(2):
                    _assert_valid(expander_mask(m, n, d, seed=seed), m, n, d)


def test_deterministic_per_seed_and_different_across_seeds():
    a = expander_mask(300, 1000, 7, seed=11)
    assert torch.equal(a, expander_mask(300, 1000, 7, seed=11))
    assert not torch.equal(a, expander_mask(300, 1000, 7, seed=12))


def test_does_not_touch_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    expander_mask(64, 200, 6, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_latent_supports_look_random():
    """Neighbouring latent ids are unrelated (the layout is shuffled) and no pair of latents shares
    much: at m=512, d=8, two random supports share 8*8/512 = 0.125 rows on average."""
    rows = expander_mask(512, 2000, 8, seed=0)
    stats = mask_diagnostics(rows, 512, k=16, n_sets=64)
    assert stats["overlap_exact"] and stats["max_overlap"] <= 4
    assert stats["expansion_mean"] > 0.85
    shared_neighbours = (rows[1:, :, None] == rows[:-1, None, :]).any(-1).any(-1).float().mean()
    assert 0.05 < shared_neighbours < 0.25  # ~0.12 expected; an unshuffled layout gives ~0.003


def test_sae_scale_is_fast():
    start = time.perf_counter()
    rows = expander_mask(2048, 1 << 20, 7, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"expander_mask(2048, 2**20, 7) took {elapsed:.1f} s"
    assert (rows[:, 1:] > rows[:, :-1]).all()
    degree = torch.bincount(rows.reshape(-1), minlength=2048)
    assert int(degree.min()) == int(degree.max()) == (1 << 20) * 7 // 2048


@pytest.mark.parametrize(
    "args,err,match",
    [
        ((10, 5, 11), ValueError, r"d: expected d <= m=10"),
        ((10, 5, 0), ValueError, r"d: expected d >= 1"),
        ((10, 3, 3), ValueError, r"n, d: expected n \* d >= m .* got n \* d = 3 \* 3 = 9"),
        ((0, 5, 1), ValueError, r"m: expected m >= 1"),
        ((10, 0, 1), ValueError, r"n: expected n >= 1"),
        ((10.0, 5, 2), TypeError, r"m: expected an int, got float"),
        ((10, 5, True), TypeError, r"d: expected an int, got bool"),
        ((10, 5, 2, "0"), TypeError, r"seed: expected an int, got str"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(args, err, match):
    with pytest.raises(err, match=match):
        expander_mask(*args)


def test_diagnostics_on_a_known_graph():
    # Latents 0 and 1 share rows {1, 2}; row 5 has degree 0, row 1 degree 3.
    rows = torch.tensor([[0, 1, 2], [1, 2, 3], [1, 4, 6]])
    stats = mask_diagnostics(rows, 7, k=3, n_sets=4)
    assert (stats["degree_min"], stats["degree_max"], stats["degree_spread"]) == (0, 3, 3)
    assert stats["max_overlap"] == 2 and stats["overlap_exact"]
    # S = all three latents: N(S) = {0, 1, 2, 3, 4, 6}, so 6 / 9.
    assert stats["expansion_min"] == pytest.approx(6 / 9)
    assert stats["expansion_mean"] == pytest.approx(6 / 9)


def test_diagnostics_sampled_overlap_matches_exact():
    # 30 latents have 435 pairs; 20000 sampled pairs miss any given one with probability e^-46.
    rows = expander_mask(40, 30, 6, seed=2)
    exact = mask_diagnostics(rows, 40)
    sampled = mask_diagnostics(rows, 40, exact_overlap_up_to=10, n_pairs=20_000)
    assert exact["overlap_exact"] and not sampled["overlap_exact"]
    assert sampled["max_overlap"] == exact["max_overlap"] >= 2
    brute = max(len(set(a.tolist()) & set(b.tolist())) for i, a in enumerate(rows) for b in rows[i + 1:])
    assert exact["max_overlap"] == brute


def test_diagnostics_rejects_rows_out_of_range():
    with pytest.raises(IndexError, match=r"rows: expected every row in \[0, m=4\)"):
        mask_diagnostics(torch.tensor([[0, 4]]), 4)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(n_pairs=0), ValueError, r"n_pairs: expected n_pairs >= 1, got 0"),
        (dict(n_pairs=-1), ValueError, r"n_pairs: expected n_pairs >= 1, got -1"),
        (dict(exact_overlap_up_to=-5), ValueError, r"exact_overlap_up_to: expected exact_overlap_up_to >= 0"),
        (dict(seed=1.7), TypeError, r"seed: expected an int, got float"),
        (dict(seed="a"), TypeError, r"seed: expected an int, got str"),
    ],
)
def test_diagnostics_bad_arguments_raise_naming_the_argument(kwargs, err, match):
    """n_pairs=0 once sampled no pair and reported a largest overlap of 0 for a graph whose exact
    one is 5; a float seed was truncated."""
    rows = expander_mask(40, 5000, 6, seed=2)
    assert mask_diagnostics(rows, 40, exact_overlap_up_to=5000)["max_overlap"] > 0
    with pytest.raises(err, match=match):
        mask_diagnostics(rows, 40, **kwargs)


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.bfloat16])
def test_graph_and_diagnostics_do_not_depend_on_the_default_dtype(default_dtype):
    """The graph is a function of (m, n, d, seed): its random draws once took torch's default dtype,
    so under torch.set_default_dtype(torch.float64) the same seed drew another graph."""
    sizes = [(37, 101, 5), (37, 101, 18), (37, 101, 30), (2048, 3000, 7)]
    want = [expander_mask(*size, seed=3) for size in sizes]
    rows = expander_mask(600, 40, 500, seed=0)  # overlaps above 256: not exact in a bf16 product
    stats = mask_diagnostics(rows, 600, k=8, n_sets=16)
    brute = max(len(set(a.tolist()) & set(b.tolist())) for i, a in enumerate(rows) for b in rows[i + 1:])
    assert stats["max_overlap"] == brute > 256
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        got = [expander_mask(*size, seed=3) for size in sizes]
        again = mask_diagnostics(rows, 600, k=8, n_sets=16)
    finally:
        torch.set_default_dtype(previous)
    for size, a, b in zip(sizes, want, got):
        assert torch.equal(a, b), f"expander_mask{size} changed with the default dtype {default_dtype}"
    assert again == stats


# sha256 (first 16 hex digits) of the int64 bytes of graphs drawn by the repair before 2026-11-24,
# which compared every candidate with a latent's d rows and re-sorted swapped latents (minutes at
# d = 1000). The faster repair must draw the same graphs: a published run is rebuilt from its seed.
PINNED_GRAPHS = [  # (m, n, d, seed), digest
    ((2048, 1024, 1000, 3), "e0120f8b23a8234b"),  # d does not divide m: ~half the latents repaired
    ((2048, 512, 700, 0), "298c7ec5398d9588"),
    ((300, 200, 151, 5), "d96c0b833d988ec1"),  # d > m/2: through the complement (d' = 149)
    ((576, 2000, 100, 1), "19f67069d0f61256"),
    ((97, 300, 13, 2), "f3d831317aafad63"),
]


@pytest.mark.parametrize("size,digest", PINNED_GRAPHS)
def test_graph_is_the_one_drawn_before_from_the_same_seed(size, digest):
    rows = expander_mask(*size)
    _assert_valid(rows, *size[:3])
    assert hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16] == digest


@pytest.mark.parametrize("d", [1, 2, 3, 16, 17, 255, 1000])
def test_repair_helpers_match_brute_force(d):
    """The repair's sorted-row searches and its one-entry re-sort against comparisons and sorts,
    on rows with many repeats (values 0..49) and probes outside the rows' range."""
    g = torch.Generator().manual_seed(d)
    rows = torch.randint(0, 50, (40, d), generator=g).sort(dim=1).values.int()
    latent = torch.randint(0, 40, (300,), generator=g)
    value = torch.randint(-2, 53, (300,), generator=g).int()
    assert torch.equal(_row_holds(rows, latent, value), (rows[latent] == value[:, None]).any(dim=1))
    probes = torch.randint(-2, 53, (40, 7), generator=g).int()
    assert torch.equal(_sorted_holds(rows, probes), (rows[:, None, :] == probes[..., None]).any(dim=-1))
    slot = torch.randint(0, d, (40,), generator=g)
    new = torch.randint(0, 50, (40,), generator=g).int()
    replaced = rows.clone()
    replaced[torch.arange(40), slot] = new
    assert torch.equal(_replace_sorted(rows, slot, new), replaced.sort(dim=1).values)


def test_expansion_estimate_does_not_depend_on_how_the_overlap_is_found():
    """The sampled overlap's pairs once drew from the same generator before the expansion's sets,
    so exact_overlap_up_to changed the expansion estimate of the same graph and seed."""
    rows = expander_mask(64, 500, 6, seed=4)
    exact = mask_diagnostics(rows, 64, k=16, n_sets=32, seed=9, exact_overlap_up_to=10_000)
    sampled = mask_diagnostics(rows, 64, k=16, n_sets=32, seed=9, exact_overlap_up_to=0, n_pairs=5000)
    assert exact["overlap_exact"] and not sampled["overlap_exact"]
    assert (exact["expansion_min"], exact["expansion_mean"]) == (sampled["expansion_min"], sampled["expansion_mean"])
    assert sampled["max_overlap"] <= exact["max_overlap"]


def test_repair_of_rows_past_int32_is_the_repair_of_the_same_rows_shifted_down():
    """The repair only compares rows, so shifting every row by a constant shifts its result: rows
    near 2^31 (an m past int32, where the repair must not take its int32 shortcut) repair as rows
    near 0 do. Built as expander_mask lays them out: consecutive permutations cut into latents."""
    m, n, d = 10, 40, 4
    g = torch.Generator().manual_seed(0)
    slots = torch.rand(n * d // m, m, generator=g).argsort(dim=1).view(n, d)
    small = slots.sort(dim=1).values
    assert (small[:, 1:] == small[:, :-1]).any(), "no latent to repair: the test would prove nothing"
    base = 2**31 - 5  # half the rows cross 2^31
    want = _repair_duplicates(small.clone(), torch.Generator().manual_seed(1)) + base
    got = _repair_duplicates(small + base, torch.Generator().manual_seed(1))
    assert got.dtype == torch.int64 and torch.equal(got, want)
    _assert_valid(want - base, m, n, d)


def test_diagnostics_refuse_bad_rows_and_take_int32_rows():
    rows = expander_mask(40, 30, 6, seed=2)
    with pytest.raises(TypeError, match=r"^rows: expected an int64 \(or int32\) tensor, got dtype torch.float32"):
        mask_diagnostics(rows.float(), 40)
    with pytest.raises(IndexError, match=r"^rows: expected every row in \[0, m=40\), found -1\.\.39"):
        mask_diagnostics(torch.cat([rows, torch.tensor([[-1, 1, 2, 3, 4, 5]])]), 40)
    with pytest.raises(ValueError, match=r"^rows: expected a non-empty \[n, d\] tensor, got shape \(30, 0\)"):
        mask_diagnostics(rows[:, :0], 40)
    assert mask_diagnostics(rows.int(), 40) == mask_diagnostics(rows, 40)


def test_diagnostics_overlap_is_exact_up_to_and_including_the_bound_and_0_for_one_latent():
    """exact_overlap_up_to: "up to this many latents", so n == exact_overlap_up_to is exact; a graph
    of one latent has no pair (largest overlap 0) however the overlap would be found."""
    rows = expander_mask(40, 30, 6, seed=2)
    brute = max(len(set(a.tolist()) & set(b.tolist())) for i, a in enumerate(rows) for b in rows[i + 1:])
    stats = mask_diagnostics(rows, 40, exact_overlap_up_to=30)
    assert stats["overlap_exact"] and stats["max_overlap"] == brute
    one = expander_mask(6, 1, 6)
    for bound in (0, 1):
        stats = mask_diagnostics(one, 6, exact_overlap_up_to=bound)
        assert (stats["max_overlap"], stats["overlap_exact"]) == (0, True)
