"""Microbenchmark command: every op against its dense PyTorch baseline, in one run.

    python benchmarks/micro.py                 # all ops at the default shapes
    python benchmarks/micro.py --ops decode --repeat 10
    python benchmarks/micro.py --small         # a quick pass at small shapes

Per op and shape it prints the median ms (min-max) of ours and of the dense baseline, the ratio,
the bytes our op must move at the least (inputs read once, outputs written once) as GB/s, the peak
extra memory of each, and the GPU roofline floor: those bytes at an H100's 3.35 TB/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))

import topk_kernels as tk  # noqa: E402
from common import (H100_BANDWIDTH, dense_expander_weight, dense_sparse_decode, dense_topk_encode,  # noqa: E402
                    forward_backward, peak_extra_mib, summary, time_ms)


@dataclass
class Case:
    op: str
    shape: str
    ours: Callable[[], object]
    dense: Callable[[], object]
    bytes_moved: int


def _decode_cases(B, m, n, k, backward):
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(B, k, generator=g).requires_grad_(backward)
    idx = torch.randint(0, n, (B, k), generator=g)
    weight = torch.randn(n, m, generator=g).div_(m**0.5).requires_grad_(backward)
    f = 4
    fwd_bytes = B * k * (f + 8) + B * k * m * f + B * m * f
    if backward:
        # grad in, rows re-read for grad acts, zeroed grad weight written, rows read-modify-written
        bytes_moved = fwd_bytes + B * m * f + B * k * m * f + n * m * f + 2 * B * k * m * f
        return Case("sparse_decode fwd+bwd", f"B={B} m={m} n={n} k={k}",
                    forward_backward(tk.sparse_decode, acts, idx, weight),
                    forward_backward(dense_sparse_decode, acts, idx, weight), bytes_moved)
    return Case("sparse_decode fwd", f"B={B} m={m} n={n} k={k}",
                lambda: tk.sparse_decode(acts, idx, weight),
                lambda: dense_sparse_decode(acts, idx, weight), fwd_bytes)


def _encode_cases(B, m, n, k, backward):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, m, generator=g).requires_grad_(backward)
    weight = torch.randn(n, m, generator=g).div_(m**0.5).requires_grad_(backward)
    bias = torch.zeros(n).requires_grad_(backward)
    f = 4
    bytes_moved = B * m * f + n * m * f + n * f + B * k * (f + 8)
    name = "topk_encode fwd+bwd" if backward else "topk_encode fwd"
    if backward:
        bytes_moved += B * k * f + 2 * B * k * m * f + n * m * f + B * m * f
        return Case(name, f"B={B} m={m} n={n} k={k}",
                    forward_backward(tk.topk_encode, x, weight, bias, k),
                    forward_backward(dense_topk_encode, x, weight, bias, k), bytes_moved)
    return Case(name, f"B={B} m={m} n={n} k={k}", lambda: tk.topk_encode(x, weight, bias, k),
                lambda: dense_topk_encode(x, weight, bias, k), bytes_moved)


def _expander_inputs(B, m, n, d, k, backward):
    from sae.masks import expander_mask

    g = torch.Generator().manual_seed(0)
    rows = expander_mask(m, n, d, seed=0)
    values = torch.randn(n, d, generator=g).div_(d**0.5).requires_grad_(backward)
    return g, rows, values


def _expander_encode_cases(B, m, n, d, k, backward):
    g, rows, values = _expander_inputs(B, m, n, d, k, backward)
    x = torch.randn(B, m, generator=g).requires_grad_(backward)
    bias = torch.zeros(n).requires_grad_(backward)
    f = 4
    bytes_moved = B * m * f + n * d * (f + 8) + n * f + B * k * (f + 8)

    def dense(x, values, bias):
        return dense_topk_encode(x, dense_expander_weight(values, rows, m), bias, k)

    def ours(x, values, bias):
        return tk.expander_encode(x, values, rows, bias, k)

    shape = f"B={B} m={m} n={n} d={d} k={k}"
    if backward:
        return Case("expander_encode fwd+bwd", shape, forward_backward(ours, x, values, bias),
                    forward_backward(dense, x, values, bias), bytes_moved * 2)
    return Case("expander_encode fwd", shape, lambda: ours(x, values, bias), lambda: dense(x, values, bias),
                bytes_moved)


def _expander_decode_cases(B, m, n, d, k, backward):
    g, rows, values = _expander_inputs(B, m, n, d, k, backward)
    acts = torch.rand(B, k, generator=g).requires_grad_(backward)
    idx = torch.randint(0, n, (B, k), generator=g)
    f = 4
    bytes_moved = B * k * (f + 8) + B * k * d * (f + 8) + B * m * f

    def dense(acts, values):
        return dense_sparse_decode(acts, idx, dense_expander_weight(values, rows, m))

    def ours(acts, values):
        return tk.expander_decode(acts, idx, values, rows, m)

    shape = f"B={B} m={m} n={n} d={d} k={k}"
    if backward:
        return Case("expander_decode fwd+bwd", shape, forward_backward(ours, acts, values),
                    forward_backward(dense, acts, values), bytes_moved * 3 + n * d * f)
    return Case("expander_decode fwd", shape, lambda: ours(acts, values), lambda: dense(acts, values), bytes_moved)


OPS = {
    "decode": (_decode_cases, [(2048, 512, 16384, 32), (4096, 768, 24576, 32)]),
    "encode": (_encode_cases, [(4096, 768, 24576, 32), (4096, 768, 131072, 32)]),
    "expander_encode": (_expander_encode_cases, [(1024, 1024, 16384, 7, 32), (1024, 2048, 16384, 7, 64)]),
    "expander_decode": (_expander_decode_cases, [(1024, 1024, 16384, 7, 32), (1024, 2048, 16384, 7, 64)]),
}
SMALL = {
    "decode": [(512, 256, 4096, 16)],
    "encode": [(512, 256, 4096, 16)],
    "expander_encode": [(512, 256, 4096, 7, 16)],
    "expander_decode": [(512, 256, 4096, 7, 16)],
}


def _check_same(case: Case, ours, dense) -> None:
    """Ours and the baseline's (first) output agree to fp32 accumulation-order error."""
    ours, dense = (out[0] if isinstance(out, tuple) else out for out in (ours, dense))
    scale = dense.detach().abs().max().item() or 1.0
    torch.testing.assert_close(ours.detach(), dense.detach(), rtol=1e-4, atol=1e-5 * scale,
                               msg=lambda m: f"{case.op} {case.shape}: ours differs from the dense baseline\n{m}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median reported)")
    parser.add_argument("--small", action="store_true", help="small shapes, for a quick check")
    parser.add_argument("--no-backward", action="store_true")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU path vs dense baseline")
    header = (f"{'op':24s} {'shape':34s} {'ours ms median (min-max)':>30s} {'dense ms median (min-max)':>32s}"
              f" {'ratio':>7s} {'GB/s':>7s} {'ours MiB':>9s} {'dense MiB':>9s} {'H100 floor us':>13s}")
    print(header)
    print("-" * len(header))
    for op in args.ops:
        build, shapes = OPS[op]
        if args.small:
            shapes = SMALL[op]
        for shape in shapes:
            for backward in ([False] if args.no_backward else [False, True]):
                try:
                    case = build(*shape, backward)
                except (ImportError, AttributeError) as exc:
                    print(f"{op:24s} skipped: {exc}")
                    break
                # The warm-up calls (memory excludes one-off set-up) double as the check that ours and
                # the baseline compute the same thing: a speed-up over a different computation means nothing.
                _check_same(case, case.ours(), case.dense())
                ours = time_ms(case.ours, args.repeat, warmup=0, warmup_s=1.5)
                dense = time_ms(case.dense, max(1, min(args.repeat, 3)), warmup=0, warmup_s=1.5)
                ours_mem = peak_extra_mib(case.ours)
                dense_mem = peak_extra_mib(case.dense)
                ratio = statistics.median(dense) / statistics.median(ours)
                gbs = case.bytes_moved / (statistics.median(ours) * 1e-3) / 1e9
                floor_us = case.bytes_moved / H100_BANDWIDTH * 1e6
                mem = lambda v: f"{v:9.1f}" if v is not None else "      n/a"  # noqa: E731
                print(f"{case.op:24s} {case.shape:34s} {summary(ours):>30s} {summary(dense):>32s}"
                      f" {ratio:6.1f}x {gbs:7.2f} {mem(ours_mem)} {mem(dense_mem)} {floor_us:13.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
