"""One checkpoint format: the full config with every default, a format version, the class by
name through the registry, a SHA-256 per tensor checked on every load, no runtime choices; files of
the first format still load."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae import ExpanderSAE, SAEConfig, TopKSAE, load_sae
from sae.checkpoint import FORMAT_VERSION, CheckpointError, read_checkpoint, read_train_record, tensor_sha256
from sae.interop import UnsupportedPeerFormat
from sae.models import SAE_CLASSES


def _randomised(sae):
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


@pytest.mark.parametrize("make", [lambda: TopKSAE(12, 40, 4, auxk_coef=0.5),
                                  lambda: ExpanderSAE(12, 40, 4, degree=3, seed=5, tied=False)],
                         ids=["topk", "expander"])
def test_load_sae_returns_the_right_class_and_function(tmp_path, make):
    sae = _randomised(make())
    path = tmp_path / "sae.safetensors"
    sae.save(str(path))
    loaded = load_sae(path)
    assert type(loaded) is type(sae)
    assert loaded.config() == sae.config()
    x = torch.randn(5, 12)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    assert type(load_sae(tmp_path)) is type(sae)  # a run folder holding sae.safetensors


def test_metadata_holds_full_config_version_and_class(tmp_path):
    sae = TopKSAE(8, 20, 2, backend="torch")
    sae.save(str(tmp_path / "a.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["topk-sae"])
    assert meta["format_version"] == FORMAT_VERSION and meta["class"] == "TopKSAE"
    config = meta["config"]
    assert "backend" not in config
    # every SAEConfig option is saved, defaults included
    assert set(SAEConfig().model_options()) <= set(config)
    assert set(meta["sha256"]) == set(sae.state_dict())
    assert SAE_CLASSES["TopKSAE"] is TopKSAE and SAE_CLASSES["ExpanderSAE"] is ExpanderSAE


def test_backend_is_not_saved_so_a_triton_model_loads_on_cpu(tmp_path):
    sae = ExpanderSAE(16, 48, 3, degree=4, backend="triton")
    sae.save(str(tmp_path / "s.safetensors"))
    loaded = load_sae(tmp_path / "s.safetensors")
    assert loaded.backend is None
    x = torch.randn(4, 16)
    sae.backend = "torch"
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


def test_a_flipped_byte_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    TopKSAE(8, 20, 2).save(str(path))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its stored SHA-256"):
        load_sae(path)
    from sae.distributed import load_sharded  # the same refusal, the same error type

    with pytest.raises(CheckpointError, match=r"s\.safetensors is corrupt .*does not match its stored SHA-256"):
        load_sharded(path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="other.safetensors is not an SAE file"):
        load_sharded(tmp_path / "other.safetensors")


def test_missing_folder_and_wrong_kind_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="folder without"):
        load_sae(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an SAE checkpoint"):
        load_sae(tmp_path / "other.safetensors")


def test_training_checkpoint_loads_as_an_sae(tmp_path):
    from sae.data import ActivationBuffer
    from sae.train import CHECKPOINT, TrainConfig, train

    sae = TopKSAE(8, 20, 2)
    train(sae, ActivationBuffer(torch.randn(300, 8)), TrainConfig(batch_size=50, total_tokens=200, progress=False),
          tmp_path)
    ckpt = read_checkpoint(tmp_path / CHECKPOINT)
    assert ckpt.train["step"] == 4 and ckpt.train["tokens"] == 200 and ckpt.optimizer_tensors
    loaded = load_sae(tmp_path / CHECKPOINT)
    for name, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


# -- files of the first format ---------------------------------------------------------------

def _v1_digest(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_first_format_final_sae_still_loads(tmp_path):
    sae = _randomised(ExpanderSAE(10, 30, 3, degree=4, seed=2))
    old_config = {"d_model": 10, "n_latents": 30, "k": 3, "degree": 4, "seed": 2, "tied": True,
                  "dead_tokens_threshold": 999, "backend": "triton"}
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"config": json.dumps(old_config),
                                                                    "class": "ExpanderSAE"})
    loaded = load_sae(tmp_path / "old.safetensors")
    assert isinstance(loaded, ExpanderSAE) and loaded.dead_tokens_threshold == 999 and loaded.backend is None
    assert torch.equal(loaded.values, sae.values)


def test_first_format_training_checkpoint_still_loads(tmp_path):
    sae = _randomised(TopKSAE(8, 20, 2))
    tensors = {f"sae.{k}": v.detach().contiguous() for k, v in sae.state_dict().items()}
    tensors["opt.0.exp_avg"] = torch.randn(20, 8)
    meta = {"step": "7", "tokens": "700", "sae_class": "TopKSAE",
            "sae_config": json.dumps({"d_model": 8, "n_latents": 20, "k": 2}),
            "train_config": json.dumps({"batch_size": 100}), "sha256": _v1_digest(tensors)}
    save_file(tensors, str(tmp_path / "ckpt.safetensors"), metadata=meta)
    ckpt = read_checkpoint(tmp_path / "ckpt.safetensors")
    assert ckpt.version == 1 and ckpt.train["step"] == 7 and "0.exp_avg" in ckpt.optimizer_tensors
    assert torch.equal(load_sae(tmp_path / "ckpt.safetensors").W_enc, sae.W_enc)
    tensors["sae.W_enc"] = tensors["sae.W_enc"] + 1  # digest no longer matches
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_sae(tmp_path / "bad.safetensors")


def test_first_format_digest_is_taken_without_copying_a_tensor(tmp_path):
    """A first-format training checkpoint's one digest fed hashlib each tensor's bytes as a copy
    (``tobytes()``): reading it, or a latent shard resuming from it (which reads the file through its
    mapping so as never to hold a whole tensor), allocated each whole tensor once more."""
    import tracemalloc

    sae = _randomised(TopKSAE(256, 1024, 2))
    tensors = {f"sae.{k}": v.detach().contiguous() for k, v in sae.state_dict().items()}
    meta = {"step": "7", "tokens": "700", "sae_class": "TopKSAE",
            "sae_config": json.dumps({"d_model": 256, "n_latents": 1024, "k": 2}),
            "train_config": json.dumps({"batch_size": 100}), "sha256": _v1_digest(tensors)}
    save_file(tensors, str(tmp_path / "ckpt.safetensors"), metadata=meta)
    tracemalloc.start()
    try:
        ckpt = read_checkpoint(tmp_path / "ckpt.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ckpt.version == 1 and torch.equal(ckpt.sae_tensors["W_enc"], sae.W_enc)
    whole = sae.W_enc.numel() * sae.W_enc.element_size()  # 1 MiB
    assert peak < whole // 4, f"reading the file allocated {peak} bytes; W_enc is {whole}"


# -- the header is verified; every bad file is a CheckpointError --------------------------------

def _header_span(data: bytes) -> range:
    """Byte positions of safetensors' JSON header (tensor names, dtypes, offsets and our metadata)."""
    return range(8, 8 + int.from_bytes(data[:8], "little"))


def _same_sae(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (type(a) is type(b) and a.config() == b.config() and sa.keys() == sb.keys()
            and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa))


def _random_sae(gen):
    """A fresh SAE with a random config and random weights."""
    d, n = int(torch.randint(4, 12, (), generator=gen)), int(torch.randint(12, 40, (), generator=gen))
    k, seed = int(torch.randint(1, 6, (), generator=gen)), int(torch.randint(0, 1000, (), generator=gen))
    if torch.rand((), generator=gen) < 0.5:
        sae = TopKSAE(d, n, k, seed=seed, k_aux=int(torch.randint(1, n, (), generator=gen)))
    else:
        sae = ExpanderSAE(d, n, k, degree=3, seed=seed, tied=bool(torch.rand((), generator=gen) < 0.5))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def test_a_flipped_header_bit_is_refused_or_harmless(tmp_path):
    """Any one bit flipped in the header (config, class, sums, safetensors' own JSON) either raises
    CheckpointError naming the file in one line, or loads exactly the saved SAE: never another SAE
    and never another exception."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    path = tmp_path / "s.safetensors"
    for _ in range(2):
        sae = _random_sae(gen)
        sae.save(str(path))
        good = path.read_bytes()
        span = _header_span(good)
        picks = torch.randint(span.start, span.stop, (100,), generator=gen).tolist()
        config = good.find(b'config\\": {') + len(b'config\\": {')  # and every byte of the config
        picks += list(range(config, good.find(b"}", config)))
        for pos in picks:
            bad = bytearray(good)
            bad[pos] ^= 1 << int(torch.randint(0, 8, (), generator=gen))
            path.write_bytes(bytes(bad))
            try:
                loaded = load_sae(path)
            except CheckpointError as exc:
                assert str(path) in str(exc) and "\n" not in str(exc), str(exc)
            else:
                assert _same_sae(loaded, sae), f"a flipped bit at byte {pos} loaded a different SAE"


def test_a_changed_config_value_is_refused(tmp_path):
    """The review's case: "k": 4 -> "k": 5, one bit, a well-formed header for another SAE."""
    path = tmp_path / "s.safetensors"
    TopKSAE(8, 20, 4, seed=0).save(str(path))
    data = bytearray(path.read_bytes())
    i = data.find(b'\\"k\\": 4') + len(b'\\"k\\": ')
    data[i] ^= 0x01
    assert data[i:i + 1] == b"5"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its stored header_sha256"):
        load_sae(path)
    with pytest.raises(CheckpointError, match="header_sha256"):
        read_train_record(path)
    from sae.distributed import load_sharded  # one process: the whole SAE, read by rows

    with pytest.raises(CheckpointError, match="header_sha256"):
        load_sharded(path)


def _write_v2(sae, path, **extra):
    """A file as format version 2 wrote it: tensor sums, no header digest."""
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    record = {"format_version": 2, "class": type(sae).__name__, "config": sae.config(),
              "sha256": {k: tensor_sha256(v) for k, v in sorted(tensors.items())}, **extra}
    save_file(tensors, str(path), metadata={"topk-sae": json.dumps(record)})


def test_version_2_file_without_header_digest_still_loads(tmp_path):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for i in range(2):
        sae = _random_sae(gen)
        _write_v2(sae, tmp_path / f"v2_{i}.safetensors")
        ckpt = read_checkpoint(tmp_path / f"v2_{i}.safetensors")
        assert ckpt.version == 2
        assert _same_sae(load_sae(tmp_path / f"v2_{i}.safetensors"), sae)
    # a training checkpoint of version 2 too
    sae = _random_sae(gen)
    _write_v2(sae, tmp_path / "v2_train.safetensors", train={"step": 3, "tokens": 30, "train_config": {}})
    assert read_train_record(tmp_path / "v2_train.safetensors")["step"] == 3
    assert _same_sae(load_sae(tmp_path / "v2_train.safetensors"), sae)


def test_a_version_3_header_without_its_digest_is_refused(tmp_path):
    sae = TopKSAE(8, 20, 2)
    _write_v2(sae, tmp_path / "s.safetensors")
    data = (tmp_path / "s.safetensors").read_bytes().replace(b'format_version\\": 2', b'format_version\\": 3')
    (tmp_path / "s.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="no header_sha256"):
        load_sae(tmp_path / "s.safetensors")


@pytest.mark.parametrize("write", ["v2", "v1"])
def test_corrupt_old_headers_raise_checkpoint_error_only(tmp_path, write):
    """Files without a header digest cannot be verified, but a header that does not parse or does
    not build an SAE is a CheckpointError, not a JSONDecodeError, KeyError or RuntimeError."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    path = tmp_path / "s.safetensors"
    sae = _random_sae(gen)
    if write == "v2":
        _write_v2(sae, path)
    else:
        tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(sae.config()), "class": type(sae).__name__})
    good = path.read_bytes()
    span = _header_span(good)
    for pos in torch.randint(span.start, span.stop, (200,), generator=gen).tolist():
        bad = bytearray(good)
        bad[pos] ^= 1 << int(torch.randint(0, 8, (), generator=gen))
        path.write_bytes(bytes(bad))
        try:
            load_sae(path)
        except CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc), str(exc)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not an object"),
    (json.dumps({"format_version": 2, "config": {}, "sha256": {}}), "'class'"),
    (json.dumps({"format_version": "2", "class": "TopKSAE", "config": {}, "sha256": {}}), "format_version"),
    (json.dumps({"format_version": 2, "class": "TopKSAE", "config": [], "sha256": {}}), "'config'"),
], ids=["invalid-json", "not-an-object", "no-class", "version-a-string", "config-a-list"])
def test_malformed_headers_are_checkpoint_errors(tmp_path, text, match):
    path = tmp_path / "s.safetensors"
    save_file({k: v.contiguous() for k, v in TopKSAE(8, 20, 2).state_dict().items()}, str(path),
              metadata={"topk-sae": text})
    with pytest.raises(CheckpointError, match=match):
        load_sae(path)
    with pytest.raises(CheckpointError, match=match):
        read_train_record(path)


def test_a_config_that_does_not_fit_the_tensors_is_a_checkpoint_error(tmp_path):
    sae = TopKSAE(8, 20, 2)
    config = {**sae.config(), "d_model": 9}  # an old file, nothing to verify its header by
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata={"config": json.dumps(config), "class": "TopKSAE"})
    with pytest.raises(CheckpointError, match=r"s\.safetensors.*W_enc has shape \(20, 8\)"):
        load_sae(tmp_path / "s.safetensors")
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"config": "{", "class": "TopKSAE"})
    with pytest.raises(CheckpointError, match=r"t\.safetensors.*malformed"):
        load_sae(tmp_path / "t.safetensors")


@pytest.mark.parametrize("make", [lambda: TopKSAE(12, 40, 4, seed=3),
                                  lambda: ExpanderSAE(12, 40, 4, degree=5, seed=3, tied=False)],
                         ids=["topk", "expander"])
def test_load_draws_no_weights_and_no_graph(tmp_path, monkeypatch, make):
    """load_sae assigns the file's tensors into a shell: it never draws initial weights or an
    expander graph (at d = 1000 a graph took minutes, and fresh weights were a second copy of the
    model in memory while loading)."""
    import sae.models as models

    before = make()  # drawn from its seed
    saved = _randomised(make())
    saved.save(str(tmp_path / "s.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("load_sae drew random weights or a graph")

    from sae.distributed import load_sharded  # one process: the whole SAE, read by rows

    monkeypatch.setattr(torch, "randn", refuse)
    monkeypatch.setattr(models, "expander_mask", refuse)
    loaded = load_sae(tmp_path / "s.safetensors")
    sharded = load_sharded(tmp_path / "s.safetensors")
    monkeypatch.undo()
    assert _same_sae(loaded, saved)
    assert all(torch.equal(t, saved.state_dict()[k]) and t.device.type == "cpu"
               for k, t in sharded.shard.state_dict().items())
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    x = torch.randn(6, 12)
    assert torch.equal(loaded(x).x_hat, saved(x).x_hat)
    # A model built afterwards is drawn as ever: the shell's switch and meta device do not leak.
    assert _same_sae(make(), before)


@pytest.mark.parametrize("size,d_model", [((8, 4, 2, 2), 9), ((8, 4, 2, 8), 7)], ids=["n*d<m", "degree>m"])
def test_a_graph_config_the_constructor_refuses_is_still_refused_at_load(tmp_path, size, d_model):
    """The shell no longer draws the graph, and expander_mask was what refused n * d < m (a row no
    latent uses) and degree > m: the load still refuses such a config, with the constructor's
    message, even when the file's rows are distinct and in range."""
    sae = ExpanderSAE(*size[:3], degree=size[3])
    config = {**sae.config(), "d_model": d_model}
    with pytest.raises(ValueError) as refused:
        ExpanderSAE(**config)
    tensors = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
    tensors["b_dec"] = torch.zeros(d_model)
    save_file(tensors, str(tmp_path / "s.safetensors"),
              metadata={"config": json.dumps(config), "class": "ExpanderSAE"})
    with pytest.raises(CheckpointError, match=r"s\.safetensors.*does not describe") as exc:
        load_sae(tmp_path / "s.safetensors")
    assert str(refused.value).split(",")[0] in str(exc.value)


def test_a_class_with_a_tensor_outside_its_state_dict_is_refused_not_left_on_meta(tmp_path, monkeypatch):
    """load_sae assigns the file's tensors into a shell on the meta device; a (future) SAE class
    with a non-persistent buffer would keep a meta tensor there and fail at first use."""

    class _Scratch(TopKSAE):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("scratch", torch.zeros(3), persistent=False)

    monkeypatch.setitem(SAE_CLASSES, "_Scratch", _Scratch)
    _Scratch(8, 20, 2).save(str(tmp_path / "s.safetensors"))
    with pytest.raises(CheckpointError, match=r"s\.safetensors.*\(scratch\)"):
        load_sae(tmp_path / "s.safetensors")
    from sae.distributed import load_sharded

    with pytest.raises(CheckpointError, match=r"s\.safetensors.*\(scratch\)"):
        load_sharded(tmp_path / "s.safetensors")


@pytest.mark.parametrize("load", ["load_sae", "load_sharded", "load_sharded_unverified"])
def test_a_loaded_sae_does_not_change_when_its_file_is_rewritten_in_place(tmp_path, load):
    """safetensors hands out views of its mapping of the file: assigned as they were, a loaded
    SAE's weights changed when the file was overwritten in place (cp over it), and crashed the
    process (SIGBUS) when it was cut short. The loaded tensors own their memory."""
    from sae.distributed import load_sharded

    saved = _randomised(ExpanderSAE(12, 40, 4, degree=5, tied=False))
    path = tmp_path / "s.safetensors"
    saved.save(str(path))
    if load == "load_sae":
        loaded = load_sae(path)
    else:
        loaded = load_sharded(path, verify=load == "load_sharded").shard
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the same size, every byte past the header zeroed, in place
        header = 8 + int.from_bytes(f.read(8), "little")
        f.seek(header)
        f.write(bytes(size - header))
    assert _same_sae(loaded, saved)


def test_loaded_expander_rows_are_still_checked(tmp_path):
    """The graph is no longer drawn and checked at load, so the loaded rows are: a repeated row
    within a latent (the Triton decoder would lose an update) and a row past d_model are refused."""
    sae = ExpanderSAE(9, 23, 2, degree=3)
    for bad, match in ((lambda r: r.__setitem__((4, 1), r[4, 0]), "distinct"),
                       (lambda r: r.__setitem__((7, 2), 9), r"\[0, m=9\)")):
        tensors = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
        bad(tensors["rows"])
        save_file(tensors, str(tmp_path / "s.safetensors"),
                  metadata={"config": json.dumps(sae.config()), "class": "ExpanderSAE"})
        with pytest.raises(CheckpointError, match=match):
            load_sae(tmp_path / "s.safetensors")


# -- dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["topk", "expander"])
def test_load_keeps_the_saved_dtype_bit_for_bit(tmp_path, kind, dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    if kind == "topk":
        sae = TopKSAE(16, 64, 4, dtype=dtype)
    else:
        sae = ExpanderSAE(16, 64, 4, degree=3, tied=False, dtype=dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    sae.save(str(tmp_path / "s.safetensors"))
    loaded = load_sae(tmp_path / "s.safetensors")
    assert _same_sae(loaded, sae)  # every tensor in its saved dtype, bit-identical
    assert all(p.dtype == dtype and p.requires_grad for p in loaded.parameters())
    x = torch.randn(32, 16, generator=gen).to(dtype)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    # asking for another dtype still works
    assert all(p.dtype == torch.float32 for p in load_sae(tmp_path / "s.safetensors", dtype=torch.float32).parameters())


def test_a_model_cast_whole_keeps_its_buffers_dtypes(tmp_path):
    sae = _randomised(TopKSAE(8, 20, 2, normalize_activations=True)).to(torch.bfloat16)  # buffers too
    sae.save(str(tmp_path / "s.safetensors"))
    assert _same_sae(load_sae(tmp_path / "s.safetensors"), sae)


def test_a_float_tensor_for_an_integer_buffer_is_refused(tmp_path):
    sae = TopKSAE(8, 20, 2)
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    tensors["tokens_since_fired"] = tensors["tokens_since_fired"].float()
    save_file(tensors, str(tmp_path / "s.safetensors"),
              metadata={"config": json.dumps(sae.config()), "class": "TopKSAE"})
    with pytest.raises(CheckpointError, match="tokens_since_fired is torch.float32"):
        load_sae(tmp_path / "s.safetensors")


def test_integer_tensors_saved_in_another_integer_dtype_take_the_sae_s(tmp_path):
    """int32 counters and expander rows in a file load as the SAE's int64 buffers, same values."""
    sae = ExpanderSAE(9, 23, 2, degree=3)
    with torch.no_grad():
        sae.tokens_since_fired.copy_(torch.randint(0, 1000, (23,)))
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    for name in ("tokens_since_fired", "rows"):
        tensors[name] = tensors[name].int()
    save_file(tensors, str(tmp_path / "s.safetensors"),
              metadata={"config": json.dumps(sae.config()), "class": "ExpanderSAE"})
    from sae.distributed import load_sharded  # one process: the whole SAE, read by rows

    for loaded in (load_sae(tmp_path / "s.safetensors"), load_sharded(tmp_path / "s.safetensors").shard):
        for name in ("tokens_since_fired", "rows"):
            got, want = getattr(loaded, name), getattr(sae, name)
            assert got.dtype == want.dtype == torch.int64 and torch.equal(got, want), name


# -- peers' cfg.json -------------------------------------------------------------------------

@pytest.mark.parametrize("peer", ["saelens", "sparsify"])
@pytest.mark.parametrize("cfg_text,error,match", [
    ("{oops", CheckpointError, "cfg.json is not valid JSON"),
    ("[]", CheckpointError, "expected an object"),
    ("drop d_in", CheckpointError, "cfg.json: missing key 'd_in'"),
    ("d_in string", UnsupportedPeerFormat, "cfg.json: expected a positive int d_in"),
], ids=["invalid-json", "not-an-object", "no-d_in", "d_in-a-string"])
def test_a_bad_peer_cfg_is_a_clear_error(tmp_path, peer, cfg_text, error, match):
    from sae.interop import export_saelens, export_sparsify

    folder = tmp_path / "peer"
    (export_saelens if peer == "saelens" else export_sparsify)(TopKSAE(8, 20, 2), folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg_text == "drop d_in":
        cfg_text = json.dumps({k: v for k, v in cfg.items() if k != "d_in"})
    elif cfg_text == "d_in string":
        cfg_text = json.dumps({**cfg, "d_in": "8"})
    (folder / "cfg.json").write_text(cfg_text)
    with pytest.raises(error, match=match):
        load_sae(folder)


def test_a_sparsify_cfg_without_k_is_a_clear_error(tmp_path):
    from sae.interop import export_sparsify

    export_sparsify(TopKSAE(8, 20, 2), tmp_path / "sp")
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    del cfg["k"]
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing key 'k'"):
        load_sae(tmp_path / "sp")


@pytest.mark.parametrize("peer", ["saelens", "sparsify"])
def test_a_peer_k_above_its_latents_is_refused(tmp_path, peer):
    from sae.interop import export_saelens, export_sparsify

    (export_saelens if peer == "saelens" else export_sparsify)(TopKSAE(8, 20, 2), tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "cfg.json").read_text())
    (tmp_path / "p" / "cfg.json").write_text(json.dumps({**cfg, "k": 21}))
    with pytest.raises(UnsupportedPeerFormat, match="k=21 is more than its 20 latents"):
        load_sae(tmp_path / "p")


@pytest.mark.parametrize("t", [
    torch.arange(12, dtype=torch.float32).reshape(3, 4),
    torch.arange(12, dtype=torch.float32).reshape(4, 3),  # the same bytes in another shape
    torch.arange(12, dtype=torch.int32).reshape(3, 4),  # the same shape in another dtype
    torch.arange(12, dtype=torch.float32).reshape(4, 3).T,  # not contiguous
    torch.tensor(2.5),  # a scalar buffer (batch_threshold): one element is hashed too
    torch.tensor([7], dtype=torch.int64),
    torch.zeros(0, 5),
    torch.linspace(-3, 3, 10, dtype=torch.bfloat16),
], ids=["fp32", "fp32-reshaped", "int32", "transposed", "scalar", "one-element", "empty", "bf16"])
def test_tensor_digest_is_sha256_of_dtype_shape_and_logical_bytes(t):
    """Every file stores these digests, so they must not change with the implementation: SHA-256 of
    the dtype, the shape and the elements' bytes in row-major order (numpy's tobytes of the values;
    bf16 through its int16 bit pattern, which numpy can hold)."""
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    want = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw.numpy().tobytes()).hexdigest()
    assert tensor_sha256(t) == want
