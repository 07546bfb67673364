"""Shape sweep of the CPU paths against the dense PyTorch a user writes, one thread, interleaved.

    OMP_NUM_THREADS=1 python benchmarks/cpu_sweep.py --ops encode --out sweep.jsonl
    OMP_NUM_THREADS=1 python benchmarks/cpu_sweep.py --ops expander_encode --B 1 7 --d-rule 1 3
    OMP_NUM_THREADS=1 python benchmarks/cpu_sweep.py --case encode,64,768,16384,8192 --dtypes bf16

Grid (each flag narrows it): B in {1, 7, 64, 1000}, m in {16, 100, 768}, n in {64, 1000, 16384},
k in {1, 8, n/2, n-1}, the expander's d in {1, 3, m/2, m}; forward and forward + backward; fp32
and bf16. Baselines (``common``): ``addmm`` + ``torch.topk`` + ReLU for the encoders (the
expander's on its dense masked [n, m] weight, scattered in place every call), and for the decoders
both a scatter into a dense [B, n] + GEMM and ``F.embedding_bag`` (the faster of the two counts).
The expander ops check ``rows`` on every call unless ``--no-check-rows`` (ExpanderSAE's hot path skips it).
Per case each side runs ``inner`` calls a sample (enough for ~2 ms), ours and the baselines
alternate sample by sample, and the medians of ``--repeat`` samples are compared. One JSON line per
case: ``ratio`` = ours / best baseline (above 1: ours is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import topk_kernels as tk  # noqa: E402
from common import dense_expander_weight, dense_sparse_decode, dense_topk_encode  # noqa: E402


def _fwd(fn, params):
    return fn


def _fwd_bwd(fn, params):
    def run():
        for p in params:
            p.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


def _ids(B, n, k, g):
    """[B, k] distinct latent ids per token, as an encoder returns them."""
    if k * 4 <= n:
        return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    return torch.rand(B, n, generator=g).argsort(dim=1)[:, :k].contiguous()


def cases(op, B, m, n, k, d, dtype, backward, check_rows=True):
    g = torch.Generator().manual_seed(0)

    def p(t):
        return t.to(dtype).requires_grad_(backward)

    if op == "encode":
        x, w = p(torch.randn(B, m, generator=g)), p(torch.randn(n, m, generator=g) / m**0.5)
        b = p(torch.randn(n, generator=g) * 0.1)
        ours = lambda: tk.topk_encode(x, w, b, k)  # noqa: E731
        base = {"addmm+topk": lambda: dense_topk_encode(x, w, b, k)}
        params = [x, w, b]
    elif op == "decode":
        acts, idx = p(torch.rand(B, k, generator=g)), _ids(B, n, k, g)
        w, b = p(torch.randn(n, m, generator=g) / m**0.5), p(torch.randn(m, generator=g) * 0.1)
        ours = lambda: tk.sparse_decode(acts, idx, w, b)  # noqa: E731
        base = {"scatter+addmm": lambda: dense_sparse_decode(acts, idx, w, b),
                "embedding_bag": lambda: F.embedding_bag(idx, w, per_sample_weights=acts, mode="sum") + b}
        params = [acts, w, b]
    else:
        from sae.masks import expander_mask

        rows = expander_mask(m, n, d, seed=0)
        values = p(torch.randn(n, d, generator=g) / d**0.5)
        if op == "expander_encode":
            x, b = p(torch.randn(B, m, generator=g)), p(torch.randn(n, generator=g) * 0.1)
            ours = lambda: tk.expander_encode(x, values, rows, b, k, check_rows=check_rows)  # noqa: E731
            base = {"masked addmm+topk": lambda: dense_topk_encode(x, dense_expander_weight(values, rows, m), b, k)}
            params = [x, values, b]
        else:
            acts, idx = p(torch.rand(B, k, generator=g)), _ids(B, n, k, g)
            b = p(torch.randn(m, generator=g) * 0.1)
            ours = lambda: tk.expander_decode(acts, idx, values, rows, m, b, check_rows=check_rows)  # noqa: E731

            def masked():
                return dense_expander_weight(values, rows, m)

            base = {"masked scatter+addmm": lambda: dense_sparse_decode(acts, idx, masked(), b),
                    "masked embedding_bag": lambda: F.embedding_bag(idx, masked(), per_sample_weights=acts,
                                                                   mode="sum") + b}
            params = [acts, values, b]
    wrap = _fwd_bwd if backward else _fwd
    return wrap(ours, params), {name: wrap(f, params) for name, f in base.items()}


def _sample(fn, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e3


def measure(ours, base, repeat, target_ms=2.0):
    """Interleaved medians (ms): ours and every baseline alternate sample by sample."""
    fns = {"ours": ours, **base}
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up (first-call set-up)
        t = _sample(fn, 1)
        inner[name] = max(1, min(1000, int(target_ms / max(t, 1e-3))))
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(_sample(fn, inner[name]))
    return {name: statistics.median(v) for name, v in times.items()}


def grid(args):
    if args.case:
        for case in args.case:
            op, *dims = case.split(",")
            B, m, n, k, d = (int(v) if v else None for v in (dims + [""])[:5])
            for dtype in args.dtypes:
                for backward in args.modes:
                    yield op, B, m, n, k, d, dtype, backward
        return
    for op in args.ops:
        for B in args.B:
            for m in args.m:
                for n in args.n:
                    rules = {"1": 1, "8": 8, "half": n // 2, "nm1": n - 1}
                    ks = sorted({v for r, v in rules.items()
                                 if 1 <= v <= n and (args.k_rule is None or r in args.k_rule)})
                    ds = [None]
                    if op.startswith("expander"):
                        drules = {"1": 1, "3": 3, "half": m // 2, "m": m}
                        ds = sorted({v for r, v in drules.items()
                                     if 1 <= v <= m and (args.d_rule is None or r in args.d_rule)})
                    for k in ks:
                        for d in ds:
                            for dtype in args.dtypes:
                                for backward in args.modes:
                                    yield op, B, m, n, k, d, dtype, backward


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="*", default=["encode", "decode", "expander_encode", "expander_decode"])
    ap.add_argument("--B", nargs="*", type=int, default=[1, 7, 64, 1000])
    ap.add_argument("--m", nargs="*", type=int, default=[16, 100, 768])
    ap.add_argument("--n", nargs="*", type=int, default=[64, 1000, 16384])
    ap.add_argument("--k-rule", nargs="*", default=None, help="subset of: 1 8 half nm1")
    ap.add_argument("--d-rule", nargs="*", default=None, help="expander degrees, a subset of: 1 3 half m")
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    ap.add_argument("--case", action="append", default=[],
                    help="one shape instead of the grid: op,B,m,n,k[,d] (repeatable)")
    ap.add_argument("--no-check-rows", action="store_true",
                    help="expander ops with check_rows=False, as ExpanderSAE calls them")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    args.dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtypes]
    args.modes = [{"fwd": False, "fwd+bwd": True}[mo] for mo in args.modes]
    torch.set_num_threads(1)
    out = open(args.out, "a") if args.out else None
    for op, B, m, n, k, d, dtype, backward in grid(args):
        ours, base = cases(op, B, m, n, k, d, dtype, backward, not args.no_check_rows)
        med = measure(ours, base, args.repeat)
        best = min((v, name) for name, v in med.items() if name != "ours")
        row = dict(op=op, B=B, m=m, n=n, k=k, d=d, dtype=str(dtype).split(".")[-1],
                   mode="fwd+bwd" if backward else "fwd", check_rows=not args.no_check_rows,
                   ours_ms=round(med["ours"], 4),
                   **{f"{name}_ms": round(v, 4) for name, v in med.items() if name != "ours"},
                   ratio=round(med["ours"] / best[0], 3), vs=best[1], load=round(os.getloadavg()[0], 2))
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
