"""Zero-size k, m and d: the same clear error on every backend; an empty batch gives empty outputs;
more latents than the Triton kernels' int32 ids hold take the PyTorch path (or are refused by name)."""

import pytest
import torch

import topk_kernels as tk
from topk_kernels import _common
from topk_kernels import reference

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


def test_more_latents_than_int32_ids_take_the_torch_path_or_are_refused(monkeypatch):
    """n above MAX_TRITON_LATENTS (2**31 - 2 shipped; 10 here, so that the test can hold such an n):
    backend='triton' names the argument, backend=None computes on the PyTorch path, on every op."""
    monkeypatch.setattr(_common, "MAX_TRITON_LATENTS", 10)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 6, generator=g), torch.randn(11, 6, generator=g), torch.randn(11, generator=g)
    values, rows = torch.randn(11, 2, generator=g), torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(11)])
    acts, idx = torch.rand(5, 3, generator=g), torch.randint(0, 11, (5, 3), generator=g)
    calls = {
        "weight": [lambda bk: tk.topk_encode(x, w, b, 3, backend=bk),
                   lambda bk: tk.sparse_decode(acts, idx, w, backend=bk)],
        "values": [lambda bk: tk.expander_encode(x, values, rows, b, 3, backend=bk),
                   lambda bk: tk.expander_decode(acts, idx, values, rows, 6, backend=bk)],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(ValueError, match=rf"{name}: expected at most 10 latents for backend='triton'.* got 11"):
                fn("triton")
            auto, torch_path = fn(None), fn("torch")
            for a, t in zip(auto if isinstance(auto, tuple) else (auto,),
                            torch_path if isinstance(torch_path, tuple) else (torch_path,)):
                assert torch.equal(a, t)
    monkeypatch.setattr(_common, "MAX_TRITON_LATENTS", 11)  # at the limit: the kernels run
    torch.testing.assert_close(tk.expander_decode(acts, idx, values, rows, 6, backend="triton").double(),
                               reference.expander_decode(acts.double(), idx, values.double(), rows, 6),
                               rtol=1e-5, atol=1e-5)
