"""Test set-up: the Triton interpreter and per-test seeds.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is defined, so it is set
here, before ``topk_kernels`` is imported. Ops called without ``backend=`` still take the fast
PyTorch path (the interpreter is slow); tests that prove a kernel force ``backend="triton"``.
Shared assertions live in ``helpers.py``.
"""

import os
import zlib

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOPK_KERNELS_CPU_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402


# Inputs are drawn fresh from this seed (change it to draw others); each test mixes in its name.
BASE_SEED = int(os.environ.get("TOPK_TEST_SEED", "0"))


def pytest_report_header(config):
    from topk_kernels._common import HAS_TRITON

    return f"TOPK_TEST_SEED={BASE_SEED}, TRITON_INTERPRET=1, triton available: {HAS_TRITON}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) % (2**31))
    yield


# --- TEST-ONLY speed-up of the Triton interpreter (not part of the package) ----------------------
# tl.sort / tl.topk / tl.flip / tl.bitonic_merge swap elements through xor_sum reductions, which
# the interpreter runs element by element in Python. XOR is associative and exact, so reducing
# with NumPy gives bit-identical results, 10-15x faster. Only the interpreter's xor path changes.
def _patch_interpreter_xor_reduce():
    import numpy as np

    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter.ReduceOps.apply_impl
    if getattr(original, "_numpy_xor", False):
        return

    def apply_impl(self, input):
        if self.combine_fn == tl.standard._xor_combine and len(input) == 1:
            data = input[0].handle.data
            axis = self.axis
            if axis is None:
                data, axis = data.reshape(-1), 0
            out = np.bitwise_xor.reduce(data, axis=axis, keepdims=self.keep_dims and self.axis is not None)
            if self.keep_dims and self.axis is None:
                out = out.reshape([1] * input[0].handle.data.ndim)
            return self.to_tensor(out, input[0].dtype)
        return original(self, input)

    apply_impl._numpy_xor = True
    interpreter.ReduceOps.apply_impl = apply_impl


_patch_interpreter_xor_reduce()


@pytest.fixture(scope="module")
def tiny_llama():
    """A 4-layer random-weight LlamaForCausalLM (d_model 32, vocab 101) built from a config: no files."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().requires_grad_(False)
