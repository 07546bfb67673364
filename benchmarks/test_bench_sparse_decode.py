"""Decoder benchmarks: sparse_decode (CPU path) against the dense baseline a user would write
(scatter the k activations into [B, n], then a GEMM with the [n, m] dictionary).

pytest benchmarks/test_bench_sparse_decode.py --benchmark-only
"""

import pytest
import torch

from common import dense_sparse_decode, forward_backward
from topk_kernels import sparse_decode

CONFIGS = [  # (B, m, n, k)
    (2048, 512, 16384, 32),
    (4096, 768, 24576, 32),
]


def _inputs(B, m, n, k, grad):
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(B, k, generator=g).requires_grad_(grad)
    idx = torch.randint(0, n, (B, k), generator=g)
    weight = torch.randn(n, m, generator=g).div_(m**0.5).requires_grad_(grad)
    bias = torch.zeros(m).requires_grad_(grad)
    return acts, idx, weight, bias


def _dense(acts, idx, weight, bias):
    return dense_sparse_decode(acts, idx, weight, bias)


@pytest.mark.parametrize("B,m,n,k", CONFIGS, ids=lambda v: str(v))
def test_forward_dense(record, B, m, n, k):
    args = _inputs(B, m, n, k, grad=False)
    record(f"decode fwd B={B} m={m} n={n} k={k}", "dense scatter+GEMM", lambda: _dense(*args), rounds=3, baseline=True)


@pytest.mark.parametrize("B,m,n,k", CONFIGS, ids=lambda v: str(v))
def test_forward_sparse(record, B, m, n, k):
    args = _inputs(B, m, n, k, grad=False)
    record(f"decode fwd B={B} m={m} n={n} k={k}", "sparse_decode", lambda: sparse_decode(*args), rounds=10)


@pytest.mark.parametrize("B,m,n,k", CONFIGS, ids=lambda v: str(v))
def test_forward_backward_dense(record, B, m, n, k):
    fn = forward_backward(_dense, *_inputs(B, m, n, k, grad=True))
    record(f"decode fwd+bwd B={B} m={m} n={n} k={k}", "dense scatter+GEMM", fn, rounds=3, baseline=True)


@pytest.mark.parametrize("B,m,n,k", CONFIGS, ids=lambda v: str(v))
def test_forward_backward_sparse(record, B, m, n, k):
    fn = forward_backward(sparse_decode, *_inputs(B, m, n, k, grad=True))
    record(f"decode fwd+bwd B={B} m={m} n={n} k={k}", "sparse_decode", fn, rounds=10)
