"""Tests of sae.data.buffer: the shuffled, resumable activation buffer in memory and cached on
disk, the harvest resumed after an interruption (byte for byte what an uninterrupted one writes),
one harvester per cache entry, and the clean-up of what killed harvests left."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import subprocess
import threading

import numpy as np
import pytest
import torch

from sae.data import ActivationBuffer, harvest_activations


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (6, 12), generator=torch.Generator().manual_seed(1))


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
    with pytest.raises(ValueError, match=r"^seed: expected an int >= 0, got -1"):
        next(buf.batches(8, seed=-1))


def test_buffer_from_numpy_and_bf16_bits(numbered):
    np_buf = ActivationBuffer(numbered.numpy())
    assert torch.equal(np_buf[5:9], numbered[5:9])
    bf = numbered.to(torch.bfloat16)
    bits = ActivationBuffer(bf.view(torch.int16).numpy(), storage_dtype=torch.bfloat16)
    assert torch.equal(bits[:], bf.float())
    with pytest.raises(TypeError, match="acts"):
        ActivationBuffer(numbered.numpy().astype(np.int32))


def test_buffer_int_index_out_of_range_raises(numbered):
    buf = ActivationBuffer(numbered)  # 103 rows
    assert torch.equal(buf[-1], numbered[102]) and torch.equal(buf[-103], numbered[0])
    for idx in (103, 200, -104, -105, -206):  # -104 used to wrap twice, to row 101
        with pytest.raises(IndexError, match="idx"):
            buf[idx]


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


def test_buffer_harvest_finishes_a_partial_killed_after_its_last_chunk(tiny_llama, tokens, tmp_path, monkeypatch):
    """Killed after progress.json recorded every batch but before meta.json: the next harvest
    only writes meta.json (it used to run the model on an empty batch and fail, every time)."""
    from sae.data import buffer as buffer_module

    ref = ActivationBuffer.harvest(tiny_llama, tokens, 1, cache_dir=tmp_path / "ref", batch_size=4)
    write = buffer_module._write_json_atomic

    def dies_at_meta(path, obj):
        if path.name == "meta.json":
            raise _Interrupt
        write(path, obj)

    monkeypatch.setattr(buffer_module, "_write_json_atomic", dies_at_meta)
    with pytest.raises(_Interrupt):
        ActivationBuffer.harvest(tiny_llama, tokens, 1, cache_dir=tmp_path / "c", batch_size=4, chunk_batches=1)
    monkeypatch.setattr(buffer_module, "_write_json_atomic", write)
    with _count_batches(tiny_llama) as calls:
        again = ActivationBuffer.harvest(tiny_llama, tokens, 1, cache_dir=tmp_path / "c", batch_size=4)
    assert not calls and _npy_bytes(again) == _npy_bytes(ref)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [ref.path.name]


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
    orphan = tmp_path / ".orphan_L4_key.partial"  # killed before its first chunk, no lock left
    orphan.mkdir()
    (orphan / "acts.npy").write_bytes(b"\0" * 1000)
    resumable = tmp_path / ".resume_L0_key.partial"  # another entry's progress: kept for its harvest
    resumable.mkdir()
    (resumable / "progress.json").write_text("{}")
    (tmp_path / ".resume_L0_key.lock").touch()
    live = tmp_path / ".busy_L2_key.partial"  # another process is writing this one right now
    live.mkdir()
    with open(tmp_path / ".busy_L2_key.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        buf = ActivationBuffer.harvest(tiny_llama, tokens, 1, cache_dir=tmp_path, batch_size=4)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([buf.path.name, live.name, ".busy_L2_key.lock", resumable.name])
    assert (resumable / "progress.json").is_file()


def test_model_fingerprint_sees_a_change_past_the_first_values():
    from sae.data.buffer import _model_fingerprint

    model = torch.nn.Linear(300, 200)
    before = _model_fingerprint(model)
    assert _model_fingerprint(model) == before
    with torch.no_grad():
        model.weight[150:] += 0.05  # rows far past the first 64 values
    assert _model_fingerprint(model) != before
