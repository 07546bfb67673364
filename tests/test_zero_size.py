"""Zero-size k, m and d: the same clear error on every backend; an empty batch gives empty outputs."""

import pytest
import torch

import topk_kernels as tk

BACKENDS = ("torch", "triton", "reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_model_dimension_refused(backend):
    with pytest.raises(ValueError, match=r"weight: expected a non-empty \[n, m\]"):
        tk.topk_encode(torch.randn(5, 0), torch.randn(13, 0), None, 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_k_refused_by_encoder_and_decoder(backend):
    x, w = torch.randn(5, 8), torch.randn(13, 8)
    with pytest.raises(ValueError, match="k: expected 1 <= k"):
        tk.topk_encode(x, w, None, 0, backend=backend)
    with pytest.raises(ValueError, match="top_acts: expected k >= 1"):
        tk.sparse_decode(torch.randn(5, 0), torch.zeros(5, 0, dtype=torch.long), w, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_degree_refused(backend):
    values, rows = torch.randn(13, 0), torch.zeros(13, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"values: expected a non-empty \[n, d\]"):
        tk.expander_encode(torch.randn(5, 8), values, rows, None, 3, backend=backend)
    with pytest.raises(ValueError, match=r"values: expected a non-empty \[n, d\]"):
        tk.expander_decode(torch.randn(5, 3), torch.randint(0, 13, (5, 3)), values, rows, 8, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_outputs(backend):
    w = torch.randn(13, 8)
    acts, idx = tk.topk_encode(torch.randn(0, 8), w, None, 3, backend=backend)
    assert acts.shape == idx.shape == (0, 3)
    assert tk.sparse_decode(acts, idx, w, backend=backend).shape == (0, 8)
