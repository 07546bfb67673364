"""Test set-up: the device the op tests run on, the Triton interpreter, per-test seeds.

Two ways to run the suite:

- ``pytest`` (CPU, the default; CI): ``TRITON_INTERPRET=1`` is set here, before ``topk_kernels``
  is imported (it must be set before any ``@triton.jit`` function is defined), so
  ``backend="triton"`` runs the kernels in the interpreter. Ops called without ``backend=`` take
  the fast PyTorch path (``TOPK_KERNELS_CPU_BACKEND=torch``): the interpreter is slow, and tests
  that prove a kernel force ``backend="triton"``.
- ``pytest --device cuda`` (or ``TOPK_TEST_DEVICE=cuda pytest``): no interpreter; the op tests
  (modules marked ``ops``) create their tensors on the GPU, so every backend runs on CUDA tensors
  against the fp64 reference. ``--device`` is read here from the command line, because the
  interpreter switch must be settled before pytest parses its options.

Shared assertions live in ``helpers.py``.
"""

import os
import sys
import zlib


def _requested_device() -> str:
    for i, arg in enumerate(sys.argv):
        if arg == "--device" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return os.environ.get("TOPK_TEST_DEVICE", "cpu")


DEVICE = _requested_device()
if DEVICE not in ("cpu", "cuda"):
    raise SystemExit(f"--device / TOPK_TEST_DEVICE: expected 'cpu' or 'cuda', got {DEVICE!r}")
if DEVICE == "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("--device cuda runs the compiled kernels: unset TRITON_INTERPRET")
os.environ["TOPK_TEST_DEVICE"] = DEVICE  # helpers.py reads it
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOPK_KERNELS_CPU_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (``-n N``) each worker is a process of its own: share the cores among them,
# or N workers x torch's default of one thread a core oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, _cores // _WORKERS))

# Inputs are drawn fresh from this seed (change it to draw others); each test mixes in its name.
BASE_SEED = int(os.environ.get("TOPK_TEST_SEED", "0"))


def pytest_addoption(parser):
    parser.addoption("--device", default=DEVICE, choices=("cpu", "cuda"),
                     help="device of the op tests' tensors (cuda: compiled kernels, no interpreter)")


def pytest_configure(config):
    config.addinivalue_line("markers", "ops: an op test module; its tensors are created on --device")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch.cuda.is_available() is False")


def pytest_collection_modifyitems(config, items):
    """The sm_80/sm_90 compile (``gpu_compile``, the suite's one long module: about 15 CPU-minutes)
    runs first, so that under ``-n auto --dist loadscope --no-loadscope-reorder`` one worker starts
    it at once while the others take the rest, instead of its starting late and finishing alone
    (xdist's default reorder would queue modules by their number of tests, this one's 9 late)."""
    items.sort(key=lambda item: item.get_closest_marker("gpu_compile") is None)


def pytest_report_header(config):
    from topk_kernels._common import HAS_TRITON

    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"TOPK_TEST_SEED={BASE_SEED}, device={DEVICE}, TRITON_INTERPRET={interp}, triton available: {HAS_TRITON}"


@pytest.fixture(autouse=True)
def _test_device(request):
    """Op tests (marked ``ops``) create their tensors on the test device."""
    if DEVICE == "cpu" or request.node.get_closest_marker("ops") is None:
        yield
        return
    with torch.device(DEVICE):
        yield


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
