"""Encoder benchmarks: topk_encode (CPU path: blocked GEMM + running top-k) against the dense
baseline a user would write (the full [B, n] GEMM, then torch.topk: ``common.dense_topk_encode``
in fp32). Time and peak extra memory (RSS) of each, recorded by the ``record`` fixture.

pytest benchmarks/test_bench_topk_encode.py --benchmark-only

The last config is the memory check of the design: at B=4096, m=256, n=65536, k=32 the dense
pre-activations alone are 1 GiB; topk_encode must stay under 300 MiB of extra memory.
"""

import pytest
import torch

from common import dense_topk_encode, forward_backward
from topk_kernels import topk_encode

CONFIGS = [  # (B, m, n, k, rounds)
    (1024, 256, 8192, 32, 3),
    (4096, 768, 24576, 32, 3),
    (4096, 768, 131072, 32, 1),  # ~1 TFLOP per call on 2 cores: one timed round
]
MEMORY_CONFIG = (4096, 256, 65536, 32)
MEMORY_LIMIT_MIB = 300


def _inputs(B, m, n, grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, m, generator=g).requires_grad_(grad)
    weight = torch.randn(n, m, generator=g).div_(m**0.5).requires_grad_(grad)
    bias = torch.randn(n, generator=g).mul_(0.1).requires_grad_(grad)
    return x, weight, bias


def _ours(x, weight, bias, k):
    return topk_encode(x, weight, bias, k, backend="torch")


def _group(kind, B, m, n, k):
    return f"encode {kind} B={B} m={m} n={n} k={k}"


# impl innermost: each config's dense and ours run back to back, so their ratio sees the same load.
@pytest.mark.parametrize("impl", ["dense", "ours"])
@pytest.mark.parametrize("B,m,n,k,rounds", CONFIGS, ids=lambda v: str(v))
def test_forward(record, impl, B, m, n, k, rounds):
    x, weight, bias = _inputs(B, m, n)
    if impl == "dense":
        record(_group("fwd", B, m, n, k), "dense GEMM + topk", lambda: dense_topk_encode(x, weight, bias, k),
               rounds=rounds, baseline=True)
    else:
        record(_group("fwd", B, m, n, k), "topk_encode", lambda: _ours(x, weight, bias, k), rounds=rounds)


@pytest.mark.parametrize("impl", ["dense", "ours"])
def test_forward_backward(record, impl):
    B, m, n, k = 4096, 768, 24576, 32
    args = _inputs(B, m, n, grad=True)
    if impl == "dense":
        fn = forward_backward(lambda x, w, b: dense_topk_encode(x, w, b, k), *args)
        record(_group("fwd+bwd", B, m, n, k), "dense GEMM + topk", fn, rounds=3, baseline=True)
    else:
        fn = forward_backward(lambda x, w, b: _ours(x, w, b, k), *args)
        record(_group("fwd+bwd", B, m, n, k), "topk_encode", fn, rounds=3)


@pytest.mark.parametrize("impl", ["dense", "ours"])
def test_memory_bound(record, benchmark, impl):
    B, m, n, k = MEMORY_CONFIG
    x, weight, bias = _inputs(B, m, n)
    if impl == "dense":
        record(_group("fwd", B, m, n, k), "dense GEMM + topk", lambda: dense_topk_encode(x, weight, bias, k),
               rounds=3, baseline=True)
        return
    record(_group("fwd", B, m, n, k), "topk_encode", lambda: _ours(x, weight, bias, k), rounds=3)
    extra = benchmark.extra_info["extra_mib"]
    if extra is not None:  # None off Linux: no RSS accounting to read
        assert extra < MEMORY_LIMIT_MIB, f"topk_encode used {extra:.0f} MiB extra, limit {MEMORY_LIMIT_MIB}"
