"""A/B of the CPU paths between two source trees: run it once per tree, interleaved, and compare.

    git worktree add /tmp/before <commit>      # or any export of the package at that commit
    for i in 1 2 3; do python benchmarks/cpu_ab.py /tmp/before; python benchmarks/cpu_ab.py .; done

Imports ``topk_kernels`` from the given tree (one tree per process), 2 threads, and prints each
op's median ms (7 calls; 21 for the millisecond ones) at the CPU tables' shapes. Machine load
moves absolute times by 1.5-2x here, so only rounds run back to back compare.
"""
import os
import statistics
import sys

root = os.path.abspath(sys.argv[1])
sys.path.insert(0, root)
import torch  # noqa: E402

torch.set_num_threads(2)
import topk_kernels as tk  # noqa: E402
from common import time_ms  # noqa: E402  (benchmarks/ of this script's tree: stdlib and torch only)

assert tk.__file__.startswith(root), f"imported {tk.__file__}, not the tree {root}"
g = torch.Generator().manual_seed(0)
res = {}


def bench(name, f, n=7):
    res[name] = round(statistics.median(time_ms(f, repeat=n)), 2)


x = torch.randn(1024, 256, generator=g)
w = torch.randn(8192, 256, generator=g)
b = torch.randn(8192, generator=g)
bench("topk_encode fwd B=1024 m=256 n=8192 k=32", lambda: tk.topk_encode(x, w, b, 32, backend="torch"))
xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))


def enc_fb():
    acts, _ = tk.topk_encode(xg, wg, bg, 32, backend="torch")
    acts.backward(torch.ones_like(acts))


bench("topk_encode fwd+bwd same", enc_fb)
a = torch.rand(2048, 32, generator=g)
idx = torch.randint(0, 16384, (2048, 32), generator=g)
W = torch.randn(16384, 512, generator=g)
bench("sparse_decode fwd B=2048 m=512 n=16384 k=32", lambda: tk.sparse_decode(a, idx, W, backend="torch"), 21)
ag, Wg = a.clone().requires_grad_(), W.clone().requires_grad_()


def dec_fb():
    out = tk.sparse_decode(ag, idx, Wg, backend="torch")
    out.backward(torch.ones_like(out))


bench("sparse_decode fwd+bwd same", dec_fb)
m, n, d, k = 1024, 16384, 7, 32
rows = torch.stack([torch.randperm(m, generator=g)[:d] for _ in range(n)])
vals = torch.randn(n, d, generator=g)
xe = torch.randn(1024, m, generator=g)
be = torch.randn(n, generator=g)
bench("expander_encode fwd B=1024 m=1024 n=16384 d=7 k=32", lambda: tk.expander_encode(xe, vals, rows, be, k, backend="torch"))
ae = torch.rand(1024, k, generator=g)
ie = torch.randint(0, n, (1024, k), generator=g)
bench("expander_decode fwd same", lambda: tk.expander_decode(ae, ie, vals, rows, m, backend="torch"), 21)

# The frontier's SAE size (m=576, n=4608, B=1024): expander_decode at d=100 (chunks of atom entries,
# RESULTS.md "reused chunk buffers") and whole train steps (common.train_step: sae from this tree).
from sae.models import ExpanderSAE, TopKSAE  # noqa: E402
from common import train_step  # noqa: E402

m, n, B = 576, 4608, 1024
rows = torch.stack([torch.randperm(m, generator=g)[:100] for _ in range(n)])
vals = torch.randn(n, 100, generator=g)
ae = torch.rand(B, 64, generator=g).requires_grad_()
ie = torch.randint(0, n, (B, 64), generator=g)
vg = vals.clone().requires_grad_()


def exp_dec_fb():
    out = tk.expander_decode(ae, ie, vg, rows, m, backend="torch", check_rows=False)
    out.backward(torch.ones_like(out))


bench("expander_decode fwd+bwd B=1024 m=576 n=4608 d=100 k=64", exp_dec_fb, 11)
xs = torch.randn(B, m, generator=g)
for name, model in (("TopKSAE k=64", TopKSAE(m, n, 64, seed=0)), ("ExpanderSAE d=100 k=64", ExpanderSAE(m, n, 64, degree=100, seed=0))):
    step = train_step(model, xs, True)
    for _ in range(3):
        step()
    bench(f"{name} train step B=1024 m=576 n=4608", step, 11)
print(root, res)
