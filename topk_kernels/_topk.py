"""Top-k machinery shared by the fused encoders (``topk_encode``, ``expander_encode``).

A fused encoder never writes the [B, n] pre-activations: each program computes one tile of them,
keeps its best ``K_PAD`` candidates in registers, and a second stage merges the candidates of all
programs into the final k per token. ``tl.topk`` returns values only, so a candidate travels as one
int64 *key* that packs the value and its latent id and whose signed integer order is the order we
want: larger value first, and on equal values the lower latent id first. Sorting keys therefore
breaks ties deterministically, the same way on every backend.

Key layout (int64)::

    bits 63..32: the fp32 value's bits, made order-preserving as a signed int32
                 (negative floats get their 31 magnitude bits flipped; -0.0 is folded into +0.0)
    bits 31..0 : 0xFFFFFFFF - latent_id   (unsigned; a lower id gives a larger key)

Every NaN (either sign bit) is first replaced by the canonical +NaN 0x7FC00000, whose key is
above +inf's: that is the package's one NaN order (documented in :mod:`topk_kernels._common`), and
it keeps a sign-bit NaN such as ``+inf - inf`` on x86 from sinking below the ``-inf`` padding.
Latent ids must lie in [0, 2**31 - 1). ``MIN_KEY + slot`` (MIN_KEY = -2**63) marks an empty slot:
it is below every real key, including keys of real ``-inf`` values, so padding never wins over a
real entry.

Interface (stable; both encoders import it):

Triton device functions (call them from ``@triton.jit`` kernels):
  - ``ordered_bits(values) -> int32``: fp32 -> the high half of a key (order-preserving bits).
  - ``pack_key(bits, ids) -> int64``: ``ordered_bits`` and latent ids (broadcastable) -> keys.
  - ``empty_slots(BLOCK_B, K_PAD) -> [BLOCK_B, K_PAD]`` int64: the initial running candidates,
    the distinct keys ``MIN_KEY + slot`` (below every real key; stage 2 never selects them when
    k <= n).
  - ``fold_tile(running, pre, ids, valid) -> running``: the one call per tile of a fused
    encoder's inner loop. ``running`` holds K_PAD distinct keys per row in no particular order;
    ``pre`` is the fp32 [BLOCK_B, BLOCK_N] tile, ``ids`` its [BLOCK_N] latent ids, all above the
    ids already folded in, ``valid`` False for padded columns. Entries that beat a row's worst
    running key are inserted one per row per pass (best first, ties to the lower id); a tile
    where nothing enters costs one compare per entry. No sort: the static code is a few hundred
    instructions, and the run time follows the number of insertions, about
    K_PAD * (1 + ln(latents per program / K_PAD)) per row in all.

Host side (torch tensors on any device):
  - ``pack_keys_torch(values, ids)``, ``unpack_keys_torch(keys)``: the same packing on tensors
    (stage 2 unpacks on the host). An empty slot unpacks to (NaN, about 2**32): callers never
    select one when k <= n.
  - ``merge_candidates(keys, k, out_dtype=torch.float32, *, ascending=False) -> (top_acts,
    top_indices)``: stage 2. ``keys`` [B, C] int64 candidates (C >= k, at least k of them real
    per row, e.g. K_PAD per latent split); returns the k best per row sorted by descending
    pre-activation, ``top_acts`` = relu(value) as ``out_dtype`` [B, k], ``top_indices`` int64
    [B, k]. ``ascending=True``: rows already sorted ascending, so the last k keys are taken.
    No host sync.
  - ``blocked_topk(pre_block_fn, n, k, block, *, exact_keys=False) -> (values, indices)``: the
    CPU path's running top-k. ``pre_block_fn(start, stop)`` returns the pre-activations
    [B, stop - start] of latents [start, stop); the result is the k largest per row, values (raw,
    not ReLU'd) fp32 [B, k] sorted descending and indices int64 [B, k], ties to the lower latent
    id exactly as the kernels do. Extra memory O(B * (block + k)) beyond what ``pre_block_fn``
    allocates. ``exact_keys=True`` packs whole blocks into keys, which avoids the per-block host
    sync of the tie check (for CUDA tensors).
  - ``token_blocked_topk(pre_fn, B, n, k, block_n, block_b, *, exact_keys=False)``: the same,
    tiled over tokens too (``pre_fn(b0, b1, start, stop)`` -> [b1 - b0, stop - start]).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from ._common import HAS_TRITON

MIN_KEY_VALUE = -(2**63)
_LOW_MASK = 0xFFFFFFFF  # low 32 bits of a key: 0xFFFFFFFF - latent id
_MAGNITUDE = 0x7FFFFFFF  # the 31 non-sign bits of an fp32
_CANONICAL_NAN = 0x7FC00000  # every NaN ranks as this +NaN: above +inf

if HAS_TRITON:
    import triton
    import triton.language as tl

    MIN_KEY: tl.constexpr = tl.constexpr(MIN_KEY_VALUE)
    LOW_MASK: tl.constexpr = tl.constexpr(_LOW_MASK)
    CANONICAL_NAN: tl.constexpr = tl.constexpr(_CANONICAL_NAN)
    # A tile entry out of the running: below every real value's ordered bits (-inf's is -2**31 + 2**23 - 1).
    REMOVED: tl.constexpr = tl.constexpr(-(2**31))
    MAX_ID: tl.constexpr = tl.constexpr(2**31 - 1)

    @triton.jit
    def ordered_bits(values):
        """fp32 -> int32 whose signed order is the value order: -0.0 folded into +0.0 (they tie, as
        in torch.topk), every NaN made the canonical +NaN (above +inf), negative floats' magnitude
        bits flipped so that they order backwards as integers."""
        values = tl.where(values == 0.0, 0.0, values)
        bits = tl.where(values != values, CANONICAL_NAN, values.to(tl.int32, bitcast=True))
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def pack_key(bits, ids):
        """Keys from ``ordered_bits`` (high half) and latent ids (low half: 0xFFFFFFFF - id)."""
        return (bits.to(tl.int64) << 32) | (LOW_MASK - ids.to(tl.int64))

    @triton.jit
    def empty_slots(BLOCK_B: tl.constexpr, K_PAD: tl.constexpr):
        """[BLOCK_B, K_PAD] running candidates with no entry yet: the distinct keys MIN_KEY + slot,
        below every real key (their high half, INT32_MIN, is below the lowest real value's, -inf's)."""
        return tl.full((BLOCK_B, K_PAD), MIN_KEY, tl.int64) + tl.arange(0, K_PAD).to(tl.int64)[None, :]

    @triton.jit
    def fold_tile(running, pre, ids, valid):
        """Fold one tile of pre-activations into the running candidates; returns the new ones.

        running: [BLOCK_B, K_PAD] int64, each row K_PAD distinct keys in no particular order (from
        ``empty_slots`` or an earlier call). pre: [BLOCK_B, BLOCK_N] fp32. ids: [BLOCK_N] int32
        latent ids of the columns, all above every id already in ``running`` (tiles come in
        increasing id order, so an equal value never displaces an entry: its id is higher).
        valid: [BLOCK_N] bool, False for padded columns, which never enter.

        Selection by insertion: a tile entry can enter a row only if its value beats the row's
        worst running key, and after the first tiles few do. While any row has such an entry, each
        row moves its best one (ties to the lower id) into the slot of its worst key. So a tile
        costs one compare per entry when nothing enters, and one pass over the tile per entry
        inserted (at most BLOCK_N passes) otherwise: no sort, and little code.
        """
        bits = tl.where(valid[None, :], ordered_bits(pre), REMOVED)
        worst = tl.min(running, axis=1)
        bits = tl.where(bits > (worst >> 32).to(tl.int32)[:, None], bits, REMOVED)
        while tl.max(tl.max(bits, axis=1), axis=0) > REMOVED:
            best = tl.max(bits, axis=1)
            col = tl.min(tl.where(bits == best[:, None], ids[None, :], MAX_ID), axis=1)
            enters = best > REMOVED
            key = pack_key(best, col)
            running = tl.where((running == worst[:, None]) & enters[:, None], key[:, None], running)
            worst = tl.min(running, axis=1)
            # Drop the entry just inserted and every one that no longer beats the new worst key.
            keep = (bits > (worst >> 32).to(tl.int32)[:, None]) & (ids[None, :] != col[:, None])
            bits = tl.where(keep, bits, REMOVED)
        return running


# ---------------------------------------------------------------------------------------------
# Host side: the same packing on torch tensors, stage 2, and the CPU path's blocked top-k.
# ---------------------------------------------------------------------------------------------

def pack_keys_torch(values: Tensor, ids: Tensor) -> Tensor:
    """fp32 values and integer ids (broadcastable) -> int64 keys: ``ordered_bits`` in the high half,
    0xFFFFFFFF - id in the low half, as ``fold_tile`` builds them."""
    values = values.float()
    values = torch.where(values == 0, torch.zeros((), dtype=values.dtype, device=values.device), values)
    bits = torch.where(values.isnan(), _CANONICAL_NAN, values.view(torch.int32))
    bits = bits ^ ((bits >> 31) & _MAGNITUDE)
    return (bits.long() << 32) | (_LOW_MASK - ids.long())


def unpack_keys_torch(keys: Tensor) -> tuple[Tensor, Tensor]:
    """int64 keys -> (fp32 values, int64 ids): the inverse of ``pack_keys_torch`` (NaN comes back as +NaN)."""
    high = (keys >> 32).int()
    bits = high ^ ((high >> 31) & _MAGNITUDE)
    return bits.view(torch.float32), _LOW_MASK - (keys & _LOW_MASK)


def merge_candidates(keys: Tensor, k: int, out_dtype: torch.dtype = torch.float32, *,
                     ascending: bool = False) -> tuple[Tensor, Tensor]:
    """Stage 2: candidate keys [B, C] int64 -> (top_acts [B, k] out_dtype, top_indices [B, k] int64).

    Keys are unique per row (one per latent) except for ``MIN_KEY`` padding, so ``torch.topk``'s
    unspecified tie order never matters. Sorted by descending pre-activation; acts are ReLU'd.
    ``ascending=True`` says each row is already sorted ascending: its last k keys are taken, no
    ``torch.topk``.
    """
    if keys.shape[1] < k:
        raise ValueError(f"keys: expected at least k={k} candidates per row, got {keys.shape[1]}")
    top = keys[:, keys.shape[1] - k:].flip(1) if ascending else keys.topk(k, dim=1, sorted=True).values
    values, ids = unpack_keys_torch(top)
    return values.relu().to(out_dtype), ids


def _exact_topk(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of [R, C] values with their ids by (value desc, id asc), via packed keys."""
    top = pack_keys_torch(values, ids).topk(k, dim=1, sorted=True).values
    return unpack_keys_torch(top)


# The CPU path's per-row top-(k+1) goes through groups of PREFILTER_GROUP strided columns
# (``_grouped_topk``) on rows of PREFILTER_MIN_WIDTH or more whose groups outnumber k + 1 by
# PREFILTER_MIN_RATIO. Interleaved medians here (2 threads, ~4M entries a call, plain / grouped ms):
# w = 4608: k = 8 3.90 / 2.65, k = 32 7.64 / 6.29, k = 64 12.43 / 8.17, k = 128 21.00 / 11.88;
# w = 65536: k = 8 5.82 / 2.24, k = 64 7.74 / 4.27 (RESULTS.md, "CPU top-k through group maxima").
# The width floor was 4096 until the thirty-first session: at w = 2048 and k = 8 or 16 it had lost
# (0.89x, 0.92x), but measured again (1,000 Gaussian rows, medians of 9, grouped / plain, 1 and
# 2 threads) it won: w = 1024, k + 1 = 9: 0.89-0.99, 26: 0.54-0.57; w = 2048, 9: 0.88-0.97, 26:
# 0.66-0.73, 33: 0.41-0.42, 56: 0.54-0.56 (bf16 and fp32 alike). The group maxima themselves go the
# same way when wide enough: at w = 16384 their [R, 2048] top-56 had cost 13.7 ms a call, more
# than the [R, 16384] group maxima (6.8).
PREFILTER_GROUP = 8
PREFILTER_MIN_RATIO = 4
PREFILTER_MIN_WIDTH = 1024


def _grouped_topk(pre: Tensor, kk: int) -> tuple[Tensor, Tensor]:
    """The kk largest values of each [R, w] row as a multiset (what ``torch.topk(kk)`` returns, in no
    order) and the ids of entries holding them, through group maxima: column c < G * s is in group
    c mod G (s = PREFILTER_GROUP strided columns a group, so the group maxima are one vectorised max
    over s rows of length G), and only the kk groups with the largest maxima, plus the columns past
    G * s, are ranked. Exact: an entry outside those groups has kk group maxima at least as large
    (kk other entries), so it is beaten kk times over or ties the kk-th value, and the kept groups
    still hold kk entries of every value down to the kk-th (each kept maximum is one, or the kept
    groups are every group with an entry that large). Group maxima propagate NaN, which torch.topk
    ranks first, as it ranks NaN entries first. The groups are picked the same way where the group
    maxima are wide enough (``_unordered_topk``)."""
    R, w = pre.shape
    s = PREFILTER_GROUP
    G = w // s
    group_max = pre[:, :G * s].reshape(R, s, G).amax(dim=1)  # a view unless pre is column-strided
    groups = _unordered_topk(group_max, kk)[1]  # any kk groups of the kk largest maxima will do
    cols = (groups[:, None, :] + torch.arange(0, s * G, G, device=pre.device)[None, :, None]).view(R, s * kk)
    if G * s < w:
        cols = torch.cat([cols, torch.arange(G * s, w, device=pre.device).expand(R, w - G * s)], 1)
    vals, pos = pre.gather(1, cols).topk(kk, dim=1, sorted=False)
    return vals, cols.gather(1, pos)


def _unordered_topk(pre: Tensor, kk: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(kk, sorted=False)`` of [R, w] rows (values and ids within the rows), through
    ``_grouped_topk`` on rows long enough for its prefilter to pay (PREFILTER_*)."""
    w = pre.shape[1]
    if w >= PREFILTER_MIN_WIDTH and w // PREFILTER_GROUP >= PREFILTER_MIN_RATIO * kk:
        return _grouped_topk(pre, kk)
    return pre.topk(kk, dim=1, sorted=False)


def _topk_plus_one(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.topk(k + 1)`` of [R, w] rows (w > k + 1) and which rows to rank again: fp32 values,
    int64 ids within the rows, and a bool [R] mask. torch.topk breaks ties arbitrarily. Its
    top-(k+1) holds the exact top-k (ties to the lower id) unless the k-th and the (k+1)-th value
    tie, and then the smallest kept value appears at least twice: only such rare rows need packed
    keys. torch.topk ranks NaN above everything, so a selection holding fewer than k + 1 NaNs holds
    every NaN of its row, and the check runs on its other values. A selection of k + 1 NaNs is
    suspect: torch.topk picks arbitrary NaNs, the NaN order wants the lowest ids. (Every row was
    suspect once a NaN was selected: a weight with one NaN entry made each token re-rank its whole
    row through packed keys, 5.2x slower.) Checking costs O(R * k), not O(R * w). Long rows go
    through ``_grouped_topk`` (the same values; the check needs nothing else)."""
    vals, idx = _unordered_topk(pre, k + 1)
    nan = vals.isnan()
    low = vals.masked_fill(nan, float("inf")).min(dim=1, keepdim=True).values
    suspect = ((vals == low).sum(dim=1) > 1) | nan.all(dim=1)
    return vals.float(), idx, suspect


def _block_candidates(pre: Tensor, start: int, k: int, exact_keys: bool) -> tuple[Tensor, Tensor]:
    """Candidates of one [R, w] block that contain its exact top-min(k, w) (ties to the lower id);
    returns fp32 values and int64 global ids (offset by ``start``)."""
    w = pre.shape[1]

    def ids(rows: int) -> Tensor:
        return torch.arange(start, start + w, device=pre.device).expand(rows, w)

    if exact_keys:  # no host sync: for CUDA tensors
        return _exact_topk(pre, ids(pre.shape[0]), min(k, w))
    if pre.dtype == torch.float64:
        # Keys rank fp32-rounded values (the callers then return the winners' exact values), so the
        # tie check must see those too: on fp64 values, a winner by 1e-12 hid ties that rounding
        # makes (k = 1 picked an arbitrary one of them, not the lowest id).
        pre = pre.float()
    if w <= k + 1:
        return pre.float(), ids(pre.shape[0])
    vals, idx, tied = _topk_plus_one(pre, k)
    idx = idx + start
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        rv, ri = _exact_topk(pre[rows], ids(len(rows)), k + 1)
        vals[rows], idx[rows] = rv, ri
    return vals, idx


def blocked_topk(
    pre_block_fn: Callable[[int, int], Tensor], n: int, k: int, block: int, *, exact_keys: bool = False
) -> tuple[Tensor, Tensor]:
    """Running top-k over latents computed ``block`` at a time.

    Args:
        pre_block_fn: (start, stop) -> [B, stop - start] pre-activations of latents [start, stop).
        n: number of latents; k: 1 <= k <= n; block: latents per call.
        exact_keys: pack every block into keys before ``torch.topk`` (no host sync, for CUDA;
            two extra elementwise passes). Otherwise ``torch.topk`` on the values plus a cheap
            tie check, with one host sync per block (fine on CPU).

    Returns:
        values fp32 [B, k] (raw pre-activations, sorted descending), indices int64 [B, k];
        ties go to the lower latent id. Extra memory O(B * (block + k)).
    """
    run_vals = run_idx = None
    for start in range(0, n, block):
        stop = min(n, start + block)
        vals, idx = _block_candidates(pre_block_fn(start, stop), start, k, exact_keys)
        if run_vals is not None:
            vals, idx = torch.cat([run_vals, vals], 1), torch.cat([run_idx, idx], 1)
        run_vals, run_idx = _exact_topk(vals, idx, min(k, vals.shape[1]))
    return run_vals, run_idx


def token_blocked_topk(
    pre_fn: Callable[[int, int, int, int], Tensor], B: int, n: int, k: int, block_n: int, block_b: int,
    *, exact_keys: bool = False,
) -> tuple[Tensor, Tensor]:
    """``blocked_topk`` tiled over tokens as well: ``pre_fn(b0, b1, start, stop)`` returns the
    [b1 - b0, stop - start] pre-activations; returns values fp32 [B, k], indices int64 [B, k]."""
    parts = [
        blocked_topk(lambda s, e, b0=b0: pre_fn(b0, min(B, b0 + block_b), s, e), n, k, block_n,
                     exact_keys=exact_keys)
        for b0 in range(0, B, block_b)
    ]
    if not parts:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def cpu_tile(B: int, n: int, tile_elems: int, max_block_n: int, min_block_b: int) -> tuple[int, int]:
    """(tokens, latents) per CPU tile of an encoder: wide in latents (up to ``max_block_n``, since
    torch.topk is cheaper per element on long rows), at least ``min_block_b`` tokens, and about
    ``tile_elems`` pre-activations, which bounds the extra memory."""
    block_n = min(n, max_block_n)
    block_b = min(B, max(min_block_b, tile_elems // block_n))
    return max(1, block_b), block_n


def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (tests/gpu_compile.py substitutes an A100's or H100's count)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def tensor_core_generation(device: torch.device) -> int:
    """Compute capability major of a CUDA device (9: wgmma), 0 elsewhere (tests/gpu_compile.py
    substitutes the target's)."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0


# Per-SM limits when the device does not report them (H100's): registers, shared memory at the
# largest carveout, resident threads, resident CTAs; and the 1 KiB of shared memory reserved per CTA.
SM_LIMITS_DEFAULT = dict(regs=65536, smem=233472, threads=2048, ctas=32)
SMEM_RESERVED_PER_CTA = 1024


def ctas_per_sm(regs: int, shared: int, num_warps: int, limits: dict) -> int:
    """Resident CTAs per SM of a compiled kernel, limited by registers (allocated per warp in
    units of 256), shared memory (plus the reserve per CTA), threads and the CTA cap."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (limits["regs"] // regs_per_warp) // num_warps if regs_per_warp else limits["ctas"]
    by_smem = limits["smem"] // (shared + SMEM_RESERVED_PER_CTA)
    by_threads = limits["threads"] // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, limits["ctas"])


_RESIDENT: dict = {}

# Triton specialises an integer argument divisible by 16 (``tt.divisibility``; 1 becomes a constexpr).
ALIGN = 16


def candidate_buffer(rows: int, width: int, device: torch.device) -> Tensor:
    """An uninitialised int64 [rows, width] candidate buffer whose row stride is a multiple of
    ``ALIGN``: a kernel taking the stride as an argument then has the same specialisation at every
    split count, so ``resident_ctas``'s query (which passes ``ALIGN``) compiles the very build the
    launch runs, and the stores keep their vector width."""
    return torch.empty(rows, -(-width // ALIGN) * ALIGN, device=device, dtype=torch.int64)[:, :width]


def resident_ctas(kernel, device: torch.device, args: tuple, kwargs: dict) -> int | None:
    """CTAs per SM of ``kernel`` compiled for this launch (``kernel.warmup`` compiles without
    running; the real launch then hits Triton's cache), cached per device and launch options.
    None off CUDA, or when no compiled kernel comes back (tests/gpu_compile.py's recorder)."""
    if device.type != "cuda":
        return None
    key = (kernel, device.index, tuple(sorted(kwargs.items())), tuple(getattr(a, "dtype", None) for a in args))
    if key not in _RESIDENT:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        if compiled is None:
            return None
        # Triton loads the binary (and learns its register count from the driver) lazily.
        getattr(compiled, "_init_handles", lambda: None)()
        if getattr(compiled, "n_regs", None) is None:
            return None
        props = torch.cuda.get_device_properties(device)
        limits = dict(
            regs=getattr(props, "regs_per_multiprocessor", SM_LIMITS_DEFAULT["regs"]),
            smem=getattr(props, "shared_memory_per_multiprocessor", SM_LIMITS_DEFAULT["smem"]),
            threads=getattr(props, "max_threads_per_multi_processor", SM_LIMITS_DEFAULT["threads"]),
            ctas=SM_LIMITS_DEFAULT["ctas"],
        )
        # 0 would mean the kernel cannot launch at all, which Triton's launch reports by itself.
        _RESIDENT[key] = max(1, ctas_per_sm(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps,
                                            limits))
    return _RESIDENT[key]


@functools.lru_cache(maxsize=1024)
def _fewest_waves_splits(token_blocks: int, n_tiles: int, slots: int, overhead_tiles: float) -> int:
    best = None
    for per in sorted({-(-n_tiles // s) for s in range(1, n_tiles + 1)}):
        splits = -(-n_tiles // per)
        span = -(-token_blocks * splits // slots) * (per + overhead_tiles)
        if best is None or (span, splits) < best:
            best = (span, splits)
    return best[1]


def latent_splits(token_blocks: int, n_tiles: int, device: torch.device, ctas: int | None = None,
                  overhead_tiles: float = 0.0) -> int:
    """Latent splits per token block of a fused encoder grid.

    With the compiled kernel's resident CTAs per SM (``resident_ctas``), the split count is the
    one whose programs (token_blocks x splits, each ceil(n_tiles / splits) tiles plus a fixed
    ``overhead_tiles``: filling the empty candidate slots, in units of one tile's work) finish
    soonest on SMs x ctas slots, then the fewest splits (less for stage 2 to merge): the last
    wave is not mostly empty, and the grid does not pay the fixed cost more often than it must.
    Without it: enough programs to fill the GPU (4 per SM), each with >= 1 tile of latents. The
    interpreter runs programs one by one: a few splits still exercise stage 2."""
    if device.type == "cuda" and ctas is not None:
        return _fewest_waves_splits(token_blocks, n_tiles, multiprocessor_count(device) * ctas, overhead_tiles)
    target = 4 * multiprocessor_count(device) if device.type == "cuda" else 4
    splits = max(1, min(n_tiles, -(-target // token_blocks)))
    per_split = -(-n_tiles // splits)
    return -(-n_tiles // per_split)
