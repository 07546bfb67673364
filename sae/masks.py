"""Random expander masks: which d of the m model coordinates each latent's decoder atom may use.

An Expander SAE fixes, before training, a left-d-regular bipartite graph between the n latents
and the m model coordinates: latent j writes only to the d rows ``rows[j]``. ``expander_mask``
draws that graph; ``mask_diagnostics`` measures it (row degrees, largest overlap between two
latents, expansion of random latent sets).

How the graph is drawn, fully vectorised (n = 2^20, m = 2048, d = 7 takes under 2 s on one CPU core):

1. Lay the n*d slots out as consecutive random permutations of the m rows, then cut them into
   n groups of d. Every full permutation adds one to every row's degree and the last partial one
   adds one to a random subset, so degrees differ by at most one and every row is used when
   n*d >= m.
2. A group of d <= m consecutive slots spans at most two permutations, so it can repeat a row
   only where it straddles a boundary: few latents at small d. Those are repaired by swapping a
   repeated entry with an entry of another latent where neither side then repeats; a swap moves
   entries between latents and so leaves every row's degree unchanged. Many swaps run per round,
   but one per latent, so a latent that repeats r rows takes about 2r rounds. At large d that adds
   up: when d does not divide m about d/m of the latents straddle, each repeating about
   a * b / m rows (a + b = d), and a round costs O(d) per swap (binary searches of the sorted
   rows, one entry moved into place). Measured on one core here: m = 2048, n = 65536 takes 8.7 s
   at d = 500 and 118 s at d = 1000 (~400 rounds; 36 s and over 11 minutes before the rounds were
   made O(d), with the same graphs); m = 576, n = 36864, d = 100: 0.4 s; d dividing m: no repairs.
3. When d > m/2 the latents' complements (the m - d rows a latent does *not* use) are the sparser
   graph: they are drawn the same way and inverted, which keeps repairs easy near d = m.

Latent order is shuffled (so neighbouring ids are not structurally related) and rows are sorted
within each latent (ascending rows give the kernels a little memory locality).
"""

from __future__ import annotations

import functools
import numbers

import torch

# Candidate swap partners tried per repeated entry per repair round.
_CANDIDATES = 16
_MAX_ROUNDS = 10_000


def _on_cpu(fn):
    """Run ``fn`` with CPU as the default device: its seeded draws come from a CPU generator, so
    they are the same on every machine, also when called under ``with torch.device("cuda")``.
    (Every float draw also names dtype=torch.float32: torch's default dtype changes what a seed
    draws, and so, before, the graph under ``torch.set_default_dtype(torch.float64)``.)"""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.device("cpu"):
            return fn(*args, **kwargs)
    return wrapper


def _check_int(name: str, value, lo: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name}: expected {name} >= {lo}, got {value}")
    return int(value)


def _check_seed(seed) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:  # what a torch.Generator's seed holds
        raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {seed}")
    return int(seed)


@_on_cpu
def expander_mask(m: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Draw the support rows of a random left-d-regular bipartite graph.

    Args:
        m: number of model coordinates (right vertices).
        n: number of latents (left vertices).
        d: degree: rows per latent, 1 <= d <= m.
        seed: the graph is a deterministic function of (m, n, d, seed).

    Returns:
        LongTensor [n, d] (on CPU): ``rows[j]`` holds d distinct rows in [0, m), sorted ascending.
        Every row of [0, m) appears, and row degrees differ by at most one.
    """
    m = _check_int("m", m, 1)
    n = _check_int("n", n, 1)
    d = _check_int("d", d, 1)
    seed = _check_seed(seed)
    if d > m:
        raise ValueError(f"d: expected d <= m={m} (a latent's rows must be distinct), got d={d}")
    if n * d < m:
        raise ValueError(
            f"n, d: expected n * d >= m so that every one of the m={m} rows is used, "
            f"got n * d = {n} * {d} = {n * d}"
        )
    gen = torch.Generator().manual_seed(seed)
    if d == m:
        return torch.arange(m).expand(n, m).clone()
    if 2 * d > m:
        # Complement degrees are n - degree, so they are balanced too; every row keeps degree >= 1
        # because the complement's largest degree ceil(n (m-d) / m) is < n when n*d >= m.
        missing = _balanced_rows(m, n, m - d, gen)
        keep = torch.ones(n, m, dtype=torch.bool)
        keep.scatter_(1, missing, False)
        return keep.nonzero()[:, 1].view(n, d)
    return _balanced_rows(m, n, d, gen)


def _balanced_rows(m: int, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """[n, d] distinct sorted rows per latent, row degrees within one of each other (d <= m/2 or
    n*d <= m; the caller guarantees it)."""
    total = n * d
    n_perm = -(-total // m)
    # Row-wise argsort of uniform noise: n_perm independent random permutations in one call.
    slots = torch.rand(n_perm, m, generator=gen, dtype=torch.float32).argsort(dim=1).view(-1)[:total]
    rows = slots.view(n, d)[torch.randperm(n, generator=gen)]
    rows = rows.sort(dim=1).values
    return _repair_duplicates(rows, gen)


def _repair_duplicates(rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Make each latent's rows distinct by degree-preserving swaps; ``rows`` sorted per latent.

    A round costs O(swaps * d) memory traffic plus a binary search per candidate. It used to
    compare every candidate with all d rows of its latent and re-sort each swapped latent: at
    m = 2048, n = 65,536, d = 1000 (~400 rounds) that took over 11 minutes. The draws, the
    choices and so the graph are unchanged (tests/test_masks.py pins graphs drawn before).
    """
    n, d = rows.shape
    if d == 1:
        return rows
    if int(rows.max()) < 2**31:  # m < 2^31 (always, in practice): int32 halves the rounds' traffic
        rows = rows.int()
    # repeats[j]: how many of latent j's d entries repeat an earlier one (adjacent equal pairs).
    repeats = (rows[:, 1:] == rows[:, :-1]).sum(dim=1)
    bad = repeats.nonzero().squeeze(1)
    for _ in range(_MAX_ROUNDS):
        if bad.numel() == 0:
            return rows.long()
        # A random half of the bad latents are repaired this round; the rest (and all clean
        # latents) may serve as partners, so the repair never waits on a clean latent existing.
        targets = bad[torch.rand(bad.numel(), generator=gen, dtype=torch.float32) < 0.5]
        if targets.numel() == 0:
            continue
        held = rows.index_select(0, targets)
        pos = (held[:, 1:] == held[:, :-1]).int().argmax(dim=1) + 1  # 2nd copy of the 1st repeat
        v = held.gather(1, pos[:, None]).squeeze(1)
        t_count = targets.numel()
        partner = torch.randint(0, n, (t_count, _CANDIDATES), generator=gen)
        slot = torch.randint(0, d, (t_count, _CANDIDATES), generator=gen)
        w = rows.view(-1)[partner * d + slot]
        # Swap v (repeated in the target) with w (in the partner): the target then repeats one
        # row less iff w is new to it; the partner repeats no more iff v is new to it.
        ok = ~torch.isin(partner, targets)
        ok &= ~_sorted_holds(held, w)
        ok &= ~_row_holds(rows, partner, v[:, None].expand_as(partner))
        found = ok.any(dim=1)
        choice = ok.int().argmax(dim=1)
        targets, pos, v = targets[found], pos[found], v[found]
        partner = partner[found, choice[found]]
        slot = slot[found, choice[found]]
        w = w[found, choice[found]]
        # A latent may take part in one swap per round: keep the first target per partner.
        order = torch.argsort(partner, stable=True)
        first = torch.ones(order.numel(), dtype=torch.bool)
        first[1:] = partner[order][1:] != partner[order][:-1]
        keep = order[first]
        targets, pos, v, partner, slot, w = (t[keep] for t in (targets, pos, v, partner, slot, w))
        # The target loses one copy of v (a repeat); the partner loses w, a repeat iff w was there
        # twice. Neither gains one (v is new to the partner, w to the target), so a latent that
        # was clean stays clean and only ``bad`` needs watching.
        touched = torch.cat([targets, partner])
        before = rows.index_select(0, touched)
        repeats[partner] -= _holds_twice(before[targets.numel():], slot)
        repeats[targets] -= 1
        after = _replace_sorted(before, torch.cat([pos, slot]), torch.cat([w, v]))
        rows.index_copy_(0, touched, after)
        bad = bad[repeats[bad] > 0]
    raise RuntimeError(
        f"expander_mask: could not make every latent's rows distinct after {_MAX_ROUNDS} repair "
        f"rounds (n={n}, d={d}); try another seed"
    )


def _sorted_holds(rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[T, c] bool: whether sorted ``rows[i]`` [T, d] holds ``value[i, j]``."""
    at = torch.searchsorted(rows, value).clamp_(max=rows.shape[1] - 1)
    return rows.gather(1, at) == value


def _row_holds(rows: torch.Tensor, latent: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Whether sorted ``rows[latent]`` holds ``value`` (same shapes): a binary search of each
    latent's row in place, log2(d) gathers of one entry, where gathering the rows would move d."""
    d = rows.shape[1]
    flat = rows.view(-1)
    start = latent * d
    lo, width = torch.zeros_like(latent), d
    while width > 1:  # branchless lower bound: the first entry >= value is at lo or lo + 1
        half = width // 2
        lo += (flat[start + lo + half] < value).long() * half
        width -= half
    lo += (flat[start + lo] < value).long()
    return flat[start + lo.clamp_(max=d - 1)] == value


def _holds_twice(rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """1 where sorted ``rows[i]`` holds ``rows[i, slot[i]]`` at a neighbouring slot too, else 0."""
    d = rows.shape[1]
    at = rows.gather(1, slot[:, None])
    left = rows.gather(1, (slot - 1).clamp_(min=0)[:, None])
    right = rows.gather(1, (slot + 1).clamp_(max=d - 1)[:, None])
    twice = ((slot > 0)[:, None] & (left == at)) | ((slot < d - 1)[:, None] & (right == at))
    return twice.squeeze(1).long()


def _replace_sorted(rows: torch.Tensor, slot: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Sorted ``rows`` [T, d] with ``rows[i, slot[i]]`` replaced by ``value[i]``, sorted again: the
    entries between the old slot and the new value's place move by one (O(d), not a sort)."""
    d = rows.shape[1]
    old = rows.gather(1, slot[:, None])
    # The new place among the other d - 1 entries: how many of them are smaller.
    place = torch.searchsorted(rows, value[:, None]) - (old < value[:, None]).long()
    i = torch.arange(d, dtype=torch.int32)[None, :]
    out = rows.clone()
    # Moving up (slot < place): entries slot+1..place move one left. Down: place..slot-1 one right.
    up = (i >= slot[:, None]) & (i < place)
    out[:, :-1] = torch.where(up[:, :-1], rows[:, 1:], rows[:, :-1])
    down = (i > place) & (i <= slot[:, None])
    out[:, 1:] = torch.where(down[:, 1:], rows[:, :-1], out[:, 1:])
    out.scatter_(1, place, value[:, None].to(out.dtype))
    return out


@_on_cpu
def mask_diagnostics(
    rows: torch.Tensor, m: int, k: int = 32, n_sets: int = 256, seed: int = 0,
    n_pairs: int = 200_000, exact_overlap_up_to: int = 4096,
) -> dict:
    """Measure an expander mask.

    Args:
        rows: [n, d] integer support rows in [0, m).
        m: number of model coordinates.
        k: size of the random latent sets S used for the expansion estimate (clipped to n).
        n_sets: how many random sets S.
        seed: seed of the sampling (sets and pairs).
        n_pairs: latent pairs sampled for the overlap estimate when n > exact_overlap_up_to.
        exact_overlap_up_to: up to this many latents, the largest overlap is computed exactly.

    Returns:
        dict with ``degree_min``, ``degree_max``, ``degree_spread`` (rows' degrees in the graph),
        ``max_overlap`` (largest |rows[i] & rows[j]| over latent pairs i != j; exact or over
        sampled pairs, see ``overlap_exact``), ``expansion_min`` and ``expansion_mean``
        (|N(S)| / (d |S|) over the random sets S; 1.0 means no two latents of S share a row).
    """
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise ValueError(f"rows: expected a 2-D [n, d] tensor, got {getattr(rows, 'shape', type(rows).__name__)}")
    if rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rows: expected an int64 (or int32) tensor, got dtype {rows.dtype}")
    m = _check_int("m", m, 1)
    k = _check_int("k", k, 1)
    n_sets = _check_int("n_sets", n_sets, 1)
    # n_pairs = 0 would sample no pair and report a largest overlap of 0 whatever the graph.
    n_pairs = _check_int("n_pairs", n_pairs, 1)
    exact_overlap_up_to = _check_int("exact_overlap_up_to", exact_overlap_up_to, 0)
    seed = _check_seed(seed)
    rows = rows.long().cpu()
    n, d = rows.shape
    if n == 0 or d == 0:
        raise ValueError(f"rows: expected a non-empty [n, d] tensor, got shape {tuple(rows.shape)}")
    if int(rows.min()) < 0 or int(rows.max()) >= m:
        raise IndexError(f"rows: expected every row in [0, m={m}), found {int(rows.min())}..{int(rows.max())}")
    gen = torch.Generator().manual_seed(seed)
    degree = torch.bincount(rows.reshape(-1), minlength=m)
    out = {
        "degree_min": int(degree.min()),
        "degree_max": int(degree.max()),
        "degree_spread": int(degree.max() - degree.min()),
    }

    # The sets are drawn first, so that they do not depend on whether the overlap is exact (the
    # sampled pairs, drawn after them, once shifted the sets with exact_overlap_up_to).
    k = min(k, n)
    sets = _random_sets(n, k, n_sets, gen)
    support = rows[sets].reshape(n_sets, k * d).sort(dim=1).values
    distinct = 1 + (support[:, 1:] != support[:, :-1]).sum(dim=1)
    expansion = distinct.double() / (d * k)
    expansion_min, expansion_mean = float(expansion.min()), float(expansion.mean())

    if n < 2:
        out["max_overlap"], out["overlap_exact"] = 0, True
    elif n <= exact_overlap_up_to:
        indicator = torch.zeros(n, m, dtype=torch.float32)  # overlaps exact up to 2^24, not bf16's 256
        indicator.scatter_(1, rows, 1.0)
        gram = indicator @ indicator.T
        gram.fill_diagonal_(-1.0)
        out["max_overlap"], out["overlap_exact"] = int(gram.max()), True
    else:
        i = torch.randint(0, n, (n_pairs,), generator=gen)
        j = (i + torch.randint(1, n, (n_pairs,), generator=gen)) % n  # j != i
        best = 0
        for lo in range(0, n_pairs, 65536):  # bounded [chunk, d, d] comparisons
            a, b = rows[i[lo:lo + 65536]], rows[j[lo:lo + 65536]]
            best = max(best, int((a[:, :, None] == b[:, None, :]).sum(dim=(1, 2)).max()))
        out["max_overlap"], out["overlap_exact"] = best, False

    out["expansion_min"], out["expansion_mean"] = expansion_min, expansion_mean
    return out


def _random_sets(n: int, k: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """[count, k] latent ids, distinct within each set."""
    if n * count <= 1 << 24:
        return torch.rand(count, n, generator=gen, dtype=torch.float32).argsort(dim=1)[:, :k]
    sets = torch.randint(0, n, (count, k), generator=gen)
    while True:  # redraw the (rare, since k << n) sets holding a repeated latent
        s = sets.sort(dim=1).values
        again = (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero().squeeze(1)
        if again.numel() == 0:
            return sets
        sets[again] = torch.randint(0, n, (again.numel(), k), generator=gen)
