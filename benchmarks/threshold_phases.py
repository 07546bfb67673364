"""Where topk_encode's threshold strategy spends its time, on one CUDA GPU, and what its knobs buy.

    python benchmarks/threshold_phases.py [--B 8192 --m 2048 --n 131072 --k 512,1024,2048,4096]
    python benchmarks/threshold_phases.py --k 4096 --tiles SPREAD=0.5 SAMPLE=1024 CAP=512

At one shape (bf16, with a bias, by default the issue's B=8192 m=2048 n=131072), per k:
- the baseline ``torch.topk(torch.addmm(b, x, W.T), k)`` and the strategy's pieces, each the
  median of ``triton.testing.do_bench``: its GEMM blocks alone (cuBLAS, fp32 output), the final
  ``sort`` of the [B, k] keys with ``merge_candidates``, and the whole strategy at the package's
  tile and at each ``--tiles`` variant (``KEY=VALUE[,KEY=VALUE]``, overriding ``THRESHOLD_TILE``);
- for each tile, ``_threshold_select_kernel``'s own phase timers (``TIMERS``: the SM's cycle
  counter after a barrier at each phase's end, one run): per row the mean cycles of the sample,
  the read and append, the counting passes, the compaction and the final candidate sort, with
  each phase's share; the mean entries appended per row, the mean counting passes and the share
  of rows whose buffer did not serve (a floor above the k-th value, or an overflow: the row is
  read again);
- whether each tile returns the same ids as the package's tile.
The timed build differs from the shipped one: five more barriers and stores, and (sm_90, 4 warps)
72 registers where the shipped build takes 64, which would cost an SM one of its 8 CTAs, so it is
capped at ``--timers-maxnreg`` (default 64; ptxas then spills 28 bytes, outside the read loop,
whose 279 instructions are the shipped build's). Its time is printed beside the shipped one: the
shares, not the cycle sums, are what to read. Prints markdown.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

te = importlib.import_module("topk_kernels.topk_encode")
from topk_kernels._topk import merge_candidates  # noqa: E402

PHASES = ("sample", "read + append", "counting", "compaction", "final sort")


def parse_tile(text: str) -> dict:
    """"SPREAD=0.5,SAMPLE=1024" -> {"SPREAD": 0.5, "SAMPLE": 1024}: overrides of THRESHOLD_TILE."""
    tile = {}
    for item in text.split(","):
        key, value = item.split("=")
        if key not in te.THRESHOLD_TILE:
            raise argparse.ArgumentTypeError(f"expected keys of THRESHOLD_TILE {sorted(te.THRESHOLD_TILE)}, got {key!r}")
        tile[key] = float(value) if "." in value else int(value)
    return tile


def phase_stats(timers: torch.Tensor, k: int, buf_len: int) -> dict:
    """Per-row means of a timed run's [B, 8] timers: phase cycles, passes, entries buffered."""
    t = timers.double()
    cycles = (t[:, 1:6] - t[:, 0:5]).mean(0).tolist()
    buffered = timers[:, 7]
    missed = ((buffered < k) | (buffered > buf_len)).double().mean().item()
    return dict(cycles=cycles, passes=t[:, 6].mean().item(), appended=t[:, 7].mean().item(), missed=missed)


def main(argv=None) -> int:
    from triton.testing import do_bench

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=8192)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--k", type=lambda s: [int(v) for v in s.split(",")], default=[512, 1024, 2048, 4096])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--tiles", nargs="*", type=parse_tile, default=[dict(SPREAD=0.5), dict(SPREAD=0.5, CAP=512)],
                   help="THRESHOLD_TILE variants, each KEY=VALUE[,KEY=VALUE]")
    p.add_argument("--timers-maxnreg", type=int, default=64, help="register cap of the timed build (0: none)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("threshold_phases.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    B, m, n = args.B, args.m, args.n
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, m, device="cuda", dtype=dtype, generator=g)
    w = (torch.randn(n, m, device="cuda", dtype=dtype, generator=g) / m**0.5).to(dtype)
    b = (0.1 * torch.randn(n, device="cuda", dtype=dtype, generator=g)).to(dtype)
    base = dict(te.THRESHOLD_TILE)
    tiles = [{}] + list(args.tiles)
    print(f"### {torch.cuda.get_device_name()}, {args.dtype} B={B} m={m} n={n}, with bias; "
          f"THRESHOLD_TILE {base}, {te._threshold_block_tokens(n)} tokens a block\n")

    def ms(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    for k in args.k:
        keys = torch.randint(-2**62, 2**62, (B, k), device="cuda", dtype=torch.int64, generator=g)
        pieces = dict(
            baseline=ms(lambda: torch.topk(torch.addmm(b, x, w.T), k)),
            gemms=ms(lambda: sum(1 for _ in te._threshold_blocks(x, w))),
            sort=ms(lambda: merge_candidates(keys.sort(dim=1).values, k, dtype, ascending=True)),
        )
        print(f"#### k = {k}: addmm + topk {pieces['baseline']:.2f} ms; GEMM blocks {pieces['gemms']:.2f} ms; "
              f"final sort + unpack {pieces['sort']:.2f} ms\n")
        print("| tile | strategy ms | vs baseline | timed build ms | same ids | " + " | ".join(f"{p} (cycles/row, share)" for p in PHASES)
              + " | appended/row | passes/row | rows not from buffer |")
        print("|" + "---|" * (5 + len(PHASES) + 3))
        ref = None
        for extra in tiles:
            tile = dict(base, **extra)
            te.THRESHOLD_TILE = tile
            try:
                acts, ids = te._threshold_forward(x, w, b, k, dtype)
                ref = ids if ref is None else ref
                same = (ids == ref).double().mean().item()
                total = ms(lambda: te._threshold_forward(x, w, b, k, dtype))
                timers = torch.zeros(B, 8, device="cuda", dtype=torch.int64)
                if args.timers_maxnreg:
                    te.THRESHOLD_TILE = dict(tile, maxnreg=args.timers_maxnreg)
                timed = ms(lambda: te._threshold_forward(x, w, b, k, dtype, timers=timers))
                stats = phase_stats(timers, k, te._threshold_sizes(n, k, tile)[2])
            finally:
                te.THRESHOLD_TILE = base
            whole = sum(stats["cycles"])
            cells = " | ".join(f"{c:,.0f} ({c / whole:.0%})" for c in stats["cycles"])
            name = ", ".join(f"{key}={v}" for key, v in extra.items()) or "shipped"
            print(f"| {name} | {total:.2f} | {pieces['baseline'] / total:.2f}x | {timed:.2f} | {same:.4f} | {cells} | "
                  f"{stats['appended']:,.0f} | {stats['passes']:.2f} | {stats['missed']:.2%} |", flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
