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
Latent ids must lie in [0, 2**32 - 1). ``MIN_KEY`` (= -2**63) marks an empty slot: it is below
every real key, including keys of real ``-inf`` values, so padding never wins over a real entry.

Interface (stable; both encoders import it):

Triton device functions (call them from ``@triton.jit`` kernels):
  - ``pack_keys(values, ids) -> keys``: fp32 tensor and integer ids of broadcastable shapes ->
    int64 keys.
  - ``empty_keys(BLOCK_B, K_PAD) -> [BLOCK_B, K_PAD]`` int64 filled with ``MIN_KEY``: the initial
    running candidates.
  - ``tile_topk_keys(pre, ids, K_PAD) -> [BLOCK_B, K_PAD]`` int64 keys, sorted descending.
    ``pre`` is the fp32 [BLOCK_B, BLOCK_N] tile with invalid entries already set to ``-inf``
    and ``ids`` its [BLOCK_N] global latent ids; padded columns must carry ids >= n (for
    example ``offs_n`` itself), so a padded ``-inf`` loses against a real ``-inf``. Needs
    ``K_PAD <= BLOCK_N``, both powers of two. K_PAD = 1 takes one int64 max of the keys
    instead of the bitonic network.
  - ``merge_topk_keys(running, new) -> [BLOCK_B, K_PAD]``: the K_PAD largest keys of the union of
    two [BLOCK_B, K_PAD] key tiles, each sorted descending; the result is sorted descending.
    (Max against the reversed tile keeps the top half of a bitonic merge, then one bitonic merge
    sorts it: log2(K_PAD) compare-and-swap rounds instead of a full sort of 2*K_PAD keys.)
  - ``update_topk_keys(running, pre, ids, K_PAD)`` = ``merge_topk_keys(running,
    tile_topk_keys(pre, ids, K_PAD))``: the one call per tile of a fused encoder's inner loop.

Host side (torch tensors on any device):
  - ``pack_keys_torch(values, ids)``, ``unpack_keys_torch(keys)``: the same packing on tensors
    (stage 2 unpacks on the host). ``MIN_KEY`` unpacks to (NaN, 2**32 - 1): callers never select
    it when k <= n.
  - ``merge_candidates(keys, k, out_dtype=torch.float32) -> (top_acts, top_indices)``: stage 2.
    ``keys`` [B, C] int64 candidates (C >= k, at least k of them real per row, e.g. K_PAD per
    latent split); returns the k best per row sorted by descending pre-activation, ``top_acts``
    = relu(value) as ``out_dtype`` [B, k], ``top_indices`` int64 [B, k].
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

    @triton.jit
    def pack_keys(values, ids):
        """fp32 values and integer latent ids (broadcastable) -> int64 keys, larger = better."""
        values = tl.where(values == 0.0, 0.0, values)  # -0.0 and +0.0 must tie, as in torch.topk
        bits = tl.where(values != values, CANONICAL_NAN, values.to(tl.int32, bitcast=True))
        # Negative floats order backwards as integers: flipping their magnitude bits fixes that.
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        low = LOW_MASK - ids.to(tl.int64)
        return (bits.to(tl.int64) << 32) | low

    @triton.jit
    def empty_keys(BLOCK_B: tl.constexpr, K_PAD: tl.constexpr):
        """[BLOCK_B, K_PAD] empty running candidates (every slot MIN_KEY)."""
        return tl.full((BLOCK_B, K_PAD), MIN_KEY, tl.int64)

    @triton.jit
    def tile_topk_keys(pre, ids, K_PAD: tl.constexpr):
        """pre [BLOCK_B, BLOCK_N] fp32 (invalid = -inf), ids [BLOCK_N] -> top K_PAD keys per row,
        sorted descending."""
        tl.static_assert(K_PAD <= pre.shape[1], "tile_topk_keys needs K_PAD <= BLOCK_N")
        keys = pack_keys(pre, ids[None, :])
        if K_PAD == 1:
            # The max of the keys: a float max + argmin would lose NaNs (NaN == NaN is false).
            return tl.max(keys, axis=1)[:, None]
        return tl.topk(keys, K_PAD, dim=1)

    @triton.jit
    def merge_topk_keys(running, new):
        """Two [BLOCK_B, K_PAD] key tiles sorted descending -> the K_PAD largest of their union,
        sorted descending."""
        # running[i] vs new[K_PAD-1-i]: the larger of each pair is exactly the top K_PAD of the
        # union, and the sequence is bitonic, so one bitonic merge sorts it.
        if running.shape[1] == 1:
            return tl.maximum(running, new)
        both = tl.maximum(running, tl.flip(new, 1))
        return tl.bitonic_merge(both, 1, True)

    @triton.jit
    def update_topk_keys(running, pre, ids, K_PAD: tl.constexpr):
        """Fold one pre-activation tile into the running candidates (see tile_topk_keys)."""
        return merge_topk_keys(running, tile_topk_keys(pre, ids, K_PAD))


# ---------------------------------------------------------------------------------------------
# Host side: the same packing on torch tensors, stage 2, and the CPU path's blocked top-k.
# ---------------------------------------------------------------------------------------------

def pack_keys_torch(values: Tensor, ids: Tensor) -> Tensor:
    """fp32 values and integer ids (broadcastable) -> int64 keys, identical to ``pack_keys``."""
    values = values.float()
    values = torch.where(values == 0, torch.zeros((), dtype=values.dtype, device=values.device), values)
    bits = torch.where(values.isnan(), _CANONICAL_NAN, values.view(torch.int32))
    bits = bits ^ ((bits >> 31) & _MAGNITUDE)
    return (bits.long() << 32) | (_LOW_MASK - ids.long())


def unpack_keys_torch(keys: Tensor) -> tuple[Tensor, Tensor]:
    """int64 keys -> (fp32 values, int64 ids): the inverse of ``pack_keys`` (NaN comes back as +NaN)."""
    high = (keys >> 32).int()
    bits = high ^ ((high >> 31) & _MAGNITUDE)
    return bits.view(torch.float32), _LOW_MASK - (keys & _LOW_MASK)


def merge_candidates(keys: Tensor, k: int, out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Stage 2: candidate keys [B, C] int64 -> (top_acts [B, k] out_dtype, top_indices [B, k] int64).

    Keys are unique per row (one per latent) except for ``MIN_KEY`` padding, so ``torch.topk``'s
    unspecified tie order never matters. Sorted by descending pre-activation; acts are ReLU'd.
    """
    if keys.shape[1] < k:
        raise ValueError(f"keys: expected at least k={k} candidates per row, got {keys.shape[1]}")
    values, ids = unpack_keys_torch(keys.topk(k, dim=1, sorted=True).values)
    return values.relu().to(out_dtype), ids


def _exact_topk(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of [R, C] values with their ids by (value desc, id asc), via packed keys."""
    top = pack_keys_torch(values, ids).topk(k, dim=1, sorted=True).values
    return unpack_keys_torch(top)


def _block_candidates(pre: Tensor, start: int, k: int, exact_keys: bool) -> tuple[Tensor, Tensor]:
    """Candidates of one [R, w] block that contain its exact top-min(k, w) (ties to the lower id);
    returns fp32 values and int64 global ids (offset by ``start``)."""
    w = pre.shape[1]

    def ids(rows: int) -> Tensor:
        return torch.arange(start, start + w, device=pre.device).expand(rows, w)

    if exact_keys:  # no host sync: for CUDA tensors
        return _exact_topk(pre, ids(pre.shape[0]), min(k, w))
    if w <= k + 1:
        return pre.float(), ids(pre.shape[0])
    # torch.topk breaks ties arbitrarily. Its top-(k+1) holds the exact top-k unless the k-th and
    # the (k+1)-th value tie, and then the smallest kept value appears at least twice; only such
    # rare rows are redone with packed keys. Checking costs O(R * k), not O(R * w).
    # A NaN among them (NaN == NaN is false) makes the row suspect too: torch.topk picks arbitrary
    # NaNs, the NaN order wants the lowest ids.
    vals, idx = pre.topk(k + 1, dim=1, sorted=False)
    low = vals.min(dim=1, keepdim=True).values  # NaN when any selected value is NaN
    tied = ((vals == low).sum(dim=1) > 1) | low.squeeze(1).isnan()
    vals, idx = vals.float(), idx + start
    any_tied = bool(tied.any())
    if any_tied:
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


def latent_splits(token_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Latent splits per token block of a fused encoder grid: enough programs to fill the GPU,
    each with >= 1 tile of latents."""
    if device.type == "cuda":
        target = 4 * multiprocessor_count(device)
    else:  # the interpreter runs programs one by one: a few splits still exercise stage 2
        target = 4
    splits = max(1, min(n_tiles, -(-target // token_blocks)))
    per_split = -(-n_tiles // splits)
    return -(-n_tiles // per_split)
