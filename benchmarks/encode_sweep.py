"""Tuning sweep of topk_encode's chunked strategy on one CUDA GPU: where its time goes.

    python benchmarks/encode_sweep.py [--B 8192 --m 2048 --n 131072 --k 64 --dtype bf16]

Times (median of ``triton.testing.do_bench``), at one shape:
- the dense baseline: cuBLAS ``x @ W.T`` (output in the input dtype), alone and + ``torch.topk``;
- the chunked strategy's GEMMs alone (fp32 output, one chunk at a time, as it launches them) for
  each chunk size, so that (strategy - its GEMMs) is the selection's share;
- the whole chunked strategy for each chunk size x selection tile (BLOCK_B, BLOCK_N, warps), each
  checked to return the same ids as the package's defaults; a tile written ``1x128x1b`` runs the
  threshold-and-sort kernel (``_select_buffer_kernel``), the others insertion;
- the fused strategy at its defaults;
- with ``--threshold``, the threshold strategy (whole rows: GEMM, ``_threshold_select_kernel``)
  for each block size in ``--threshold-elems`` (default: the package's ``THRESHOLD_TILE_ELEMS``),
  with its GEMM blocks alone (so that the difference is the selection's share) and the share of
  its ids equal to the reference run's (the chunked strategy's: cuBLAS may round whole rows
  differently from chunks, so a near-tie can differ); ``--no-chunked`` skips the chunked rows
  (then the threshold strategy at its defaults is the id reference);
- with ``--packed-fallback``, the chunked strategy's packed-keys + ``torch.topk`` path (what runs
  at a K_PAD without a selection tile, or off Triton) beside the selection kernel;
- with ``--select-ab``, the chunked strategy at its defaults four ways: ``_select_buffer_kernel``
  with and without its tile one ahead (``SELECT_AHEAD``) and its register caps
  (``SELECT_MAXNREG``), each checked against the shipped build's ids (with ``--expander``, the
  expander's chunked strategy the same four ways);
- with ``--expander``, ``expander_encode`` instead: the fused strategy for each (BLOCK_B, BLOCK_N,
  warps) given in ``--tiles`` (defaults: the package's tile and seven others), then the chunked
  strategy for each ``--chunks`` size, at B=4096 n=2**20 d=7 unless told.
Prints a markdown table; benchmarks/RESULTS.md keeps the runs that chose the defaults.

    python benchmarks/encode_sweep.py --k 256 --packed-fallback --tiles 8x256x4
    python benchmarks/encode_sweep.py --expander --B 4096 --n 1048576 --d 7
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

te = importlib.import_module("topk_kernels.topk_encode")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CHUNK_ELEMS = [8 * 2**20, 32 * 2**20, 64 * 2**20]
SELECT_TILES = [(8, 128, 4), (64, 128, 8), (32, 128, 4), (16, 128, 4), (8, 256, 4), (8, 64, 2),
                (1, 128, 1), (2, 128, 1), (1, 256, 1), (2, 256, 1), (1, 64, 1, "buffer"), (1, 128, 1, "buffer")]


def parse_tile(text: str) -> tuple:
    """"8x128x4" -> (8, 128, 4), an insertion tile; "1x128x1b" -> (1, 128, 1, "buffer")."""
    tile = tuple(int(v) for v in text.rstrip("b").split("x"))
    return (*tile, "buffer") if text.endswith("b") else tile


SELECT_VARIANTS = {  # name -> (SELECT_AHEAD, register caps on)
    "shipped (tile ahead, caps)": (True, True),
    "tile ahead, no caps": (True, False),
    "no tile ahead, caps": (False, True),
    "no tile ahead, no caps (the kernel before)": (False, False),
}


def select_variants(run, bench):
    """Time ``run`` (a chunked-strategy call returning (acts, ids)) under each of SELECT_VARIANTS
    with ``bench(name, fn, note)``, checking its ids against the shipped variant's; restores the
    package's settings."""
    ahead, caps = te.SELECT_AHEAD, dict(te.SELECT_MAXNREG)
    try:
        want = None
        for name, (on, capped) in SELECT_VARIANTS.items():
            te.SELECT_AHEAD, te.SELECT_MAXNREG = on, (dict(caps) if capped else {})
            ids = run()[1]
            want = ids if want is None else want
            bench(f"select A/B: {name}", run, f"ids same as shipped: {bool(torch.equal(ids, want))}")
    finally:
        te.SELECT_AHEAD, te.SELECT_MAXNREG = ahead, caps


def main(argv=None) -> int:
    from triton.testing import do_bench

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=8192)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--chunks", type=lambda s: [int(v) for v in s.split(",")],
                   help="fp32 elements per GEMM chunk, comma-separated (default: 8Mi,32Mi,64Mi)")
    p.add_argument("--tiles", type=lambda s: [parse_tile(t) for t in s.split(",") if t],
                   help="selection tiles BxNxWARPS (insertion) or 1xNxWARPSb (threshold and sort), "
                        "comma-separated (default: twelve shapes; '' for none)")
    p.add_argument("--no-fused", action="store_true", help="skip the fused strategy's row")
    p.add_argument("--packed-fallback", action="store_true", help="also time the packed-keys chunk path")
    p.add_argument("--threshold", action="store_true", help="also time the threshold strategy (whole rows + "
                   "the threshold kernel) and its GEMM blocks alone")
    p.add_argument("--no-chunked", action="store_true", help="skip the chunked strategy's rows")
    p.add_argument("--threshold-elems", type=lambda s: [int(v) for v in s.split(",")],
                   help="fp32 elements per threshold-strategy block, comma-separated (default: the package's)")
    p.add_argument("--select-ab", action="store_true", help="also time the chunked strategy with and without "
                   "the selection's tile ahead and register caps")
    p.add_argument("--expander", action="store_true", help="sweep expander_encode's tiles instead")
    p.add_argument("--d", type=int, default=7, help="expander degree (with --expander)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("encode_sweep.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.expander:
        return expander_sweep(args)
    dt = DTYPES[args.dtype]
    B, m, n, k = args.B, args.m, args.n, args.k
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, m, device="cuda", generator=g).to(dt)
    w = (torch.randn(n, m, device="cuda", generator=g) / m**0.5).to(dt)
    b = (0.1 * torch.randn(n, device="cuda", generator=g)).to(dt)
    rows = []

    def bench(name, fn, note=""):
        fn()
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
        rows.append((name, ms, note))
        print(f"{name}: {ms:.3f} ms {note}", file=sys.stderr, flush=True)
        return ms

    bench("cuBLAS x @ W.T", lambda: x @ w.T)
    bench("cuBLAS + torch.topk", lambda: torch.topk(torch.addmm(b, x, w.T), k, dim=1))
    want = (te._threshold_forward if args.no_chunked else te._chunked_forward)(x, w, b, k, dt)[1]
    defaults = (te.CHUNK_TILE_ELEMS, dict(te.SELECT_CONFIGS))
    kp = te.pow2(k, lo=min(te.SELECT_CONFIGS))
    for elems in [] if args.no_chunked else args.chunks or CHUNK_ELEMS:
        block_b = min(B, te.CHUNK_MAX_BLOCK_B)
        block_n = min(n, max(1, elems // block_b))

        def gemms():
            for b0 in range(0, B, block_b):
                for s in range(0, n, block_n):
                    if dt == torch.float32:
                        torch.mm(x[b0:b0 + block_b], w[s:s + block_n].T)
                    else:
                        torch.mm(x[b0:b0 + block_b], w[s:s + block_n].T, out_dtype=torch.float32)

        gemm_ms = bench(f"chunk GEMMs alone, {block_b}x{block_n}", gemms)
        for tile in SELECT_TILES if args.tiles is None else args.tiles:
            te.CHUNK_TILE_ELEMS = elems
            te.SELECT_CONFIGS = {**defaults[1], kp: tile}
            got = te._chunked_forward(x, w, b, k, dt)[1]
            same = bool(torch.equal(got, want))
            ms = bench(f"chunked {block_b}x{block_n}, select {tile}", lambda: te._chunked_forward(x, w, b, k, dt))
            rows[-1] = (rows[-1][0], ms, f"selection ~{ms - gemm_ms:.3f} ms; ids same as defaults: {same}")
    te.CHUNK_TILE_ELEMS, te.SELECT_CONFIGS = defaults
    if args.select_ab:
        select_variants(lambda: te._chunked_forward(x, w, b, k, dt), bench)
    if args.packed_fallback:
        # Without a selection tile for this K_PAD the chunks take the packed-keys path.
        te.SELECT_CONFIGS = {p: tile for p, tile in defaults[1].items() if p != kp}
        same = bool(torch.equal(te._chunked_forward(x, w, b, k, dt)[1], want))
        bench("chunked, packed keys + torch.topk per chunk", lambda: te._chunked_forward(x, w, b, k, dt))
        rows[-1] = (*rows[-1][:2], f"ids same as defaults: {same}")
        te.SELECT_CONFIGS = defaults[1]
    if args.threshold:
        elems_default = te.THRESHOLD_TILE_ELEMS
        try:
            for elems in args.threshold_elems or [elems_default]:
                te.THRESHOLD_TILE_ELEMS = elems
                block = te._threshold_block_tokens(n)
                gemm_ms = bench(f"whole-row GEMMs alone, {block} tokens a block",
                                lambda: sum(1 for _ in te._threshold_blocks(x, w)))
                same = (te._threshold_forward(x, w, b, k, dt)[1] == want).double().mean().item()
                ms = bench(f"threshold strategy, {block} tokens a block", lambda: te._threshold_forward(x, w, b, k, dt))
                rows[-1] = (rows[-1][0], ms,
                            f"selection ~{ms - gemm_ms:.3f} ms; ids equal to the reference run's: {same:.6f}")
        finally:
            te.THRESHOLD_TILE_ELEMS = elems_default
    if not args.no_fused:
        bench("fused strategy (defaults)", lambda: te._fused_forward(x, w, b, k, dt))
    print(f"\n### encode sweep: {torch.cuda.get_device_name()}, {args.dtype} B={B} m={m} n={n} k={k}\n")
    print("| what | median ms | note |\n|---|---|---|")
    for name, ms, note in rows:
        print(f"| {name} | {ms:.3f} | {note} |")
    return 0


def expander_sweep(args) -> int:
    from triton.testing import do_bench

    from sae.masks import expander_mask

    ee = importlib.import_module("topk_kernels.expander_encode")
    dt = DTYPES[args.dtype]
    B, m, n, d, k = args.B, args.m, args.n, args.d, args.k
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, m, device="cuda", generator=g).to(dt)
    rows = expander_mask(m, n, d, seed=0).cuda()
    values = (torch.randn(n, d, device="cuda", generator=g) / d**0.5).to(dt)
    bias = (0.1 * torch.randn(n, device="cuda", generator=g)).to(dt)
    kp = ee.pow2(k)
    default = ee.EXPANDER_ENCODE_CONFIGS[kp]
    tiles = args.tiles or [default, (8, 128, 4), (16, 128, 4), (64, 128, 4), (32, 64, 4), (32, 256, 8),
                           (16, 256, 8), (64, 64, 4)]
    dispatcher = ee.expander_strategy
    print(f"\n### expander_encode: {torch.cuda.get_device_name()}, {args.dtype} B={B} m={m} n={n} d={d} "
          f"k={k} (the dispatcher picks {dispatcher(k, dt, x.device)!r})\n\n"
          f"| strategy, tile or chunk | median ms | ids same as the fused default |\n|---|---|---|")
    fn = lambda: ee.expander_encode(x, values, rows, bias, k, check_rows=False)  # noqa: E731
    chunk_default = ee.EXPANDER_CHUNK_ELEMS
    try:
        ee.expander_strategy = lambda *a: "fused"
        want = fn()[1]
        for tile in tiles:
            ee.EXPANDER_ENCODE_CONFIGS[kp] = tuple(tile)
            same = bool(torch.equal(fn()[1], want))
            ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            print(f"| fused {tuple(tile)}{' (default)' if tuple(tile) == default else ''} | {ms:.3f} | {same} |",
                  flush=True)
        ee.EXPANDER_ENCODE_CONFIGS[kp] = default
        ee.expander_strategy = lambda *a: "chunked"
        for elems in [] if args.no_chunked else args.chunks or [8 * 2**20, chunk_default]:
            ee.EXPANDER_CHUNK_ELEMS = elems
            same = bool(torch.equal(fn()[1], want))
            ms = do_bench(fn, warmup=20, rep=200, return_mode="median")
            print(f"| chunked, {elems // 2**20} Mi pre-activations a chunk | {ms:.3f} | {same} |", flush=True)
        if args.select_ab:
            ee.EXPANDER_CHUNK_ELEMS = chunk_default

            def bench(name, run, note):
                ms = do_bench(run, warmup=20, rep=200, return_mode="median")
                print(f"| chunked ({chunk_default // 2**20} Mi), {name} | {ms:.3f} | {note} |", flush=True)

            select_variants(fn, bench)
    finally:
        ee.expander_strategy = dispatcher
        ee.EXPANDER_ENCODE_CONFIGS[kp] = default
        ee.EXPANDER_CHUNK_ELEMS = chunk_default
    return 0


if __name__ == "__main__":
    sys.exit(main())
