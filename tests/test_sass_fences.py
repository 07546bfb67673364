"""The sm_90 SASS scan of tests/gpu_compile.py finds a fenced atomic when there is one.

Triton's default ``tl.atomic_*`` semantics are ``acq_rel``: each atomic is wrapped in a GPU-wide
``MEMBAR.ALL.GPU`` fence (and an L1 invalidate), which stalls the warp until all its outstanding
memory operations complete; a plain accumulation needs ``sem="relaxed"``. ``test_gpu_compile.py``
asserts that no kernel of the package has a fenced atomic, using ``gpu_compile.sass_atomics``;
this file proves that scan on two probe kernels (default semantics: fenced; relaxed: not), plus
the scan's parsing on a fixed SASS excerpt. Compiling needs TRITON_INTERPRET unset, so the probes
are compiled by running this file as a script in a subprocess:

    python tests/test_sass_fences.py   # JSON on stdout
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from gpu_compile import Spec, capture, compile_launch, sass_atomics  # noqa: E402

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_default_sem(ptr, val_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.atomic_add(ptr + offs, tl.load(val_ptr + offs, mask=offs < N), mask=offs < N)

    @triton.jit
    def _probe_relaxed(ptr, val_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.atomic_add(ptr + offs, tl.load(val_ptr + offs, mask=offs < N), mask=offs < N, sem="relaxed")
except ImportError:  # pragma: no cover - the tests below skip without triton
    pass


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("test_sass_fences: unset TRITON_INTERPRET to compile for real GPUs", file=sys.stderr)
        return 2
    import torch

    t = torch.empty(1024, device="meta")
    out = {}
    for name, kernel in (("_probe_default_sem", _probe_default_sem), ("_probe_relaxed", _probe_relaxed)):
        (launch,) = capture(Spec("probe", name, lambda k=kernel: k[(8,)](t, t, 1000, BLOCK=128)), 90)
        row = compile_launch(launch, 90)
        out[name] = {"atomics": row["atomics"], "fenced": row["fenced_atomics"]}
    print(json.dumps(out))
    return 0


def test_scan_finds_the_atomic_behind_the_fence():
    """nvdisasm's instruction bodies, in program order."""
    fenced_kernel = [
        "S2R R0, SR_TID.X",
        "MEMBAR.ALL.GPU",
        "ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, RZ, desc[UR4][R2.64], R7",
    ]
    relaxed_kernel = [
        "REDUX.SUM UR4, R3",
        "@P0 REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R7",
        "MEMBAR.ALL.GPU",
    ]
    count, fenced = sass_atomics(fenced_kernel)
    assert count == 1 and len(fenced) == 1 and fenced[0].startswith("ATOMG")
    assert sass_atomics(relaxed_kernel) == (1, [])


@pytest.mark.gpu_compile
def test_scan_sees_the_default_fence_and_not_the_relaxed_one():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.strip(), f"test_sass_fences printed nothing; stderr:\n{proc.stderr[-4000:]}"
    probes = json.loads(proc.stdout.strip().splitlines()[-1])
    default, relaxed = probes["_probe_default_sem"], probes["_probe_relaxed"]
    assert default["atomics"] >= 1 and default["fenced"], default
    assert relaxed["atomics"] >= 1 and not relaxed["fenced"], relaxed


if __name__ == "__main__":
    sys.exit(main())
