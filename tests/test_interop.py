"""SAELens and sparsify folders in and out. The folders are written here from the peers' own
layouts (SAELens ``SAE.save_model``: cfg.json + sae_weights.safetensors; sparsify
``SparseCoder.save_to_disk``: cfg.json + sae.safetensors), and each peer's forward formula is
written out below, in float64, as the reference."""

import json

import pytest
import torch
from helpers import StorageAllocations
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
    monkeypatch.setattr(interop, "_BLOCK_ELEMS", 1000 * m)  # five blocks of latents
    spy = StorageAllocations()
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


# Import: sizes that are not powers of two, folded over several blocks of latents with a ragged last one.
IM, IN, IK, IBLOCK = 37, 203, 6, 50  # blocks of 50 latents: 50, 50, 50, 50, 3


def _saelens_folder(path, m, n, k, dtype=torch.float32, seed=0, **cfg_overrides):
    """A SAELens folder of size m x n in ``dtype``; the weights as written (in ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(m, n, generator=g) / m**0.5,
         "W_dec": torch.randn(n, m, generator=g) * (torch.rand(n, 1, generator=g) + 0.5),
         "b_enc": torch.randn(n, generator=g) * 0.1, "b_dec": torch.randn(m, generator=g) * 0.3}
    w = {name: t.to(dtype) for name, t in w.items()}
    cfg = {"architecture": "topk", "d_in": m, "d_sae": n, "k": k, "dtype": str(dtype).removeprefix("torch."),
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "rescale_acts_by_decoder_norm": False, **cfg_overrides}
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg, w


def _sparsify_folder(path, m, n, k, dtypes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"encoder.weight": torch.randn(n, m, generator=g) / m**0.5, "encoder.bias": torch.randn(n, generator=g) * 0.1,
         "W_dec": torch.randn(n, m, generator=g), "b_dec": torch.randn(m, generator=g) * 0.3}
    w = {name: t.to((dtypes or {}).get(name, torch.float32)) for name, t in w.items()}
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": n, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": m}
    path.mkdir()
    save_file(w, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg, w


def _fp64_saelens_fold(cfg, w):
    """The whole-matrix fp64 fold, written out independently: (W_enc [n, m], b_enc, W_dec, b_dec)."""
    W_enc, W_dec, b_enc, b_dec = (w[name].double() for name in ("W_enc", "W_dec", "b_enc", "b_dec"))
    if not cfg["apply_b_dec_to_input"]:  # (x - b_dec) @ W_enc + b_enc', b_enc' = b_enc + b_dec @ W_enc
        b_enc = b_enc + b_dec @ W_enc
    if cfg["rescale_acts_by_decoder_norm"]:  # pre * r: into W_enc and b_enc; acts / r: into W_dec
        r = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * r, b_enc * r, W_dec / r[:, None]
    return W_enc.T, b_enc, W_dec, b_dec


def _params(sae):
    return sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("apply_b_dec,rescale", [(True, False), (False, False), (True, True), (False, True)])
def test_saelens_blockwise_fold_equals_the_whole_matrix_fp64_fold(tmp_path, monkeypatch, apply_b_dec, rescale,
                                                                  file_dtype):
    """load_saelens folds one block of latents at a time: at a block size of 50 latents (five blocks,
    the last of 3) every parameter is the whole-matrix fp64 fold, rounded once to the file's dtype
    (dtype=None) or kept in fp64 (dtype=float64)."""
    import sae.interop as interop

    monkeypatch.setattr(interop, "_BLOCK_ELEMS", IBLOCK * IM)
    cfg, w = _saelens_folder(tmp_path / "sl", IM, IN, IK, file_dtype, apply_b_dec_to_input=apply_b_dec,
                             rescale_acts_by_decoder_norm=rescale)
    want = _fp64_saelens_fold(cfg, w)
    for dtype in (None, torch.float64):
        sae = load_sae(tmp_path / "sl", dtype=dtype)
        for name, got, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), _params(sae), want):
            assert got.dtype == (dtype or file_dtype), name
            # b_enc's centring is a matrix-vector product per block: its sums may be ordered differently
            tol = {"atol": 1e-13, "rtol": 1e-13} if name == "b_enc" and dtype is not None else {"atol": 0, "rtol": 0}
            if name == "b_enc" and dtype is None and not apply_b_dec:  # rounded from the fp64 sum: at most 1 ulp
                tol = {"atol": 0, "rtol": torch.finfo(file_dtype).eps}
            torch.testing.assert_close(got.detach(), ref.to(got.dtype), **tol, msg=name)
    x = torch.randn(5, IM, dtype=torch.float64)
    torch.testing.assert_close(sae(x).x_hat, saelens_topk_forward(cfg, w, x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("row", [3, 120, IN - 1])
def test_saelens_zero_decoder_row_is_refused_in_any_block(tmp_path, monkeypatch, row):
    import sae.interop as interop

    monkeypatch.setattr(interop, "_BLOCK_ELEMS", IBLOCK * IM)
    cfg, w = _saelens_folder(tmp_path / "sl", IM, IN, IK, rescale_acts_by_decoder_norm=True)
    w["W_dec"][row] = 0
    save_file(w, str(tmp_path / "sl" / "sae_weights.safetensors"))
    with pytest.raises(UnsupportedPeerFormat, match="rescale_acts_by_decoder_norm with a zero decoder row"):
        load_sae(tmp_path / "sl")
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": False}))
    assert not load_sae(tmp_path / "sl").W_dec[row].any()  # without the rescale a zero row is a dead latent


@pytest.mark.parametrize("file_dtypes,dtype", [
    ({}, None), ({}, torch.bfloat16), ({}, torch.float64),
    ({"encoder.weight": torch.float64, "encoder.bias": torch.bfloat16, "b_dec": torch.float16}, None),
    ({"encoder.weight": torch.float64, "encoder.bias": torch.bfloat16, "b_dec": torch.float16}, torch.bfloat16),
    ({"encoder.weight": torch.float64, "W_dec": torch.bfloat16}, torch.float64),
], ids=["fp32", "fp32-to-bf16", "fp32-to-fp64", "mixed", "mixed-to-bf16", "bf16-dec-to-fp64"])
def test_sparsify_parameters_are_rounded_to_w_dec_dtype_then_to_dtype(tmp_path, file_dtypes, dtype):
    """As before: the SAE holds W_dec's dtype (each tensor rounded to it), then is cast to ``dtype``."""
    _, w = _sparsify_folder(tmp_path / "sp", IM, IN, IK, file_dtypes)
    sae = load_sae(tmp_path / "sp", dtype=dtype)
    via = w["W_dec"].dtype
    for got, name in zip(_params(sae), ("encoder.weight", "encoder.bias", "W_dec", "b_dec")):
        assert torch.equal(got.detach(), w[name].to(via).to(dtype or via)), name
        assert got.dtype == (dtype or via)


def _fresh_like_before(kind, m, n, k, dtype, via):
    """The TopKSAE the import built before it folded into an empty shell: SAELens's in fp64, cast to
    ``dtype`` or else the file's ``via``; sparsify's in W_dec's dtype ``via``, cast to ``dtype`` when
    one was asked for (a float buffer, BatchTopK's threshold, stays in the default dtype without)."""
    if kind == "saelens":
        return TopKSAE(m, n, k, dtype=torch.float64).to(dtype or via)
    sae = TopKSAE(m, n, k, dtype=via)
    return sae if dtype is None else sae.to(dtype)


@pytest.mark.parametrize("kind,file_dtype,dtype", [
    ("saelens", torch.float32, None), ("saelens", torch.float64, None), ("saelens", torch.bfloat16, torch.float32),
    ("saelens", torch.float32, torch.float64), ("sparsify", torch.float32, None), ("sparsify", torch.float64, None),
    ("sparsify", torch.float32, torch.bfloat16), ("sparsify", torch.float64, torch.float64),
], ids=str)
def test_peer_import_is_a_trained_topk_sae_owning_its_tensors(tmp_path, monkeypatch, kind, file_dtype, dtype):
    """The imported SAE's parameters are Parameters with a fresh TopKSAE's requires_grad (b_dec frozen
    only with b_dec_init="zero"), none a view of the file's tensors (safetensors maps the file), its
    buffers a fresh SAE's (names, dtypes, zeros), ``_fresh`` False, on no meta device."""
    import sae.interop as interop

    read = interop._read
    seen = []
    monkeypatch.setattr(interop, "_read", lambda *a: seen.append(read(*a)) or seen[-1])
    if kind == "saelens":
        _saelens_folder(tmp_path / "peer", IM, IN, IK, file_dtype)
    else:
        _sparsify_folder(tmp_path / "peer", IM, IN, IK, {name: file_dtype for name in
                                                        ("encoder.weight", "encoder.bias", "W_dec", "b_dec")})
    sae = interop.load(tmp_path / "peer", dtype=dtype)
    (_, file_tensors), = seen
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
             for t in file_tensors.values()]
    fresh = _fresh_like_before(kind, IM, IN, IK, dtype, file_dtype)
    assert sae._fresh is False and fresh._fresh is True
    mine, theirs = dict(sae.named_parameters()), dict(fresh.named_parameters())
    assert list(mine) == list(theirs)
    for name, p in mine.items():
        assert isinstance(p, torch.nn.Parameter) and p.device.type == "cpu" and p.is_contiguous(), name
        assert p.requires_grad == theirs[name].requires_grad and p.dtype == theirs[name].dtype, name
        lo = p.untyped_storage().data_ptr()
        assert not any(a <= lo < b for a, b in spans), f"{name} is backed by the file's tensors"
    mine, theirs = dict(sae.named_buffers()), dict(fresh.named_buffers())
    assert list(mine) == list(theirs)
    for name, b in mine.items():
        assert b.device.type == "cpu" and b.dtype == theirs[name].dtype and torch.equal(b, theirs[name]), name
    # frozen b_dec: as a fresh TopKSAE with b_dec_init="zero" would have it
    assert TopKSAE(IM, IN, IK, b_dec_init="zero").b_dec.requires_grad is False


def _read_beforehand(monkeypatch, path):
    """The folder's cfg and tensors, read now: the import under a spy then reads them from here, so
    that the spy counts what the import allocates, not how safetensors reads (it maps the file: its
    pages are the one other copy of the model in memory)."""
    import sae.interop as interop

    read = interop._read(path, interop.SAELENS_WEIGHTS if interop.detect(path) == "saelens"
                         else interop.SPARSIFY_WEIGHTS)
    monkeypatch.setattr(interop, "_read", lambda *args: read)


@pytest.mark.parametrize("kind,dtype", [("saelens", None), ("saelens", torch.bfloat16), ("sparsify", None),
                                        ("sparsify", torch.bfloat16)], ids=str)
def test_peer_import_allocates_the_model_once(tmp_path, monkeypatch, kind, dtype):
    """Importing allocates the SAE's parameters once, in their dtype, and a block of latents at a
    time: everything allocated, summed, stays under the model's size plus a small constant (with the
    file's mapped pages, about twice the model at the peak). SAELens's import made whole fp64 copies
    of both matrices, then folded copies, then a TopKSAE in fp64 with its random draw, then the cast:
    about 7.5 times the fp32 model here (both folds); sparsify's drew random weights (half the fp32
    model) and cast a built SAE to ``dtype``."""
    import sae.interop as interop

    m, n = 96, 3001
    monkeypatch.setattr(interop, "_BLOCK_ELEMS", 64 * m)
    if kind == "saelens":
        _saelens_folder(tmp_path / "peer", m, n, IK, apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True)
    else:
        _sparsify_folder(tmp_path / "peer", m, n, IK)
    _read_beforehand(monkeypatch, tmp_path / "peer")
    model_bytes = (2 * n * m + n + m) * (dtype or torch.float32).itemsize
    spy = StorageAllocations()
    with spy:
        sae = load_sae(tmp_path / "peer", dtype=dtype)
    assert sae.W_dec.dtype == (dtype or torch.float32)
    small = 4 * 64 * m * 8 + 16 * n * 8  # the fp64 block buffer, per-latent fp64 vectors, buffers
    assert spy.total <= model_bytes + small, (spy.total, model_bytes, small)


@pytest.mark.parametrize("writer", [_saelens_folder, _sparsify_folder], ids=["saelens", "sparsify"])
def test_peer_k_above_its_latents_is_refused_before_the_weights_are_copied(tmp_path, monkeypatch, writer):
    m, n = 96, 3001
    writer(tmp_path / "peer", m, n, n + 1)
    _read_beforehand(monkeypatch, tmp_path / "peer")
    spy = StorageAllocations()
    with spy, pytest.raises(UnsupportedPeerFormat, match=f"k={n + 1} is more than its {n} latents"):
        load_sae(tmp_path / "peer")
    assert spy.total <= 4096, spy.total  # nothing of the model's size


@pytest.mark.parametrize("writer,name", [(_saelens_folder, "W_dec"), (_sparsify_folder, "W_dec")],
                         ids=["saelens", "sparsify"])
def test_peer_weights_in_a_dtype_a_topk_sae_cannot_hold_are_refused(tmp_path, writer, name):
    import sae.interop as interop

    writer(tmp_path / "peer", IM, IN, IK)
    weights = next((tmp_path / "peer").glob("*.safetensors"))
    w = load_file(str(weights))
    save_file({**w, name: w[name].to(torch.float8_e4m3fn)}, str(weights))
    with pytest.raises(UnsupportedPeerFormat, match="float8_e4m3fn"):
        load_sae(tmp_path / "peer")
    assert load_sae(tmp_path / "peer", dtype=torch.float32).W_dec.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype: expected None or one of"):
        interop.load(tmp_path / "peer", dtype=torch.int32)
