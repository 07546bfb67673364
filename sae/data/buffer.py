"""Harvested activations as a dataset: ``ActivationBuffer``.

It holds token activations ``[N, d_model]`` in memory or memory-mapped from a cache on disk, and
serves shuffled minibatches, deterministic per seed and resumable from any step.

The disk cache (``ActivationBuffer.harvest(..., cache_dir=...)``) keeps one folder per (model,
layer, context length, tokens, storage dtype), named with a hash of the tokens and of the model's
weights, holding ``acts.npy`` and ``meta.json``. A harvest writes into a hidden ``.<key>.partial``
folder, records every completed chunk of batches in its ``progress.json`` (written to a unique
temporary name, then renamed), and renames the folder into place only when complete, so:

- an interrupted harvest resumes from its last completed chunk, and the result is byte for byte
  what an uninterrupted harvest writes (the same batches, in the same order);
- a lock file ``.<key>.lock`` (``flock``, released by the kernel when a process dies) lets one
  process write a given entry; a second one waits for it and then maps the finished entry;
- when the next harvest starts, partial folders whose lock nobody holds and that hold nothing to
  resume (no ``progress.json``), and the per-process temporary folders of older versions, are
  removed; another entry's resumable partial is kept for its own harvest to finish (delete the
  hidden ``.<key>.partial`` folder by hand to reclaim its space).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .harvest import harvest_activations
from .layouts import decoder_layer
from .texts import data_root
from ..rundir import pid_alive

__all__ = ["ActivationBuffer"]

_STORAGE = {  # torch dtype -> (name, numpy dtype of the stored bits)
    torch.float32: ("float32", np.float32),
    torch.float16: ("float16", np.float16),
    torch.bfloat16: ("bfloat16", np.int16),  # bf16 bit patterns; numpy has no bf16
}
_STORAGE_BY_NAME = {name: dt for dt, (name, _) in _STORAGE.items()}
_OLD_TMP = re.compile(r"^\.(?P<key>.+)\.(?P<pid>\d+)\.tmp$")  # per-process temp folders of older versions


# Values of each weight tensor the cache key reads, spread evenly over the whole tensor.
_FINGERPRINT_VALUES = 256


def _model_fingerprint(model) -> str:
    """Cheap identity of a model's weights: its config plus, for every tensor, its shape, dtype and
    ``_FINGERPRINT_VALUES`` values spread over all of it (the first values alone missed a model
    that differs further in)."""
    h = hashlib.sha1()
    config = getattr(model, "config", None)
    h.update(repr(config.to_dict() if hasattr(config, "to_dict") else config).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        h.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
        if flat.numel():
            count = min(flat.numel(), _FINGERPRINT_VALUES)
            at = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(1, count - 1)
            h.update(flat[at].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60] or "model"


class ActivationBuffer:
    """Token activations ``[N, d_model]`` held in memory or memory-mapped from disk, served as
    shuffled minibatches.

    Build one from a tensor/array (``ActivationBuffer(acts)``) or by harvesting
    (``ActivationBuffer.harvest(model, tokens, layer, cache_dir=...)``, which reuses a cached
    harvest of the same model, layer and tokens). ``batches(batch_size, epochs, seed,
    start_step)`` yields ``[B, d_model]`` tensors: every epoch is a fresh permutation of all
    rows determined by ``(seed, epoch)`` alone, so the stream is reproducible and resumable
    from any step. Values are stored as float32, float16 or bfloat16 and returned as float32
    (or the ``dtype`` asked for)."""

    def __init__(self, acts: torch.Tensor | np.ndarray, *, storage_dtype: torch.dtype | None = None):
        """``acts``: ``[N, d_model]`` tensor, or numpy array / memmap. A numpy ``int16`` array
        holds bfloat16 bit patterns and needs ``storage_dtype=torch.bfloat16``."""
        if acts.ndim != 2:
            raise ValueError(f"acts: expected a 2-D [N, d_model] array, got shape {tuple(acts.shape)}")
        if isinstance(acts, torch.Tensor):
            if acts.dtype not in _STORAGE:
                raise TypeError(f"acts: expected float32/float16/bfloat16, got {acts.dtype}")
            self._data = acts.detach().cpu()
            self._dtype = acts.dtype
        elif isinstance(acts, np.ndarray):
            if storage_dtype is None:
                storage_dtype = {np.dtype(np.float32): torch.float32,
                                 np.dtype(np.float16): torch.float16}.get(acts.dtype)
            if storage_dtype not in _STORAGE or np.dtype(_STORAGE[storage_dtype][1]) != acts.dtype:
                raise TypeError(
                    f"acts: expected a float32/float16 array, or int16 bits with "
                    f"storage_dtype=torch.bfloat16; got {acts.dtype} with storage_dtype={storage_dtype}"
                )
            self._data = acts
            self._dtype = storage_dtype
        else:
            raise TypeError(f"acts: expected a torch.Tensor or numpy array, got {type(acts).__name__}")
        self.path: Path | None = None  # the cache folder when memory-mapped

    def __len__(self) -> int:
        return int(self._data.shape[0])

    @property
    def d_model(self) -> int:
        return int(self._data.shape[1])

    @property
    def storage_dtype(self) -> torch.dtype:
        return self._dtype

    def _rows(self, idx) -> torch.Tensor:
        if isinstance(self._data, torch.Tensor):
            if isinstance(idx, slice):
                return self._data[idx]
            return self._data[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
        rows = self._data[idx]
        if not (rows.flags.writeable and rows.flags.c_contiguous):  # a view into a read-only memmap
            rows = np.array(rows)
        t = torch.from_numpy(rows)
        return t.view(torch.bfloat16) if self._dtype == torch.bfloat16 else t

    def __getitem__(self, idx) -> torch.Tensor:
        """Rows ``idx`` (an int, slice or index array) as a float32 tensor ``[..., d_model]``."""
        if isinstance(idx, int):
            if not -len(self) <= idx < len(self):
                raise IndexError(f"idx: expected in [-{len(self)}, {len(self)}), got {idx}")
            idx %= len(self)
            return self._rows(slice(idx, idx + 1))[0].float()
        return self._rows(idx).float()

    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        """Minibatches per epoch: ``N // batch_size`` (or rounded up without ``drop_last``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    @staticmethod
    def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([int(seed), int(epoch)]).permutation(n)

    def batch_indices(self, batch_size: int, epochs: int = 1, *, seed: int = 0, start_step: int = 0,
                      drop_last: bool = True) -> Iterator[np.ndarray]:
        """The row indices (ascending int64 arrays) of the minibatches ``batches`` yields, with the
        same arguments; a data-parallel rank reads only its slice of each."""
        spe = self.steps_per_epoch(batch_size, drop_last)
        if spe == 0:
            raise ValueError(f"batch_size: expected <= {len(self)} rows with drop_last, got {batch_size}")
        total = epochs * spe
        if not 0 <= start_step <= total:
            raise ValueError(f"start_step: expected in [0, {total}], got {start_step}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        perm, perm_epoch = None, -1
        for step in range(start_step, total):
            epoch, s = divmod(step, spe)
            if epoch != perm_epoch:
                perm, perm_epoch = self._permutation(len(self), seed, epoch), epoch
            yield np.sort(perm[s * batch_size:(s + 1) * batch_size])

    def batches(self, batch_size: int, epochs: int = 1, *, seed: int = 0, start_step: int = 0,
                drop_last: bool = True, dtype: torch.dtype = torch.float32,
                device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
        """Shuffled minibatches ``[batch_size, d_model]`` for ``epochs`` epochs.

        Step ``s`` (counted from 0 over all epochs) is batch ``s % steps_per_epoch`` of epoch
        ``s // steps_per_epoch``; epoch ``e`` visits the rows in a permutation fixed by
        ``(seed, e)``. ``start_step`` skips the first steps without reading them, so a resumed
        run sees exactly the batches an uninterrupted one would. With ``drop_last`` each epoch
        leaves out its last ``N % batch_size`` permuted rows; otherwise the last batch is
        smaller. Rows inside a batch come in ascending row order (cheaper reads from disk)."""
        for idx in self.batch_indices(batch_size, epochs, seed=seed, start_step=start_step, drop_last=drop_last):
            out = self._rows(idx).to(dtype)
            yield out if device is None else out.to(device)

    @staticmethod
    def default_cache_dir() -> Path:
        """``${TOPK_SAE_DATA:-~/.cache/topk-sae}/activations``."""
        return data_root() / "activations"

    @classmethod
    def harvest(cls, model, tokens: torch.Tensor, layer: int, *,
                cache_dir: str | os.PathLike | None = None, model_id: str | None = None,
                batch_size: int = 8, storage_dtype: torch.dtype | None = None,
                autocast_dtype: torch.dtype | None = None, progress: bool = False,
                chunk_batches: int = 16) -> "ActivationBuffer":
        """Harvests decoder layer ``layer`` over ``tokens`` ``[n_ctx, T]`` (position 0 of every
        context left out: ``N = n_ctx * (T - 1)`` rows, context by context).

        ``cache_dir=None`` keeps the activations in memory. Otherwise they go to a ``.npy``
        memmap in a sub-folder of ``cache_dir`` named after the model, layer, context length,
        token count and storage dtype plus a hash of the tokens and model weights; a later call
        with the same inputs maps that file instead of running the model, and a call after an
        interrupted harvest resumes it from its last completed chunk of ``chunk_batches``
        batches (see the module docstring). ``storage_dtype`` defaults to the model's parameter
        dtype, the dtype the residual stream comes out in (lossless; under ``autocast_dtype``
        it stays the parameter dtype)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens: expected a LongTensor [n_ctx, T], got {getattr(tokens, 'shape', type(tokens))}")
        n_ctx, ctx_len = tokens.shape
        if ctx_len < 2:
            raise ValueError(f"tokens: expected contexts of >= 2 tokens, got {ctx_len}")
        if n_ctx < 1:
            raise ValueError("tokens: expected at least one context, got none")
        for name, value in (("batch_size", batch_size), ("chunk_batches", chunk_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        model_dtype = next(model.parameters()).dtype
        if storage_dtype is None:  # what the residual stream comes out in (autocast keeps it fp32)
            storage_dtype = model_dtype if model_dtype in _STORAGE else torch.float32
        if storage_dtype not in _STORAGE:
            raise TypeError(f"storage_dtype: expected float32, float16 or bfloat16, got {storage_dtype}")
        decoder_layer(model, layer)  # validate early
        n_rows = n_ctx * (ctx_len - 1)
        n_batches = -(-n_ctx // batch_size)

        def stream(start_batch: int = 0):
            it = harvest_activations(model, tokens[start_batch * batch_size:], layer, batch_size=batch_size,
                                     autocast_dtype=autocast_dtype, out_dtype=storage_dtype)
            if progress:
                from tqdm import tqdm
                it = tqdm(it, total=n_batches, initial=start_batch, desc=f"harvest layer {layer}", unit="batch")
            return it

        if cache_dir is None:
            out = None
            pos = 0
            for acts in stream():
                if out is None:
                    out = torch.empty(n_rows, acts.shape[1], dtype=storage_dtype)
                out[pos:pos + len(acts)] = acts
                pos += len(acts)
            return cls(out)

        name_id = model_id or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(tokens.cpu().numpy().astype(np.int64)).tobytes())
        h.update(_model_fingerprint(model).encode())
        h.update(f"{model_dtype}|{autocast_dtype}".encode())
        sname = _STORAGE[storage_dtype][0]
        key = f"{_slug(str(name_id))}_L{layer}_ctx{ctx_len}_n{n_rows}_{sname}_{h.hexdigest()[:16]}"
        cache_dir = Path(cache_dir)
        folder = cache_dir / key
        if (folder / "meta.json").is_file():
            return cls._open(folder)

        cache_dir.mkdir(parents=True, exist_ok=True)
        lock_path = cache_dir / f".{key}.lock"
        lock = _lock(lock_path, wait_message=f"[sae] waiting for another process harvesting {key}")
        try:
            if (folder / "meta.json").is_file():  # it finished while we waited
                return cls._open(folder)
            _remove_stale(cache_dir)
            partial = cache_dir / f".{key}.partial"
            expected = dict(n_rows=n_rows, batch_size=batch_size, storage_dtype=sname)
            start, arr = _resume_partial(partial, expected)
            pos = start * batch_size * (ctx_len - 1)
            # start == n_batches: killed after the last chunk was recorded, only meta.json is missing
            for i, acts in enumerate(stream(start) if start < n_batches else (), start=start + 1):
                if arr is None:
                    partial.mkdir(exist_ok=True)
                    arr = np.lib.format.open_memmap(partial / "acts.npy", mode="w+",
                                                    dtype=_STORAGE[storage_dtype][1], shape=(n_rows, acts.shape[1]))
                bits = acts.view(torch.int16) if storage_dtype == torch.bfloat16 else acts
                arr[pos:pos + len(acts)] = bits.numpy()
                pos += len(acts)
                if i % chunk_batches == 0 or i == n_batches:
                    arr.flush()  # the rows reach the file before progress.json says they did
                    _write_json_atomic(partial / "progress.json", dict(expected, batches_done=i, d_model=arr.shape[1]))
            d_model = arr.shape[1]
            del arr
            meta = dict(model_id=str(name_id), layer=layer, ctx_len=ctx_len, n_contexts=n_ctx,
                        n_rows=n_rows, d_model=d_model, storage_dtype=sname,
                        model_dtype=str(model_dtype), autocast_dtype=str(autocast_dtype),
                        skip_first=True)
            _write_json_atomic(partial / "meta.json", meta)
            (partial / "progress.json").unlink()
            if folder.exists():  # an incomplete entry without meta.json, from a version before this one
                shutil.rmtree(folder)
            os.replace(partial, folder)
        finally:
            _unlock(lock, lock_path)
        return cls._open(folder)

    @classmethod
    def _open(cls, folder: Path) -> "ActivationBuffer":
        meta = json.loads((folder / "meta.json").read_text())
        arr = np.load(folder / "acts.npy", mmap_mode="r")
        buf = cls(arr, storage_dtype=_STORAGE_BY_NAME[meta["storage_dtype"]])
        buf.path = folder
        return buf


# --------------------------------------------------------------------------------------------
# The cache's files: locks, atomic writes, resuming and cleaning up
# --------------------------------------------------------------------------------------------

def _lock(path: Path, wait_message: str | None = None, blocking: bool = True) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if missing); returns the open descriptor, or
    ``None`` when not ``blocking`` and another process holds it. Retries when the file was
    removed and recreated while we waited, so two holders never hold two inodes of one name."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if not blocking:
                os.close(fd)
                return None
            if wait_message:
                print(wait_message, file=sys.stderr, flush=True)
                wait_message = None
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock(fd: int, path: Path) -> None:
    """Removes the lock file (while still holding it) and releases it."""
    path.unlink(missing_ok=True)
    os.close(fd)


def _write_json_atomic(path: Path, obj: dict) -> None:
    """Writes ``path`` through a unique temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resume_partial(partial: Path, expected: dict) -> tuple[int, np.memmap | None]:
    """(batches already done, the open memmap or None) for the partial folder of this harvest.
    Anything in it that does not match ``expected`` is thrown away, and with it the folder."""
    if not partial.is_dir():
        return 0, None
    for p in partial.iterdir():  # temporary files of writes that were killed
        if p.name not in ("acts.npy", "progress.json"):
            p.unlink() if not p.is_dir() else shutil.rmtree(p)
    try:
        progress = json.loads((partial / "progress.json").read_text())
        arr = np.load(partial / "acts.npy", mmap_mode="r+")
        ok = (all(progress.get(k) == v for k, v in expected.items())
              and arr.shape == (expected["n_rows"], progress["d_model"])
              and arr.dtype == np.dtype(_STORAGE[_STORAGE_BY_NAME[expected["storage_dtype"]]][1]))
        if ok:
            return int(progress["batches_done"]), arr
        del arr
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shutil.rmtree(partial, ignore_errors=True)
    return 0, None


def _remove_stale(cache_dir: Path) -> None:
    """Removes what killed harvests left in ``cache_dir``: partial folders no live process holds and
    nothing can resume (no ``progress.json``), unheld lock files, and the per-process temporary
    folders of older versions. A resumable partial is progress (a harvest can take hours): kept."""
    for p in cache_dir.iterdir():
        name = p.name
        old = _OLD_TMP.match(name)
        if old and p.is_dir() and not pid_alive(int(old["pid"])):
            shutil.rmtree(p, ignore_errors=True)
        elif name.startswith(".") and name.endswith(".lock"):
            key = name[1:-len(".lock")]
            fd = _lock(p, blocking=False)
            if fd is None:
                continue  # a live process is harvesting this one
            if not (cache_dir / f".{key}.partial" / "progress.json").is_file():
                shutil.rmtree(cache_dir / f".{key}.partial", ignore_errors=True)
            _unlock(fd, p)
        elif (name.startswith(".") and name.endswith(".partial") and not (p / "progress.json").is_file()
              and not (cache_dir / f"{name[:-len('.partial')]}.lock").exists()):
            shutil.rmtree(p, ignore_errors=True)
