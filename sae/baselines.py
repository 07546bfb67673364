"""Dense PyTorch SAEs: the formulations a user would write without our kernels.

They materialise the [B, n] latent tensor and, for the Expander SAE, the dense masked [m, n]
matrix of the paper's public code. Benchmarks time them as baselines; tests use them as
independent references for ``TopKSAE`` and ``ExpanderSAE``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return (x - x_hat).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()


class DenseTopKSAE(nn.Module):
    """pre = (x - b_dec) @ W_enc.T + b_enc; keep top-k, ReLU; x_hat = z @ W_dec + b_dec (dense z)."""

    def __init__(self, d_model: int, n_latents: int, k: int):
        super().__init__()
        w = torch.randn(n_latents, d_model)
        w /= w.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(w.clone())
        self.W_dec = nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.k = k

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, m] -> (x_hat [B, m], fvu)."""
        # Biases inside the GEMMs (addmm) and an in-place scatter: what a competent user writes; the
        # unfused forms hold and write two more [B, n] tensors (1166 -> 842 MiB peak extra RSS of a
        # training step at B=4096 m=768 n=24576 k=32).
        pre = torch.addmm(self.b_enc, (x - self.b_dec).reshape(-1, x.shape[-1]), self.W_enc.T)
        acts, idx = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, idx, acts.relu())
        x_hat = torch.addmm(self.b_dec, z, self.W_dec).reshape(x.shape)
        return x_hat, _fvu(x, x_hat)


class DenseMaskedExpanderSAE(nn.Module):
    """The paper's formulation: W = colnorm(M * V) with dense V [m, n] and a 0/1 mask M [m, n];
    tied encoder pre = (x - b_dec) @ W + b_enc; x_hat = z @ W.T + b_dec (dense z [B, n])."""

    def __init__(self, d_model: int, n_latents: int, k: int, rows: Tensor, values: Tensor | None = None):
        super().__init__()
        n, d = rows.shape
        cols = torch.arange(n).repeat_interleave(d)
        mask = torch.zeros(d_model, n_latents)
        mask[rows.reshape(-1), cols] = 1.0
        self.register_buffer("mask", mask)
        v = torch.randn(d_model, n_latents) if values is None else torch.zeros(d_model, n_latents)
        if values is not None:
            v[rows.reshape(-1), cols] = values.reshape(-1).to(v.dtype)
        self.V = nn.Parameter(v)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.k = k

    def dictionary(self) -> Tensor:
        w = self.V * self.mask
        return w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, m] -> (x_hat [B, m], fvu)."""
        w = self.dictionary()
        pre = torch.addmm(self.b_enc, (x - self.b_dec).reshape(-1, x.shape[-1]), w)  # as DenseTopKSAE
        acts, idx = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, idx, acts.relu())
        x_hat = torch.addmm(self.b_dec, z, w.T).reshape(x.shape)
        return x_hat, _fvu(x, x_hat)
