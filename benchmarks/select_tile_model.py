"""A prediction, without a GPU, of the chunked encoder's selection kernel per tile: how many
instructions each row costs, from the sm_90 SASS and a simulated count of insertion passes.

    python benchmarks/select_tile_model.py [--k-pads 64,128,256,512,1024,2048] [--tiles 8x128x4,1x128x1,...]

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

Tiles ending in ``b`` (``1x128x1b``) are ``_select_buffer_kernel``'s threshold-append-merge
scheme. From its SASS: the fast path of a tile (nothing beats the threshold), the extra cost of a
tile that appends, and a flush (sort the max(K_PAD, BLOCK_N) spare slots, merge their best K_PAD
into the K_PAD held keys), taken from the loop's two forward branches (``if n_new > 0`` and ``if
count + n_new > CAP``). The simulation counts, per row, the tiles that append and the flushes
(with the last chunk's final one). Warp instructions per row = (tiles x fast path + appending
tiles x append + flushes x flush) x warps. A last table repeats it with each row cut into 2 and 4
latent splits, as the launcher cuts rows when they alone leave SMs idle: what a split costs.
RESULTS.md, "Selection by threshold, append and merge".
"""

from __future__ import annotations

import argparse
import functools
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


@functools.lru_cache(maxsize=None)  # tiles of one width share it (and split_costs' one split)
def simulated_buffer(k_pad: int, block_n: int, rows: int = 16, n: int = SHAPE["n"], seed: int = 0) -> dict:
    """Mean per row of ``_select_buffer_kernel``'s work on the same pre-activations (one latent
    split): tiles that append (some entry beats the threshold) and flushes (the buffer of K_PAD
    held keys, empty at the start, and max(K_PAD, BLOCK_N) spare slots overflows, as the launcher
    sizes it; and the final flush)."""
    cap = k_pad + max(k_pad, block_n)
    rng = np.random.default_rng(seed)
    pre = rng.standard_normal((rows, n)).astype(np.float32) + 0.1 * rng.standard_normal(n).astype(np.float32)
    appending = flushes = 0
    for r in range(rows):
        held, threshold = [-np.inf] * k_pad, -np.inf
        for t in range(n // block_n):
            tile = pre[r, t * block_n:(t + 1) * block_n]
            new = tile[tile > threshold]
            if new.size == 0:
                continue
            if len(held) + new.size > cap:
                held = sorted(held, reverse=True)[:k_pad]
                threshold, flushes = held[-1], flushes + 1
                new = tile[tile > threshold]
            held.extend(new.tolist())
            appending += 1
        flushes += len(held) > k_pad  # the last chunk's final flush
    return {"appending": appending / rows, "flushes": flushes / rows}


def buffer_row_cost(s: dict, sim: dict, block_n: int, warps: int, n_splits: int = 1, of: str = "") -> float:
    """Warp instructions per row of the buffer kernel: (tiles x fast path + splits x (appending
    tiles x append + flushes x flush)) x warps, from ``buffer_paths`` counts ``s`` and a
    ``simulated_buffer`` of one split ``sim``. ``of="_shfl"`` counts the shuffles among them."""
    tiles = SHAPE["n"] // block_n
    return (tiles * s["fast" + of]
            + n_splits * (sim["appending"] * s["append" + of] + sim["flushes"] * s["flush" + of])) * warps


def split_costs(k_pad: int, block_n: int, s: dict, warps: int, splits=(1, 2, 4)) -> dict:
    """Warp instructions per row of the buffer kernel when the launcher cuts each row into
    ``splits`` latent splits: every split fills its own K_PAD held keys, so it appends and
    flushes more. {splits: per row}."""
    return {n_splits: buffer_row_cost(s, simulated_buffer(k_pad, block_n, n=SHAPE["n"] // n_splits), block_n,
                                      warps, n_splits) for n_splits in splits}


def print_table(title: str, header: list[str], rows: list[str]) -> None:
    print(f"{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(rows) + "\n")


def sass_loops(k_pad: int, tile: tuple) -> dict:
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
            launch = next(lc for lc in gc.capture(spec, 90)
                          if lc.kernel.__name__ in ("_select_kernel", "_select_buffer_kernel"))
            report = gc.compile_launch(launch, 90)
            text = gc.launch_asm(launch, 90)["sass"]
    finally:
        te.SELECT_CONFIGS.clear()
        te.SELECT_CONFIGS.update(saved)
    instrs, all_loops = gc.sass_loops(text)
    common = {"registers": report["registers"], "spills": report["spill_stores"] + report["spill_loads"],
              "ctas_per_sm": report["ctas_per_sm"]}
    if len(tile) == 4:
        return common | buffer_paths(text)
    # Real loops only (not the trailing self-branch): the insertion pass is the smallest, the
    # tile loop around it the largest.
    loops = sorted({(s, e) for s, e in all_loops if e - s > 2}, key=lambda se: se[1] - se[0])
    (p0, p1), (t0, t1) = loops[0], loops[-1]
    return common | {"pass": p1 - p0 + 1,
            "pass_barriers": sum("BAR.SYNC" in i for i in instrs[p0:p1 + 1]),
            "rest_of_tile": (t1 - t0 + 1) - (p1 - p0 + 1) if (t0, t1) != (p0, p1) else 0,
            "pass_shfl": _shfl(instrs[p0:p1 + 1]),
            "rest_shfl": _shfl(instrs[t0:t1 + 1]) - _shfl(instrs[p0:p1 + 1]) if (t0, t1) != (p0, p1) else 0}


def _shfl(instrs: list[str]) -> int:
    """Warp shuffles among SASS instructions: sm_90 issues one a clock per SM, against four of
    the integer and select instructions, so a shuffle-heavy path runs below the issue rate."""
    return sum("SHFL" in i for i in instrs)


def buffer_paths(text: str) -> dict:
    """Instructions (per warp) of ``_select_buffer_kernel``'s tile loop by path, from its SASS: the
    first conditional forward branch in the loop skips a tile where nothing enters, the second
    skips the flush. fast = the loop without both regions; append = the first region without
    the flush; flush = the second region."""
    import gpu_compile as gc

    instrs, labels, branches = gc.sass_listing(text)
    _, loops = gc.sass_loops(text)
    s, e = max(((a, b) for a, b in loops if b - a > 2), key=lambda ab: ab[1] - ab[0])
    # Conditional forward branches inside the tile loop, as (index, target index).
    inner = [(at, labels[t]) for at, t in branches
             if instrs[at].startswith("@") and s < at < e and at < labels.get(t, -1) <= e]
    (a, skip_all), (b, skip_flush) = inner[0], inner[1]
    flush = skip_flush - b - 1
    if not (a < b < skip_flush <= skip_all) or not any("BAR.SYNC" in i for i in instrs[b:skip_flush]):
        raise RuntimeError("the buffer kernel's SASS does not have the expected shape")
    fast, append = instrs[s:a + 1] + instrs[skip_all:e + 1], instrs[a + 1:b + 1] + instrs[skip_flush:skip_all]
    return {"fast": len(fast), "append": len(append), "flush": flush,
            "fast_barriers": sum("BAR.SYNC" in i for i in fast),
            "fast_shfl": _shfl(fast), "append_shfl": _shfl(append), "flush_shfl": _shfl(instrs[b + 1:skip_flush])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k-pads", default="64,128,256")
    ap.add_argument("--tiles", default=None,
                    help="BxNxWARPS (insertion) or 1xNxWARPSb (threshold and sort), comma-separated "
                         "(default: the measured tile, 1-warp tiles and the buffer tiles)")
    args = ap.parse_args(argv)
    default_tiles = {64: "8x128x4,1x128x1,2x128x1,2x256x1,1x64x1b,1x128x1b",
                     128: "8x128x4,1x128x1,2x128x1,1x128x1b",
                     256: "8x256x4,1x256x1,2x256x1,1x128x1,1x128x1b,1x256x1b",
                     512: "1x128x1,1x256x1,1x512x1,1x256x2,1x128x1b,1x256x1b,1x128x2b",
                     1024: "1x128x1,1x256x1,1x64x1,1x128x1b,1x256x1b,1x128x2b,1x256x2b",
                     2048: "1x256x2b,1x256x4b,1x512x4b,1x256x8b"}
    insertion, buffer, splitting = [], [], []
    for k_pad in (int(v) for v in args.k_pads.split(",")):
        sims = {}
        for spec in (args.tiles or default_tiles.get(k_pad, "8x128x4,1x128x1")).split(","):
            buffered = spec.endswith("b")
            rows, block_n, warps = (int(v) for v in spec.rstrip("b").split("x"))
            if buffered:
                sim = simulated_buffer(k_pad, block_n)
                s = sass_loops(k_pad, (rows, block_n, warps, "buffer"))
                per_row = buffer_row_cost(s, sim, block_n, warps)
                shfl = buffer_row_cost(s, sim, block_n, warps, of="_shfl")
                buffer.append(f"| {k_pad} | 1 x {block_n}, {warps} | {s['registers']} | {s['spills']} "
                              f"| {s['ctas_per_sm']} | {s['fast']} | {s['fast_barriers']} | {s['append']} "
                              f"| {s['flush']} | {sim['appending']:.0f} | {sim['flushes']:.1f} | {per_row / 1e3:.0f}K "
                              f"| {shfl / 1e3:.0f}K |")
                print(buffer[-1], file=sys.stderr, flush=True)
                costs = split_costs(k_pad, block_n, s, warps)
                extra = (costs[2] - costs[1]) / (s["fast"] * warps)
                splitting.append(f"| {k_pad} | 1 x {block_n}, {warps} | "
                                 + " | ".join(f"{v / 1e3:.0f}K" for v in costs.values())
                                 + f" | {extra:.0f} | {extra / (2 * k_pad):.2f} |")
                continue
            if block_n not in sims:
                sims[block_n] = simulated_insertions(k_pad, block_n)
            counts = sims[block_n]
            passes = counts.reshape(-1, rows, counts.shape[1]).max(axis=1).sum(axis=1).mean()
            s = sass_loops(k_pad, (rows, block_n, warps))
            per_row = (counts.shape[1] * s["rest_of_tile"] + passes * s["pass"]) * warps / rows
            shfl = (counts.shape[1] * s["rest_shfl"] + passes * s["pass_shfl"]) * warps / rows
            insertion.append(f"| {k_pad} | {rows} x {block_n}, {warps} | {s['registers']} | {s['spills']} "
                             f"| {s['ctas_per_sm']} | {s['pass']} | {s['pass_barriers']} | {s['rest_of_tile']} "
                             f"| {passes:.0f} | {per_row / 1e3:.0f}K | {shfl / 1e3:.0f}K |")
            print(insertion[-1], file=sys.stderr, flush=True)
    tile = ["K_PAD", "tile (rows x latents, warps)"]
    if insertion:
        print_table("Insertion (`_select_kernel`)", tile + [
            "registers", "spills", "CTAs/SM", "instrs per insertion pass (warp)", "BAR.SYNC per pass",
            "other instrs per tile (warp)", "passes per program (simulated)", "warp instructions per row",
            "of them SHFL"], insertion)
    if buffer:
        print_table("Threshold, append and merge (`_select_buffer_kernel`)", tile + [
            "registers", "spills", "CTAs/SM", "fast path per tile (warp)", "BAR.SYNC in it", "append, extra (warp)",
            "flush (warp)", "appending tiles per row (simulated)", "flushes per row (simulated)",
            "warp instructions per row", "of them SHFL"], buffer)
        print_table("Latent splits (`_select_buffer_kernel`): every split of a row fills its own K_PAD keys", tile + [
            "warp instructions per row, 1 split", "2 splits", "4 splits", "a second split, in fast-path tiles",
            "the same, x 2 x K_PAD"], splitting)
    return 0


if __name__ == "__main__":
    sys.exit(main())
