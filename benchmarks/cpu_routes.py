"""The CPU TopK encoder's routes and tiles, each forced on and off on the same inputs, interleaved.

    OMP_NUM_THREADS=1 python benchmarks/cpu_routes.py route 1000,768,16384,128 --dtype bf16
    OMP_NUM_THREADS=1 python benchmarks/cpu_routes.py route 1000,2048,16384,32 --dtype fp32
    OMP_NUM_THREADS=1 python benchmarks/cpu_routes.py tiles 1000,16,16384,8 --dtype fp32 --fp32-path
    OMP_NUM_THREADS=1 python benchmarks/cpu_routes.py nan-weight 1000,768,16384,32 --dtype fp32

``route``: the bf16 candidates (bf16 inputs) or the fp32 candidates (fp32 inputs) against the fp32
GEMM path, their gates (``BF16_MIN_*``, ``FP32_CANDIDATES_MIN_*``) opened or shut; prints both
medians, their ratio and m n / (k + extra), the quantity the gates test. ``tiles``: the GEMM tile
(``CPU_GEMM_TILE_ELEMS``, at least the weight's elements as shipped) at each ``--tiles`` size in
Mi elements; ``--fp32-path`` shuts both candidate routes first. ``nan-weight``: the call with W[5, 3]
= NaN beside the clean one. Inputs: x ~ N(0, 1), rows ~ N(0, 1/m), bias ~ N(0, 0.01); each line
also gives the baseline (``addmm`` + ``torch.topk`` in the inputs' dtype). Medians of ``--repeat``
rounds, each round one call of every variant in turn.
"""
import argparse
import contextlib
import statistics
import sys
import time

import torch

import topk_kernels  # noqa: F401  (registers the ops)

te = sys.modules["topk_kernels.topk_encode"]
SHUT = 1 << 62


@contextlib.contextmanager
def patched(**values):
    old = {name: getattr(te, name) for name in values}
    for name, value in values.items():
        setattr(te, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(te, name, value)


def interleaved(variants: dict, repeat: int) -> dict:
    """{name: (patches, fn)} -> {name: median ms}, one call of each per round after a warm-up."""
    times = {name: [] for name in variants}
    for r in range(repeat + 1):
        for name, (patches, fn) in variants.items():
            with patched(**patches):
                t0 = time.perf_counter()
                fn()
                if r:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["route", "tiles", "nan-weight"])
    ap.add_argument("case", help="B,m,n,k")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    ap.add_argument("--tiles", default="32,8,4,2", help="Mi elements, for `tiles`")
    ap.add_argument("--fp32-path", action="store_true", help="`tiles`: shut the candidate routes")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    B, m, n, k = map(int, args.case.split(","))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, m, generator=g).to(dtype)
    w = (torch.randn(n, m, generator=g) / m**0.5).to(dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype)

    def ours(weight=w):
        return lambda: te.topk_encode(x, weight, b, k, backend="torch")

    shut = dict(BF16_MIN_WORK=SHUT, FP32_CANDIDATES_MIN_WORK=SHUT)
    variants = {}
    if args.what == "route":
        if dtype == torch.bfloat16:
            kk, opened = k + te._bf16_extra(k), dict(BF16_MIN_WORK=0, BF16_MIN_N=0)
        else:
            kk = k + te._fp32_extra(k, m, n)
            opened = dict(FP32_CANDIDATES_MIN_WORK=0, FP32_CANDIDATES_MIN_RATIO=0, FP32_CANDIDATES_MIN_TOKENS=0,
                          FP32_CANDIDATES_MIN_M=0)
        variants = {"route": (opened, ours()), "fp32 path": (shut, ours())}
        label = f"m n / (k + extra) = {m * n / kk:.0f}"
    elif args.what == "tiles":
        for size in args.tiles.split(","):
            variants[f"{size} Mi"] = (dict(CPU_GEMM_TILE_ELEMS=int(float(size) * 2**20),
                                           **(shut if args.fp32_path else {})), ours())
        label = "fp32 path" if args.fp32_path else "shipped routes"
    else:
        bad = w.clone()
        bad[5, 3] = float("nan")
        variants = {"clean": ({}, ours()), "W[5, 3] = NaN": ({}, ours(bad))}
        label = ""
    variants["baseline"] = ({}, lambda: torch.addmm(b, x, w.T).topk(k, dim=1))
    med = interleaved(variants, args.repeat)
    cells = "  ".join(f"{name} {ms:.2f}" for name, ms in med.items())
    if args.what == "route":
        cells += f"  route / fp32 path {med['route'] / med['fp32 path']:.2f}"
    print(f"{args.what} {args.dtype} B={B} m={m} n={n} k={k}  {cells}  {label}", flush=True)


if __name__ == "__main__":
    main()
