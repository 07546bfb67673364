"""Time ``expander_mask`` (and ``load_sae`` of an Expander SAE) at large degrees, for one source tree.

    python benchmarks/mask_timing.py .                      # this tree, the default sizes
    git worktree add /tmp/before <commit>
    python benchmarks/mask_timing.py /tmp/before 2048,8192,1000

One core (``torch.set_num_threads(1)``), one call per size (the graphs take seconds to minutes:
noise is small against that). Prints seconds and the first 12 hex digits of the graph's SHA-256
(int64 bytes), so two trees can be checked to draw the same graph from the same seed.
"""
import hashlib
import os
import sys
import tempfile
import time

root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
sys.path.insert(0, root)
import torch  # noqa: E402

torch.set_num_threads(1)
import sae  # noqa: E402
from sae import ExpanderSAE, expander_mask, load_sae  # noqa: E402

assert sae.__file__.startswith(root), f"imported {sae.__file__}, not the tree {root}"
DEFAULT = [(2048, 8192, 1000), (2048, 65536, 500), (2048, 65536, 1000), (2048, 2**20, 7), (576, 36864, 100)]
sizes = [tuple(int(v) for v in a.split(",")) for a in sys.argv[2:]] or DEFAULT
for m, n, d in sizes:
    start = time.perf_counter()
    rows = expander_mask(m, n, d, seed=0)
    took = time.perf_counter() - start
    digest = hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:12]
    print(f"expander_mask m={m} n={n} d={d}: {took:.2f} s  sha256 {digest}", flush=True)
m, n, d = sizes[0]
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "sae.safetensors")
    ExpanderSAE(m, n, min(32, n), degree=d).save(path)
    start = time.perf_counter()
    load_sae(path)
    print(f"load_sae ExpanderSAE m={m} n={n} d={d}: {time.perf_counter() - start:.2f} s", flush=True)
