"""A prediction, without a GPU, of the chunked encoder's selection kernel per tile: how many
instructions each row costs, from the sm_90 SASS and a simulated count of insertion passes.

    python benchmarks/select_tile_model.py [--k-pads 64,128,256,512,1024] [--tiles 8x128x4,1x128x1,...]

For each K_PAD and tile (BLOCK_B rows x BLOCK_N latents, warps), ``_chunked_forward`` is launched
on meta tensors at the benchmark shape (B=8192, m=2048, n=131072, bf16) through
tests/gpu_compile.py, and the ``_select_kernel`` it launches is compiled for sm_90 with ptxas. From
the SASS: registers, CTAs per SM, the insertion pass (the innermost loop of ``_topk.fold_tile``)
in instructions per warp and its ``BAR.SYNC`` count, and the rest of a tile's loop. A simulation
then counts passes: a row inserts, in each tile, the entries that are in the top K_PAD of all it
has seen so far (fold_tile inserts best first, one per row per pass), and a program makes as many
passes per tile as its busiest row (the loop runs until every row of the block is done). The
pre-activations are Gaussian plus a per-latent bias of scale 0.1, like a trained SAE's.

Warp instructions per row = (tiles x rest-of-tile + passes x pass) x warps / rows. Lower predicts
faster when the kernel is issue-bound; barriers and occupancy decide when it is latency-bound
(both favour 1-warp tiles). benchmarks/RESULTS.md ("Selection tiles of one warp") keeps the table
and what it predicts; a GPU measures it with benchmarks/encode_sweep.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = dict(B=8192, m=2048, n=131072)


def simulated_insertions(k_pad: int, block_n: int, rows: int = 64, n: int = SHAPE["n"], seed: int = 0) -> np.ndarray:
    """[rows, n / block_n] entries each row inserts per tile (those in the top k_pad of the prefix)."""
    rng = np.random.default_rng(seed)
    pre = rng.standard_normal((rows, n)).astype(np.float32) + 0.1 * rng.standard_normal(n).astype(np.float32)
    counts = np.zeros((rows, n // block_n), dtype=np.int64)
    running = np.full((rows, k_pad), -np.inf, dtype=np.float32)
    for t in range(n // block_n):
        tile = pre[:, t * block_n:(t + 1) * block_n]
        both = np.concatenate([running, tile], axis=1)
        running = np.partition(both, -k_pad, axis=1)[:, -k_pad:]
        counts[:, t] = (tile >= running.min(axis=1, keepdims=True)).sum(axis=1)
    return counts


def sass_loops(k_pad: int, tile: tuple[int, int, int]) -> dict:
    """Compile the selection kernel as ``_chunked_forward`` launches it with this tile (sm_90)."""
    import torch

    import gpu_compile as gc

    te = gc._mod("topk_encode")
    saved = dict(te.SELECT_CONFIGS)
    te.SELECT_CONFIGS[k_pad] = tile
    try:
        spec = gc.Spec("topk_encode", "model", lambda: te._chunked_forward(
            gc._t(SHAPE["B"], SHAPE["m"], dtype="bf16"), gc._t(SHAPE["n"], SHAPE["m"], dtype="bf16"),
            gc._t(SHAPE["n"], dtype="bf16"), k_pad, torch.bfloat16))
        with contextlib.redirect_stderr(io.StringIO()):
            launch = next(lc for lc in gc.capture(spec, 90) if lc.kernel.__name__ == "_select_kernel")
            report = gc.compile_launch(launch, 90)
            text = gc.disassemble(gc.compile_quietly(launch, 90).asm["cubin"])
    finally:
        te.SELECT_CONFIGS.clear()
        te.SELECT_CONFIGS.update(saved)
    instrs, all_loops = gc.sass_loops(text)
    # Real loops only (not the trailing self-branch): the insertion pass is the smallest, the
    # tile loop around it the largest.
    loops = sorted({(s, e) for s, e in all_loops if e - s > 2}, key=lambda se: se[1] - se[0])
    (p0, p1), (t0, t1) = loops[0], loops[-1]
    return {"registers": report["registers"], "spills": report["spill_stores"] + report["spill_loads"],
            "ctas_per_sm": report["ctas_per_sm"], "pass": p1 - p0 + 1,
            "pass_barriers": sum("BAR.SYNC" in i for i in instrs[p0:p1 + 1]),
            "rest_of_tile": (t1 - t0 + 1) - (p1 - p0 + 1) if (t0, t1) != (p0, p1) else 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k-pads", default="64,128,256")
    ap.add_argument("--tiles", default=None, help="BxNxWARPS,... (default: the measured tile and 1-warp tiles)")
    args = ap.parse_args(argv)
    default_tiles = {64: "8x128x4,1x128x1,2x128x1,2x256x1", 128: "8x128x4,1x128x1,2x128x1",
                     256: "8x256x4,1x256x1,2x256x1,1x128x1", 512: "1x128x1,1x256x1,1x512x1,1x256x2",
                     1024: "1x128x1,1x256x1,1x64x1"}
    print("| K_PAD | tile (rows x latents, warps) | registers | spills | CTAs/SM | instrs per insertion pass "
          "(warp) | BAR.SYNC per pass | other instrs per tile (warp) | passes per program (simulated) "
          "| warp instructions per row |")
    print("|" + "---|" * 10)
    for k_pad in (int(v) for v in args.k_pads.split(",")):
        sims = {}
        for spec in (args.tiles or default_tiles.get(k_pad, "8x128x4,1x128x1")).split(","):
            rows, block_n, warps = (int(v) for v in spec.split("x"))
            if block_n not in sims:
                sims[block_n] = simulated_insertions(k_pad, block_n)
            counts = sims[block_n]
            passes = counts.reshape(-1, rows, counts.shape[1]).max(axis=1).sum(axis=1).mean()
            s = sass_loops(k_pad, (rows, block_n, warps))
            per_row = (counts.shape[1] * s["rest_of_tile"] + passes * s["pass"]) * warps / rows
            print(f"| {k_pad} | {rows} x {block_n}, {warps} | {s['registers']} | {s['spills']} | {s['ctas_per_sm']} "
                  f"| {s['pass']} | {s['pass_barriers']} | {s['rest_of_tile']} | {passes:.0f} | {per_row / 1e3:.0f}K |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
