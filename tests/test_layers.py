"""SparseDecoder: the same function as the nn.Linear it replaces, and the same gradients."""

import pytest
import torch
from torch import nn

from helpers import assert_close
from sae.layers import SparseDecoder
from topk_kernels import reference


def _sparse_code(lead, n, k):
    acts = torch.rand(*lead, k)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(int(torch.tensor(lead).prod()))]).reshape(*lead, k)
    return acts, idx


@pytest.mark.parametrize("lead", [(29,), (3, 5)])
def test_from_linear_equals_linear_on_dense_latents(lead):
    n, m, k = 203, 37, 11
    linear = nn.Linear(n, m).double()
    acts, idx = _sparse_code(lead, n, k)
    acts = acts.double()
    decoder = SparseDecoder.from_linear(linear)
    dense = reference.scatter_latents(acts, idx, n)
    assert_close(decoder(acts, idx), linear(dense), 1e-12, "from_linear")


def test_gradients_match_linear():
    n, m, k = 150, 24, 7
    linear = nn.Linear(n, m).double()
    decoder = SparseDecoder.from_linear(linear)
    acts, idx = _sparse_code((17,), n, k)
    acts = acts.double().requires_grad_()
    acts_ref = acts.detach().clone().requires_grad_()
    grad = torch.randn(17, m, dtype=torch.float64)
    decoder(acts, idx).backward(grad)
    linear(reference.scatter_latents(acts_ref, idx, n)).backward(grad)
    assert_close(decoder.weight.grad, linear.weight.grad.T, 1e-12, "weight grad")
    assert_close(decoder.bias.grad, linear.bias.grad, 1e-12, "bias grad")
    assert_close(acts.grad, acts_ref.grad, 1e-12, "acts grad")


def test_to_linear_round_trip():
    decoder = SparseDecoder(64, 10)
    linear = decoder.to_linear()
    assert linear.weight.shape == (10, 64)
    back = SparseDecoder.from_linear(linear)
    assert torch.equal(back.weight, decoder.weight) and torch.equal(back.bias, decoder.bias)


def test_state_dict_holds_weight_and_bias():
    state = SparseDecoder(33, 8).state_dict()
    assert set(state) == {"weight", "bias"}
    assert state["weight"].shape == (33, 8) and state["bias"].shape == (8,)


def test_without_bias():
    decoder = SparseDecoder(20, 6, bias=False)
    acts, idx = _sparse_code((4,), 20, 3)
    assert decoder.bias is None and "bias" not in decoder.state_dict()
    assert_close(decoder(acts, idx), reference.sparse_decode(acts, idx, decoder.weight), 1e-6, "no bias")


def test_check_indices_is_passed_to_the_op(monkeypatch):
    """The layer checks ids by default and passes ``check_indices=False`` through when asked."""
    import sae.layers as layers

    seen = []
    real = layers.sparse_decode

    def spy(*args, **kwargs):
        seen.append(kwargs["check_indices"])
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "sparse_decode", spy)
    acts, idx = torch.rand(4, 3), torch.randint(0, 10, (4, 3))
    SparseDecoder(10, 6)(acts, idx)
    SparseDecoder(10, 6, check_indices=False)(acts, idx)
    assert seen == [True, False]
    with pytest.raises(IndexError, match="top_indices"):
        SparseDecoder(10, 6)(acts, idx + 10)


def test_sparse_decoder_refuses_sizes_that_are_not_positive_ints():
    for args, name in (((2.5, 4), "n_latents"), ((4, 0), "d_model"), ((True, 4), "n_latents")):
        with pytest.raises(ValueError, match=rf"^{name}: expected a positive int"):
            SparseDecoder(*args)
