"""The GPU verdict: correctness and speed of every op and training step on one CUDA GPU.

    python benchmarks/gpu.py                       # on a CUDA machine: ~5-8 minutes
    python benchmarks/gpu.py --out report.md       # also write the markdown report
    python benchmarks/gpu.py --dry-run             # CPU, Triton interpreter, tiny sizes (CI)

Prints (and with ``--out`` writes) a markdown report with
(a) correctness of every op's forward and backward, on every backend, against the fp64 dense
    reference of ``topk_kernels.reference``: at small odd sizes for fp32/bf16/fp16, and at the
    real sizes below (the real n, m, k, d on a slice of the tokens, so the fp64 dense reference
    fits in memory);
(b) ``triton.testing.do_bench`` medians, achieved TFLOP/s or GB/s, peak extra memory and the
    roofline floor (HBM bytes / bandwidth, FLOPs / tensor-core peak, from the spec sheet of the
    GPU found) of: ``topk_encode`` against cuBLAS ``x @ W.T`` alone and cuBLAS + ``torch.topk``;
    ``sparse_decode`` forward and backward against dense scatter + matmul and ``F.embedding_bag``;
    the expander ops against the dense masked formulation; full ``TopKSAE`` and ``ExpanderSAE``
    training steps against the dense SAEs of ``sae.baselines``; and, when ``sparsify``
    (eai-sparsify) is importable, its Triton decoder and its ``SparseCoder`` training step;
    at B=8192, m=2048, n=131072, k=64 (bf16 and fp32) and B=4096, m=2048, n=2^20, d=7, k=64;
(c) ``sae.train.train`` end to end on the device: a TopKSAE and an ExpanderSAE (bf16 and fp32)
    trained on planted sparse activations with dead-latent resampling; a repeat of the run and a
    run killed after its midway checkpoint and resumed must end on the same weights bit for bit
    (training is deterministic), and ``load_sae`` must reproduce the trained SAE's outputs; FVU
    before and after;
(d) the GPU's name and SM clock.

A case that runs out of memory is reported as OOM, not dropped. ``--dry-run`` proves the script on
CPU: the same code paths at tiny sizes, with a wall-clock timer instead of ``do_bench`` and no
roofline (its numbers mean nothing and are labelled so).
"""

from __future__ import annotations

import argparse
import importlib
import functools
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

if "--dry-run" in sys.argv:  # must precede the first import of topk_kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Timed cases take the automatic backend: the fast PyTorch path on CPU (the interpreter takes
    # seconds per call); the correctness checks force backend="triton" and "torch" explicitly.
    os.environ.setdefault("TOPK_KERNELS_CPU_BACKEND", "torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import topk_kernels as tk  # noqa: E402
from topk_kernels import reference  # noqa: E402
from common import (dense_expander_weight, dense_sparse_decode, dense_topk_encode,  # noqa: E402
                    forward_backward as _fwd_bwd, train_step as _train_step)
from sae.train import adam  # noqa: E402

# Spec-sheet peaks (dense, no sparsity): HBM bytes/s and tensor-core FLOP/s by dtype. The floor
# of a case is max(bytes / bandwidth, flops / peak): no kernel can beat it.
GPU_PEAKS = {  # name substring -> (bandwidth, {dtype: flop/s})
    "H200": (4.8e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    "H100 PCIe": (2.0e12, {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    "H100": (3.35e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    "A100": (2.039e12, {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    "L40S": (0.864e12, {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
}

REAL_TOPK = dict(B=8192, m=2048, n=131072, k=64)
REAL_EXPANDER = dict(B=4096, m=2048, n=2**20, d=7, k=64)
SMALL = dict(B=37, m=100, n=999, k=17, d=7)  # odd sizes: every kernel edge is masked
DRY_SMALL = dict(B=5, m=12, n=70, k=3, d=3)
DRY_TOPK = dict(B=8, m=16, n=100, k=3)
DRY_EXPANDER = dict(B=8, m=16, n=130, d=3, k=3)
CHECK_TOKENS = 512  # tokens of the real-size correctness checks (fp64 dense reference memory)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 4e-3}  # relative to the output's scale; fp32 allows TF32-free accumulation order


# --- environment ------------------------------------------------------------------------------

@dataclass
class Machine:
    device: torch.device
    name: str
    sm_clock: str
    bandwidth: Optional[float]
    peaks: dict = field(default_factory=dict)


def machine(dry_run: bool) -> Machine:
    if dry_run or not torch.cuda.is_available():
        return Machine(torch.device("cpu"), f"CPU ({platform.processor() or platform.machine()}), dry run",
                       "n/a", None)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    clock = "unknown"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        clock = f"{out[dev.index or 0]} (current, max)" if out else clock
    except (OSError, subprocess.SubprocessError):
        pass
    for key, (bw, peaks) in GPU_PEAKS.items():
        if key in name:
            return Machine(dev, name, clock, bw, peaks)
    return Machine(dev, name, clock, None)


# --- timing and memory -----------------------------------------------------------------------

def bench_ms(fn: Callable[[], object], mach: Machine) -> float:
    """Median milliseconds: triton.testing.do_bench on CUDA; a short wall-clock loop in a dry run."""
    if mach.device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    t0 = time.perf_counter()  # a dry run only proves the case runs: one call
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_extra_mib(fn: Callable[[], object], mach: Machine) -> Optional[float]:
    if mach.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


# --- (a) correctness ---------------------------------------------------------------------------

def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = max(1.0, expected.double().abs().max().item())
    return (actual.double() - expected.double()).abs().max().item() / scale


@functools.lru_cache(maxsize=4)
def _rows(n: int, m: int, d: int, device) -> torch.Tensor:
    """The expander graph (drawn once per size: n = 2^20 takes seconds on the host)."""
    from sae.masks import expander_mask

    return expander_mask(m, n, d, seed=0).to(device)


def _topk_ids_ok(idx, ref_idx, ref_pre, tol) -> bool:
    """Same ids as the reference except swaps between values that tie within tol."""
    differ = idx != ref_idx
    if not differ.any():
        return True
    scale = max(1.0, ref_pre.abs().max().item())
    gap = (ref_pre.gather(-1, idx) - ref_pre.gather(-1, ref_idx)).abs()
    return not (differ & (gap > tol * scale)).any()


def check_op(op: str, size: dict, dtype: str, backend: str, device) -> dict:
    """Forward and backward of one op against the fp64 reference; returns the worst relative
    errors and whether the selected ids agree (encoders)."""
    dt = DTYPES[dtype]
    B, m, n, k = size["B"], size["m"], size["n"], size["k"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    result = {"op": op, "size": _size_str(size), "dtype": dtype, "backend": backend}
    if op in ("sparse_decode", "expander_decode"):
        acts = rand(B, k).abs()
        idx = torch.randint(0, n, (B, k), generator=g).to(device)
        bias = rand(m)
        if op == "sparse_decode":
            params = [rand(n, m)]
            fn = lambda a, w, b: tk.sparse_decode(a, idx, w, b, backend=backend)  # noqa: E731
            ref = lambda a, w, b: reference.sparse_decode(a, idx, w, b)  # noqa: E731
        else:
            rows = _rows(n, m, size["d"], device)
            params = [rand(n, size["d"])]
            fn = lambda a, v, b: tk.expander_decode(a, idx, v, rows, m, b, backend=backend)  # noqa: E731
            ref = lambda a, v, b: reference.expander_decode(a, idx, v, rows, m, b)  # noqa: E731
        leaves = [t.clone().requires_grad_() for t in (acts, *params, bias)]
        ref_leaves = [t.detach().double().requires_grad_() for t in (acts, *params, bias)]
        out, want = fn(*leaves), ref(*ref_leaves)
        grad = torch.randn(want.shape, generator=g, dtype=torch.float64).to(device)
        out.backward(grad.to(out.dtype))
        want.backward(grad)
        result["forward"] = _rel_err(out, want)
        result["backward"] = max(_rel_err(a.grad, b.grad) for a, b in zip(leaves, ref_leaves))
        result["ids"] = "-"
        return result
    x = rand(B, m)
    bias = rand(n, scale=0.1)
    if op == "topk_encode":
        params = [rand(n, m, scale=m ** -0.5)]
        fn = lambda x_, w, b: tk.topk_encode(x_, w, b, k, backend=backend)  # noqa: E731
        pre_of = lambda x_, w, b: x_ @ w.T + b  # noqa: E731
    else:
        rows = _rows(n, m, size["d"], device)
        params = [rand(n, size["d"])]
        fn = lambda x_, v, b: tk.expander_encode(x_, v, rows, b, k, backend=backend)  # noqa: E731
        pre_of = lambda x_, v, b: x_ @ reference.expander_dense(v, rows, m).T + b  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in (x, *params, bias)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, *params, bias)]
    acts, idx = fn(*leaves)
    pre = pre_of(*ref_leaves)
    ref_acts, ref_idx = reference.topk_relu(pre.detach(), k)
    result["ids"] = "ok" if _topk_ids_ok(idx, ref_idx, pre.detach(), TOL[dtype]) else "DIFFER"
    chosen = pre.gather(-1, idx).relu()  # the reference's gradient at the kernel's selection
    result["forward"] = _rel_err(acts, chosen)
    grad = torch.randn(chosen.shape, generator=g, dtype=torch.float64).to(device)
    acts.backward(grad.to(acts.dtype))
    chosen.backward(grad)
    result["backward"] = max(_rel_err(a.grad, b.grad) for a, b in zip(leaves, ref_leaves))
    return result


def correctness(mach: Machine, dry_run: bool) -> list[dict]:
    backends = ["triton", "torch"]
    ops = ["topk_encode", "sparse_decode", "expander_encode", "expander_decode"]
    small = DRY_SMALL if dry_run else SMALL
    rows = []
    for op in ops:
        for dtype in (("fp32",) if dry_run else ("fp32", "bf16", "fp16")):
            for backend in backends:
                rows.append(_guard(lambda: check_op(op, small, dtype, backend, mach.device),
                                   {"op": op, "size": _size_str(small), "dtype": dtype, "backend": backend}))
    for op in ops:
        real = dict(DRY_EXPANDER if "expander" in op else DRY_TOPK) if dry_run else \
            dict(REAL_EXPANDER if "expander" in op else REAL_TOPK)
        real["B"] = min(real["B"], CHECK_TOKENS)
        for dtype in (("bf16",) if dry_run else ("bf16", "fp32")):
            rows.append(_guard(lambda: check_op(op, real, dtype, "triton", mach.device),
                               {"op": op, "size": _size_str(real), "dtype": dtype, "backend": "triton"}))
    for r in rows:
        if "error" not in r:
            ok = r["forward"] <= TOL[r["dtype"]] and r["backward"] <= TOL[r["dtype"]] and r["ids"] != "DIFFER"
            r["verdict"] = "PASS" if ok else "FAIL"
    return rows


def _guard(fn, row: dict) -> dict:
    try:
        return fn()
    except torch.OutOfMemoryError:
        _free()
        return {**row, "error": "OOM", "verdict": "OOM"}
    except Exception as exc:  # a verdict reports every failure instead of stopping at the first
        _free()
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:160]}", "verdict": "ERROR"}


def _free():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _size_str(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


# --- (b) speed ---------------------------------------------------------------------------------

@dataclass
class Case:
    group: str
    name: str
    make: Callable[[], Callable[[], object]]  # builds inputs, returns the function to time
    flops: float = 0.0
    bytes: float = 0.0
    precision: str = "fp32"  # which tensor-core peak bounds it
    baseline: bool = False


def _elt(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def topk_cases(size: dict, dtype: str, device) -> list[Case]:
    B, m, n, k = size["B"], size["m"], size["n"], size["k"]
    dt = DTYPES[dtype]
    e = _elt(dt)
    prec = "tf32" if (dt == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else dtype
    grp = f"{dtype} B={B} m={m} n={n} k={k}"

    def enc_inputs(grad=False):
        x = torch.randn(B, m, device=device, dtype=dt)
        w = (torch.randn(n, m, device=device) * m ** -0.5).to(dt)
        b = torch.zeros(n, device=device, dtype=dt)
        return [t.requires_grad_(grad) for t in (x, w, b)]

    def dec_inputs(grad=False):
        acts = torch.rand(B, k, device=device, dtype=dt)
        idx = torch.randint(0, n, (B, k), device=device)
        w = torch.randn(n, m, device=device, dtype=dt)
        return acts.requires_grad_(grad), idx, w.requires_grad_(grad)

    enc_flops, enc_bytes = 2 * B * n * m, (B * m + n * m + n) * e + B * k * (e + 8)
    dec_flops = 2 * B * k * m
    dec_bytes = (min(n, B * k) * m + B * m) * e + B * k * (e + 8)

    def cublas():
        x, w, b = enc_inputs()
        return lambda: torch.addmm(b, x, w.T)

    def cublas_topk():
        x, w, b = enc_inputs()
        return lambda: torch.addmm(b, x, w.T).topk(k, dim=-1)

    def ours_enc():
        x, w, b = enc_inputs()
        return lambda: tk.topk_encode(x, w, b, k)

    def strategy(name):  # one of topk_encode's two CUDA strategies, whatever the dispatcher picks
        def make():
            te = importlib.import_module("topk_kernels.topk_encode")
            run = {"fused": te._fused_forward, "chunked": te._chunked_forward}[name]
            x, w, b = enc_inputs()
            return lambda: run(x, w, b, k, dt)
        return make

    def dense_enc_fb():
        return _fwd_bwd(lambda x, w, b: dense_topk_encode(x, w, b, k), *enc_inputs(True))

    def ours_enc_fb():
        return _fwd_bwd(lambda x, w, b: tk.topk_encode(x, w, b, k), *enc_inputs(True))

    def dense_dec():
        a, i, w = dec_inputs()
        return lambda: dense_sparse_decode(a, i, w)

    def bag_dec():
        a, i, w = dec_inputs()
        return lambda: F.embedding_bag(i, w, per_sample_weights=a, mode="sum")

    def ours_dec():
        a, i, w = dec_inputs()
        return lambda: tk.sparse_decode(a, i, w)

    def dense_dec_fb():
        a, i, w = dec_inputs(True)
        return _fwd_bwd(lambda a_, w_: dense_sparse_decode(a_, i, w_), a, w)

    def bag_dec_fb():
        a, i, w = dec_inputs(True)
        return _fwd_bwd(lambda a_, w_: F.embedding_bag(i, w_, per_sample_weights=a_, mode="sum"), a, w)

    def ours_dec_fb():
        a, i, w = dec_inputs(True)
        return _fwd_bwd(lambda a_, w_: tk.sparse_decode(a_, i, w_), a, w)

    def step(ours):
        def make():
            from sae.baselines import DenseTopKSAE
            from sae.models import TopKSAE

            with torch.device(device):
                model = TopKSAE(m, n, k) if ours else DenseTopKSAE(m, n, k)
            model = model.to(dt)
            x = torch.randn(B, m, device=device, dtype=dt)
            return _train_step(model, x, ours)
        return make

    cases = [
        Case(f"topk_encode fwd {grp}", "cuBLAS x @ W.T alone", cublas, enc_flops, enc_bytes, prec, True),
        Case(f"topk_encode fwd {grp}", "cuBLAS + torch.topk", cublas_topk, enc_flops, enc_bytes, prec),
        Case(f"topk_encode fwd {grp}", "topk_encode (ours)", ours_enc, enc_flops, enc_bytes, prec),
        # These two rows decide topk_encode.ENCODE_MEASURED for this GPU, dtype, m and K_PAD.
        Case(f"topk_encode fwd {grp}", "ours, fused strategy", strategy("fused"), enc_flops, enc_bytes, prec),
        Case(f"topk_encode fwd {grp}", "ours, chunked strategy", strategy("chunked"), enc_flops, enc_bytes, prec),
        Case(f"topk_encode fwd+bwd {grp}", "dense GEMM + torch.topk", dense_enc_fb, 3 * enc_flops,
             2 * enc_bytes, prec, True),
        Case(f"topk_encode fwd+bwd {grp}", "topk_encode (ours)", ours_enc_fb, enc_flops + 2 * dec_flops,
             enc_bytes + 2 * dec_bytes, prec),
        Case(f"sparse_decode fwd {grp}", "dense scatter + matmul", dense_dec, dec_flops, dec_bytes, prec, True),
        Case(f"sparse_decode fwd {grp}", "F.embedding_bag", bag_dec, dec_flops, dec_bytes, prec),
        Case(f"sparse_decode fwd {grp}", "sparse_decode (ours)", ours_dec, dec_flops, dec_bytes, prec),
        Case(f"sparse_decode fwd+bwd {grp}", "dense scatter + matmul", dense_dec_fb, 3 * dec_flops,
             3 * dec_bytes, prec, True),
        Case(f"sparse_decode fwd+bwd {grp}", "F.embedding_bag", bag_dec_fb, 3 * dec_flops, 3 * dec_bytes, prec),
        Case(f"sparse_decode fwd+bwd {grp}", "sparse_decode (ours)", ours_dec_fb, 3 * dec_flops, 3 * dec_bytes, prec),
        Case(f"TopK SAE train step {grp}", "sae.baselines.DenseTopKSAE", step(False), 0, 0, prec, True),
        Case(f"TopK SAE train step {grp}", "TopKSAE (ours)", step(True), enc_flops + 3 * dec_flops + 2 * dec_flops,
             enc_bytes + 3 * dec_bytes, prec),
    ]
    return cases + sparsify_cases(size, dtype, device, grp, dec_flops, dec_bytes, prec)


def sparsify_cases(size, dtype, device, grp, dec_flops, dec_bytes, prec) -> list[Case]:
    """EleutherAI sparsify's Triton decoder and SparseCoder training step, when importable."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.utils import decoder_impl
    except ImportError:
        return []
    B, m, n, k = size["B"], size["m"], size["n"], size["k"]
    dt = DTYPES[dtype]

    def dec():
        acts = torch.rand(B, k, device=device, dtype=dt)
        idx = torch.randint(0, n, (B, k), device=device)
        w = torch.randn(n, m, device=device, dtype=dt)
        return lambda: decoder_impl(idx, acts, w.mT)

    def step():
        coder = SparseCoder(m, SparseCoderConfig(num_latents=n, k=k), device=device, dtype=dt)
        opt = adam(coder.parameters(), 1e-4)  # the same Adam as our steps (sae.train's)
        x = torch.randn(B, m, device=device, dtype=dt)

        def run():
            out = coder(x)
            loss = out.fvu + out.auxk_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
        return run

    return [
        Case(f"sparse_decode fwd {grp}", "sparsify decoder_impl (Triton)", dec, dec_flops, dec_bytes, prec),
        Case(f"TopK SAE train step {grp}", "sparsify SparseCoder", step, 0, 0, prec),
    ]


def expander_cases(size: dict, dtype: str, device) -> list[Case]:
    B, m, n, d, k = size["B"], size["m"], size["n"], size["d"], size["k"]
    dt = DTYPES[dtype]
    e = _elt(dt)
    grp = f"{dtype} B={B} m={m} n={n} d={d} k={k}"
    rows = _rows(n, m, d, device)

    def enc_inputs(grad=False):
        x = torch.randn(B, m, device=device, dtype=dt)
        v = torch.randn(n, d, device=device, dtype=dt)
        b = torch.zeros(n, device=device, dtype=dt)
        return [t.requires_grad_(grad) for t in (x, v, b)]

    def dec_inputs(grad=False):
        acts = torch.rand(B, k, device=device, dtype=dt)
        idx = torch.randint(0, n, (B, k), device=device)
        v = torch.randn(n, d, device=device, dtype=dt)
        return acts.requires_grad_(grad), idx, v.requires_grad_(grad)

    # Floors: the encoder reads x and the graph once ([n, d] values and int64 rows); the gathers
    # are 2*B*n*d FLOPs on CUDA cores (no tensor-core form), bounded here by fp32 peak.
    enc_flops, enc_bytes = 2 * B * n * d, B * m * e + n * d * (e + 8) + n * e + B * k * (e + 8)
    dec_flops, dec_bytes = 2 * B * k * d, B * m * e + B * k * (e + 8) + min(n, B * k) * d * (e + 8)

    def dense_enc():
        x, v, b = enc_inputs()
        w = dense_expander_weight(v, rows, m)
        return lambda: dense_topk_encode(x, w, b, k)

    def ours_enc():
        x, v, b = enc_inputs()
        return lambda: tk.expander_encode(x, v, rows, b, k, check_rows=False)

    def dense_enc_fb():
        return _fwd_bwd(lambda x, v, b: dense_topk_encode(x, dense_expander_weight(v, rows, m), b, k),
                       *enc_inputs(True))

    def ours_enc_fb():
        return _fwd_bwd(lambda x, v, b: tk.expander_encode(x, v, rows, b, k, check_rows=False), *enc_inputs(True))

    def dense_dec():
        a, i, v = dec_inputs()
        return lambda: dense_sparse_decode(a, i, dense_expander_weight(v, rows, m))

    def ours_dec():
        a, i, v = dec_inputs()
        return lambda: tk.expander_decode(a, i, v, rows, m, check_rows=False)

    def dense_dec_fb():
        a, i, v = dec_inputs(True)
        return _fwd_bwd(lambda a_, v_: dense_sparse_decode(a_, i, dense_expander_weight(v_, rows, m)), a, v)

    def ours_dec_fb():
        a, i, v = dec_inputs(True)
        return _fwd_bwd(lambda a_, v_: tk.expander_decode(a_, i, v_, rows, m, check_rows=False), a, v)

    def step(ours):
        def make():
            from sae.baselines import DenseMaskedExpanderSAE
            from sae.models import ExpanderSAE

            with torch.device(device):
                model = ExpanderSAE(m, n, k, d) if ours else DenseMaskedExpanderSAE(m, n, k, rows.cpu())
            model = model.to(device=device, dtype=dt)
            x = torch.randn(B, m, device=device, dtype=dt)
            return _train_step(model, x, ours)
        return make

    return [
        Case(f"expander_encode fwd {grp}", "dense masked (x @ W.T + torch.topk)", dense_enc, 2 * B * n * m,
             (B * m + n * m) * e, dtype if dt != torch.float32 else "fp32", True),
        Case(f"expander_encode fwd {grp}", "expander_encode (ours)", ours_enc, enc_flops, enc_bytes, "fp32"),
        Case(f"expander_encode fwd+bwd {grp}", "dense masked", dense_enc_fb, 6 * B * n * m, 3 * (B * m + n * m) * e,
             "fp32", True),
        Case(f"expander_encode fwd+bwd {grp}", "expander_encode (ours)", ours_enc_fb, enc_flops + 2 * dec_flops,
             enc_bytes + 2 * dec_bytes, "fp32"),
        Case(f"expander_decode fwd {grp}", "dense masked (scatter + matmul)", dense_dec, 2 * B * n * m,
             (B * n + n * m) * e, "fp32", True),
        Case(f"expander_decode fwd {grp}", "expander_decode (ours)", ours_dec, dec_flops, dec_bytes, "fp32"),
        Case(f"expander_decode fwd+bwd {grp}", "dense masked", dense_dec_fb, 6 * B * n * m, 3 * (B * n + n * m) * e,
             "fp32", True),
        Case(f"expander_decode fwd+bwd {grp}", "expander_decode (ours)", ours_dec_fb, 3 * dec_flops, 3 * dec_bytes,
             "fp32"),
        Case(f"Expander SAE train step {grp}", "sae.baselines.DenseMaskedExpanderSAE", step(False), 0, 0, "fp32", True),
        Case(f"Expander SAE train step {grp}", "ExpanderSAE (ours)", step(True), enc_flops + 3 * dec_flops,
             enc_bytes + 3 * dec_bytes, "fp32"),
    ]


def run_case(case: Case, mach: Machine) -> dict:
    row = {"group": case.group, "name": case.name, "baseline": case.baseline}
    try:
        fn = case.make()
        ms = bench_ms(fn, mach)
        mib = peak_extra_mib(fn, mach)
        del fn
    except torch.OutOfMemoryError:
        _free()
        return {**row, "error": "OOM"}
    except Exception as exc:
        _free()
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    _free()
    row.update(ms=ms, mib=mib)
    if mach.device.type != "cuda":  # a dry run's rates would mean nothing
        return row
    if case.flops:
        row["tflops"] = case.flops / ms / 1e9
    if case.bytes:
        row["gbs"] = case.bytes / ms / 1e6
    if mach.bandwidth and (case.flops or case.bytes):
        peak = mach.peaks.get(case.precision, mach.peaks["fp32"])
        row["floor_ms"] = max(case.bytes / mach.bandwidth, case.flops / peak) * 1e3
    return row


def speed(mach: Machine, dry_run: bool) -> list[dict]:
    if dry_run:
        plans = [(topk_cases, DRY_TOPK, "fp32"), (expander_cases, DRY_EXPANDER, "fp32")]
    else:
        plans = [(topk_cases, REAL_TOPK, "bf16"), (topk_cases, REAL_TOPK, "fp32"),
                 (expander_cases, REAL_EXPANDER, "bf16"), (expander_cases, REAL_EXPANDER, "fp32")]
    rows = []
    for build, size, dtype in plans:
        for case in build(size, dtype, mach.device):
            rows.append(run_case(case, mach))
            print(_speed_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


# --- the report --------------------------------------------------------------------------------

def _fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def _speed_line(r: dict) -> str:
    if "error" in r:
        return f"{r['group']} | {r['name']} | {r['error']}"
    return f"{r['group']} | {r['name']} | {r['ms']:.3f} ms"


def _planted_acts(m: int, n: int, k: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """x = sum of k random unit atoms of a planted dictionary [n, m], positive coefficients (CPU)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n, m, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.randint(0, n, (tokens, k), generator=g)  # a repeat adds its coefficients
    coef = torch.rand(tokens, k, generator=g) + 0.5
    return reference.sparse_decode(coef, idx, dictionary)


class _Stop(Exception):
    pass


def _max_rel_diff(a, b) -> float:
    """Largest |a - b| / max|a| over two models' floating-point state tensors."""
    return max(float((x.float() - y.float()).abs().max() / x.float().abs().max().clamp_min(1e-30))
               for x, y in zip(a.state_dict().values(), b.state_dict().values()) if x.is_floating_point())


def training_check(mach: Machine, dry_run: bool) -> list[dict]:
    """(c): sae.train.train on the device, with resampling, a kill and a resume, and a reload."""
    import tempfile

    from sae.checkpoint import load_sae
    from sae.data import ActivationBuffer
    from sae.models import ExpanderSAE, TopKSAE
    from sae.train import TrainConfig, train

    m, n, k, tokens, batch = (24, 96, 4, 4096, 256) if dry_run else (512, 8192, 32, 262144, 4096)
    steps = tokens // batch
    buffer = ActivationBuffer(_planted_acts(m, n // 4, k, tokens))
    x_eval = buffer[torch.arange(min(len(buffer), 4096))].to(mach.device)
    cfg = TrainConfig(batch_size=batch, total_tokens=tokens, warmup_steps=steps // 8, checkpoint_every=steps // 2,
                      resample_every=steps // 4, log_every=10**9, progress=False, seed=0)
    rows = []
    for name, build in (("TopKSAE", lambda: TopKSAE(m, n, k, seed=0)),
                        ("ExpanderSAE d=7", lambda: ExpanderSAE(m, n, k, 7, seed=0))):
        for dt in (torch.bfloat16, torch.float32):
            row = {"model": name, "dtype": str(dt).replace("torch.", ""), "size": f"m={m} n={n} k={k}",
                   "steps": steps}

            def run(row=row, build=build, dt=dt):
                def fvu(model):  # in eval mode: a training-mode forward counts firings (dead latents)
                    model.eval()
                    with torch.no_grad():
                        err = (model(x_eval.to(dt)).x_hat.float() - x_eval.float()).pow(2).sum()
                    model.train()
                    return float(err / (x_eval.float() - x_eval.float().mean(0)).pow(2).sum())

                def kill(step, log):
                    if step == steps // 2 + 3:  # after the midway checkpoint
                        raise _Stop

                with tempfile.TemporaryDirectory() as tmp:
                    sae = build().to(mach.device, dt)
                    row["fvu_before"] = fvu(sae)
                    t0 = time.perf_counter()
                    train(sae, buffer, cfg, f"{tmp}/whole")
                    if mach.device.type == "cuda":
                        torch.cuda.synchronize()
                    row["ms_per_step"] = 1e3 * (time.perf_counter() - t0) / steps
                    row["fvu_after"] = fvu(sae)
                    repeat = build().to(mach.device, dt)
                    train(repeat, buffer, cfg, f"{tmp}/repeat")
                    row["repeat_diff"] = _max_rel_diff(sae, repeat)
                    try:
                        train(build().to(mach.device, dt), buffer, cfg, f"{tmp}/killed", on_step=kill)
                    except _Stop:
                        pass
                    resumed = build().to(mach.device, dt)
                    train(resumed, buffer, cfg, f"{tmp}/killed", resume=True)
                    row["resume_diff"] = _max_rel_diff(sae, resumed)
                    sae.save(f"{tmp}/sae.safetensors")
                    again = load_sae(f"{tmp}/sae.safetensors", device=mach.device, dtype=dt).eval()
                    with torch.no_grad():
                        row["reload_same"] = bool(torch.equal(again(x_eval.to(dt)).x_hat, sae.eval()(x_eval.to(dt)).x_hat))
                # Deterministic training: a repeat and a kill + resume end on the same weights, bit
                # for bit. The planted dictionary is dense, so an expander SAE only fits it in part.
                learned = 0.5 if name == "TopKSAE" else 0.8
                ok = (math.isfinite(row["fvu_after"]) and row["fvu_after"] < learned * row["fvu_before"]
                      and row["repeat_diff"] == 0 and row["resume_diff"] == 0 and row["reload_same"])
                row["verdict"] = "PASS" if ok else "FAIL"
                return row

            rows.append(_guard(run, row))
            print(f"train {name} {row['dtype']}: {rows[-1].get('error') or rows[-1]['verdict']}", file=sys.stderr,
                  flush=True)
    return rows


def report(mach: Machine, checks: list[dict], timings: list[dict], dry_run: bool, seconds: float,
           trains: Optional[list[dict]] = None) -> str:
    out = [f"## GPU verdict: {mach.name}", ""]
    out.append(f"- SM clock: {mach.sm_clock}; torch {torch.__version__}; triton "
               f"{__import__('triton').__version__ if _has_triton() else 'absent'}; "
               f"TF32 matmul allowed: {torch.backends.cuda.matmul.allow_tf32}")
    if mach.bandwidth:
        out.append(f"- Roofline floors use the spec sheet: {mach.bandwidth / 1e12:.2f} TB/s, tensor-core peaks "
                   + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in mach.peaks.items()))
    if dry_run:
        out.append("- DRY RUN on CPU under the Triton interpreter at tiny sizes: proves the script runs; "
                   "its timings mean nothing.")
    out.append(f"- Total wall time: {seconds:.0f} s")
    out += ["", "### (a) Correctness against the fp64 reference (max error relative to the output's scale)", "",
            "| op | size | dtype | backend | forward | backward | ids | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in checks:
        if "error" in r:
            out.append(f"| {r['op']} | {r['size']} | {r['dtype']} | {r['backend']} | {r['error']} | | | {r['verdict']} |")
        else:
            out.append(f"| {r['op']} | {r['size']} | {r['dtype']} | {r['backend']} | {r['forward']:.2e} "
                       f"| {r['backward']:.2e} | {r['ids']} | {r['verdict']} |")
    out += ["", "### (b) Speed (median of triton.testing.do_bench; speed-up over the group's first, dense, row)", "",
            "| case | implementation | median ms | speed-up | TFLOP/s | GB/s | floor ms | floor / ours | peak extra MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    base: dict = {}
    for r in timings:
        if r.get("baseline") and "ms" in r:
            base.setdefault(r["group"], r["ms"])
    for r in timings:
        if "error" in r:
            out.append(f"| {r['group']} | {r['name']} | {r['error']} | | | | | | |")
            continue
        b = base.get(r["group"])
        speedup = f"{b / r['ms']:.2f}x" if b else "-"
        frac = f"{r['floor_ms'] / r['ms']:.0%}" if r.get("floor_ms") else "-"
        out.append(f"| {r['group']} | {r['name']} | {r['ms']:.3f} | {speedup} | {_fmt(r.get('tflops'), '.1f')} "
                   f"| {_fmt(r.get('gbs'), '.0f')} | {_fmt(r.get('floor_ms'), '.3f')} | {frac} "
                   f"| {_fmt(r.get('mib'), '.0f')} |")
    if trains:
        out += ["", "### (c) Training on the device (sae.train.train: resampling, kill + resume, reload)", "",
                "| model | dtype | size | steps | ms/step | FVU before | FVU after | repeat max rel. diff "
                "| resume max rel. diff | reload same | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in trains:
            if "error" in r:
                out.append(f"| {r['model']} | {r['dtype']} | {r['size']} | {r['steps']} | {r['error']} | | | | | | "
                           f"{r['verdict']} |")
            else:
                out.append(f"| {r['model']} | {r['dtype']} | {r['size']} | {r['steps']} | {r['ms_per_step']:.1f} "
                           f"| {r['fvu_before']:.3f} | {r['fvu_after']:.3f} | {r['repeat_diff']:.1e} | {r['resume_diff']:.1e} "
                           f"| {r['reload_same']} | {r['verdict']} |")
    return "\n".join(out) + "\n"


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--skip-speed", action="store_true", help="correctness only")
    args = parser.parse_args(argv)
    mach = machine(args.dry_run)
    if mach.device.type != "cuda" and not args.dry_run:
        print("gpu.py: no CUDA device; use --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    checks = correctness(mach, args.dry_run)
    timings = [] if args.skip_speed else speed(mach, args.dry_run)
    trains = training_check(mach, args.dry_run)
    text = report(mach, checks, timings, args.dry_run, time.perf_counter() - t0, trains)
    print(text)
    if args.out:
        args.out.write_text(text)
    failed = [r for r in checks + trains if r.get("verdict") != "PASS"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
