"""SAELens and sparsify folders in and out. The folders are written here from the peers' own
layouts (SAELens ``SAE.save_model``: cfg.json + sae_weights.safetensors; sparsify
``SparseCoder.save_to_disk``: cfg.json + sae.safetensors), and each peer's forward formula is
written out below, in float64, as the reference."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae import ExpanderSAE, TopKSAE, load_sae
from sae.interop import UnsupportedPeerFormat, export_saelens, export_sparsify

M, N, K = 24, 77, 5


def saelens_topk_forward(cfg, w, x):
    """SAELens TopKSAE.forward: process_sae_in, (x @ W_enc + b_enc) [* ||W_dec||], TopK + ReLU,
    [/ ||W_dec||] @ W_dec + b_dec."""
    W_enc, W_dec, b_enc, b_dec = (w[k].double() for k in ("W_enc", "W_dec", "b_enc", "b_dec"))
    x = x.double() - b_dec * float(cfg.get("apply_b_dec_to_input", True))
    pre = x @ W_enc + b_enc
    if cfg.get("rescale_acts_by_decoder_norm", False):
        pre = pre * W_dec.norm(dim=-1)
    vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    if cfg.get("rescale_acts_by_decoder_norm", False):
        acts = acts / W_dec.norm(dim=-1)
    return acts @ W_dec + b_dec


def sparsify_forward(cfg, w, x):
    """sparsify SparseCoder: relu(linear(x - b_dec)) -> topk -> acts @ W_dec + b_dec."""
    enc_w, enc_b, W_dec, b_dec = (w[k].double() for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    pre = torch.relu((x.double() - b_dec) @ enc_w.T + enc_b)
    vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, vals) @ W_dec + b_dec


def _saelens_dir(path, **cfg_overrides):
    w = {"W_enc": torch.randn(M, N) / M**0.5, "W_dec": torch.randn(N, M) * (torch.rand(N, 1) + 0.5),
         "b_enc": torch.randn(N) * 0.1, "b_dec": torch.randn(M) * 0.3}
    cfg = {"architecture": "topk", "d_in": M, "d_sae": N, "k": K, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": False, "metadata": {"sae_lens_version": "6.0.0"}, **cfg_overrides}
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg, w


def _sparsify_dir(path, **cfg_overrides):
    w = {"encoder.weight": torch.randn(N, M) / M**0.5, "encoder.bias": torch.randn(N) * 0.1,
         "W_dec": torch.randn(N, M), "b_dec": torch.randn(M) * 0.3}
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": M, **cfg_overrides}
    path.mkdir()
    save_file(w, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg, w


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk_loads_with_its_own_outputs(tmp_path, apply_b_dec, rescale):
    cfg, w = _saelens_dir(tmp_path / "sl", apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=rescale)
    sae = load_sae(tmp_path / "sl")
    assert isinstance(sae, TopKSAE) and sae.k == K and sae.n_latents == N
    x = torch.randn(3, 11, M)
    got = sae.double()(x.double()).x_hat
    torch.testing.assert_close(got, saelens_topk_forward(cfg, w, x), atol=1e-5, rtol=1e-5)


def test_saelens_old_config_with_activation_fn_kwargs(tmp_path):
    cfg, w = _saelens_dir(tmp_path / "sl", architecture="standard", activation_fn_str="topk",
                          activation_fn_kwargs={"k": K})
    del cfg["k"]
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    x = torch.randn(9, M)
    torch.testing.assert_close(load_sae(tmp_path / "sl").double()(x.double()).x_hat,
                               saelens_topk_forward({**cfg, "k": K}, w, x), atol=1e-5, rtol=1e-5)


def test_sparsify_loads_with_its_own_outputs(tmp_path):
    cfg, w = _sparsify_dir(tmp_path / "sp")
    sae = load_sae(tmp_path / "sp")
    assert isinstance(sae, TopKSAE)
    x = torch.randn(13, M)
    torch.testing.assert_close(sae.double()(x.double()).x_hat, sparsify_forward(cfg, w, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("writer,override,match", [
    (_saelens_dir, {"architecture": "jumprelu"}, "architecture 'jumprelu'"),
    (_saelens_dir, {"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
    (_sparsify_dir, {"skip_connection": True}, "skip_connection"),
    (_sparsify_dir, {"transcode": True}, "transcode"),
    (_sparsify_dir, {"activation": "groupmax"}, "groupmax"),
])
def test_unrepresentable_settings_are_refused(tmp_path, writer, override, match):
    writer(tmp_path / "peer", **override)
    with pytest.raises(UnsupportedPeerFormat, match=match):
        load_sae(tmp_path / "peer")


def _ours(kind):
    if kind == "topk":
        sae = TopKSAE(M, N, K, seed=3)
    else:
        sae = ExpanderSAE(M, N, K, degree=4, seed=3, tied=False)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return sae.double()


@pytest.mark.parametrize("kind", ["topk", "expander"])
def test_export_to_both_formats_round_trips(tmp_path, kind):
    sae = _ours(kind)
    x = torch.randn(17, M, dtype=torch.float64)
    want = sae.eval()(x).x_hat
    export_saelens(sae, tmp_path / "sl")
    export_sparsify(sae, tmp_path / "sp")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    torch.testing.assert_close(saelens_topk_forward(cfg, load_file(str(tmp_path / "sl" / "sae_weights.safetensors")),
                                                    x), want, atol=1e-6, rtol=1e-6)
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    torch.testing.assert_close(sparsify_forward(cfg, load_file(str(tmp_path / "sp" / "sae.safetensors")), x), want,
                               atol=1e-6, rtol=1e-6)
    for folder in ("sl", "sp"):
        back = load_sae(tmp_path / folder)
        torch.testing.assert_close(back(x).x_hat, want, atol=1e-6, rtol=1e-6)


def test_export_folds_activation_normalisation(tmp_path):
    sae = TopKSAE(M, N, K, normalize_activations=True).double()
    sample = torch.randn(200, M, dtype=torch.float64) * 40
    sae.init_b_dec(sample)
    assert abs(float(sae.act_scale) - (M / sample.pow(2).sum(-1).mean()).sqrt()) < 1e-9
    export_saelens(sae, tmp_path / "sl")
    x = torch.randn(9, M, dtype=torch.float64) * 40
    torch.testing.assert_close(load_sae(tmp_path / "sl")(x).x_hat, sae(x).x_hat, atol=1e-6, rtol=1e-6)


def test_export_refuses_signed_codes(tmp_path):
    with pytest.raises(UnsupportedPeerFormat, match="signed"):
        export_sparsify(ExpanderSAE(M, N, K, degree=3, signed=True), tmp_path / "sp")


@pytest.mark.parametrize("writer,name,shape", [
    (_saelens_dir, "b_enc", (1,)), (_saelens_dir, "b_dec", ()), (_saelens_dir, "b_enc", (2,)),
    (_sparsify_dir, "encoder.bias", (1,)), (_sparsify_dir, "b_dec", (1,)),
])
def test_peer_bias_of_the_wrong_shape_is_refused_not_broadcast(tmp_path, writer, name, shape):
    _, w = writer(tmp_path / "peer")
    weights = next((tmp_path / "peer").glob("*.safetensors"))
    save_file({**w, name: torch.randn(shape)}, str(weights))
    with pytest.raises(UnsupportedPeerFormat, match=f"tensor {name} has shape"):
        load_sae(tmp_path / "peer")


@pytest.mark.parametrize("writer,name", [(_saelens_dir, "b_enc"), (_sparsify_dir, "encoder.weight")])
def test_peer_integer_tensors_are_refused_by_name(tmp_path, writer, name):
    _, w = writer(tmp_path / "peer")
    weights = next((tmp_path / "peer").glob("*.safetensors"))
    save_file({**w, name: w[name].round().long()}, str(weights))
    with pytest.raises(UnsupportedPeerFormat, match=f"tensor {name} is torch.int64"):
        load_sae(tmp_path / "peer")


def test_saelens_bool_k_is_refused_naming_the_file(tmp_path):
    _saelens_dir(tmp_path / "sl", k=True)
    with pytest.raises(UnsupportedPeerFormat, match=r"cfg\.json: expected a positive int k, got True"):
        load_sae(tmp_path / "sl")


@pytest.mark.parametrize("apply_b_dec,rescale", [(False, False), (True, True)])
def test_saelens_bf16_folds_loaded_in_fp64_are_not_rounded_to_bf16(tmp_path, apply_b_dec, rescale):
    cfg, w = _saelens_dir(tmp_path / "sl", apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=rescale)
    w = {name: t.bfloat16() for name, t in w.items()}
    save_file(w, str(tmp_path / "sl" / "sae_weights.safetensors"))
    sae = load_sae(tmp_path / "sl", dtype=torch.float64)
    x = torch.randn(7, M, dtype=torch.float64)
    torch.testing.assert_close(sae(x).x_hat, saelens_topk_forward(cfg, w, x), atol=1e-9, rtol=1e-9)


class _AllocatedBytes:
    """A ``TorchDispatchMode`` summing the bytes of every tensor an op allocates (views of its
    inputs allocate nothing)."""

    def __new__(cls):
        from torch.utils import _pytree
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            total = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in _pytree.tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)}
                for t in _pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                        self.total += t.untyped_storage().nbytes()
                return out

        return Mode()


@pytest.mark.parametrize("export,weights,enc", [(export_saelens, "sae_weights.safetensors", "W_enc"),
                                                (export_sparsify, "sae.safetensors", "encoder.weight")],
                         ids=["saelens", "sparsify"])
def test_expander_export_allocates_its_two_dense_matrices_and_little_else(tmp_path, monkeypatch, export, weights,
                                                                          enc):
    """An Expander SAE is exported as its dense [n, m] dictionary: the two fp32 matrices written are
    what it must cost (16 GiB at n = 2^20, m = 2048). It allocated about three times that: the dense
    decoder twice (an out-of-place scatter), fp64 copies of both matrices, then the casts back (and
    for SAELens a transposed copy, made contiguous). Here everything allocated, summed, stays within
    the two matrices plus a few [n, d] tensors, over several blocks of latents, and the matrices
    are the dense reference's, with the activation scale folded in fp64 and rounded once."""
    from topk_kernels import reference

    import sae.interop as interop

    m, n, d = 256, 4096, 4
    sae = ExpanderSAE(m, n, K, degree=d, seed=1, tied=False, normalize_activations=True)
    with torch.no_grad():
        sae.enc_values.mul_(1.5)
        sae.act_scale.fill_(0.37)
    monkeypatch.setattr(interop, "_EXPORT_BLOCK", 1000 * m, raising=False)  # five blocks of latents
    spy = _AllocatedBytes()
    with spy:
        export(sae, tmp_path / "out")
    dense = n * m * 4
    assert spy.total < 2 * dense + 32 * 8 * n * d, (spy.total, dense)
    w = load_file(str(tmp_path / "out" / weights))
    s = float(sae.act_scale)
    with torch.no_grad():
        W_dec = (reference.expander_dense(sae.atoms().double(), sae.rows, m) / s).float()
        W_enc = (reference.expander_dense(sae.enc_values.double(), sae.rows, m) * s).float()
    assert torch.equal(w["W_dec"], W_dec)
    assert torch.equal(w[enc], W_enc.T if enc == "W_enc" else W_enc)
