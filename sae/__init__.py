"""Thin modules for TopK and Expander sparse autoencoders, built on :mod:`topk_kernels`.

The public API: the SAEs (``TopKSAE``, ``ExpanderSAE``, their output ``SAEOutput``), the sparse
decoder layer and the expander graph, ``load_sae`` for any checkpoint (ours, SAELens's or
sparsify's), and the trainer with its configuration. Data harvesting (``sae.data``) and
evaluation (``sae.evaluate``) need the ``lm`` extra and stay in their modules; peer export is in
``sae.interop``.

Names are imported on first use, except ``train``: the function must be bound over the submodule
``sae.train`` of the same name before anything imports that submodule (which would rebind the
name to the module). ``python -m sae`` (``sys.argv[0] == "-m"`` while the package is located)
skips that import, so the CLI checks its arguments before torch loads.
"""

import importlib
import sys

if sys.argv[:1] != ["-m"]:
    from .train import train  # noqa: E402,F401

_PUBLIC = {
    "TopKSAE": "models", "ExpanderSAE": "models", "SAEOutput": "models", "SparseDecoder": "layers",
    "expander_mask": "masks", "load_sae": "checkpoint", "CheckpointError": "checkpoint", "SAEConfig": "config",
    "TrainConfig": "config", "train": "train", "NonFiniteError": "errors",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
