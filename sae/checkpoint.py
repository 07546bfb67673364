"""One checkpoint format for final SAEs and training checkpoints, and ``load_sae``.

A checkpoint is one safetensors file. Its metadata has one key, ``"topk-sae"``, whose value is a
JSON object (one key, so the file's bytes do not depend on the order in which safetensors writes
a map: two identical runs give identical files) with:

- ``format_version`` (``FORMAT_VERSION``);
- ``class``: the SAE class's name in ``sae.models.SAE_CLASSES``;
- ``config``: the SAE's full ``config()`` (every default; never runtime choices such as ``backend``);
- ``sha256``: a JSON map from each tensor's name to the SHA-256 of its dtype, shape and bytes,
  verified on every load;
- training checkpoints only: ``train``, a JSON object (step, tokens, the TrainConfig, ...);
- ``header_sha256`` (from format version 3): the SHA-256 of the canonical JSON (sorted keys, no
  spaces) of every other key of this record, verified on every load, so that a flipped bit in the
  class, the config, the train record or the tensor sums is refused rather than loaded as another
  SAE. The record is the only metadata this package writes or reads, so this covers the whole
  header (the tensors' names, dtypes and shapes in safetensors' own header are covered by ``sha256``).

The SAE's tensors are stored under their ``state_dict`` names, in the dtypes the SAE held (``load_sae``
returns them in those dtypes); a training checkpoint adds the optimizer's state under
``optimizer.<param>.<key>``, so ``load_sae`` reads either kind. Older files still load: version 2
(no ``header_sha256``: its tensors are verified, its header cannot be) and the first format
(``config``/``class`` metadata without checksums, or training checkpoints with ``sae.``/``opt.``
prefixes and one digest). Anything that cannot be read, parsed, verified or built is refused with
a ``CheckpointError`` naming the file, and so is a file whose parameters, buffers or optimizer
state hold a NaN or infinity (its checksums verify, but nothing computed from it can be trusted).

``load_sae(path)`` also takes a directory: one of our run folders, or an SAE saved by SAELens
(``save_model``) or sparsify (``save_to_disk``), converted by ``sae.interop``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .rundir import atomic_write

FORMAT = "topk-sae"
FORMAT_VERSION = 3
HEADER_DIGEST = "header_sha256"
# Version 2 records (written before HEADER_DIGEST) held exactly these keys.
_V2_KEYS = frozenset({"format_version", "class", "config", "sha256", "train"})


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
    path: Optional[Path] = None  # the file it was read from, for error messages


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: tobytes() was a copy
    return h.hexdigest()


def header_sha256(record: dict) -> str:
    """SHA-256 of a header record without its ``header_sha256`` key, over its canonical JSON (sorted
    keys, no spaces): the digest depends on the record's content, not on how its JSON was laid out."""
    body = {k: v for k, v in record.items() if k != HEADER_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    record = json.loads(json.dumps(record))  # as a reader will see it (tuples as lists, keys as strings)
    record[HEADER_DIGEST] = header_sha256(record)
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
        raise CheckpointError(f"checkpoint: {path} is truncated or corrupt ({_one_line(exc)})") from exc
    if FORMAT in meta:
        return _read_v2(path, _parse_record(path, meta[FORMAT]), tensors)
    try:
        if "sae_class" in meta and "sha256" in meta:
            return _read_v1_training(path, meta, tensors)
        if "config" in meta and "class" in meta:  # first-format final SAE: no checksum to verify
            return Checkpoint(meta["class"], _clean_config(_json_object(meta["config"])), tensors, version=1,
                              path=path)
    except (KeyError, TypeError, ValueError) as exc:  # a missing key, a bad number, invalid JSON
        raise CheckpointError(f"checkpoint: {path} is corrupt (its first-format metadata is malformed: "
                              f"{_one_line(exc)})") from exc
    raise CheckpointError(f"checkpoint: {path} is not an SAE checkpoint of this package (no format in its metadata)")


def read_header(path: str | os.PathLike) -> Optional[dict]:
    """``{"class", "config", "train", "sha256", "tensor_prefix"}`` of an SAE file (a training
    checkpoint or a final SAE, any format) from its header alone: the header's digest is checked
    where it has one, no tensor is read or verified (``read_checkpoint`` verifies everything).
    ``sha256``: the stored per-tensor sums ({} in the first format, which has none);
    ``tensor_prefix``: what the SAE's tensor names start with in the file ("sae." in a first-format
    training checkpoint, else ""). None for a file of no format this reads; ``CheckpointError`` for
    one whose header cannot be read or parsed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"checkpoint: {path} is truncated or corrupt ({_one_line(exc)})") from exc
    if FORMAT in meta:
        record = _parse_record(path, meta[FORMAT])
        return {"class": record["class"], "config": record["config"], "train": record.get("train"),
                "sha256": record["sha256"], "tensor_prefix": ""}
    try:
        if "sae_class" in meta and "sae_config" in meta:  # first-format training checkpoint
            return {"class": meta["sae_class"], "config": _clean_config(_json_object(meta["sae_config"])),
                    "train": _v1_train_record(meta), "sha256": {}, "tensor_prefix": "sae."}
        if "class" in meta and "config" in meta:  # first-format final SAE
            return {"class": meta["class"], "config": _clean_config(_json_object(meta["config"])), "train": None,
                    "sha256": {}, "tensor_prefix": ""}
    except (KeyError, TypeError, ValueError) as exc:  # a missing key, a bad number, invalid JSON
        raise CheckpointError(f"checkpoint: {path} is corrupt (its first-format metadata is malformed: "
                              f"{_one_line(exc)})") from exc
    return None


def read_train_record(path: str | os.PathLike) -> Optional[dict]:
    """The ``train`` record of a training checkpoint from its header alone (``read_header``), or
    None for a final SAE. For quick checks before a run; ``read_checkpoint`` verifies everything."""
    header = read_header(path)
    return None if header is None else header["train"]


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _parse_record(path: Path, text: str) -> dict:
    """The ``topk-sae`` record, parsed and, where it carries one, checked against its header digest."""
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint: {path} is corrupt ({what})")

    try:
        record = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError, or a number too long to convert
        raise corrupt(f"its header is not valid JSON: {_one_line(exc)}") from exc
    if not isinstance(record, dict):
        raise corrupt(f"its header is a JSON {type(record).__name__}, not an object")
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 2:
        raise corrupt(f"its header has format_version {version!r}; expected an int from 2 to {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {path} has format version {version}; this package reads up to "
                              f"{FORMAT_VERSION} (upgrade the package)")
    # Backward compatibility: files of version 2 were written before the header digest existed, so
    # it is verified only where present; from version 3 on it must be.
    if HEADER_DIGEST in record:
        if record[HEADER_DIGEST] != header_sha256(record):
            raise corrupt(f"its header (class, config, tensor sums, train record) does not match its "
                          f"stored {HEADER_DIGEST}")
    elif version >= 3:
        raise corrupt(f"its version-{version} header has no {HEADER_DIGEST}")
    elif set(record) - _V2_KEYS:  # nothing to verify a version-2 header by; it held only these keys
        raise corrupt(f"its version-2 header has unknown keys {sorted(set(record) - _V2_KEYS)}")
    for key, kind in (("class", str), ("config", dict), ("sha256", dict)):
        if not isinstance(record.get(key), kind):
            raise corrupt(f"its header's {key!r} is {type(record.get(key)).__name__}, expected {kind.__name__}")
    if not all(isinstance(v, str) for v in record["sha256"].values()):
        raise corrupt("its header's 'sha256' holds a value that is not a string")
    if record.get("train") is not None and not isinstance(record["train"], dict):
        raise corrupt(f"its header's 'train' is {type(record['train']).__name__}, expected dict")
    return record


def _read_v2(path: Path, meta: dict, tensors: dict) -> Checkpoint:
    version = meta["format_version"]
    sums = meta["sha256"]
    if set(sums) != set(tensors):
        raise CheckpointError(f"checkpoint: {path} is corrupt (tensors {sorted(set(sums) ^ set(tensors))} "
                              f"lack a checksum or are missing)")
    bad = [k for k, v in tensors.items() if tensor_sha256(v) != sums[k]]
    if bad:
        raise CheckpointError(f"checkpoint: {path} is corrupt (tensor {bad[0]} does not match its stored SHA-256)")
    sae = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    opt = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return Checkpoint(meta["class"], meta["config"], sae, opt, meta.get("train"), version, path)


def _v1_digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, not a copy
    return h.hexdigest()


def _read_v1_training(path: Path, meta: dict, tensors: dict) -> Checkpoint:
    if _v1_digest(tensors) != meta["sha256"]:
        raise CheckpointError(f"checkpoint: {path} is corrupt (its tensors do not match the stored SHA-256)")
    sae = {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}
    opt = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
    return Checkpoint(meta["sae_class"], _clean_config(_json_object(meta["sae_config"])), sae, opt,
                      _v1_train_record(meta), 1, path)


def _v1_train_record(meta: dict) -> dict:
    return {"step": int(meta["step"]), "tokens": int(meta["tokens"]),
            "train_config": _json_object(meta["train_config"])}


def _clean_config(config: dict) -> dict:
    """First-format configs saved runtime choices; drop them."""
    return {k: v for k, v in config.items() if k != "backend"}


def build_sae(ckpt: Checkpoint, device="cpu", dtype: Optional[torch.dtype] = None):
    """The SAE a verified checkpoint describes, with its tensors loaded in the dtypes they were saved
    in (a bf16 SAE comes back bf16), then moved to ``device`` and, if given, cast to ``dtype``."""
    from .models import SAE_CLASSES, _empty_build

    where = f"checkpoint: {ckpt.path}" if ckpt.path is not None else "checkpoint:"
    cls = SAE_CLASSES.get(ckpt.class_name)
    if cls is None:
        raise CheckpointError(f"{where} unknown SAE class {ckpt.class_name!r}; known: {sorted(SAE_CLASSES)}")
    try:
        with _empty_build():  # a shell on the meta device: every tensor is assigned from the file below
            sae = cls(**ckpt.config)
    except Exception as exc:  # a config the class refuses, whatever the class raises for it
        raise CheckpointError(f"{where} its config does not describe a {ckpt.class_name} "
                              f"({_one_line(exc)})") from exc
    state = _saved_state(sae, ckpt.sae_tensors, where)
    try:
        # assign: each parameter and buffer becomes the saved tensor, in its saved dtype (copying into
        # the freshly built SAE would cast to the default dtype).
        # Clones: safetensors hands out views of its mapping of the file, and assigned as they are
        # the parameters would stay backed by it (a file rewritten in place would change or, cut
        # short, crash a loaded SAE).
        sae.load_state_dict({k: t.clone() for k, t in state.items()}, assign=True)
    except Exception as exc:  # e.g. an ExpanderSAE's rows that are not a valid expander graph
        raise CheckpointError(f"{where} its tensors do not fit a {ckpt.class_name} {ckpt.config} "
                              f"({_one_line(exc)})") from exc
    _check_no_meta(sae, where)
    return sae.to(device=device, dtype=dtype) if dtype is not None else sae.to(device)


def _check_no_meta(sae, where: str) -> None:
    """After a state dict was assigned into an ``models._empty_build`` shell (``build_sae``,
    ``sae.distributed.load_sharded``): every tensor of the two classes is in the state dict, but a
    class with one outside it (a non-persistent buffer) would keep it on the meta device. Refused
    here, naming it, not at its first use."""
    named = list(sae.named_parameters()) + list(sae.named_buffers())
    left = next((name for name, t in named if t.is_meta), None)
    if left is not None:
        raise CheckpointError(f"{where} a {type(sae).__name__} has a tensor the file cannot hold ({left}): "
                              f"it cannot be loaded into an empty shell")


def _saved_state(sae, tensors: dict, where: str, *, cast: bool = True) -> dict:
    """``tensors`` checked against ``sae``'s state dict: the same names and shapes; floating-point
    tensors keep their saved dtype, integer ones take the SAE's (as ``load_state_dict`` casts them;
    ``cast=False`` leaves them as saved, for a copying ``load_state_dict`` that casts only the rows
    it keeps)."""
    mine = sae.state_dict()
    missing, extra = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
    if missing or extra:
        raise CheckpointError(f"{where} its tensors do not match a {type(sae).__name__}'s (missing {missing}, "
                              f"unexpected {extra})")
    state = {}
    for name, want in mine.items():
        t = tensors[name]
        if t.shape != want.shape:
            raise CheckpointError(f"{where} tensor {name} has shape {tuple(t.shape)}; its config gives "
                                  f"{tuple(want.shape)}")
        if want.is_floating_point() != t.is_floating_point() or t.is_complex():
            raise CheckpointError(f"{where} tensor {name} is {t.dtype}; expected a "
                                  f"{'floating-point' if want.is_floating_point() else str(want.dtype)} tensor")
        kind = _non_finite(t)
        if kind is not None:
            raise CheckpointError(f"{where} tensor {name} is not finite (it holds {kind}); expected finite "
                                  f"parameters and buffers")
        state[name] = t if want.is_floating_point() or not cast else t.to(want.dtype)
    return state


def _non_finite(t: torch.Tensor) -> Optional[str]:
    """"nan" or "inf" where the floating-point tensor ``t`` holds one, else None (integer tensors:
    None). One reduction over ``t`` that allocates nothing of its size (``aminmax`` propagates NaN
    and keeps infinities, where ``isfinite(t).all()`` would first write a [numel] mask): checking
    a large SAE's checkpoint costs a small part of the SHA-256 pass that reading it already makes."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    lo, hi = torch.stack(torch.aminmax(t.detach())).tolist()  # one device-to-host read, not two
    if math.isfinite(lo) and math.isfinite(hi):
        return None
    return "nan" if math.isnan(lo) or math.isnan(hi) else "inf"


def load_sae(path: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None):
    """Any SAE this package can read: our checkpoint files (final or training), one of our run
    folders, or a folder saved by SAELens or sparsify. Returns the right class on ``device``."""
    from .layers import check_param_dtype

    check_param_dtype(dtype)  # before any file is read: a string such as "float32" names the argument
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
