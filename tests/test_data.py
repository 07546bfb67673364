"""Tests of sae.data: the R lazy-load reader, text loading, tokenisation and the train/held-out
split, activation harvesting (stops after the layer, skips position 0, equals the model's own
hidden states) and the shuffled, resumable activation buffer (in memory and cached on disk).

Harvesting tests use a tiny random-weight LlamaForCausalLM built from a config (no files);
the real SmolLM2 + Austen check is in test_evaluate.py, marked slow."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import gzip
import os
import subprocess
import sys
import threading
import struct
import zlib

import numpy as np
import pytest
import torch

from sae import data as sdata
from sae.data._rdata import read_lazy_load_db, unserialize
from sae.data import ActivationBuffer, harvest_activations, load_austen_texts, load_texts, tokenize_contexts


# --------------------------------------------------------------------------------------------
# A writer of R's XDR serialisation, just enough for character vectors and named lists
# --------------------------------------------------------------------------------------------

class _RWriter:
    def __init__(self, version: int = 3):
        self.version = version
        self.symbols: dict[str, int] = {}  # symbol -> reference index (1-based)

    @staticmethod
    def int(v: int) -> bytes:
        return struct.pack(">i", v)

    def header(self) -> bytes:
        out = b"X\n" + self.int(self.version) + self.int(0x040201) + self.int(0x030500)
        if self.version == 3:
            out += self.int(5) + b"UTF-8"
        return out

    def charsxp(self, s) -> bytes:
        if s is None:
            return self.int(9) + self.int(-1)
        raw = s.encode("utf-8")
        levels = 64 if raw.isascii() else 8  # ASCII_MASK or UTF8_MASK
        return self.int(9 | (levels << 12)) + self.int(len(raw)) + raw

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:  # REFSXP with the index packed into the flags
            return self.int((self.symbols[name] << 8) | 255)
        self.symbols[name] = len(self.symbols) + 1
        return self.int(1) + self.charsxp(name)

    def attrs(self, names) -> bytes:
        # pairlist(names = <character vector>) : LISTSXP with a tag, then NILVALUE
        return self.int(2 | (1 << 10)) + self.symbol("names") + self.strsxp(names) + self.int(254)

    def strsxp(self, strings, names=None) -> bytes:
        flags = 16 | ((1 << 9) if names is not None else 0)
        out = self.int(flags) + self.int(len(strings)) + b"".join(self.charsxp(s) for s in strings)
        return out + (self.attrs(names) if names is not None else b"")

    def intsxp(self, values) -> bytes:
        return self.int(13) + self.int(len(values)) + b"".join(
            self.int(-(2**31) if v is None else v) for v in values)

    def realsxp(self, values) -> bytes:
        return self.int(14) + self.int(len(values)) + struct.pack(f">{len(values)}d", *values)

    def lglsxp(self, values) -> bytes:
        return self.int(10) + self.int(len(values)) + b"".join(self.int(int(v)) for v in values)

    def named_list(self, items: dict[str, bytes]) -> bytes:
        flags = 19 | (1 << 9)
        return (self.int(flags) + self.int(len(items)) + b"".join(items.values())
                + self.attrs(list(items)))

    def serialize(self, body: bytes) -> bytes:
        return self.header() + body


def _write_lazy_load_db(stem, variables: dict[str, list], version: int = 3) -> None:
    """Writes ``stem.rdx`` (gzip) + ``stem.rdb`` (length-prefixed zlib blobs), as R's
    makeLazyLoadDB does, with each value a character vector."""
    blob = b""
    positions = {}
    for name, strings in variables.items():
        w = _RWriter(version)
        ser = w.serialize(w.strsxp(strings))
        chunk = struct.pack(">I", len(ser)) + zlib.compress(ser)
        positions[name] = (len(blob), len(chunk))
        blob += chunk
    w = _RWriter(version)
    index = w.named_list({
        "variables": w.named_list({name: w.intsxp(list(pos)) for name, pos in positions.items()}),
        "references": w.named_list({}),
        "compressed": w.lglsxp([True]),
    })
    with open(f"{stem}.rdb", "wb") as f:
        f.write(blob)
    with open(f"{stem}.rdx", "wb") as f:
        f.write(gzip.compress(w.serialize(index)))


@pytest.mark.parametrize("version", [2, 3])
def test_r_lazy_load_db_round_trip(tmp_path, version):
    variables = {
        "greeting": ["It is a truth universally acknowledged,", None, "", "caf\u00e9 na\u00efve"],
        "empty": [],
        "long": [f"line {i}" for i in range(5000)],
    }
    _write_lazy_load_db(tmp_path / "Rdata", variables, version)
    db = read_lazy_load_db(tmp_path / "Rdata")
    assert set(db) == set(variables)
    for name, strings in variables.items():
        assert list(db[name]) == strings


def test_r_unserialize_numbers_and_named_list():
    w = _RWriter(3)
    ser = w.serialize(w.named_list({
        "i": w.intsxp([1, None, -7]),
        "x": w.realsxp([1.5, -2.25]),
        "b": w.lglsxp([True, False]),
        "s": w.strsxp(["a", "b"], names=["first", "second"]),
    }))
    obj = unserialize(ser)
    assert obj.attrs["names"] == ["i", "x", "b", "s"]
    assert list(obj[0]) == [1, None, -7]
    assert list(obj[1]) == [1.5, -2.25]
    assert list(obj[2]) == [True, False]
    assert list(obj[3]) == ["a", "b"] and obj[3].attrs["names"] == ["first", "second"]
    with pytest.raises(ValueError, match="truncated"):
        unserialize(ser[:-6])
    with pytest.raises(ValueError, match="XDR"):
        unserialize(b"A\n" + ser[2:])


def test_load_austen_texts_from_generated_db(tmp_path):
    folder = tmp_path / "usr/lib/R/site-library/janeaustenr/data"
    folder.mkdir(parents=True)
    novels = {name: [name.upper(), "", "First line of", "a paragraph.", "", "", "Second."]
              for name in sdata.AUSTEN_NOVELS}
    _write_lazy_load_db(folder / "Rdata", novels)
    texts = load_austen_texts(tmp_path)
    assert len(texts) == 6
    assert texts[0] == "SENSESENSIBILITY\n\nFirst line of a paragraph.\n\nSecond."
    raw = load_austen_texts(folder, reflow=False)
    assert raw[1] == "PRIDEPREJUDICE\n\nFirst line of\na paragraph.\n\n\nSecond."
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_austen_texts(tmp_path / "nowhere")


def test_load_texts(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first \u00e9")
    (tmp_path / "skip.md").write_text("not text")
    assert load_texts(tmp_path) == ["first \u00e9", "second"]
    assert load_texts([tmp_path / "b.txt", str(tmp_path / "a.txt")]) == ["second", "first \u00e9"]
    with pytest.raises(FileNotFoundError, match="paths"):
        load_texts(tmp_path / "missing.txt")


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------

class _CharTokenizer:
    """One token per character (code point % 100 + 3); BOS is 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) % 100 + 3 for c in text]}


def test_tokenize_contexts_split():
    tok = _CharTokenizer()
    texts = ["a" * 95, "b" * 40, "c" * 5]  # 95 chars -> 10 chunks of 9 (+BOS), 40 -> 4, 5 -> 0
    train, held = tokenize_contexts(texts, tok, ctx_len=10, held_out_fraction=0.25)
    assert train.shape[1] == held.shape[1] == 10
    assert (train[:, 0] == 1).all() and (held[:, 0] == 1).all()
    a, b = ord("a") % 100 + 3, ord("b") % 100 + 3
    # text a: 10 chunks, last round(2.5)=2 held out; text b: 4 chunks, last 1 held out
    assert train.shape[0] == 8 + 3 and held.shape[0] == 2 + 1
    assert (train[:8, 1:] == a).all() and (train[8:, 1:] == b).all()
    assert (held[:2, 1:] == a).all() and (held[2:, 1:] == b).all()
    again = tokenize_contexts(texts, tok, ctx_len=10, held_out_fraction=0.25)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)

    no_bos, _ = tokenize_contexts(["x" * 30], tok, ctx_len=10, held_out_fraction=0.0, add_bos=False)
    assert no_bos.shape == (3, 10) and (no_bos != 1).all()
    with pytest.raises(ValueError, match="ctx_len"):
        tokenize_contexts(texts, tok, ctx_len=1)
    with pytest.raises(TypeError, match="texts"):
        tokenize_contexts("one string", tok)


def test_tokenize_contexts_disjoint_positions():
    """Held-out contexts are the tail of each text: no token position is in both splits."""

    class Positional:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False, verbose=True):
            return {"input_ids": list(range(len(text)))}

    train, held = tokenize_contexts(["z" * 1000], Positional(), ctx_len=16, held_out_fraction=0.2)
    assert set(train.flatten().tolist()).isdisjoint(held.flatten().tolist())
    assert held.min() > train.max()


# --------------------------------------------------------------------------------------------
# Harvesting with a tiny random Llama
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (6, 12), generator=torch.Generator().manual_seed(1))


def test_harvest_stops_after_layer(tiny_llama, tokens):
    model, layer = tiny_llama, 1
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
    assert not model.model.layers[layer]._forward_hooks  # the harvesting hook is gone


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


def test_harvest_bf16_and_bad_layer(tiny_llama, tokens):
    model = tiny_llama
    ref = torch.cat(list(harvest_activations(model, tokens, 1)))
    auto = torch.cat(list(harvest_activations(model, tokens, 1, autocast_dtype=torch.bfloat16,
                                              out_dtype=torch.bfloat16)))
    assert auto.dtype == torch.bfloat16
    assert (auto.float() - ref).norm() / ref.norm() < 0.05
    with pytest.raises(IndexError, match="layer"):
        next(harvest_activations(model, tokens, 4))


# --------------------------------------------------------------------------------------------
# Activation buffer
# --------------------------------------------------------------------------------------------

def _rows_of(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()  # column 0 holds the row number


@pytest.fixture
def numbered():
    n, m = 103, 4
    acts = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, m)
    acts[:, 1:] += torch.randn(n, m - 1)
    return acts


def test_buffer_shuffles_deterministically_and_completely(numbered):
    buf = ActivationBuffer(numbered)
    assert len(buf) == 103 and buf.d_model == 4 and buf.steps_per_epoch(10) == 10
    epochs = list(buf.batches(10, epochs=2, seed=7))
    assert len(epochs) == 20 and all(b.shape == (10, 4) for b in epochs)
    for e in range(2):
        rows = [r for b in epochs[10 * e:10 * (e + 1)] for r in _rows_of(b)]
        assert len(set(rows)) == 100  # each row at most once per epoch, 3 left over
    first, second = ([r for b in epochs[10 * e:10 * (e + 1)] for r in _rows_of(b)] for e in range(2))
    assert first != second  # each epoch reshuffles
    for a, b in zip(epochs, buf.batches(10, epochs=2, seed=7)):
        assert torch.equal(a, b)
    other = [r for b in buf.batches(10, seed=8) for r in _rows_of(b)]
    assert other != first
    # without drop_last every row appears exactly once per epoch
    full = list(buf.batches(10, seed=7, drop_last=False))
    assert [len(b) for b in full] == [10] * 10 + [3]
    assert sorted(r for b in full for r in _rows_of(b)) == list(range(103))
    # batch rows match the stored rows
    b0 = full[0]
    torch.testing.assert_close(b0, numbered[b0[:, 0].long()])


def test_buffer_resume_from_step(numbered):
    buf = ActivationBuffer(numbered)
    all_batches = list(buf.batches(8, epochs=3, seed=3))
    for start in (0, 1, 11, 12, 13, 30, len(all_batches)):
        resumed = list(buf.batches(8, epochs=3, seed=3, start_step=start))
        assert len(resumed) == len(all_batches) - start
        for a, b in zip(resumed, all_batches[start:]):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="start_step"):
        next(buf.batches(8, epochs=1, start_step=100))


def test_buffer_from_numpy_and_bf16_bits(numbered):
    np_buf = ActivationBuffer(numbered.numpy())
    assert torch.equal(np_buf[5:9], numbered[5:9])
    bf = numbered.to(torch.bfloat16)
    bits = ActivationBuffer(bf.view(torch.int16).numpy(), storage_dtype=torch.bfloat16)
    assert torch.equal(bits[:], bf.float())
    with pytest.raises(TypeError, match="acts"):
        ActivationBuffer(numbered.numpy().astype(np.int32))


def test_buffer_harvest_cached_on_disk(tiny_llama, tokens, tmp_path):
    model, layer = tiny_llama, 2
    in_mem = ActivationBuffer.harvest(model, tokens, layer, batch_size=4)
    assert len(in_mem) == 6 * 11 and in_mem.path is None
    ref = torch.cat(list(harvest_activations(model, tokens, layer)))
    assert torch.equal(in_mem[:], ref)

    on_disk = ActivationBuffer.harvest(model, tokens, layer, cache_dir=tmp_path, model_id="tiny/llama")
    assert on_disk.path is not None and on_disk.path.parent == tmp_path
    assert on_disk.path.name.startswith("tiny-llama_L2_ctx12_n66_float32_")
    assert torch.equal(on_disk[:], ref)

    # a second harvest of the same inputs maps the cached file and runs no layer
    calls = []
    h = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        again = ActivationBuffer.harvest(model, tokens, layer, cache_dir=tmp_path, model_id="tiny/llama")
    finally:
        h.remove()
    assert not calls and again.path == on_disk.path
    for a, b in zip(again.batches(16, epochs=2, seed=1), in_mem.batches(16, epochs=2, seed=1)):
        assert torch.equal(a, b)

    # other tokens or another layer get their own entries; bf16 storage is lossless for bf16
    other = ActivationBuffer.harvest(model, tokens[:3], layer, cache_dir=tmp_path, model_id="tiny/llama")
    assert other.path != on_disk.path and len(other) == 33
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf = ActivationBuffer.harvest(model_bf16, tokens, 1, cache_dir=tmp_path, model_id="tiny/llama")
    assert bf.storage_dtype == torch.bfloat16
    direct = torch.cat(list(harvest_activations(model_bf16, tokens, 1)))
    assert torch.equal(bf[:], direct)
    assert len([p for p in tmp_path.iterdir()]) == 3  # no temporary folders left behind


def _npy_bytes(buf: ActivationBuffer) -> bytes:
    return (buf.path / "acts.npy").read_bytes()


class _Interrupt(BaseException):
    """Stands in for Ctrl-C / a kill in the middle of a harvest."""


@contextlib.contextmanager
def _count_batches(model, interrupt_at: int | None = None):
    """Counts forward passes through layer 0; raises _Interrupt inside pass ``interrupt_at``."""
    calls = []

    def hook(*args):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise _Interrupt

    h = model.model.layers[0].register_forward_hook(hook)
    try:
        yield calls
    finally:
        h.remove()


def test_buffer_harvest_resumes_after_interruption(tiny_llama, tmp_path):
    model, layer = tiny_llama, 1
    toks = torch.randint(0, 101, (11, 9), generator=torch.Generator().manual_seed(5))  # 6 batches of 2
    whole = ActivationBuffer.harvest(model, toks, layer, cache_dir=tmp_path / "a", batch_size=2, chunk_batches=2)

    cache = tmp_path / "b"
    # dies inside batch 4: the chunk of batches 1-2 is recorded, batch 3 is written but not recorded
    with _count_batches(model, interrupt_at=4), pytest.raises(_Interrupt):
        ActivationBuffer.harvest(model, toks, layer, cache_dir=cache, batch_size=2, chunk_batches=2)
    assert [p.name.endswith(".partial") for p in cache.iterdir() if p.is_dir()] == [True]
    with _count_batches(model) as calls:
        resumed = ActivationBuffer.harvest(model, toks, layer, cache_dir=cache, batch_size=2, chunk_batches=2)
    assert len(calls) == 4  # batches 3..6 only
    assert _npy_bytes(resumed) == _npy_bytes(whole)
    assert sorted(p.name for p in cache.iterdir()) == [whole.path.name]  # no partial, lock or temp left


def test_buffer_harvest_restarts_a_partial_of_other_batching(tiny_llama, tokens, tmp_path):
    ref = ActivationBuffer.harvest(tiny_llama, tokens, 2, cache_dir=tmp_path / "ref", batch_size=3)
    with _count_batches(tiny_llama, interrupt_at=2), pytest.raises(_Interrupt):
        ActivationBuffer.harvest(tiny_llama, tokens, 2, cache_dir=tmp_path / "c", batch_size=2, chunk_batches=1)
    with _count_batches(tiny_llama) as calls:
        again = ActivationBuffer.harvest(tiny_llama, tokens, 2, cache_dir=tmp_path / "c", batch_size=3)
    assert len(calls) == 2  # all of it again: batches of 3 cannot continue a harvest in batches of 2
    assert _npy_bytes(again) == _npy_bytes(ref)


def test_buffer_harvest_waits_for_a_live_harvester_of_the_same_entry(tiny_llama, tokens, tmp_path, capfd):
    ref = ActivationBuffer.harvest(tiny_llama, tokens, 1, cache_dir=tmp_path / "ref")
    cache = tmp_path / "c"
    cache.mkdir()
    out = []
    with open(cache / f".{ref.path.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another process harvesting the same entry would
        worker = threading.Thread(target=lambda: out.append(
            ActivationBuffer.harvest(tiny_llama, tokens, 1, cache_dir=cache)))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not out
    worker.join(timeout=120)
    assert out and _npy_bytes(out[0]) == _npy_bytes(ref)
    assert "waiting for another process harvesting" in capfd.readouterr().err


def test_buffer_harvest_cleans_what_killed_harvests_left(tiny_llama, tokens, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    old_tmp = tmp_path / f".tiny_L1_oldkey.{dead.pid}.tmp"  # what older versions left
    old_tmp.mkdir()
    (old_tmp / "acts.npy").write_bytes(b"\0" * 1000)
    killed = tmp_path / ".other_L3_key.partial"
    killed.mkdir()
    (killed / "acts.npy").write_bytes(b"\0" * 1000)
    (tmp_path / ".other_L3_key.lock").touch()
    live = tmp_path / ".busy_L2_key.partial"  # another process is writing this one right now
    live.mkdir()
    with open(tmp_path / ".busy_L2_key.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        buf = ActivationBuffer.harvest(tiny_llama, tokens, 1, cache_dir=tmp_path, batch_size=4)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([buf.path.name, live.name, ".busy_L2_key.lock"])


# --------------------------------------------------------------------------------------------
# Model layouts, splits, model loading, the environment
# --------------------------------------------------------------------------------------------

def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval().requires_grad_(False)


def _tiny_neox():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64)
    return transformers.GPTNeoXForCausalLM(config).eval().requires_grad_(False)


@pytest.mark.parametrize("make, where", [(_tiny_gpt2, "transformer.h"), (_tiny_neox, "gpt_neox.layers")])
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
    assert not tiny_llama.model.layers[3]._forward_hooks


def test_token_splits_three_way():
    tok = _CharTokenizer()
    texts = ["a" * 180, "b" * 45]  # 20 and 5 contexts of 9 text tokens (+ BOS)
    splits = sdata.token_splits(texts, tok, ctx_len=10, validation_fraction=0.1, test_fraction=0.2)
    a, b = ord("a") % 100 + 3, ord("b") % 100 + 3
    # text a: 4 test, 2 validation, 14 train; text b: 1 test, 1 validation (at least one each), 3 train
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [14 + 3, 2 + 1, 4 + 1]
    assert (splits.test[:4, 1:] == a).all() and (splits.test[4:, 1:] == b).all()
    assert (splits.validation[:2, 1:] == a).all() and (splits.train[14:, 1:] == b).all()
    assert splits.bos_id == 1 and (splits.test[:, 0] == 1).all()
    assert splits.n_tokens() == {"train": 170, "validation": 30, "test": 50}
    with pytest.raises(ValueError, match="min_test_tokens"):
        sdata.token_splits(texts, tok, ctx_len=10, test_fraction=0.2, min_test_tokens=51)
    with pytest.raises(ValueError, match="validation_fraction \\+ test_fraction"):
        sdata.token_splits(texts, tok, ctx_len=10, validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(KeyError, match="name"):
        splits["held_out"]


def test_token_splits_are_disjoint_by_position():
    class Positional:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False, verbose=True):
            return {"input_ids": list(range(len(text)))}

    s = sdata.token_splits(["z" * 2000], Positional(), ctx_len=16, validation_fraction=0.1, test_fraction=0.1)
    assert s.bos_id is None
    assert s.train.max() < s.validation.min() and s.validation.max() < s.test.min()


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
