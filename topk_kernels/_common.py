"""What every op shares: backend choice, argument checks, the ops' registration (``define_op``:
a ``torch.library`` custom op whose plain eager calls skip the dispatcher), launch options, small
helpers.

One place decides which implementation runs: CUDA tensors go to the Triton kernels, CPU tensors to
the fast PyTorch path, and with ``TRITON_INTERPRET=1`` set before import, CPU tensors go to the
Triton kernels running in the interpreter (that is how the kernels are proven without a GPU).
Every op also accepts ``backend="triton" | "torch" | "reference"`` to force one. The names here
are public inside the package (the op modules import them); only ``check_float`` and
``check_expander_rows`` are re-exported by ``topk_kernels`` for modules built on the ops.

Environment (read where noted; nothing here is a mutable switch):

- ``TOPK_KERNELS_CPU_BACKEND`` (read at import): what ``backend=None`` picks for CPU tensors.
  Default ``"triton"`` under the interpreter, ``"torch"`` otherwise; ``"triton"`` without the
  interpreter is refused at the first call on such tensors, as ``backend="triton"`` is. The test suite sets
  ``"torch"`` so that only tests that force ``backend="triton"`` pay for the interpreter.
- ``TOPK_KERNELS_DEBUG=1`` (read at every launch): the kernels ``tl.device_assert`` their
  indices (see the index contract below), on CUDA and under the interpreter.

Index contract (every kernel that reads or writes through an index obeys it)
-----------------------------------------------------------------------------
An index is a latent id from ``top_indices`` (valid range ``[0, n)``) or a model coordinate from
``rows`` (valid range ``[0, m)``). The public ops check index values by default on every device
(on CUDA one host sync per call; ``check_indices=False`` / ``check_rows=False`` turn that off where
the ids come from a checked source, as in ``sae``'s models; while torch.compile traces, the CUDA
check is skipped, since a sync would break the graph). Unchecked on CUDA, the kernels are the last
line of defence, so:

1. A kernel masks every load and store that goes through an index with ``0 <= index < bound``.
   An entry with an index outside its range **contributes nothing**: it is never dereferenced, its
   gathered row reads as zero, its scatter is dropped, and an output slot that only it would have
   written (e.g. the gradient of its activation) is zero.
2. With ``TOPK_KERNELS_DEBUG=1`` the same kernels ``tl.device_assert`` that every live index is in
   range (a failed assertion is an error on CUDA; under the interpreter, Triton's
   ``InterpreterError`` wrapping the ``AssertionError``).
   Launch with ``**launch_options()`` to honour the switch.

NaN order (the one place it is defined; the Triton kernels, the PyTorch paths and
``topk_kernels.reference`` all follow it): the top-k ranks pre-activations by value, descending,
with **every NaN (either sign bit) above +inf**, and equal values (all NaNs equal each other, and
-0.0 equals +0.0) go to the lower latent id. ``top_acts`` at a NaN is NaN (ReLU keeps it), so a
broken input shows in the loss instead of being hidden. This is ``torch.sort(pre, descending=True,
stable=True)``'s order. In float64 (the PyTorch path) the order is that of the pre-activations
rounded to fp32, the precision of the packed keys, and ``top_acts`` are the winners' exact float64
values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
from typing import Optional

import torch
from torch import Tensor

try:  # Triton is optional: macOS / Windows users get the PyTorch paths only.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 allows 2^31 - 1)
# The Triton kernels hold latent ids as int32, with 2**31 - 1 kept for an id clamped past n
# (``_topk.MAX_ID``, ``_rowgrad``'s sort): more latents take the PyTorch path (int64 ids).
MAX_TRITON_LATENTS = 2**31 - 2

BACKENDS = ("triton", "torch", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_DEFAULT_CPU_BACKEND = os.environ.get(
    "TOPK_KERNELS_CPU_BACKEND", "triton" if (HAS_TRITON and INTERPRET) else "torch"
)
if _DEFAULT_CPU_BACKEND not in ("triton", "torch"):
    raise ValueError(f"TOPK_KERNELS_CPU_BACKEND: expected 'triton' or 'torch', got {_DEFAULT_CPU_BACKEND!r}")


def resolve_backend(backend: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None,
                    latents: Optional[tuple[str, int]] = None) -> str:
    """Return the backend that runs for tensors on ``device`` whose compute dtype is ``dtype``.

    ``None`` picks Triton on CUDA (or on CPU under the interpreter, unless
    ``TOPK_KERNELS_CPU_BACKEND`` says otherwise) and the PyTorch path otherwise; float64 always
    takes the PyTorch path, because the Triton kernels compute in fp32, and so does a dictionary of
    more than ``MAX_TRITON_LATENTS`` latents (``latents``: the argument that holds them and n).
    """
    too_many = latents is not None and latents[1] > MAX_TRITON_LATENTS
    if backend is None:
        if dtype == torch.float64 or too_many:
            return "torch"
        if device.type == "cuda" and HAS_TRITON:
            return "triton"
        if _DEFAULT_CPU_BACKEND == "triton" and not (HAS_TRITON and INTERPRET):
            # Asked for explicitly (the default is "torch" here): refused as backend="triton" is,
            # rather than silently running the PyTorch path the user meant to bypass.
            raise RuntimeError(
                f"TOPK_KERNELS_CPU_BACKEND=triton: {device.type} tensors need the Triton interpreter for it: "
                "set TRITON_INTERPRET=1 before importing topk_kernels, or unset TOPK_KERNELS_CPU_BACKEND"
                + ("" if HAS_TRITON else " (triton is not installed)")
            )
        return _DEFAULT_CPU_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected None or one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton': triton is not installed")
        if device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing topk_kernels"
            )
        if too_many:
            raise ValueError(f"{latents[0]}: expected at most {MAX_TRITON_LATENTS} latents for backend='triton' "
                             f"(its kernels hold latent ids as int32), got {latents[1]}; use backend='torch' or None")
        if dtype == torch.float64:
            raise TypeError(
                "backend='triton': expected float32/bfloat16/float16 inputs, got float64 (the kernels "
                "compute in fp32); use backend='torch' (float64 values, the top-k ranked by their fp32 rounding) "
                "or backend=None"
            )
    return backend


# ---------------------------------------------------------------------------------------------
# Argument checks: errors name the argument, what was expected and what came.
# ---------------------------------------------------------------------------------------------

def check_float(name: str, t: Tensor, min_dim: int = 1) -> None:
    """``t`` is a float32/bfloat16/float16/float64 tensor with at least ``min_dim`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES and t.dtype != torch.float64:
        raise TypeError(f"{name}: expected a float32/bfloat16/float16/float64 tensor, got dtype {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_matrix(name: str, t: Tensor, dims: str = "[n, m]") -> None:
    """A float 2-D tensor with no empty dimension (zero latents, model dimensions or degree have no
    defined top-k or atom, so every backend refuses them the same way)."""
    check_float(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor {dims}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty {dims} matrix (every size >= 1), got shape {tuple(t.shape)}")


def check_index_dtype(name: str, t: Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an int64 (or int32) tensor, got dtype {t.dtype}")


def check_indices(name: str, t: Tensor, upper: int, what: str = "n", every_device: bool = False) -> None:
    """Integer tensor with every entry in [0, upper).

    Values are checked on CPU tensors always, and on other devices only with ``every_device``
    (one ``aminmax`` and one host sync): the public decode ops do that by default, and callers
    whose ids come from their own encoder (``sae``'s models) pass ``check_indices=False`` to keep
    the sync out of the hot path. Unchecked, the kernels follow the index contract (an
    out-of-range entry contributes nothing; ``TOPK_KERNELS_DEBUG=1`` asserts).
    """
    check_index_dtype(name, t)
    if t.numel() == 0 or t.device.type == "meta" or (t.device.type != "cpu" and not every_device):
        return  # meta tensors hold no values: shapes only
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one device-to-host copy
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name}: expected every index in [0, {what}={upper}), found {bad}")


def check_decode_ids(top_indices: Tensor, n: int, backend: str, check: bool) -> None:
    """The decode ops' id check before their op (``check``: the ops' ``check_indices``). CPU ids
    are checked inside the op, which runs eagerly even under torch.compile. Elsewhere the check is
    a host sync: it runs when asked and not while torch.compile traces (the kernels' index contract
    then holds). Ids for ``backend="reference"``, which would fail on a bad one, are always checked."""
    on_host = top_indices.device.type == "cpu"
    if backend == "reference" or (check and not on_host and not torch.compiler.is_compiling()):
        check_indices("top_indices", top_indices, n, "n_latents", every_device=True)


def check_expander_rows(rows: Tensor, m: int, what: str = "m") -> None:
    """An expander graph's ``rows [n, d]``: integers in ``[0, m)``, distinct within each latent.

    Checks values on every device (on CUDA this syncs once, so a model checks its fixed ``rows``
    once, at construction or load, and then calls the ops with ``check_rows=False``). Repeated
    rows inside one latent are refused because the Triton decoder writes a latent's d entries in
    one step: a repeat would lose an update there.
    """
    check_index_dtype("rows", rows)
    # Public, so m may be a caller's own: a float or bool m was compared as it came (m=5.5 let row
    # 5 through; True read as 1), and a str or None failed inside the comparison, naming nothing.
    if not isinstance(m, numbers.Integral) or isinstance(m, bool):
        raise TypeError(f"m: expected an int, got {type(m).__name__}")
    if m < 1:
        raise ValueError(f"m: expected m >= 1, got {m}")
    if rows.dim() != 2:
        raise ValueError(f"rows: expected a 2-D tensor [n, d], got shape {tuple(rows.shape)}")
    if rows.numel() == 0 or rows.device.type == "meta":  # meta: shapes only, no values to check
        return
    lo, hi = (int(v) for v in torch.aminmax(rows))
    if lo < 0 or hi >= m:
        raise IndexError(f"rows: expected every index in [0, {what}={m}), found {lo if lo < 0 else hi}")
    d = rows.shape[1]
    if d > 1:
        if d <= 16:  # d(d-1)/2 column comparisons: ~10x faster than a sort along a short dim
            cols = rows.T.contiguous()
            repeats = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
            for t in range(1, d):
                repeats |= (cols[t] == cols[:t]).any(dim=0)
        else:
            ordered = rows.sort(dim=1).values
            repeats = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if bool(repeats.any()):
            j = int(repeats.nonzero()[0, 0])
            raise ValueError(
                f"rows: expected distinct rows within each latent, latent {j} repeats one: "
                f"{rows[j].tolist()}"
            )


def check_same_device(**tensors: Optional[Tensor]) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"expected all tensors on one device, got {desc}")


def check_bias(name: str, bias: Optional[Tensor], length: int, what: str) -> None:
    if bias is None:
        return
    check_float(name, bias)
    if bias.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},) = ({what},), got {tuple(bias.shape)}")


def check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if k < 1 or k > n:
        raise ValueError(f"k: expected 1 <= k <= n_latents={n}, got {k}")


def check_decode_args(top_acts: Tensor, top_indices: Tensor) -> None:
    """Shapes and dtypes of a decoder's inputs; index values are checked inside the ops."""
    check_float("top_acts", top_acts)
    if not isinstance(top_indices, Tensor) or top_indices.shape != top_acts.shape:
        got = tuple(top_indices.shape) if isinstance(top_indices, Tensor) else type(top_indices).__name__
        raise ValueError(f"top_indices: expected the shape of top_acts {tuple(top_acts.shape)}, got {got}")
    check_index_dtype("top_indices", top_indices)
    if top_acts.shape[-1] == 0:
        raise ValueError(f"top_acts: expected k >= 1 active latents in the last dimension, got shape "
                         f"{tuple(top_acts.shape)}")


def check_expander(values: Tensor, rows: Tensor, m) -> int:
    """values/rows shapes and dtypes, and m; returns m as an int. Row values: ``check_expander_rows``."""
    check_matrix("values", values, "[n, d]")
    check_index_dtype("rows", rows)
    if rows.shape != values.shape:
        raise ValueError(
            f"rows: expected the shape of values {tuple(values.shape)} ([n, d]), got {tuple(rows.shape)}"
        )
    if not isinstance(m, numbers.Integral) or isinstance(m, bool):
        raise TypeError(f"m: expected an int, got {type(m).__name__}")
    if m < 1:
        raise ValueError(f"m: expected m >= 1, got {m}")
    d = values.shape[1]
    if d > m:
        raise ValueError(f"values, rows: expected degree d <= m={m} (rows distinct per latent), got d={d}")
    return int(m)


# ---------------------------------------------------------------------------------------------
# Helpers of the op modules.
# ---------------------------------------------------------------------------------------------

def pow2(x: int, lo: int = 1, hi: int = 1 << 30) -> int:
    """The next power of two >= x, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << max(0, (x - 1).bit_length())))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the PyTorch paths: float64 stays exact, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Elements of a narrower weight that ``rows_dot`` widens at a time (2 MiB of fp32: in L2 here).
ROWS_DOT_PIECE_ELEMS = 2**19


def rows_dot(vectors: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """[B, K] dot products ``vectors[b] . weight[idx[b, s]]`` in vectors' dtype: ``pairs_dot`` of
    every (token, slot) pair. bf16 weight, fp32 vectors, m=768, n=16384, K=56, one thread: B=1000
    13.1 ms against 38.9 for the gathered rows' batched GEMVs, B=300 7.2 / 10.1, B=64 1.9 / 2.6
    (two threads: 7.2 / 17.6 at B=1000)."""
    B, K = idx.shape
    return pairs_dot(vectors, weight, torch.arange(B * K, device=idx.device) // max(K, 1), idx.reshape(-1)).view(B, K)


def pairs_dot(vectors: Tensor, weight: Tensor, tokens: Tensor, ids: Tensor) -> Tensor:
    """[P] dot products ``vectors[tokens[p]] . weight[ids[p]]`` in vectors' dtype, each a sum in
    that dtype of the exact products with the (widened) rows. One ATen kernel gathers and
    multiplies (an embedding bag's per-sample-weights gradient, parallel over the pairs), so no
    [P, m] copy of the rows exists. A weight in vectors' dtype is read as it is. A narrower one
    is widened: when the pairs name at least n rows (P >= n), in latent order,
    ROWS_DOT_PIECE_ELEMS at a time into one reused buffer that is in cache while its pairs (sorted
    by id) read it; else a chunk of pairs' rows at a time (both for CPU: the pieces sync with the
    host). ``tokens`` int64 [P], ``ids`` integer [P]."""
    P = ids.shape[0]
    n, m = weight.shape
    cd = vectors.dtype
    out = torch.empty(P, device=vectors.device, dtype=cd)
    if P == 0 or m == 0:
        return out.zero_()
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward
    flat = ids.long()  # int64 as the bag numbers: the kernel reads both as one type
    none = flat[:0]  # offsets: unused where every pair names its bag (offset2bag)
    if weight.dtype == cd:
        return dots(vectors, weight, flat, none, tokens, 0, -1)
    if P >= n:
        ids, order = torch.sort(flat)
        bags = tokens[order]
        step = max(1, ROWS_DOT_PIECE_ELEMS // m)
        starts = torch.arange(0, n + step, step, device=flat.device).clamp_(max=n)
        bounds = torch.searchsorted(ids, starts).tolist()
        buf = torch.empty(min(n, step), m, device=vectors.device, dtype=cd)
        for p, s in enumerate(range(0, n, step)):
            lo, hi = bounds[p], bounds[p + 1]
            if lo < hi:
                table = buf[: min(n, s + step) - s].copy_(weight[s:s + step])
                out[order[lo:hi]] = dots(vectors, table, ids[lo:hi] - s, none, bags[lo:hi], 0, -1)
        return out
    chunk = max(1, ROWS_DOT_PIECE_ELEMS // m)
    rows = torch.arange(min(P, chunk), device=flat.device)
    buf = torch.empty(min(P, chunk), m, device=vectors.device, dtype=cd)
    for p0 in range(0, P, chunk):
        e = min(P, p0 + chunk) - p0
        table = buf[:e].copy_(weight.index_select(0, flat[p0:p0 + e]))
        out[p0:p0 + e] = dots(vectors, table, rows[:e], none, tokens[p0:p0 + e], 0, -1)
    return out


# When the CPU paths of the dense-dictionary ops (``sparse_decode``, ``topk_encode``'s backward)
# go through a dense [tokens, n] latent tensor instead of gathers. The gathers cost B * k row reads
# at gather speed (0.5 ns an element from DRAM here), a dense GEMM B * n * m FMAs at GEMM speed
# (0.02-0.05 ns) plus one read of the [n, m] dictionary. So dense pays once the k of n are a large
# share (GEMM work within a small multiple of the gathers') and the call names at least n ids
# (the gathers read at least the dictionary's worth of rows). Measured here (fp32, one thread,
# interleaved medians of 7, B, m, n from (7, 768, 16384) to (1000, 16, 1000)), sparse / dense time:
# backward 0.19-0.68 at k = n/64, 0.46-8.5 at n/8 (the two below 0.8 at B * k < n), 0.64-9.2 at
# n/4; the decoder's forward, whose gathers are cheap while the dictionary sits in cache, 0.06-2.35
# at n/8 and 0.22-5.0 at n/4 (0.48 at B=1000 m=100 n=1000, 0.22 at m=16), so it takes half.
# Dense tensors go DENSE_TILE_ELEMS (128 MiB in fp32) a tile of tokens at a time; at k >= n/8 one
# holds at most 4x the bytes of those tokens' int64 ids.
DENSE_BACKWARD_SHARE = 8
DENSE_FORWARD_SHARE = 2
DENSE_TILE_ELEMS = 32 * 2**20


def dense_pays(tokens: int, k: int, n: int, share: int) -> bool:
    """Whether a CPU path's k of n latents per token go through dense [tokens, n] tiles: from
    k = n / share on, when the tokens name at least n ids in all (``DENSE_BACKWARD_SHARE``)."""
    return k * share >= n and tokens * k >= n


def dense_tiles(tokens: int, n: int):
    """(b0, b1) token tiles of at most DENSE_TILE_ELEMS dense latents each (at least one token)."""
    step = max(1, DENSE_TILE_ELEMS // n)
    return [(b0, min(tokens, b0 + step)) for b0 in range(0, tokens, step)]


def dense_latents(acts: Tensor, idx: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """[tokens, k] activations at [tokens, k] ids -> dense [tokens, n] in dtype, duplicates added."""
    return torch.zeros(idx.shape[0], n, device=idx.device, dtype=dtype).scatter_add_(1, idx, acts.to(dtype))


# A decode and its two gradients through dense [tokens, n] tiles, for the CPU paths where
# ``dense_pays`` (sparse_decode, topk_encode's backward) and for a degenerate Expander's dense
# masked dictionary (expander_decode). ``w`` is [n, m]; results are in the compute dtype ``cd``.

def dense_decode(acts: Tensor, idx: Tensor, w: Tensor, bias: Optional[Tensor], cd: torch.dtype) -> Tensor:
    """[B, m]: sum_s acts[:, s] * w[idx[:, s]] (+ bias), a GEMM a tile of tokens."""
    n = w.shape[0]
    wc, bc = w.to(cd), bias.to(cd) if bias is not None else None
    out = torch.empty(idx.shape[0], w.shape[1], device=idx.device, dtype=cd)
    for b0, b1 in dense_tiles(idx.shape[0], n):
        dense = dense_latents(acts[b0:b1], idx[b0:b1], n, cd)
        if bc is None:
            torch.mm(dense, wc, out=out[b0:b1])
        else:
            torch.addmm(bc, dense, wc, out=out[b0:b1])
    return out


def dense_grad_acts(grad: Tensor, idx: Tensor, w: Tensor, cd: torch.dtype) -> Tensor:
    """[B, k]: the decode's gradient of its activations, ``grad @ w.T`` at the ids."""
    gc, wc = grad.to(cd), w.to(cd)
    out = torch.empty(idx.shape, device=idx.device, dtype=cd)
    for b0, b1 in dense_tiles(idx.shape[0], w.shape[0]):
        torch.gather(torch.mm(gc[b0:b1], wc.T), 1, idx[b0:b1], out=out[b0:b1])
    return out


def dense_grad_weight(grad: Tensor, acts: Tensor, idx: Tensor, n: int, cd: torch.dtype) -> Tensor:
    """[n, m]: the decode's gradient of ``w``, ``G.T @ grad`` with G the dense activations."""
    gc = grad.to(cd)
    tiles = dense_tiles(idx.shape[0], n)
    if not tiles:
        return torch.zeros(n, grad.shape[1], device=grad.device, dtype=cd)
    out = torch.empty(n, grad.shape[1], device=grad.device, dtype=cd)
    for b0, b1 in tiles:  # the first tile writes out (no zeroing pass over [n, m]), later ones add
        dense = dense_latents(acts[b0:b1], idx[b0:b1], n, cd)
        if b0 == 0:
            torch.mm(dense.T, gc[b0:b1], out=out)
        else:
            out.addmm_(dense.T, gc[b0:b1])
    return out


def grad_bias(g: Tensor, idx: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """An encoder's bias gradient: [B, k] gradients at [B, k] latent ids -> [n], a scatter-add.

    On CPU ``index_add_`` (deterministic there). On CUDA ``index_add_`` adds with float atomics,
    so the sums' order, and their last bits, change from run to run, and a training run drifts
    from its own repeat (seen on an H100 before this: a killed-and-resumed run of 64 steps ended
    with weights up to 2% (TopKSAE fp32) and 98% (ExpanderSAE bf16, relative max difference)
    away from the uninterrupted one; now bit-identical, benchmarks/gpu.py (c)). There the sum is
    ``_rowgrad.segment_sums``: deterministic by construction, on the weight gradient's own sort."""
    if g.device.type != "cpu":
        from ._rowgrad import segment_sums, sort_by_latent

        return segment_sums(g, sort_by_latent(idx, n)).to(dtype)
    gb = torch.zeros(n, device=g.device, dtype=compute_dtype(g.dtype))
    gb.index_add_(0, idx.reshape(-1), g.reshape(-1).to(gb.dtype))
    return gb.to(dtype)


def unused_grad(like: Tensor) -> Tensor:
    """The placeholder a backward custom op returns for a gradient nobody asked for.

    A fresh empty tensor per output: outputs of a ``torch.library`` custom op must never alias
    each other (reusing one placeholder for two outputs is an error at backward time).
    """
    return like.new_empty(0)


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
try:  # private probes of the state that decides; a torch without one of them never skips the dispatcher
    from torch.autograd import forward_ad as _forward_ad

    _dispatch_modes = torch._C._len_torch_dispatch_stack
    _function_mode = torch._C._is_torch_function_mode_enabled
    _transforms = torch._C._functorch.peek_interpreter_stack
    _autocast = torch._C._is_any_autocast_enabled
    _profiler = torch.autograd._profiler_enabled
    _jit_tracing = torch._C._get_tracing_state
    _excluded = torch._C._dispatch_tls_is_dispatch_key_excluded
    _AUTOGRAD_KEY = torch._C.DispatchKey.AutogradFunctionality
    _forward_ad._current_level  # noqa: B018 - probed below
    _EAGER_PROBES = True
except AttributeError:  # pragma: no cover - torch versions without one of them
    _EAGER_PROBES = False


def plain_eager(args) -> bool:
    """Whether a call may skip the dispatcher (``define_op``). Not when compiling, jit-tracing, or
    called below autograd; not under autocast, forward-mode AD, a Python dispatch mode (fake
    tensors, FlopCounterMode, make_fx), a function mode (``with torch.device(...)``), a functorch
    transform (vmap, grad, jvp) or the profiler (whose traces keep the op's name); and only when
    every tensor argument is a plain ``torch.Tensor`` or ``nn.Parameter`` (no fake tensor or
    other subclass) off the meta device. Anything else goes through the registered op, which
    handles all of them."""
    if torch.compiler.is_compiling() or not _EAGER_PROBES:  # first: a constant while tracing
        return False
    if (_dispatch_modes() or _function_mode() or _transforms() is not None or _autocast() or _profiler()
            or _jit_tracing() is not None or _forward_ad._current_level >= 0 or _excluded(_AUTOGRAD_KEY)):
        return False
    return all(type(a) in _PLAIN_TYPES and not a.is_meta for a in args if isinstance(a, Tensor))


class _EagerFunction(torch.autograd.Function):
    """An op's autograd rule without the dispatcher, as ``torch.library`` wires it (its generated
    Function): the op's spec comes last, so it is stripped from ``needs_input_grad``."""

    @staticmethod
    def forward(ctx, *args):
        op, args = args[-1], args[:-1]
        out = op.impl(*args)
        op.setup_context(ctx, args, out)
        ctx.op = op
        return out

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]
        try:
            result = ctx.op.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*result, None) if isinstance(result, tuple) else (result, None)


class define_op:
    """A ``torch.library`` custom op (``name``, implemented by ``impl``, with ``fake`` and
    optionally an autograd rule) whose eager calls skip the dispatcher.

    Calling the returned object runs ``impl`` directly, or, when an argument needs a gradient,
    through one ``torch.autograd.Function`` holding the same ``setup_context`` and ``backward``,
    whenever ``plain_eager`` allows; otherwise it calls the registered op
    (``torch.ops.topk_kernels.<name>``), which torch.compile, fake tensors, dispatch modes and
    ``torch.library.opcheck`` see. Both routes run the same Python code; the dispatcher and the
    custom op's autograd wrapper cost, on this project's CPU, ``sparse_decode`` of 7 tokens
    68 -> 50 us a forward and 334 -> 250 us a forward and backward (benchmarks/RESULTS.md,
    "Twenty-ninth session"; the embedding bag itself takes ~18 us).
    """

    def __init__(self, name: str, impl, fake, setup_context=None, backward=None):
        self.impl, self.setup_context, self.backward = impl, setup_context, backward
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self.op.register_fake(fake)
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup_context)

    def __call__(self, *args):
        if not plain_eager(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            if self.backward is None:
                # An op without an autograd rule (the backward ops, under create_graph=True): the
                # registered op's outputs refuse a backward through them ("no autograd formula"),
                # where the implementation's own torch calls would differentiate silently.
                return self.op(*args)
            return _EagerFunction.apply(*args, self)
        return self.impl(*args)


def on_device(device: torch.device):
    """Context for kernel launches: ``torch.cuda.device(device)`` for CUDA tensors, so tensors on
    ``cuda:1`` launch on GPU 1 whatever the current device is; a no-op elsewhere."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def debug_enabled() -> bool:
    return os.environ.get("TOPK_KERNELS_DEBUG", "0") == "1"


def launch_options() -> dict:
    """Keyword options for every kernel launch: ``debug=True`` under ``TOPK_KERNELS_DEBUG=1``,
    which turns on the kernels' ``tl.device_assert`` index checks (and Triton's own overflow
    checks). The interpreter ignores a launch's ``debug`` flag, so there the switch is applied to
    its builder, which is what a launch with ``debug=True`` means on a GPU."""
    debug = debug_enabled()
    if INTERPRET and HAS_TRITON:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        if builder.options.debug != debug:
            builder.options = dataclasses.replace(builder.options, debug=debug)
    return {"debug": debug}
