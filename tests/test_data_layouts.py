"""Tests of sae.data.layouts, sae.data.harvest and sae.data.language_model: decoder layers of
Llama-style, GPT-2 and GPT-NeoX models (tiny random models built from configs, no files), the
output hook, harvesting (stops after the layer, skips position 0, equals the model's own hidden
states), loading a model from a local folder offline, and no environment changes at import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import tiny_gpt2, tiny_neox
from sae import data as sdata
from sae.data import harvest_activations


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (6, 12), generator=torch.Generator().manual_seed(1))


def test_harvest_stops_after_layer(tiny_llama, tokens):
    model, layer = tiny_llama, 1
    hooks_before = dict(model.model.layers[layer]._forward_hooks)  # transformers may keep its own there
    ran = []
    handles = [l.register_forward_hook(lambda *a, i=i: ran.append(i))
               for i, l in enumerate(model.model.layers)]
    handles.append(model.model.norm.register_forward_hook(lambda *a: ran.append("norm")))
    handles.append(model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head")))
    try:
        out = list(harvest_activations(model, tokens, layer, batch_size=4))
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1, 0, 1]  # two batches, each through layers 0 and 1 only
    assert [o.shape for o in out] == [(4 * 11, 32), (2 * 11, 32)]
    assert dict(model.model.layers[layer]._forward_hooks) == hooks_before  # the harvesting hook is gone


@pytest.mark.parametrize("layer", [0, 2])
def test_harvest_matches_hidden_states(tiny_llama, tokens, layer):
    model = tiny_llama
    with torch.no_grad():
        hs = model(tokens, output_hidden_states=True).hidden_states[layer + 1]  # [n, T, m]
    got = torch.cat(list(harvest_activations(model, tokens, layer, batch_size=4)))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, hs[:, 1:].reshape(-1, 32), rtol=1e-5, atol=1e-5)
    with_first = torch.cat(list(harvest_activations(model, tokens, layer, batch_size=6, skip_first=False)))
    torch.testing.assert_close(with_first, hs.reshape(-1, 32), rtol=1e-5, atol=1e-5)
    # an iterable of batches works like a tensor
    batches = [tokens[:2], tokens[2:]]
    torch.testing.assert_close(torch.cat(list(harvest_activations(model, batches, layer))), got)


def test_harvest_runs_a_model_in_training_mode_without_dropout(tokens):
    """A model built from a config starts in training mode: harvesting runs it in eval mode (no
    dropout noise in the activations, which are cached on disk) and restores its modes."""
    model = tiny_gpt2()
    want = torch.cat(list(harvest_activations(model, tokens, 1)))
    model.train()
    got = torch.cat(list(harvest_activations(model, tokens, 1)))
    assert torch.equal(got, want) and all(m.training for m in model.modules())


def test_harvest_bf16_and_bad_layer(tiny_llama, tokens):
    model = tiny_llama
    ref = torch.cat(list(harvest_activations(model, tokens, 1)))
    auto = torch.cat(list(harvest_activations(model, tokens, 1, autocast_dtype=torch.bfloat16,
                                              out_dtype=torch.bfloat16)))
    assert auto.dtype == torch.bfloat16
    assert (auto.float() - ref).norm() / ref.norm() < 0.05
    with pytest.raises(IndexError, match="layer"):
        next(harvest_activations(model, tokens, 4))


@pytest.mark.parametrize("make, where", [(tiny_gpt2, "transformer.h"), (tiny_neox, "gpt_neox.layers")])
def test_layouts_gpt2_and_neox(make, where, tokens):
    model = make()
    layers = sdata.decoder_layers(model)
    expected = model
    for attr in where.split("."):
        expected = getattr(expected, attr)
    assert layers is expected and sdata.n_decoder_layers(model) == 3
    with torch.no_grad():
        hs = model(tokens, output_hidden_states=True).hidden_states
    for layer in (0, 1):  # the last entry of hidden_states has the final norm applied
        got = torch.cat(list(harvest_activations(model, tokens, layer, batch_size=4)))
        torch.testing.assert_close(got, hs[layer + 1][:, 1:].reshape(-1, 32), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="layer: expected 0 <= layer < 3"):
        sdata.decoder_layer(model, 3)
    with pytest.raises(IndexError, match="layer"):
        sdata.decoder_layer(model, -1)


def test_layouts_unknown_model_and_output_hook(tiny_llama, tokens):
    with pytest.raises(TypeError, match="model: expected a decoder-only transformer"):
        sdata.decoder_layers(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="layer: expected an int"):
        sdata.decoder_layer(tiny_llama, 1.0)
    hooks_before = dict(tiny_llama.model.layers[3]._forward_hooks)  # transformers may keep its own there
    with torch.no_grad():
        clean = tiny_llama(tokens).logits
        seen = []
        with sdata.layer_output_hook(tiny_llama, 2, lambda h: seen.append(h.shape)):
            same = tiny_llama(tokens).logits
        with sdata.layer_output_hook(tiny_llama, 3, torch.zeros_like):
            zeroed = tiny_llama(tokens).logits
    assert seen == [(6, 12, 32)] and torch.equal(same, clean)
    # the last layer's output zeroed: the final RMSNorm of 0 is 0, so every logit is 0
    assert (zeroed == 0).all()
    assert dict(tiny_llama.model.layers[3]._forward_hooks) == hooks_before


def test_load_model_missing_paths_fail_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path: the model folder .* does not exist"):
        sdata.load_model(tmp_path / "no" / "such" / "model")
    with pytest.raises(FileNotFoundError, match="name_or_path: the .gguf file"):
        sdata.load_model(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="name_or_path"):
        sdata.load_model(tmp_path / "weights.bin")


def test_load_model_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1)
    folder = tmp_path / "tiny"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghij ")}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                         unk_token="<unk>").save_pretrained(folder)
    model, tokenizer = sdata.load_model(folder, dtype=torch.float32)
    assert sdata.n_decoder_layers(model) == 2 and not model.training
    assert tokenizer.bos_token_id == 1 and tokenizer("abc", add_special_tokens=False)["input_ids"] == [2, 3, 4]
    source = sdata.model_source(folder)
    assert list(source["files"]) == ["model.safetensors"] and len(source["files"]["model.safetensors"]) == 64


def test_importing_data_and_evaluate_leaves_the_environment_alone():
    code = ("import os, sys; before = dict(os.environ); import sae.data, sae.evaluate; "
            "sys.exit(0 if dict(os.environ) == before else 1)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_harvest_refuses_non_finite_activations_and_empty_batches(tiny_llama, tokens):
    """Activations that overflow the harvest's dtype, or that the model itself makes NaN, are an
    error naming out_dtype, not infinities cached for training; an empty batch is refused."""
    model, layer = tiny_llama, 1
    scale = model.model.layers[layer].mlp.down_proj.weight
    saved = scale.detach().clone()
    try:
        with torch.no_grad():
            scale.mul_(1e6)  # residual stream ~1e5..1e6: finite in fp32 and bf16, past fp16's 65504
        big = torch.cat(list(harvest_activations(model, tokens, layer)))
        assert bool(torch.isfinite(big).all()) and big.abs().max() > 65504
        assert bool(torch.isfinite(torch.cat(list(harvest_activations(model, tokens, layer,
                                                                        out_dtype=torch.bfloat16)))).all())
        with pytest.raises(ValueError, match="out_dtype.*overflow"):
            list(harvest_activations(model, tokens, layer, out_dtype=torch.float16))
        with torch.no_grad():
            scale[0, 0] = float("nan")
        with pytest.raises(ValueError, match="model's own activations"):
            list(harvest_activations(model, tokens, layer))
    finally:
        with torch.no_grad():
            scale.copy_(saved)
    with pytest.raises(ValueError, match="token_batches"):
        list(harvest_activations(model, tokens[:0], layer))
