"""One checkpoint format for final SAEs and training checkpoints, and ``load_sae``.

A checkpoint is one safetensors file. Its metadata has one key, ``"topk-sae"``, whose value is a
JSON object (one key, so the file's bytes do not depend on the order in which safetensors writes
a map: two identical runs give identical files) with:

- ``format_version`` (``FORMAT_VERSION``);
- ``class``: the SAE class's name in ``sae.models.SAE_CLASSES``;
- ``config``: the SAE's full ``config()`` (every default; never runtime choices such as ``backend``);
- ``sha256``: a JSON map from each tensor's name to the SHA-256 of its dtype, shape and bytes,
  verified on every load;
- training checkpoints only: ``train``, a JSON object (step, tokens, the TrainConfig, ...).

The SAE's tensors are stored under their ``state_dict`` names; a training checkpoint adds the
optimizer's state under ``optimizer.<param>.<key>``, so ``load_sae`` reads either kind.
Files of the first format (``config``/``class`` metadata without checksums, or training
checkpoints with ``sae.``/``opt.`` prefixes and one digest) still load.

``load_sae(path)`` also takes a directory: one of our run folders, or an SAE saved by SAELens
(``save_model``) or sparsify (``save_to_disk``), converted by ``sae.interop``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .rundir import atomic_write

FORMAT = "topk-sae"
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: missing, truncated, corrupt, or for another SAE or run."""


@dataclass
class Checkpoint:
    """A verified checkpoint read from disk."""

    class_name: str
    config: dict
    sae_tensors: dict
    optimizer_tensors: dict = field(default_factory=dict)
    train: Optional[dict] = None
    version: int = FORMAT_VERSION


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_sae(sae, path: str | os.PathLike, *, optimizer_tensors: Optional[dict] = None,
             train: Optional[dict] = None) -> None:
    """Atomically write ``sae`` (and, for a training checkpoint, optimizer tensors and ``train``)."""
    from safetensors.torch import save_file

    from .models import SAE_CLASSES

    name = type(sae).__name__
    if SAE_CLASSES.get(name) is not type(sae):
        raise TypeError(f"sae: expected a registered SAE class ({sorted(SAE_CLASSES)}), got {name}")
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    for k, v in (optimizer_tensors or {}).items():
        tensors[f"optimizer.{k}"] = v.detach().contiguous()
    record = {"format_version": FORMAT_VERSION, "class": name, "config": sae.config(),
              "sha256": {k: tensor_sha256(v) for k, v in sorted(tensors.items())}}
    if train is not None:
        record["train"] = train
    meta = {FORMAT: json.dumps(record)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint file (either format). Raises ``CheckpointError``."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is a folder; expected a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header or size
        raise CheckpointError(f"checkpoint: {path} is truncated or corrupt ({exc})") from exc
    if FORMAT in meta:
        return _read_v2(path, json.loads(meta[FORMAT]), tensors)
    if "sae_class" in meta and "sha256" in meta:
        return _read_v1_training(path, meta, tensors)
    if "config" in meta and "class" in meta:  # first-format final SAE: no checksum to verify
        return Checkpoint(meta["class"], _clean_config(json.loads(meta["config"])), tensors, version=1)
    raise CheckpointError(f"checkpoint: {path} is not an SAE checkpoint of this package (no format in its metadata)")


def read_train_record(path: str | os.PathLike) -> Optional[dict]:
    """The ``train`` record of a training checkpoint from its header alone (no tensor is read or
    verified), or None for a final SAE. For quick checks before a run; ``read_checkpoint`` verifies."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"checkpoint: {path} is truncated or corrupt ({exc})") from exc
    if FORMAT in meta:
        return json.loads(meta[FORMAT]).get("train")
    if "sae_class" in meta and "step" in meta:
        return {"step": int(meta["step"]), "tokens": int(meta["tokens"]),
                "train_config": json.loads(meta["train_config"])}
    return None


def _read_v2(path: Path, meta: dict, tensors: dict) -> Checkpoint:
    version = int(meta.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {path} has format version {version}; this package reads up to "
                              f"{FORMAT_VERSION} (upgrade the package)")
    sums = meta.get("sha256", {})
    if set(sums) != set(tensors):
        raise CheckpointError(f"checkpoint: {path} is corrupt (tensors {sorted(set(sums) ^ set(tensors))} "
                              f"lack a checksum or are missing)")
    bad = [k for k, v in tensors.items() if tensor_sha256(v) != sums[k]]
    if bad:
        raise CheckpointError(f"checkpoint: {path} is corrupt (tensor {bad[0]} does not match its stored SHA-256)")
    sae = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    opt = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return Checkpoint(meta["class"], meta["config"], sae, opt, meta.get("train"), version)


def _v1_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_v1_training(path: Path, meta: dict, tensors: dict) -> Checkpoint:
    if _v1_digest(tensors) != meta["sha256"]:
        raise CheckpointError(f"checkpoint: {path} is corrupt (its tensors do not match the stored SHA-256)")
    sae = {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}
    opt = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
    train = {"step": int(meta["step"]), "tokens": int(meta["tokens"]),
             "train_config": json.loads(meta["train_config"])}
    return Checkpoint(meta["sae_class"], _clean_config(json.loads(meta["sae_config"])), sae, opt, train, 1)


def _clean_config(config: dict) -> dict:
    """First-format configs saved runtime choices; drop them."""
    return {k: v for k, v in config.items() if k != "backend"}


def build_sae(ckpt: Checkpoint, device="cpu", dtype: Optional[torch.dtype] = None):
    """The SAE a verified checkpoint describes, with its tensors loaded."""
    from .models import SAE_CLASSES

    cls = SAE_CLASSES.get(ckpt.class_name)
    if cls is None:
        raise CheckpointError(f"checkpoint: unknown SAE class {ckpt.class_name!r}; known: {sorted(SAE_CLASSES)}")
    try:
        sae = cls(**ckpt.config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: its config does not describe a {ckpt.class_name} ({exc})") from exc
    sae.load_state_dict(ckpt.sae_tensors)
    return sae.to(device=device, dtype=dtype) if dtype is not None else sae.to(device)


def load_sae(path: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None):
    """Any SAE this package can read: our checkpoint files (final or training), one of our run
    folders, or a folder saved by SAELens or sparsify. Returns the right class on ``device``."""
    path = Path(path)
    if path.is_dir():
        from . import interop

        peer = interop.detect(path)
        if peer is not None:
            return interop.load(path, device=device, dtype=dtype)
        for name in ("sae.safetensors", "checkpoint.safetensors"):
            if (path / name).is_file():
                return build_sae(read_checkpoint(path / name), device, dtype)
        raise CheckpointError(f"path: {path} is a folder without sae.safetensors, checkpoint.safetensors, or a "
                              f"SAELens/sparsify cfg.json")
    if not path.exists():
        raise FileNotFoundError(f"path: {path} does not exist")
    return build_sae(read_checkpoint(path), device, dtype)
