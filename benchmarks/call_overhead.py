"""Per-call cost of the public ops and of SAE forwards at small batches (CPU), where Python and
dispatch, not arithmetic, decide.

    OMP_NUM_THREADS=1 python benchmarks/call_overhead.py [TREE]

TREE (default: this checkout) goes first on ``sys.path``, so two checkouts can be compared
by running the script on each, interleaved. Prints medians of 7 samples in microseconds:
each op at B=7 (m=768, n=16384, k=32, d=7; forward alone, and forward + backward with the
activations' / values' gradient), then TopKSAE / ExpanderSAE eval-mode forwards under no_grad
and training forward + backward (FVU) at B = 1, 8, 64.
"""

import os
import sys
import time

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from sae import ExpanderSAE, TopKSAE  # noqa: E402
from topk_kernels import expander_decode, expander_encode, sparse_decode, topk_encode  # noqa: E402


def median_us(f, reps: int) -> float:
    for _ in range(10):
        f()
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        samples.append((time.perf_counter() - t0) / reps * 1e6)
    return sorted(samples)[3]


def ops() -> None:
    torch.manual_seed(0)
    B, m, n, k, d = 7, 768, 16384, 32, 7
    W, b, be = torch.randn(n, m), torch.randn(m), torch.randn(n)
    V = torch.randn(n, d)
    rows = torch.stack([torch.randperm(m)[:d] for _ in range(n)])
    acts, idx, x = torch.rand(B, k), torch.randint(0, n, (B, k)), torch.randn(B, m)
    Vg, ag = V.clone().requires_grad_(), acts.clone().requires_grad_()
    cases = {
        "sparse_decode": (lambda: sparse_decode(acts, idx, W, b),
                          lambda: sparse_decode(ag, idx, W, b).sum().backward()),
        "expander_decode": (lambda: expander_decode(acts, idx, V, rows, m, b, check_rows=False),
                            lambda: expander_decode(ag, idx, V, rows, m, b, check_rows=False).sum().backward()),
        "topk_encode": (lambda: topk_encode(x, W, be, k), None),
        "expander_encode": (lambda: expander_encode(x, V, rows, be, k, check_rows=False),
                            lambda: expander_encode(x, Vg, rows, be, k, check_rows=False)[0].sum().backward()),
    }
    for name, (fwd, fwd_bwd) in cases.items():
        reps = 300 if name == "topk_encode" else 1000
        line = f"{name:16s} B={B} fwd {median_us(fwd, reps):8.1f} us"
        if fwd_bwd is not None:
            line += f"   fwd+bwd {median_us(fwd_bwd, reps // 2):8.1f} us"
        print(line, flush=True)


def saes() -> None:
    torch.manual_seed(0)
    m, n, k = 768, 16384, 32
    for name, sae in (("TopKSAE", TopKSAE(m, n, k)), ("ExpanderSAE d=7", ExpanderSAE(m, n, k, 7))):
        for B in (1, 8, 64):
            x = torch.randn(B, m)
            sae.eval()
            with torch.no_grad():
                inference = median_us(lambda: sae(x), 200)
            sae.train()

            def step():
                sae.zero_grad(set_to_none=True)
                sae(x).fvu.backward()

            print(f"{name:16s} B={B:3d} eval forward {inference:8.1f} us   train fwd+bwd {median_us(step, 50):8.1f} us",
                  flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    ops()
    saes()
