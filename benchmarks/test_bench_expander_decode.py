"""Expander decoder benchmarks: expander_decode (CPU path) against
(a) the dense masked formulation a user would write: build the dense [n, m] dictionary from
    values on rows, scatter the k activations into [B, n], then a GEMM (baseline), and
(b) sparse_decode with a dense [n, m] dictionary: a TopK SAE of the same size, which reads whole
    m-wide rows where the expander reads d entries.

pytest benchmarks/test_bench_expander_decode.py --benchmark-only
"""

import pytest
import torch

from common import dense_expander_weight, dense_sparse_decode, forward_backward
from sae.masks import expander_mask
from topk_kernels import expander_decode, sparse_decode

CONFIGS = [  # (B, m, n, d, k)
    (1024, 1024, 16384, 7, 32),
    (1024, 2048, 16384, 7, 64),
]


def _inputs(B, m, n, d, k, grad):
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(B, k, generator=g).requires_grad_(grad)
    idx = torch.randint(0, n, (B, k), generator=g)
    values = torch.randn(n, d, generator=g).div_(d**0.5).requires_grad_(grad)
    rows = expander_mask(m, n, d, seed=0)
    bias = torch.zeros(m).requires_grad_(grad)
    return acts, idx, values, rows, bias


def _dense_masked(acts, idx, values, rows, bias):
    m = bias.shape[0]
    return dense_sparse_decode(acts, idx, dense_expander_weight(values, rows, m), bias)


def _sparse_dense_weight_inputs(B, m, n, d, k, grad):
    acts, idx, _, _, bias = _inputs(B, m, n, d, k, grad)
    weight = torch.randn(n, m, generator=torch.Generator().manual_seed(1)).div_(m**0.5).requires_grad_(grad)
    return acts, idx, weight, bias


def _ours(acts, idx, values, rows, bias):
    return expander_decode(acts, idx, values, rows, bias.shape[0], bias)


def _group(kind, B, m, n, d, k):
    return f"expander decode {kind} B={B} m={m} n={n} d={d} k={k}"


IDS = [f"B{B}-m{m}-n{n}-d{d}-k{k}" for B, m, n, d, k in CONFIGS]


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_dense_masked(record, B, m, n, d, k):
    args = _inputs(B, m, n, d, k, grad=False)
    record(_group("fwd", B, m, n, d, k), "dense masked scatter+GEMM", lambda: _dense_masked(*args),
           rounds=3, baseline=True)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_sparse_decode_dense_weight(record, B, m, n, d, k):
    args = _sparse_dense_weight_inputs(B, m, n, d, k, grad=False)
    record(_group("fwd", B, m, n, d, k), "sparse_decode, dense [n, m] W", lambda: sparse_decode(*args), rounds=10)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_expander_decode(record, B, m, n, d, k):
    args = _inputs(B, m, n, d, k, grad=False)
    record(_group("fwd", B, m, n, d, k), "expander_decode", lambda: _ours(*args), rounds=30)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_backward_dense_masked(record, B, m, n, d, k):
    fn = forward_backward(_dense_masked, *_inputs(B, m, n, d, k, grad=True))
    record(_group("fwd+bwd", B, m, n, d, k), "dense masked scatter+GEMM", fn, rounds=3, baseline=True)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_backward_sparse_decode_dense_weight(record, B, m, n, d, k):
    fn = forward_backward(sparse_decode, *_sparse_dense_weight_inputs(B, m, n, d, k, grad=True))
    record(_group("fwd+bwd", B, m, n, d, k), "sparse_decode, dense [n, m] W", fn, rounds=10)


@pytest.mark.parametrize("B,m,n,d,k", CONFIGS, ids=IDS)
def test_forward_backward_expander_decode(record, B, m, n, d, k):
    fn = forward_backward(_ours, *_inputs(B, m, n, d, k, grad=True))
    record(_group("fwd+bwd", B, m, n, d, k), "expander_decode", fn, rounds=30)
