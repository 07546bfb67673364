"""Dense references of every op: plain PyTorch, differentiable, obviously correct.

Tests call these on float64 inputs to get the ground truth; benchmarks call them in the working
dtype as the dense baselines a user would otherwise write. They materialise the full [..., n]
latent tensor on purpose: that is exactly what the fast ops avoid.
"""

from __future__ import annotations

import torch


def scatter_latents(top_acts: torch.Tensor, top_indices: torch.Tensor, n: int) -> torch.Tensor:
    """[..., k] activations at [..., k] indices -> dense [..., n]; duplicate indices add up."""
    # in place into fresh zeros: one [..., n] tensor, not two (autograd still reaches top_acts)
    return top_acts.new_zeros(*top_acts.shape[:-1], n).scatter_add_(-1, top_indices, top_acts)


def sparse_decode(top_acts, top_indices, weight, bias=None):
    """out[..., :] = sum_s top_acts[..., s] * weight[top_indices[..., s]] (+ bias). weight [n, m]."""
    out = scatter_latents(top_acts, top_indices, weight.shape[0]) @ weight
    return out if bias is None else out + bias


def topk_relu(pre: torch.Tensor, k: int):
    """Top-k of pre-activations [..., n] (descending), then ReLU on the selected values.

    The package's one order (``topk_kernels._common``): equal values go to the lower latent id,
    every NaN ranks above +inf. A stable descending sort is exactly that; ``torch.topk`` is not
    (its tie order is unspecified). NaNs are made the canonical +NaN first: CUDA's sort orders a
    NaN with its sign bit set below -inf.
    """
    pre = torch.where(pre.isnan(), torch.full_like(pre, float("nan")), pre)
    values, indices = torch.sort(pre, dim=-1, descending=True, stable=True)
    return values[..., :k].relu(), indices[..., :k]


def topk_encode(x, weight, bias, k):
    """pre = x @ weight.T + bias; keep the k largest per token, ReLU them. weight [n, m]."""
    pre = x @ weight.T
    if bias is not None:
        pre = pre + bias
    return topk_relu(pre, k)


def expander_dense(values: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
    """values [n, d] on support rows [n, d] -> dense [n, m] (row j holds latent j's atom)."""
    return values.new_zeros(values.shape[0], m).scatter_add_(1, rows, values)  # one [n, m], as above


def expander_encode(x, values, rows, bias, k):
    """pre[..., j] = sum_t values[j, t] * x[..., rows[j, t]] + bias[j]; then TopK + ReLU."""
    return topk_encode(x, expander_dense(values, rows, x.shape[-1]), bias, k)


def expander_decode(top_acts, top_indices, values, rows, m, bias=None):
    """out[..., rows[j, t]] += top_acts[..., s] * values[j, t] for j = top_indices[..., s]."""
    return sparse_decode(top_acts, top_indices, expander_dense(values, rows, m), bias)
