"""Backend choice and argument checks shared by every op.

One place decides which implementation runs: CUDA tensors go to the Triton kernels, CPU tensors to
the fast PyTorch path, and with ``TRITON_INTERPRET=1`` set before import, CPU tensors go to the
Triton kernels running in the interpreter (that is how the kernels are proven without a GPU).
Every op also accepts ``backend="triton" | "torch" | "reference"`` to force one.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: macOS / Windows users get the PyTorch paths only.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("triton", "torch", "reference")

# What ``backend=None`` picks for CPU tensors. The interpreter makes it Triton, as documented;
# the test suite sets it back to "torch" so that only tests that force ``backend="triton"`` pay
# for the interpreter.
cpu_default_backend = "triton" if (HAS_TRITON and INTERPRET) else "torch"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return the backend that runs for tensors on ``device``.

    ``None`` picks Triton on CUDA (or on CPU under the interpreter) and the PyTorch path otherwise.
    """
    if backend is None:
        if device.type == "cuda" and HAS_TRITON:
            return "triton"
        return cpu_default_backend
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
    return backend


def check_float(name: str, t: torch.Tensor, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES and t.dtype != torch.float64:
        raise TypeError(f"{name}: expected a float32/bfloat16/float16 tensor, got dtype {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_matrix(name: str, t: torch.Tensor) -> None:
    check_float(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")


def check_indices(name: str, t: torch.Tensor, upper: int, what: str = "n") -> None:
    """Integer tensor with every entry in [0, upper). Syncs once on CPU-side values only."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an int64 (or int32) tensor, got dtype {t.dtype}")
    if t.numel() == 0 or t.device.type != "cpu":
        # On CUDA the kernels mask their loads; a bounds check here would be a host sync in the
        # hot path, so it is done only on CPU tensors.
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name}: expected every index in [0, {what}={upper}), found {bad}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"expected all tensors on one device, got {desc}")


def check_bias(name: str, bias: torch.Tensor | None, length: int, what: str) -> None:
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
