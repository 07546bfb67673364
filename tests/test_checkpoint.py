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
from sae.checkpoint import FORMAT_VERSION, CheckpointError, read_checkpoint
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
