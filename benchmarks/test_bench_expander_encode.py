"""Expander encoder benchmarks: expander_encode (CPU path: embedding-bag gathers over token tiles +
running top-k) against
(a) the dense masked formulation a user would write: build the dense [n, m] dictionary from
    values on rows, then the [B, n] GEMM and torch.topk (``common.dense_topk_encode`` in fp32; the
    baseline), and
(b) topk_encode with a dense [n, m] encoder: a TopK SAE of the same size, which pays the
    O(B*n*m) GEMM where the expander gathers O(B*n*d).

pytest benchmarks/test_bench_expander_encode.py --benchmark-only

The last test is the memory check of the design: at B=4096, m=768, n=65536 the dense
pre-activations alone are 1 GiB; expander_encode must stay under 300 MiB of extra memory.
"""

import pytest
import torch

from common import dense_expander_weight, dense_topk_encode, forward_backward
from sae.masks import expander_mask
from topk_kernels import expander_encode, topk_encode

CONFIGS = [  # (B, m, n, d, k)
    (1024, 1024, 16384, 7, 32),
    (1024, 2048, 16384, 7, 64),
]
MEMORY_CONFIG = (4096, 768, 65536, 8, 32)
MEMORY_LIMIT_MIB = 300


def _inputs(B, m, n, d, grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, m, generator=g).requires_grad_(grad)
    values = torch.randn(n, d, generator=g).div_(d**0.5).requires_grad_(grad)
    rows = expander_mask(m, n, d, seed=0)
    bias = torch.randn(n, generator=g).mul_(0.1).requires_grad_(grad)
    return x, values, rows, bias


def _dense_weight_inputs(B, m, n, d, grad):
    x, _, _, bias = _inputs(B, m, n, d, grad)
    weight = torch.randn(n, m, generator=torch.Generator().manual_seed(1)).div_(m**0.5).requires_grad_(grad)
    return x, weight, bias


def _dense_masked(k):
    def run(x, values, rows, bias):
        return dense_topk_encode(x, dense_expander_weight(values, rows, x.shape[-1]), bias, k)
    return run


def _dense_topk(k):
    return lambda x, weight, bias: topk_encode(x, weight, bias, k, backend="torch")


def _ours(k):
    return lambda x, values, rows, bias: expander_encode(x, values, rows, bias, k, backend="torch")


def _group(kind, B, m, n, d, k):
    return f"expander encode {kind} B={B} m={m} n={n} d={d} k={k}"


IDS = [f"B{B}-m{m}-n{n}-d{d}-k{k}" for B, m, n, d, k in CONFIGS]


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_dense_masked(record, B, m, n, d, k):
    args = _inputs(B, m, n, d, grad=False)
    record(_group("fwd", B, m, n, d, k), "dense masked GEMM + topk", lambda: _dense_masked(k)(*args),
           rounds=3, baseline=True)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_topk_encode_dense_weight(record, B, m, n, d, k):
    args = _dense_weight_inputs(B, m, n, d, grad=False)
    record(_group("fwd", B, m, n, d, k), "topk_encode, dense [n, m] W", lambda: _dense_topk(k)(*args), rounds=3)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_expander_encode(record, B, m, n, d, k):
    args = _inputs(B, m, n, d, grad=False)
    record(_group("fwd", B, m, n, d, k), "expander_encode", lambda: _ours(k)(*args), rounds=10)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_backward_dense_masked(record, B, m, n, d, k):
    fn = forward_backward(_dense_masked(k), *_inputs(B, m, n, d, grad=True))
    record(_group("fwd+bwd", B, m, n, d, k), "dense masked GEMM + topk", fn, rounds=3, baseline=True)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_backward_topk_encode_dense_weight(record, B, m, n, d, k):
    fn = forward_backward(_dense_topk(k), *_dense_weight_inputs(B, m, n, d, grad=True))
    record(_group("fwd+bwd", B, m, n, d, k), "topk_encode, dense [n, m] W", fn, rounds=3)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_backward_expander_encode(record, B, m, n, d, k):
    fn = forward_backward(_ours(k), *_inputs(B, m, n, d, grad=True))
    record(_group("fwd+bwd", B, m, n, d, k), "expander_encode", fn, rounds=10)


def test_memory_bound(record, benchmark):
    B, m, n, d, k = MEMORY_CONFIG
    args = _inputs(B, m, n, d, grad=False)
    record(_group("fwd", B, m, n, d, k), "expander_encode", lambda: _ours(k)(*args), rounds=2)
    extra = benchmark.extra_info["extra_mib"]
    if extra is not None:  # None off Linux: no RSS accounting to read
        assert extra < MEMORY_LIMIT_MIB, f"expander_encode used {extra:.0f} MiB extra, limit {MEMORY_LIMIT_MIB}"
