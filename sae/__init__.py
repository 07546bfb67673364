"""Thin modules for TopK and Expander sparse autoencoders, built on :mod:`topk_kernels`.

The public API: the SAEs (``TopKSAE``, ``ExpanderSAE``, their output ``SAEOutput``), the sparse
decoder layer and the expander graph, ``load_sae`` for any checkpoint (ours, SAELens's or
sparsify's), and the trainer with its configuration. Data harvesting (``sae.data``) and
evaluation (``sae.evaluate``) need the ``lm`` extra and stay in their modules; peer export is in
``sae.interop``.
"""

from .checkpoint import CheckpointError, load_sae
from .config import SAEConfig, TrainConfig
from .layers import SparseDecoder
from .masks import expander_mask
from .models import ExpanderSAE, SAEOutput, TopKSAE
from .train import NonFiniteError, train

__all__ = ["TopKSAE", "ExpanderSAE", "SparseDecoder", "SAEOutput", "expander_mask", "load_sae", "SAEConfig",
           "TrainConfig", "train", "CheckpointError", "NonFiniteError"]
