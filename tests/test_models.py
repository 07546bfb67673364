"""TopKSAE and ExpanderSAE: forward against independent dense formulas, the decoder constraints,
dead latents and AuxK, BatchTopK, checkpoints, and learning a planted sparse dictionary."""

import numpy as np
import pytest
import torch

from helpers import DEVICE, StorageAllocations, assert_close
from sae.baselines import DenseMaskedExpanderSAE, DenseTopKSAE
from sae.data import ActivationBuffer
from sae.layers import SparseDecoder
from sae.masks import expander_mask
from sae import load_sae
from sae.models import ExpanderSAE, TopKSAE
from sae.train import TrainConfig, train
from topk_kernels import reference


def _planted(m, n, k, tokens, seed=0):
    """x = sum of k random atoms of a unit-norm dictionary [n, m] with positive coefficients."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n, m, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(tokens)])
    coef = torch.rand(tokens, k, generator=g) + 0.5
    return reference.sparse_decode(coef, idx, dictionary)


# -- TopKSAE ----------------------------------------------------------------------------------

def test_topk_forward_matches_dense_formula():
    sae = TopKSAE(24, 101, 5)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(3, 7, 24)
    out = sae(x)
    x64 = x.double()
    pre = (x64 - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double()
    acts, idx = pre.topk(5, dim=-1)
    dense = torch.zeros(3, 7, 101, dtype=torch.float64).scatter(-1, idx, acts.relu())
    want = dense @ sae.W_dec.double() + sae.b_dec.double()
    assert torch.equal(out.top_indices, idx)
    assert_close(out.x_hat, want, 1e-5, "x_hat")
    dense = DenseTopKSAE(24, 101, 5)
    dense.load_state_dict({"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec})
    assert_close(dense(x)[0], want, 1e-5, "dense baseline x_hat")
    err = (x64 - want).reshape(-1, 24)
    fvu = err.pow(2).sum() / (x64.reshape(-1, 24) - x64.reshape(-1, 24).mean(0)).pow(2).sum()
    assert_close(out.fvu.reshape(1), fvu.reshape(1), 1e-5, "fvu")


@pytest.mark.parametrize("tokens", [37, 3])  # B * k >= n (b_dec's gradient through b_enc's) and < n
@pytest.mark.parametrize("x_grad", [False, True])
def test_topk_gradients_match_dense_formula(monkeypatch, tokens, x_grad):
    """Every parameter's gradient (and x's) against the dense formula in fp64, with b_dec off zero."""
    import sae.models as models
    calls = []
    apply = models._CentreGrad.apply
    monkeypatch.setattr(models._CentreGrad, "apply", lambda *a: calls.append(1) or apply(*a))
    m, n, k = 24, 101, 5
    sae = TopKSAE(m, n, k).double()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.W_enc.add_(0.3 * torch.randn(n, m, dtype=torch.float64))
    dense = DenseTopKSAE(m, n, k).double()
    dense.load_state_dict({"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec})
    x = torch.randn(tokens, m, dtype=torch.float64)
    xs = [x.clone().requires_grad_(x_grad) for _ in range(2)]
    g = torch.randn(tokens, m, dtype=torch.float64)
    (sae(xs[0]).x_hat * g).sum().backward()
    (dense(xs[1])[0] * g).sum().backward()
    assert len(calls) == (tokens * k >= n)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert_close(getattr(sae, name).grad, getattr(dense, name).grad, 1e-10, f"grad {name}")
    if x_grad:
        assert_close(xs[0].grad, xs[1].grad, 1e-10, "grad x")


def test_topk_auxk_gradient_of_b_dec_matches_dense_formula():
    """AuxK's encoder centres x too: its b_dec gradient, with many dead latents, against fp64 autograd."""
    m, n, k, k_aux = 16, 64, 2, 8
    sae = TopKSAE(m, n, k, dead_tokens_threshold=10, k_aux=k_aux, auxk_norm="residual").double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
        sae.tokens_since_fired[:40] = 100
    x = torch.randn(40, m, dtype=torch.float64)
    out = sae(x)
    out.auxk_loss.backward()
    b_dec = sae.b_dec.detach().clone().requires_grad_(True)
    W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
    dead_bias = sae.b_enc.detach().masked_fill(~out.dead_mask, -1e30)
    pre = (x - b_dec) @ W_enc.T + dead_bias
    acts, idx = pre.topk(k_aux, dim=-1)
    e = (x - out.x_hat).detach()
    e_hat = torch.zeros_like(pre).scatter(-1, idx, acts.relu()) @ W_dec
    ((e_hat - e).pow(2).sum() / e.pow(2).sum()).backward()
    assert torch.equal(out.auxk_indices, idx)
    assert_close(sae.b_dec.grad, b_dec.grad, 1e-10, "AuxK grad b_dec")  # an fp64 SAE's losses are fp64


@pytest.mark.parametrize("arch", ["topk", "expander"])
def test_an_fp64_sae_is_an_fp64_function_loss_included(arch):
    """An fp64 SAE computes FVU and AuxK in fp64 (they were fp32 whatever the SAE's dtype), so its
    loss passes gradcheck and matches the fp64 formula to fp64 precision."""
    m, n, k = 13, 45, 4
    sae = (TopKSAE(m, n, k) if arch == "topk" else ExpanderSAE(m, n, k, degree=3)).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(9, m, dtype=torch.float64, requires_grad=True)
    sae.eval()  # no dead-latent counts moving between gradcheck's calls
    out = sae(x)
    assert out.fvu.dtype == torch.float64
    want = (x - out.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert abs(float(out.fvu.detach()) - float(want.detach())) <= 1e-14 * float(want.detach())
    assert torch.autograd.gradcheck(lambda t: sae(t).fvu, (x,))
    sae.train()
    with torch.no_grad():
        sae.tokens_since_fired.fill_(10**9)  # every latent dead: AuxK on
    aux = sae(x).auxk_loss
    assert aux is not None and aux.dtype == torch.float64


@pytest.mark.parametrize("arch", ["topk", "expander", "expander-untied", "expander-signed"])
@pytest.mark.parametrize("tokens", [3, 40])  # 40 * 8 >= 23 dead: TopK's b_dec gradient through _CentreGrad
def test_auxk_over_the_dead_latents_alone_is_the_masked_encoder_s(monkeypatch, arch, tokens):
    """With few dead latents AuxK encodes only their rows. Its indices, loss and every gradient are
    those of the encoder over all latents with live ones masked by a huge negative bias (fp64)."""
    import sae.models as models

    m, n, k = 19, 203, 3
    options = {"expander-untied": dict(tied=False), "expander-signed": dict(signed=True)}.get(arch, {})
    make = (lambda: TopKSAE(m, n, k, dead_tokens_threshold=10, k_aux=8)) if arch == "topk" else \
        (lambda: ExpanderSAE(m, n, k, degree=4, dead_tokens_threshold=10, k_aux=8, **options))
    x = torch.randn(tokens, m, dtype=torch.float64)
    dead = torch.randperm(n)[:23]
    results, subsets = [], []
    cls = TopKSAE if arch == "topk" else ExpanderSAE
    encode = cls._encode_with
    monkeypatch.setattr(cls, "_encode_with", lambda self, *a, latents=None, **kw: subsets.append(latents is not None)
                        or encode(self, *a, latents=latents, **kw))
    for subset in (models._AUXK_SUBSET, n + 1):  # 23 * 8 <= 203: the subset path; then the masked one
        monkeypatch.setattr(models, "_AUXK_SUBSET", subset)
        torch.manual_seed(0)
        sae = make().double()
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_()
            sae.tokens_since_fired[dead] = 100
        out = sae(x)
        out.auxk_loss.backward()  # alone, AuxK's W_enc / W_dec rows of TopK's subset are a sparse gradient
        results.append((out, {name: p.grad.to_dense() for name, p in sae.named_parameters() if p.grad is not None}))
    (sub, sub_grads), (masked, masked_grads) = results
    assert subsets == [False, True, False, False]  # (codes, AuxK) per run: only the first AuxK took the rows
    assert torch.equal(sub.auxk_indices, masked.auxk_indices)
    assert set(sub.auxk_indices.unique().tolist()) <= set(dead.tolist())
    assert_close(sub.auxk_loss, masked.auxk_loss, 1e-12, "auxk_loss")
    assert sub_grads.keys() == masked_grads.keys() and len(sub_grads) >= 3  # b_dec (decoder.bias) among them
    for name in sub_grads:
        assert_close(sub_grads[name], masked_grads[name], 1e-10, f"grad {name}")


@pytest.mark.parametrize("options", [{}, dict(tied=False), dict(signed=True)])
def test_expander_normalises_its_atoms_once_a_forward(monkeypatch, options):
    """The tied encoder, the decoder and AuxK share one ``atoms()`` a forward (each normalised its
    own); outputs equal those with fresh atoms at every use, gradients within fp64 rounding, and
    ``encode`` / ``decode`` called alone still normalise the current values."""
    m, n, k, tokens = 19, 203, 3, 40
    x = torch.randn(tokens, m, dtype=torch.float64)
    dead = torch.randperm(n)[:23]
    calls, results = [], []
    atoms = ExpanderSAE.atoms
    monkeypatch.setattr(ExpanderSAE, "atoms", lambda self: calls.append(1) or atoms(self))
    for shared in (True, False):
        if not shared:  # every use normalises afresh, as before
            monkeypatch.setattr(ExpanderSAE, "_atoms", lambda self: self.atoms())
        torch.manual_seed(0)
        sae = ExpanderSAE(m, n, k, degree=4, dead_tokens_threshold=10, k_aux=8, **options).double()
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_()
            sae.values.mul_(torch.rand(n, 1, dtype=torch.float64) + 0.5)  # not unit norm: the division counts
            sae.tokens_since_fired[dead] = 100
        calls.clear()
        out = sae(x)
        results.append((len(calls), out))
        (out.fvu + out.auxk_loss).backward()
        results[-1] += ({name: p.grad for name, p in sae.named_parameters()},)
    (once, out, grads), (fresh, out_fresh, grads_fresh) = results
    assert once == 1 and fresh >= 3  # fresh: the decoder, AuxK's decoder, and the tied encoders
    for name in ("x_hat", "top_acts", "top_indices", "fvu", "auxk_loss", "auxk_indices"):
        assert torch.equal(getattr(out, name), getattr(out_fresh, name)), name
    for name, g in grads.items():
        assert_close(g, grads_fresh[name], 1e-12, f"grad {name}")
    assert sae._forward_atoms is None  # nothing kept between forwards
    calls.clear()
    sae.decode(*sae.encode(x))
    assert len(calls) == (2 if options.get("tied", True) else 1)


def test_topk_auxk_over_the_dead_latents_sends_their_rows_a_sparse_gradient(monkeypatch):
    """TopK's AuxK over few dead latents gathers their W_enc and W_dec rows with a sparse gradient,
    which the step's backward adds to the codes' dense one: one dense [n, m] gradient a weight and
    their sum (index_select's dense zeros and index_add, and the decoder's second dense gradient,
    made seven). The parameters' gradients are dense and those of the masked path (fp64)."""
    import sae.models as models

    m, n, k, tokens = 24, 1000, 4, 16  # tokens < m: no [tokens, n] buffer is as large as [n, m]
    x = torch.randn(tokens, m, dtype=torch.float64)
    dead = torch.randperm(n)[:100]
    grads, counts = [], []
    for subset in (models._AUXK_SUBSET, n + 1):  # 100 * 8 <= 1000: the subset path; then the masked one
        monkeypatch.setattr(models, "_AUXK_SUBSET", subset)
        torch.manual_seed(0)
        sae = TopKSAE(m, n, k, dead_tokens_threshold=10, k_aux=12).double()
        with torch.no_grad():
            sae.tokens_since_fired[dead] = 100
        out = sae(x)
        assert out.auxk_loss is not None
        spy = StorageAllocations()
        with spy:
            out.loss.backward()
        counts.append(sum(size == n * m * 8 for size in spy.sizes))
        assert not sae.W_enc.grad.is_sparse and not sae.W_dec.grad.is_sparse
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})
    assert counts[0] <= 4, counts
    for name in grads[1]:
        assert_close(grads[0][name], grads[1][name], 1e-10, f"grad {name}")


@pytest.mark.parametrize("dead", [5, 12])
def test_auxk_variance_term_weighed_down_when_fewer_dead_than_k_aux(dead):
    """auxk_norm="variance" with 5 dead latents and k_aux = 8: the term is (5 / 8) * ||e_hat - e||^2 /
    total variance, e_hat the 5 dead latents' reconstruction of e = x - x_hat (fp64 dense formula).
    With 12 dead latents the top 8 of them reconstruct e, at weight 1 (the weight is min(dead / k_aux,
    1): more dead latents than k_aux must not weigh the term up)."""
    m, n, k, k_aux = 16, 53, 2, 8
    sae = TopKSAE(m, n, k, dead_tokens_threshold=10, k_aux=k_aux).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
        sae.tokens_since_fired[torch.randperm(n)[:dead]] = 100
    x = torch.randn(31, m, dtype=torch.float64)
    out = sae(x)
    W_enc, W_dec, b_dec = sae.W_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach()
    pre = (x - b_dec) @ W_enc.T + sae.b_enc.detach().masked_fill(~out.dead_mask, -1e30)
    acts, idx = pre.topk(min(dead, k_aux), dim=-1)
    e = (x - out.x_hat).detach()
    e_hat = torch.zeros_like(pre).scatter(-1, idx, acts.relu()) @ W_dec
    want = min(dead / k_aux, 1.0) * (e_hat - e).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    got, want = float(out.auxk_loss.detach()), float(want)
    assert abs(got - want) <= 1e-12 * want


@pytest.mark.parametrize("option, value", [("auxk_norm", "resdual"), ("auxk_coef", -1.0), ("auxk_coef", float("nan")),
                                           ("k_aux", 0), ("batch_topk_cap", 0), ("b_dec_init", "bogus"),
                                           ("dead_tokens_threshold", 0), ("auxk", "no"), ("auxk", 0),
                                           ("normalize_activations", "false"), ("batch_topk", 1),
                                           ("auxk_coef", True)])
@pytest.mark.parametrize("cls", ["TopKSAE", "ExpanderSAE"])
def test_constructors_refuse_bad_options_by_name(cls, option, value):
    build = (lambda **o: TopKSAE(16, 40, 3, **o)) if cls == "TopKSAE" else (lambda **o: ExpanderSAE(16, 40, 3, 4, **o))
    build()
    with pytest.raises(ValueError, match=f"^{option}: expected"):
        build(**{option: value})


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_constructors_refuse_a_non_float_dtype_by_name(dtype):
    for build in (lambda: TopKSAE(16, 40, 3, dtype=dtype), lambda: ExpanderSAE(16, 40, 3, 4, dtype=dtype),
                  lambda: SparseDecoder(40, 16, dtype=dtype)):
        with pytest.raises(TypeError, match="^dtype: expected"):
            build()


@pytest.mark.parametrize("degree", [np.int64(4), 4.0, True, 0, -2, "4"])
def test_expander_refuses_a_degree_that_is_not_a_positive_int_by_name(degree, tmp_path):
    """As d_model, n_latents and k: a numpy int was taken once (the mask accepts any Integral), and the
    SAE then trained but could not be saved (its config held an np.int64, which JSON refuses)."""
    with pytest.raises(ValueError, match=r"^degree: expected a positive int, got "):
        ExpanderSAE(16, 40, 3, degree)
    ExpanderSAE(16, 40, 3, 4).save(str(tmp_path / "sae.safetensors"))


def test_expander_names_degree_when_it_does_not_fit_d_model():
    """A degree above d_model, or too few latents x degree to cover d_model, was refused by
    expander_mask under its own names ("d: expected d <= m=16", "n, d: ..."): no argument of
    ExpanderSAE is called d. Through SAEConfig.build as well; the limits themselves are allowed."""
    from sae.config import SAEConfig
    from sae.masks import expander_mask

    for build in (lambda: ExpanderSAE(16, 40, 3, 17), lambda: SAEConfig(arch="expander", n_latents=40, k=3,
                                                                          degree=17).build(16)):
        with pytest.raises(ValueError, match=r"^degree: expected degree <= d_model=16 \(a latent's rows must be "
                                             r"distinct\), got degree=17$"):
            build()
    with pytest.raises(ValueError, match=r"^n_latents, degree: expected n_latents \* degree >= d_model=16 so that "
                                         r"every coordinate is on some atom, got 3 \* 5 = 15$"):
        ExpanderSAE(16, 3, 3, 5)
    for m, n, d in ((16, 40, 16), (16, 4, 4)):  # the limits, as the mask draws them
        assert torch.equal(ExpanderSAE(m, n, 3, d, seed=1).rows, expander_mask(m, n, d, seed=1))


@pytest.mark.parametrize("option, value", [("tied", "no"), ("tied", 0), ("signed", "x"), ("renorm_values", 1)])
def test_expander_refuses_a_non_bool_flag_by_name(option, value):
    with pytest.raises(ValueError, match=f"^{option}: expected True or False"):
        ExpanderSAE(16, 40, 3, 4, **{option: value})


def test_topk_tied_unit_norm_init():
    sae = TopKSAE(16, 40, 3)
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert_close(sae.W_dec.norm(dim=1), torch.ones(40), 1e-6, "row norms")


@pytest.mark.parametrize("given", [torch.int64, torch.int32, None])
def test_remove_parallel_grads_touches_only_given_rows(given):
    sae = TopKSAE(12, 30, 4)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(30, 1) + 0.5)  # rows off unit norm: the projection divides by |w|^2
    sae.W_dec.grad = torch.randn(30, 12)
    before = sae.W_dec.grad.clone()
    rows = torch.tensor([3, 7, 7, 21], dtype=given) if given else None
    sae.remove_parallel_grads(rows)
    touched = torch.zeros(30, dtype=torch.bool)
    touched[rows if given else slice(None)] = True
    w, g = sae.W_dec.detach().double(), before.double()
    want = g - (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
    assert_close(sae.W_dec.grad[touched], want[touched], 1e-5, "projected rows")
    assert (sae.W_dec.grad * sae.W_dec).sum(1)[touched].abs().max() < 1e-5
    assert torch.equal(sae.W_dec.grad[~touched], before[~touched])
    assert sae.W_dec.grad_fn is None and not sae.W_dec.grad.requires_grad



def test_remove_parallel_grads_zero_row_in_half_precision():
    """A zero decoder row has no direction to project out: its gradient stays as it is (the norm's
    floor must not underflow to 0 in fp16 and turn it into NaN)."""
    sae = TopKSAE(12, 30, 4).half()
    with torch.no_grad():
        sae.W_dec[5] = 0
    sae.W_dec.grad = torch.randn(30, 12).half()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grads(torch.tensor([5, 6]))
    assert torch.equal(sae.W_dec.grad[5], before[5])
    assert not sae.W_dec.grad.isnan().any()


def test_normalize_decoder():
    sae = TopKSAE(12, 30, 4)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(30, 1) * 3 + 0.1)
    sae.normalize_decoder()
    assert_close(sae.W_dec.norm(dim=1), torch.ones(30), 1e-6, "row norms")


def test_init_b_dec_refuses_an_empty_sample():
    with pytest.raises(ValueError, match=r"^sample: expected at least one activation"):
        TopKSAE(8, 16, 2).init_b_dec(torch.empty(0, 8))


def test_init_b_dec_median():
    sae = TopKSAE(8, 16, 2)
    sample = torch.randn(101, 8) + 3
    sae.init_b_dec(sample)
    assert torch.equal(sae.b_dec.detach(), sample.median(0).values)


def test_topk_learns_planted_dictionary():
    x = _planted(32, 256, 4, 8192)
    sae = TopKSAE(32, 256, 4, auxk=False)
    with torch.no_grad():
        first = float(sae(x[:2048]).fvu)
    cfg = TrainConfig(batch_size=256, total_tokens=256 * 600, lr=3e-3, warmup_steps=20, checkpoint_every=10**9,
                      progress=False)
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        train(sae, ActivationBuffer(x), cfg, out)
    with torch.no_grad():
        last = float(sae(x[:2048]).fvu)
    assert last <= 0.5 * first, f"FVU went from {first:.3f} to {last:.3f}"


def _kill_latents(sae, killed):
    # Dead but revivable: their encoder rows are scaled down so they never make the top-k, yet keep
    # positive pre-activations on some tokens, which is what AuxK can act on.
    with torch.no_grad():
        sae.W_enc[killed] *= 0.02


@pytest.mark.parametrize("auxk", [True, False])
def test_auxk_revives_dead_latents(auxk, tmp_path):
    x = _planted(32, 128, 4, 8192, seed=1)
    sae = TopKSAE(32, 128, 4, auxk=auxk, k_aux=32, auxk_coef=1.0, dead_tokens_threshold=512)
    killed = torch.arange(64, 128)
    _kill_latents(sae, killed)
    cfg = TrainConfig(batch_size=256, total_tokens=256 * 300, lr=3e-3, warmup_steps=10, decay_fraction=0.0,
                      checkpoint_every=10**9, progress=False)
    train(sae, ActivationBuffer(x), cfg, tmp_path)
    sae.eval()
    with torch.no_grad():
        _, idx = sae.encode(x)
    fired = torch.zeros(128, dtype=torch.bool)
    fired[idx.reshape(-1)] = True
    revived = fired[killed].float().mean().item()
    if auxk:
        assert revived >= 0.5, f"AuxK revived only {revived:.0%} of the killed latents"
    else:
        assert revived <= 0.1, f"without AuxK {revived:.0%} of killed latents fired: the test does not kill them"


def test_dead_mask_and_auxk_term_reported():
    sae = TopKSAE(16, 64, 2, dead_tokens_threshold=10)
    with torch.no_grad():
        sae.tokens_since_fired[:32] = 100
    out = sae(torch.randn(20, 16))
    assert out.dead_mask is not None and out.dead_mask[:32].all() and not out.dead_mask[32:].any()
    assert out.auxk_loss is not None and out.auxk_loss > 0
    assert (out.auxk_indices < 32).all(), "AuxK must use dead latents only"
    assert torch.allclose(out.loss, out.fvu + out.auxk_coef * out.auxk_loss)


def test_dead_counts_add_the_tokens_reset_on_a_positive_act_and_dead_means_past_the_threshold():
    """One training forward: latents with a positive activation in the batch restart at 0, the rest
    (a selected latent whose act ReLU made 0 included) count the batch's tokens on top; the dead
    mask is taken before the update and is strict (a count equal to the threshold is alive)."""
    n, B, threshold = 37, 7, 10
    sae = TopKSAE(16, n, 3, dead_tokens_threshold=threshold, auxk=False)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.b_enc[[4, 30]] = 100.0  # the only latents with a positive pre-activation
        before = torch.randint(0, 2 * threshold, (n,))
        before[[4, 30, 5, 6]] = torch.tensor([threshold + 1, threshold, threshold, threshold + 1])
        sae.tokens_since_fired.copy_(before)
    out = sae(torch.randn(B, 16))
    assert torch.equal(out.dead_mask, before > threshold)
    fired = torch.zeros(n, dtype=torch.bool)
    fired[out.top_indices[out.top_acts > 0]] = True
    assert fired.sum() == 2 and (out.top_acts == 0).any()  # selected zeros are not firings
    assert torch.equal(sae.tokens_since_fired, torch.where(fired, 0, before + B))


def test_batch_topk_keeps_exactly_the_batch_s_largest_candidates():
    """No ties, every candidate positive: BatchTopK keeps exactly the B * k largest of the per-token
    candidates (the budget's smallest one included), against a direct sort."""
    B, k = 23, 3
    sae = TopKSAE(16, 61, k, batch_topk=True)
    with torch.no_grad():
        sae.b_enc.fill_(50.0)
    x = torch.randn(B, 16)
    out = sae(x)
    cand, _ = sae._encode_with(x - sae.b_dec, sae.b_enc, sae.batch_topk_cap * k)
    want = torch.zeros_like(cand, dtype=torch.bool).view(-1)
    want[cand.detach().reshape(-1).sort(descending=True).indices[: B * k]] = True
    assert torch.equal(out.top_acts.detach() > 0, want.view_as(cand))


def test_batch_topk_keeps_batch_budget_and_learns_threshold():
    sae = TopKSAE(16, 64, 3, batch_topk=True)
    x = torch.randn(50, 16)
    out = sae(x)
    assert int((out.top_acts > 0).sum()) <= 50 * 3
    assert int((out.top_acts > 0).sum()) >= 50 * 3 - 5  # ties at zero aside, the budget is used
    assert float(sae.batch_threshold) > 0
    sae.eval()
    acts, _ = sae.encode(x)
    assert ((acts == 0) | (acts > sae.batch_threshold)).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="k: expected k <= n_latents=10"):
        TopKSAE(8, 10, 11)
    with pytest.raises(ValueError, match="x: expected last dimension d_model=8"):
        TopKSAE(8, 10, 2)(torch.randn(4, 9))
    with pytest.raises(ValueError, match="^degree: expected degree <= d_model=8"):
        ExpanderSAE(8, 10, 2, degree=9)


@pytest.mark.parametrize("cls,kwargs", [(TopKSAE, {}), (ExpanderSAE, {"degree": 3, "seed": 5})])
def test_save_load_round_trip(tmp_path, cls, kwargs):
    sae = cls(12, 40, 4, dead_tokens_threshold=77, **kwargs)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    path = str(tmp_path / "sae.safetensors")
    sae.save(path)
    loaded = cls.load(path)
    assert loaded.config() == sae.config()
    for (name, a), (_, b) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(5, 12)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


# -- ExpanderSAE ------------------------------------------------------------------------------

def test_expander_equals_dense_masked_formulation():
    """Zero biases: the compact model and the paper's dense colnorm(M * V) give the same x_hat and
    the same gradient w.r.t. the values (the dense V's gradient read at the support)."""
    m, n, d, k = 40, 300, 5, 8
    sae = ExpanderSAE(m, n, k, degree=d, seed=3).double()
    with torch.no_grad():
        sae.values.normal_()
    dense = DenseMaskedExpanderSAE(m, n, k, sae.rows, sae.values.detach()).double()
    x = torch.randn(17, m, dtype=torch.float64)
    out = sae(x)
    x_hat_dense, _ = dense(x)
    assert torch.equal(out.top_indices, ((x @ dense.dictionary()).topk(k, dim=-1).indices))
    assert_close(out.x_hat, x_hat_dense, 1e-4, "x_hat")
    g = torch.randn_like(x)
    (out.x_hat * g).sum().backward()
    (x_hat_dense * g).sum().backward()
    grad_dense_at_support = dense.V.grad[sae.rows, torch.arange(n)[:, None]]
    assert_close(sae.values.grad, grad_dense_at_support, 1e-4, "grad values")


def test_expander_zero_value_row_is_a_zero_atom_not_nan():
    """A latent whose values are all 0 has the zero atom (the norm is clamped), so forward, loss and
    gradients stay finite even when that latent is selected."""
    sae = ExpanderSAE(24, 61, 4, degree=5)
    with torch.no_grad():
        sae.values[7] = 0
        sae.b_enc[7] = 5.0  # selected by every token
    assert torch.isfinite(sae.atoms()).all() and (sae.atoms()[7] == 0).all()
    out = sae(torch.randn(9, 24))
    assert (out.top_indices == 7).any()
    out.loss.backward()
    assert torch.isfinite(out.x_hat).all() and torch.isfinite(out.fvu)
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("degree", [2, 7, 16])
def test_half_precision_atoms_backward_against_fp64(dtype, degree):
    """The gradient through ``atoms()`` (values / |values|) for bf16 / fp16 values, against fp64
    autograd on the same values and output gradient: within 1 % of its scale (normalised in bf16
    it was off by 2.7 % at d = 7 and 120 % at d = 16; in fp32 and rounded once, ~0.2 %)."""
    g = torch.Generator().manual_seed(degree)
    sae = ExpanderSAE(32, 500, 4, degree=degree, seed=degree, dtype=dtype, backend="torch")
    grad_out = torch.randn(500, degree, generator=g).to(dtype)
    (sae.atoms() * grad_out).float().sum().backward()
    v = sae.values.detach().double().requires_grad_()
    ((v / v.norm(dim=1, keepdim=True)) * grad_out.double()).sum().backward()
    assert sae.atoms().dtype == dtype
    err = (sae.values.grad.double() - v.grad).abs().max() / v.grad.abs().max()
    assert err < 1e-2, float(err)


def test_expander_stores_only_n_times_d_matrix_values():
    sae = ExpanderSAE(64, 512, 8, degree=7)
    matrices = [p for p in sae.parameters() if p.dim() == 2]
    assert [tuple(p.shape) for p in matrices] == [(512, 7)]
    assert sae.decoder_values == 512 * 7
    assert sae.rows.shape == (512, 7) and sae.rows.dtype == torch.int64


def _dense_masked_expander(x, values, rows, b_enc, b_dec, k, enc_values=None, signed=False):
    """The paper's form, written from the mask, in x's dtype: W = colnorm(M * V) with M [m, n] the
    0/1 mask of ``rows`` and V [m, n] the values scattered onto it; pre = (x - b_dec) @ W_enc + b_enc
    with W_enc = W (tied) or M * V_enc; a dense top-k (ReLU, or signed by |pre|); x_hat = z @ W.T + b_dec.
    Returns (x_hat, acts at idx, idx), idx the selected latents in ascending order."""
    m, (n, d) = x.shape[-1], rows.shape
    support = (rows.reshape(-1), torch.arange(n).repeat_interleave(d))
    mask = torch.zeros(m, n, dtype=x.dtype).index_put(support, torch.ones(n * d, dtype=x.dtype))
    V = torch.zeros(m, n, dtype=x.dtype).index_put(support, values.reshape(-1))
    W = (mask * V) / (mask * V).norm(dim=0, keepdim=True)
    W_enc = W if enc_values is None else mask * torch.zeros(m, n, dtype=x.dtype).index_put(support, enc_values.reshape(-1))
    pre = (x - b_dec) @ W_enc + b_enc
    idx = (pre.abs() if signed else pre).topk(k, dim=-1).indices.sort(dim=-1).values
    acts = pre.gather(-1, idx) if signed else pre.gather(-1, idx).relu()
    z = torch.zeros_like(pre).scatter(-1, idx, acts)
    return z @ W.T + b_dec, acts, idx


def _expander_against_dense(m, n, d, k, tied, signed, backend, dtype, tol):
    """ExpanderSAE (non-zero biases, values of unequal norms) against ``_dense_masked_expander`` in
    fp64: x_hat, the codes, and the gradients of every parameter and of x (the dense V's gradient
    read at the support)."""
    sae = ExpanderSAE(m, n, k, degree=d, seed=m + n, tied=tied, signed=signed, auxk=False, backend=backend)
    assert torch.equal(sae.rows, expander_mask(m, n, d, seed=m + n))
    sae = sae.double()
    with torch.no_grad():
        sae.values.mul_(torch.rand(n, 1, dtype=torch.float64) * 3 + 0.2)  # atoms normalise them away
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        if not tied:
            sae.enc_values.normal_()
    ref = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    sae = sae.to(dtype)
    x_ref = torch.randn(7, m, dtype=torch.float64, requires_grad=True)
    x = x_ref.detach().to(dtype).requires_grad_()
    out = sae(x)
    x_hat, acts, idx = _dense_masked_expander(x_ref, ref["values"], sae.rows, ref["b_enc"], ref["b_dec"], k,
                                              ref.get("enc_values"), signed)
    order = out.top_indices.argsort(dim=-1)
    assert torch.equal(out.top_indices.gather(-1, order), idx)
    assert_close(out.top_acts.gather(-1, order), acts, tol, "top_acts")
    assert_close(out.x_hat, x_hat, tol, "x_hat")
    g = torch.randn(7, m, dtype=torch.float64)
    (out.x_hat.double() * g).sum().backward()
    (x_hat * g).sum().backward()
    for name, p in sae.named_parameters():
        assert_close(p.grad, ref[name].grad, tol, f"grad {name}")
    assert_close(x.grad, x_ref.grad, tol, "grad x")


# (m, n, d, k): odd sizes, n*d not a multiple of m; d = 1; d = m; d > m/2 (the mask's complement
# path) with k = n.
EXPANDER_REFERENCE_SIZES = [(13, 29, 5, 3), (11, 23, 1, 3), (9, 17, 9, 4), (31, 11, 16, 11)]


@pytest.mark.parametrize("m,n,d,k", EXPANDER_REFERENCE_SIZES)
@pytest.mark.parametrize("tied,signed", [(True, False), (False, False), (True, True), (False, True)])
def test_expander_equals_dense_masked_reference_with_biases_fp64(m, n, d, k, tied, signed):
    _expander_against_dense(m, n, d, k, tied, signed, "torch", torch.float64, 1e-10)


@pytest.mark.parametrize("tied,signed", [(True, False), (False, True)])
def test_expander_triton_equals_dense_masked_reference_with_biases(tied, signed):
    _expander_against_dense(13, 29, 5, 3, tied, signed, "triton", torch.float32, 2e-5)


def test_expander_gradcheck_fp64():
    """Every parameter and x through the normalised, tied atoms: autograd against finite differences."""
    sae = ExpanderSAE(11, 23, 3, degree=4, seed=1, auxk=False).double()
    with torch.no_grad():
        sae.values.mul_(torch.rand(23, 1, dtype=torch.float64) + 0.5)
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    names = [name for name, _ in sae.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in sae.parameters()]
    x = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        out = torch.func.functional_call(sae, dict(zip(names, ps)), (x,))
        return out.x_hat, out.top_acts

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_expander_adam_steps_equal_the_dense_masked_form():
    """Training, as the trainer steps: gradient clipping by global norm, Adam, then the decoder
    constraints. Off the support the dense V's gradient is 0, so Adam on the compact values is Adam
    on the dense V at the support, and the atoms stay equal step after step."""
    m, n, d, k = 13, 29, 5, 3
    sae = ExpanderSAE(m, n, k, degree=d, seed=2, auxk=False).double()
    dense = DenseMaskedExpanderSAE(m, n, k, sae.rows, sae.values.detach()).double()
    support = (sae.rows, torch.arange(n)[:, None])
    opts = [torch.optim.Adam(model.parameters(), lr=3e-2) for model in (sae, dense)]
    for _ in range(5):
        x = torch.randn(16, m, dtype=torch.float64) + 1
        for model, opt, x_hat in ((sae, opts[0], lambda: sae(x).x_hat), (dense, opts[1], lambda: dense(x)[0])):
            opt.zero_grad()
            (x - x_hat()).pow(2).sum().backward()
            if model is sae:
                sae.remove_parallel_grads(None)  # a no-op: the atoms are normalised inside autograd
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        sae.normalize_decoder()
        assert_close(sae.atoms().detach(), dense.dictionary().detach()[support], 1e-10, "atoms")
        assert_close(sae.b_dec.detach(), dense.b_dec.detach(), 1e-10, "b_dec")
        assert_close(sae.b_enc.detach(), dense.b_enc.detach(), 1e-10, "b_enc")


def test_expander_checkpoint_keeps_its_graph_not_the_seed_s(tmp_path):
    """The saved rows come back, also when they are not the graph the config's seed would draw."""
    sae = ExpanderSAE(17, 53, 3, degree=5, seed=4)
    other = expander_mask(17, 53, 5, seed=99)
    assert not torch.equal(other, sae.rows)
    with torch.no_grad():
        sae.rows.copy_(other)
        sae.values.normal_()
        sae.b_enc.normal_()
    sae.save(str(tmp_path / "sae.safetensors"))
    x = torch.randn(6, 17)
    for dtype in (None, torch.float64):
        loaded = load_sae(str(tmp_path / "sae.safetensors"), dtype=dtype)
        assert torch.equal(loaded.rows, other) and loaded.rows.dtype == torch.int64
        assert_close(loaded(x.to(loaded.values.dtype)).x_hat, sae(x).x_hat, 1e-6, "x_hat")


def test_expander_dense_decoder_and_untied_encoder():
    sae = ExpanderSAE(20, 50, 4, degree=3, tied=False)
    dense = sae.dense_decoder()
    assert dense.shape == (50, 20)
    assert ((dense != 0).sum(1) == 3).all()
    assert_close(dense.norm(dim=1), torch.ones(50), 1e-6, "unit atoms")
    assert sae.enc_values is not None and sae.enc_values.shape == (50, 3)
    x = torch.randn(6, 20)
    pre = (x - sae.b_dec) @ reference.expander_dense(sae.enc_values, sae.rows, 20).T + sae.b_enc
    acts, idx = sae.encode(x)
    assert torch.equal(idx, pre.topk(4, dim=-1).indices)


def test_expander_learns_planted_dictionary(tmp_path):
    x = _planted(32, 256, 4, 8192)
    sae = ExpanderSAE(32, 256, 4, degree=8, auxk=False)
    with torch.no_grad():
        first = float(sae(x[:2048]).fvu)
    cfg = TrainConfig(batch_size=256, total_tokens=256 * 300, lr=1e-2, warmup_steps=20, checkpoint_every=10**9,
                      progress=False)
    train(sae, ActivationBuffer(x), cfg, tmp_path)
    with torch.no_grad():
        last = float(sae(x[:2048]).fvu)
    assert last < 0.8 * first, f"FVU went from {first:.3f} to {last:.3f}"


# -- inputs and dtypes ------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kwargs", [(TopKSAE, {}), (ExpanderSAE, {"degree": 3})])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_are_refused(cls, kwargs, bad):
    x = torch.randn(6, 12)
    x[4, 2] = bad
    with pytest.raises(ValueError, match="x: expected finite activations"):
        cls(12, 30, 3, **kwargs)(x)


def test_fp16_forward_on_llm_scale_activations_has_finite_fp32_fvu():
    sae = TopKSAE(64, 128, 8).half()
    out = sae(torch.randn(256, 64).half() * 300)
    assert out.fvu.dtype == torch.float32 and torch.isfinite(out.fvu)


def test_same_seed_same_initial_weights_whatever_the_global_rng():
    torch.manual_seed(0)
    a = TopKSAE(12, 30, 3, seed=7)
    torch.manual_seed(1)
    b = TopKSAE(12, 30, 3, seed=7)
    assert torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_enc, TopKSAE(12, 30, 3, seed=8).W_enc)


def test_double_backward_is_refused_clearly():
    x = torch.randn(5, 8, requires_grad=True)
    (g,) = torch.autograd.grad(TopKSAE(8, 20, 3)(x).fvu, x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="unknown options"):
        TopKSAE(8, 20, 3, dead_tokens=5)
    with pytest.raises(ValueError, match="signed: only for ExpanderSAE"):
        TopKSAE(8, 20, 3, signed=True)


# -- recipe options ---------------------------------------------------------------------------

def test_signed_expander_keeps_largest_magnitudes_with_their_sign():
    m, n, k = 20, 90, 6
    sae = ExpanderSAE(m, n, k, degree=4, seed=1, signed=True).double()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(11, m, dtype=torch.float64)
    out = sae(x)
    atoms = reference.expander_dense(sae.atoms().detach(), sae.rows, m)
    pre = (x - sae.b_dec.detach()) @ atoms.T + sae.b_enc.detach()
    idx = pre.abs().topk(k, dim=-1).indices
    assert torch.equal(out.top_indices.sort(-1).values, idx.sort(-1).values)
    assert_close(out.top_acts, pre.gather(-1, out.top_indices), 1e-9, "signed acts")
    want = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx)) @ atoms + sae.b_dec.detach()
    assert_close(out.x_hat, want, 1e-9, "x_hat")
    out.loss.backward()
    assert sae.values.grad is not None and torch.isfinite(sae.values.grad).all()


def test_renorm_values_keeps_unit_norm_and_the_atoms():
    sae = ExpanderSAE(16, 40, 3, degree=5, renorm_values=True)
    with torch.no_grad():
        sae.values.mul_(torch.rand(40, 1) * 3 + 0.5)
    atoms = sae.atoms().detach().clone()
    sae.normalize_decoder()
    assert_close(sae.values.norm(dim=1), torch.ones(40), 1e-6, "value norms")
    assert_close(sae.atoms(), atoms, 1e-6, "atoms")


def test_auxk_residual_normalisation_is_gao_s():
    x = torch.randn(40, 16)
    sae = TopKSAE(16, 64, 2, dead_tokens_threshold=10, k_aux=8, auxk_norm="residual")
    with torch.no_grad():
        sae.tokens_since_fired[:32] = 100
    out = sae(x)
    e = (x - out.x_hat).detach().double()
    k_aux = 8
    dead_bias = sae.b_enc.detach().double().masked_fill(~out.dead_mask, -1e30)
    pre = (x.double() - sae.b_dec.detach().double()) @ sae.W_enc.detach().double().T + dead_bias
    acts, idx = pre.topk(k_aux, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, idx, acts.relu()) @ sae.W_dec.detach().double()
    want = (e_hat - e).pow(2).sum() / e.pow(2).sum()
    assert_close(out.auxk_loss.reshape(1), want.reshape(1), 1e-4, "auxk residual")


def test_activation_normalisation_scales_in_and_back_out():
    sample = torch.randn(500, 12) * 50 + 3
    sae = TopKSAE(12, 40, 4, normalize_activations=True)
    sae.init_b_dec(sample)
    assert_close((sample * sae.act_scale).pow(2).sum(-1).mean().reshape(1), torch.tensor([12.0]), 1e-4, "E||x||^2")
    x = sample[:20]
    out = sae(x)
    # the same SAE on pre-scaled inputs, outputs scaled back by hand
    plain = TopKSAE(12, 40, 4)
    plain.load_state_dict({k: v for k, v in sae.state_dict().items() if k != "act_scale"})
    s = float(sae.act_scale)
    assert_close(out.x_hat, plain(x * s).x_hat / s, 1e-5, "x_hat")



@pytest.mark.parametrize("arch", ["topk", "expander"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalised_sae_gives_bf16_activations_the_same_function_as_their_exact_values(arch, dtype):
    """An fp32 or fp64 SAE with normalize_activations given bf16 activations (what the training
    cache stores) computes what it computes on the same values in its own dtype (every bf16 value
    is exact there), as it does without normalisation. The scaling ran in the input's dtype: the
    scale and every scaled activation were rounded to bf16 (~3 significant digits) before the
    encoder, which then picked other latents (FVU off by ~1e-3 here)."""
    m, n, k = 16, 64, 4
    kwargs = dict(normalize_activations=True, dtype=dtype, dead_tokens_threshold=1)
    sae = TopKSAE(m, n, k, seed=0, **kwargs) if arch == "topk" else ExpanderSAE(m, n, k, degree=3, seed=0, **kwargs)
    x = (torch.randn(64, m, generator=torch.Generator().manual_seed(1)) * 3 + 1).bfloat16()
    sae.init_b_dec(x.to(dtype))
    assert float(sae.act_scale) != 1.0
    dead = torch.zeros_like(sae.tokens_since_fired)
    dead[::2] = 10  # half dead: AuxK on

    def forward(inputs):
        sae.tokens_since_fired.copy_(dead)  # a training forward moves the counters: each call starts alike
        return sae(inputs)

    got, want = forward(x), forward(x.to(dtype))
    assert torch.equal(got.top_indices, want.top_indices)
    assert torch.equal(got.top_acts, want.top_acts)
    assert torch.equal(got.x_hat, want.x_hat)
    assert torch.equal(got.fvu, want.fvu) and torch.equal(got.auxk_loss, want.auxk_loss)
    assert torch.equal(sae.encode(x)[1], want.top_indices)

def test_expander_rows_checked_once_at_load_not_per_call(monkeypatch):
    """ExpanderSAE validates rows at construction and on load; the ops then skip the per-call check."""
    import topk_kernels as tk
    from sae import ExpanderSAE

    sae = ExpanderSAE(d_model=37, n_latents=53, k=3, degree=5, seed=1)
    calls = []
    real = tk.check_expander_rows
    monkeypatch.setattr(tk, "check_expander_rows", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    sae(torch.randn(11, 37))
    assert calls == []
    state = sae.state_dict()
    state["rows"] = state["rows"].clone()
    state["rows"][4, 1] = state["rows"][4, 0]  # a repeated row inside latent 4
    with pytest.raises(ValueError, match="rows"):
        sae.load_state_dict(state)
    assert calls == [1]


@pytest.mark.parametrize("cls,kwargs", [(TopKSAE, {}), (ExpanderSAE, {"degree": 3})])
def test_built_under_a_default_device_draws_the_same_weights(cls, kwargs):
    """``with torch.device(...)`` (how benchmarks/gpu.py and users build on CUDA) must not meet
    the CPU seed generator: the draws happen on CPU and land on that device, equal to a CPU
    build's. Without a GPU, "meta" stands in (the same error before the fix: "Expected a 'meta'
    device type for generator but found 'cpu'"); with --device cuda the values are compared."""
    device = "cuda" if DEVICE.type == "cuda" else "meta"
    on_cpu = cls(16, 48, 4, seed=3, **kwargs)
    with torch.device(device):
        built = cls(16, 48, 4, seed=3, **kwargs)
    for (name, a), (_, b) in zip(on_cpu.state_dict().items(), built.state_dict().items()):
        assert b.shape == a.shape and b.device.type == device, (name, b.device)
        if device == "cuda" or b.device.type == "cpu":
            assert torch.equal(a, b.cpu()), name


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.bfloat16])
def test_expander_built_under_another_default_dtype_has_the_seed_s_graph_and_weights(default_dtype):
    """The seed fixes the graph and the initial values; torch's default dtype (the parameters'
    dtype when none is named) does not change what it draws, only what the values are cast to."""
    want = ExpanderSAE(37, 101, 4, degree=5, seed=3, dtype=default_dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        built = ExpanderSAE(37, 101, 4, degree=5, seed=3)
    finally:
        torch.set_default_dtype(previous)
    assert built.values.dtype == default_dtype
    assert torch.equal(built.rows, want.rows) and torch.equal(built.rows, expander_mask(37, 101, 5, seed=3))
    assert torch.equal(built.values, want.values)


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.bfloat16])
def test_topk_built_under_another_default_dtype_has_the_seed_s_weights(default_dtype):
    """As for the expander: torch's default dtype changes what TopKSAE's seeded draw is cast to, not
    the draw (under float64 it drew other weights before)."""
    want = TopKSAE(37, 101, 4, seed=3, dtype=default_dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        built = TopKSAE(37, 101, 4, seed=3)
    finally:
        torch.set_default_dtype(previous)
    assert built.W_dec.dtype == default_dtype
    assert torch.equal(built.W_dec, want.W_dec) and torch.equal(built.W_enc, want.W_enc)


def test_expander_fallback_atoms_come_from_the_resampling_generator(monkeypatch):
    """A dead latent whose support sees no residual gets a random atom: from the generator the
    resampling passes (seeded per step by the trainer), not from the SAE's seed alone."""
    sae = ExpanderSAE(16, 40, 3, degree=4, dead_tokens_threshold=5)
    idx, zero = torch.tensor([2, 9]), torch.zeros(2, 16)

    def atoms(seed):
        sae._reinit_latents(idx, zero, torch.Generator().manual_seed(seed))
        return sae.values[idx].detach().clone()

    assert torch.equal(atoms(1), atoms(1)) and not torch.equal(atoms(1), atoms(2))
    assert_close(atoms(3).norm(dim=1), torch.ones(2), 1e-6, "unit atoms")
    seen = []
    reinit = sae._reinit_latents
    monkeypatch.setattr(sae, "_reinit_latents", lambda i, d, g=None, **kw: seen.append(g) or reinit(i, d, g, **kw))
    gen = torch.Generator().manual_seed(5)
    sae.tokens_since_fired[[2, 9]] = 6
    assert sae.resample_dead(torch.randn(30, 16), generator=gen).tolist() == [2, 9]
    assert seen == [gen]


def test_bad_bias_flag_seed_and_load_dtype_are_refused_by_name(tmp_path):
    from sae import SparseDecoder, expander_mask, load_sae

    with pytest.raises(TypeError, match="bias: expected a bool"):
        SparseDecoder(7, 5, bias="no")
    with pytest.raises(ValueError, match=r"seed: expected an int in \[-2\*\*63, 2\*\*64\)"):
        expander_mask(8, 4, 2, seed=2**70)
    assert torch.equal(expander_mask(8, 4, 2, seed=2**64 - 1), expander_mask(8, 4, 2, seed=2**64 - 1))
    with pytest.raises(TypeError, match="dtype: expected None or one of"):
        load_sae(tmp_path / "nothing.safetensors", dtype="float32")


@pytest.mark.parametrize("make", [
    lambda: TopKSAE(16, 40, 3, dead_tokens_threshold=5, seed=1),
    lambda: ExpanderSAE(16, 40, 3, degree=5, tied=False, dead_tokens_threshold=5, seed=1),
], ids=["topk", "expander-untied"])
def test_resampled_encoder_rows_are_a_fifth_of_the_live_rows_mean_norm(make):
    """Bricken et al.: a resampled latent's encoder row is its new atom's direction at 0.2 times the
    mean norm of the live latents' encoder rows, for TopKSAE and the untied ExpanderSAE alike (the
    untied Expander once got a unit row whatever the live rows' norms)."""
    sae = make()
    enc = sae.W_enc if isinstance(sae, TopKSAE) else sae.enc_values
    with torch.no_grad():
        enc.mul_(torch.linspace(0.5, 3.0, 40)[:, None])  # live norms far from 1
    dead = [4, 17, 33]
    live = [j for j in range(40) if j not in dead]
    want_norm = 0.2 * enc.detach().double().norm(dim=1)[live].mean()
    sae.tokens_since_fired[:] = 0
    sae.tokens_since_fired[dead] = 6
    assert sae.resample_dead(torch.randn(30, 16), generator=torch.Generator().manual_seed(0)).tolist() == dead
    atoms = sae.W_dec[dead] if isinstance(sae, TopKSAE) else sae.values[dead]
    rows = enc.detach()[dead].double()
    assert_close(rows.norm(dim=1), want_norm.expand(3), 1e-6, "resampled encoder norms")
    assert_close(rows / rows.norm(dim=1, keepdim=True), atoms.detach().double(), 1e-6, "encoder direction")


def test_auxk_residual_norm_of_a_zero_residual_is_zero_not_nan():
    """auxk_norm="residual" divides by the residual's own squared norm: a batch the SAE reconstructs
    exactly (residual 0, and so the dead latents' error 0) gives an AuxK term of 0, not 0 / 0."""
    from sae.models import _auxk_normalised

    zero, variance = torch.zeros(()), torch.tensor(3.0)
    loss, sq = _auxk_normalised(zero, zero, variance, num_dead=4, k_aux=8, auxk_norm="residual", act_scale=None)
    assert float(loss) == 0.0 and float(sq) == 0.0


@pytest.mark.parametrize("make", [
    lambda: TopKSAE(16, 40, 3, dead_tokens_threshold=5, seed=1),
    lambda: ExpanderSAE(16, 40, 3, degree=5, tied=False, dead_tokens_threshold=5, seed=1),
], ids=["topk", "expander-untied"])
def test_resampling_every_latent_gives_encoder_rows_of_norm_a_fifth(make):
    """With no live latent to take a mean norm from, Bricken et al.'s scale falls back to 0.2 (a unit
    mean): finite rows of norm 0.2, not the NaN of an empty mean or rows of 0."""
    sae = make()
    enc = sae.W_enc if isinstance(sae, TopKSAE) else sae.enc_values
    sae.tokens_since_fired[:] = 6
    resampled = sae.resample_dead(torch.randn(30, 16), generator=torch.Generator().manual_seed(0))
    assert resampled.tolist() == list(range(40))
    atoms = (sae.W_dec if isinstance(sae, TopKSAE) else sae.values).detach().double()
    rows = enc.detach().double()
    assert_close(rows.norm(dim=1), torch.full((40,), 0.2, dtype=torch.float64), 1e-6, "resampled encoder norms")
    assert_close(rows / 0.2, atoms / atoms.norm(dim=1, keepdim=True), 1e-6, "encoder direction")
