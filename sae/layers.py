"""``SparseDecoder``: a drop-in replacement for the ``nn.Linear(n_latents -> d_model)`` decoder of an
SAE that takes the k active latents per token instead of a dense [..., n] code."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from topk_kernels import sparse_decode


_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_param_dtype(dtype) -> None:
    """``dtype`` for a module's parameters: None (the default dtype) or a float dtype the ops take."""
    if dtype is not None and dtype not in _PARAM_DTYPES:
        raise TypeError(f"dtype: expected None or one of float32/bfloat16/float16/float64, got {dtype!r}")


class SparseDecoder(nn.Module):
    """out[..., :] = sum_s top_acts[..., s] * weight[top_indices[..., s]] + bias.

    Holds ``weight [n_latents, d_model]`` (one contiguous row per latent, so a gather reads a row)
    and ``bias [d_model]``. Computes the same function as ``nn.Linear(n_latents, d_model)`` applied
    to the dense code, at O(k * d_model) per token in forward and backward.
    """

    def __init__(self, n_latents: int, d_model: int, bias: bool = True, device=None, dtype=None,
                 backend: Optional[str] = None, check_indices: bool = True):
        """``check_indices``: check every id of ``top_indices`` on each call (on CUDA one host sync;
        pass False when the ids come from a trusted encoder, as ``sparse_decode`` says)."""
        super().__init__()
        for name, size in (("n_latents", n_latents), ("d_model", d_model)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name}: expected a positive int, got {size!r}")
        if not isinstance(bias, bool):  # bias="no" would make one
            raise TypeError(f"bias: expected a bool, got {bias!r}")
        check_param_dtype(dtype)
        self.n_latents, self.d_model, self.backend = n_latents, d_model, backend
        self.check_indices = check_indices
        self.weight = nn.Parameter(torch.empty(n_latents, d_model, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(d_model, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: uniform in +-1/sqrt(fan_in), fan_in = n_latents.
        bound = 1.0 / math.sqrt(self.n_latents)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """top_acts, top_indices [..., k] -> [..., d_model]."""
        return sparse_decode(top_acts, top_indices, self.weight, self.bias, backend=self.backend,
                             check_indices=self.check_indices)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseDecoder":
        """The same function as ``linear`` (n_latents -> d_model), on a sparse code."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w.T)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear(n_latents, d_model)`` computing the same function on the dense code."""
        w = self.weight
        linear = nn.Linear(self.n_latents, self.d_model, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w.T)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"n_latents={self.n_latents}, d_model={self.d_model}, bias={self.bias is not None}"
