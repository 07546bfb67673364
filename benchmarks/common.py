"""Measurement helpers shared by the benchmark suites and the microbenchmark command.

Peak extra memory on CPU: torch keeps no CPU allocator statistics, so we read the kernel's own
accounting: reset the process's peak RSS (write 5 to /proc/self/clear_refs), run the op, and report
VmHWM minus the RSS before it. Large tensors are mmapped by glibc and returned on free, so the
reading is the op's transient footprint. Smaller ones (under glibc's sliding mmap threshold, up to
32 MiB) come from the heap, whose freed pages stay resident and would be reused unseen: an op whose
buffers are all that small read 0 MiB. So the heap's free pages are handed back first
(``malloc_trim``), for ours and the baselines alike. Linux only; elsewhere it reports None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import statistics
import time
from typing import Callable

import torch

H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3 on an H100 SXM: the roofline floor printed beside our CPU times


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


def peak_extra_mib(fn: Callable[[], object]) -> float | None:
    """MiB the process's resident set grew above its starting point while ``fn`` ran."""
    try:
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        return None
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0.0, (peak - before) / 1024)


def time_ms(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, warmup_s: float = 0.0,
            max_warmup: int = 10) -> list[float]:
    """Wall-clock milliseconds of ``repeat`` calls after ``warmup`` calls, and then more warm-up calls
    (up to ``max_warmup`` in all) while they have taken under ``warmup_s`` seconds. The CPU paths'
    first ~10 calls in a process run up to 2.5x slower (expander_encode fwd, B=1024 m=1024: 64-150
    ms, then 56-59), likely while glibc's malloc thresholds adapt to their buffers."""
    start = time.perf_counter()
    calls = 0
    while calls < warmup or (calls < max_warmup and time.perf_counter() - start < warmup_s):
        fn()
        calls += 1
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):9.2f} ({min(times):.2f}-{max(times):.2f})"


def dense_topk_encode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int):
    """The dense baseline a user writes: the full [B, n] GEMM with the bias inside it (``addmm``),
    ``torch.topk``, ReLU.

    Not ``reference.topk_encode``: that is the tests' exact oracle (a stable full sort, for the
    package's tie and NaN order), several times slower than ``torch.topk`` on long rows, so timing
    against it would flatter us. Nor ``x @ weight.T + bias``: that writes a second [B, n] tensor
    and reads the first again (1.35x the time and 2x the memory of ``addmm`` at B=4096 n=24576)."""
    if bias is None:
        pre = x @ weight.T
    else:
        pre = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.T).reshape(*x.shape[:-1], weight.shape[0])
    values, indices = pre.topk(k, dim=-1)
    return values.relu(), indices


def dense_sparse_decode(top_acts: torch.Tensor, top_indices: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The dense decoder baseline a user writes: scatter the k activations into a zeroed [B, n]
    in place, then the [B, n] x [n, m] GEMM (bias inside it).

    Not ``reference.sparse_decode``: its out-of-place ``scatter_add`` copies the zeroed [B, n]
    tensor into a second one (2x the baseline's memory, 1.26x its time at B=2048 n=16384 m=512)."""
    z = top_acts.new_zeros(top_acts.shape[0], weight.shape[0]).scatter_add_(-1, top_indices, top_acts)
    return z @ weight if bias is None else torch.addmm(bias, z, weight)


def dense_expander_weight(values: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
    """values [n, d] on support rows [n, d] -> dense [n, m], scattered in place (one [n, m] tensor,
    where ``reference.expander_dense``'s out-of-place ``scatter_add`` holds two)."""
    return values.new_zeros(values.shape[0], m).scatter_add_(1, rows, values)


def forward_backward(fn: Callable[..., torch.Tensor], *args) -> Callable[[], object]:
    """A closure running fn(*args) then backward with a ones gradient (grads accumulate; harmless)."""
    def run():
        out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        return out
    return run


def train_step(model, x: torch.Tensor, ours: bool) -> Callable[[], torch.Tensor]:
    """A closure running one Adam training step: our SAEs (output object, decoder constraints) or a
    dense baseline of ``sae.baselines`` (returns ``(x_hat, loss)``)."""
    from sae.train import adam  # here, not at the top: cpu_ab.py imports this module with torch only

    opt = adam(model.parameters(), 1e-4)  # sae.train's (fused) Adam, for ours and the baselines alike

    def step():
        if ours:
            out = model(x)
            loss = out.loss
        else:
            _, loss = model(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ours:
            model.remove_parallel_grads(out.top_indices)
        opt.step()
        if ours:
            model.normalize_decoder()
        return loss

    return step
