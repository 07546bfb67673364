"""Test set-up: the Triton interpreter and per-test seeds.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is defined, so it is set
here, before ``topk_kernels`` is imported. Ops called without ``backend=`` still take the fast
PyTorch path (the interpreter is slow); tests that prove a kernel force ``backend="triton"``.
Shared assertions live in ``helpers.py``.
"""

import os
import zlib

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import topk_kernels._dispatch as _dispatch  # noqa: E402

_dispatch.cpu_default_backend = "torch"

# Inputs are drawn fresh from this seed (change it to draw others); each test mixes in its name.
BASE_SEED = int(os.environ.get("TOPK_TEST_SEED", "0"))


def pytest_report_header(config):
    return f"TOPK_TEST_SEED={BASE_SEED}, TRITON_INTERPRET=1, triton available: {_dispatch.HAS_TRITON}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) % (2**31))
    yield
