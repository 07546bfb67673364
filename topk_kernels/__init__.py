"""Fast kernels for TopK and Expander sparse autoencoders.

Four differentiable ops, each with a Triton kernel (CUDA, or the interpreter under
``TRITON_INTERPRET=1``), a fast PyTorch path for CPU, and a dense reference in
:mod:`topk_kernels.reference`. Pick one with ``backend="triton" | "torch" | "reference"``.
"""

from .expander_decode import expander_decode
from .expander_encode import expander_encode
from .sparse_decode import sparse_decode
from .topk_encode import topk_encode

__all__ = ["expander_decode", "expander_encode", "sparse_decode", "topk_encode"]
