"""Fast kernels for TopK and Expander sparse autoencoders.

Four differentiable ops, each with a Triton kernel (CUDA, or the interpreter under
``TRITON_INTERPRET=1``), a fast PyTorch path for CPU, and a dense reference in
:mod:`topk_kernels.reference`. Pick one with ``backend="triton" | "torch" | "reference"``.

Two argument checks are public for modules built on the ops (``sae``): ``check_float`` (the
float-tensor check every op runs, so errors read the same) and ``check_expander_rows`` (an
expander graph's rows: in range and distinct per latent; check fixed rows once, then call the
expander ops with ``check_rows=False``). The index contract and the NaN order of every op are
documented in ``topk_kernels._common``.
"""

from ._common import check_expander_rows, check_float
from .expander_decode import expander_decode
from .expander_encode import expander_encode
from .sparse_decode import sparse_decode
from .topk_encode import topk_encode

__all__ = [
    "check_expander_rows",
    "check_float",
    "expander_decode",
    "expander_encode",
    "sparse_decode",
    "topk_encode",
]
