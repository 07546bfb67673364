"""One full training step (forward, backward, Adam, decoder constraint) of our SAEs against the
dense PyTorch SAEs of ``sae.baselines``, and the peak memory of a 2^20-latent Expander SAE step.

pytest benchmarks/test_bench_train_step.py --benchmark-only
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from sae.baselines import DenseMaskedExpanderSAE, DenseTopKSAE
from sae.masks import expander_mask
from sae.models import ExpanderSAE, TopKSAE

from common import train_step


TOPK_CONFIGS = [(4096, 768, 24576, 32)]
EXPANDER_CONFIGS = [(1024, 1024, 16384, 7, 32), (1024, 2048, 16384, 7, 64)]


@pytest.mark.parametrize("B,m,n,k", TOPK_CONFIGS, ids=str)
def test_topk_step_dense(record, B, m, n, k):
    x = torch.randn(B, m)
    record(f"TopK SAE train step B={B} m={m} n={n} k={k}", "dense PyTorch TopK SAE",
           train_step(DenseTopKSAE(m, n, k), x, ours=False), rounds=2, baseline=True)


@pytest.mark.parametrize("B,m,n,k", TOPK_CONFIGS, ids=str)
def test_topk_step_ours(record, B, m, n, k):
    x = torch.randn(B, m)
    record(f"TopK SAE train step B={B} m={m} n={n} k={k}", "TopKSAE", train_step(TopKSAE(m, n, k), x, ours=True),
           rounds=4)


@pytest.mark.parametrize("B,m,n,d,k", EXPANDER_CONFIGS, ids=str)
def test_expander_step_dense_masked(record, B, m, n, d, k):
    x = torch.randn(B, m)
    model = DenseMaskedExpanderSAE(m, n, k, expander_mask(m, n, d))
    record(f"Expander SAE train step B={B} m={m} n={n} d={d} k={k}", "dense masked (paper's code)",
           train_step(model, x, ours=False), rounds=2, baseline=True)


@pytest.mark.parametrize("B,m,n,d,k", EXPANDER_CONFIGS, ids=str)
def test_expander_step_dense_topk(record, B, m, n, d, k):
    x = torch.randn(B, m)
    record(f"Expander SAE train step B={B} m={m} n={n} d={d} k={k}", "dense TopK SAE (ours, TopKSAE)",
           train_step(TopKSAE(m, n, k), x, ours=True), rounds=3)


@pytest.mark.parametrize("B,m,n,d,k", EXPANDER_CONFIGS, ids=str)
def test_expander_step_ours(record, B, m, n, d, k):
    x = torch.randn(B, m)
    record(f"Expander SAE train step B={B} m={m} n={n} d={d} k={k}", "ExpanderSAE",
           train_step(ExpanderSAE(m, n, k, degree=d), x, ours=True), rounds=5)


_PEAK_SCRIPT = r"""
import json, re, sys, time, torch
from sae.models import ExpanderSAE
m, n, d, k, B = 2048, 1 << 20, 7, 64, 256
t0 = time.perf_counter()
sae = ExpanderSAE(m, n, k, degree=d)
opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
x = torch.randn(B, m)
times = []
for _ in range(3):
    t = time.perf_counter()
    out = sae(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    times.append(time.perf_counter() - t)
status = open("/proc/self/status").read()
peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
print(json.dumps({"peak_rss_mib": peak, "step_s": sorted(times)[1], "setup_s": time.perf_counter() - t0 - sum(times)}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux peak RSS")
def test_expander_2pow20_latents_step_peak_memory(benchmark):
    """m=2048, n=2^20, d=7, k=64, B=256: a whole step peaks under 3 GiB of RSS (process total, torch
    included). One dense masked [m, n] fp32 matrix of this shape alone is 8 GiB."""
    benchmark.group = "Expander SAE m=2048 n=2^20 d=7 k=64 B=256 (subprocess)"
    result = {}

    def run():
        proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\nExpander SAE n=2^20 step: peak RSS {result['peak_rss_mib']:.0f} MiB, step {result['step_s']:.2f} s")
    assert result["peak_rss_mib"] < 3 * 1024
