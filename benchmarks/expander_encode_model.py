"""PREDICTIONS for the fused expander encoder on an H100 without a GPU (issue 9, items 4 and 5).

For each build of ``_expander_encode_fwd_kernel`` at the benchmark size of tests/gpu_compile.py
(B=4096, m=2048, n=2**20, d=7, k=64; fp32 and bf16; sm_90, H100 SXM grid), from the launch plan
and the compiled SASS:

- sectors per gathered value and bytes per launch (``gpu_compile.expander_encode_plan``): L2
  traffic in 32-byte sectors (gathers, and the rows / values / bias every token block reads) and
  HBM bytes (each tensor once: a lower bound, as everything but rows/values fits in the 50 MB L2);
- static SASS: instructions, and instructions x warps / tile elements (per pre-activation);
- dynamic warp instructions per pre-activation: per tile, ceil(d / DEGREES_PER_TRIP) trips of the
  gather loop (1 degree a trip in builds before it; floor(d / DEGREES_PER_TRIP) where an odd d's
  first degree runs apart, the launch's ``ODD_APART``), the tile's straight-line code, and
  (insertion top-k) the insertion loop times its passes per tile, which are simulated with iid
  normal pre-activations (tile after tile, a pass per entry that enters the running top-K_PAD of
  the slowest row);
- a predicted time: the largest of L2 bytes / 5.5 TB/s (an assumption), HBM bytes / 3.35 TB/s and
  warp instructions / (132 SMs x 4 per clock x 1.755 GHz), for work spread evenly over the GPU;
  ``waves`` (programs / resident CTAs) tells how far a partly filled last wave can stretch it;
- the token slabs an SM's resident CTAs gather from (CTAs x BLOCK_B x (m + 1) x element bytes of x
  transposed): each CTA works on its own token block, so where they add up to more than the SM's L1
  (at most 256 KiB on an H100, less the shared memory), the gathers go to L2. The L2 column
  assumes they all do.

    python benchmarks/expander_encode_model.py                  # this checkout
    python benchmarks/expander_encode_model.py --tree /tmp/old  # another checkout's package
    python benchmarks/expander_encode_model.py --tiles 32x512x16,16x256x8  # other K_PAD=64 tiles

Runs without TRITON_INTERPRET (it compiles with the ptxas in Triton's wheel).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import gpu_compile as gc  # noqa: E402  (the machinery; the package is imported from --tree)

H100 = dict(hbm=3.35e12, l2=5.5e12, sms=132, clock=1.755e9, issue=4)
ARCH = 90


def loop_sizes(sass: str) -> dict:
    """Instructions of the gather loop (the innermost loop with a global load), of the tile loop
    (the smallest loop around it) and of the insertion loop (the largest innermost loop without a
    global load, 0 when there is none), and in all."""
    instrs, all_loops = gc.sass_loops(sass)
    loops = sorted({(s, e) for s, e in all_loops if s < e})
    inner = gc.innermost_loops(loops)
    has_load = {(s, e): any("LDG" in i for i in instrs[s:e + 1]) for s, e in inner}
    gather = max((lp for lp in inner if has_load[lp]), key=lambda lp: lp[1] - lp[0])
    tile = min((lp for lp in loops if lp[0] <= gather[0] and gather[1] <= lp[1] and lp != gather),
               key=lambda lp: lp[1] - lp[0])
    fold = [lp for lp in inner if not has_load[lp] and tile[0] <= lp[0] and lp[1] <= tile[1]]
    size = lambda lp: lp[1] - lp[0] + 1  # noqa: E731
    return {"total": len(instrs), "gather": size(gather), "tile": size(tile),
            "fold": max((size(lp) for lp in fold), default=0)}


def passes_per_tile(block_b: int, block_n: int, k_pad: int, tiles: int, seed: int = 0) -> float:
    """Mean insertion passes per tile of ``_topk.fold_tile`` over one program's tiles: per tile, the
    most entries that enter the running top-k_pad of any of its rows (iid normal values)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    running = torch.full((block_b, k_pad), -float("inf"))
    total = 0
    for _ in range(tiles):
        top = torch.cat([running, torch.randn(block_b, block_n, generator=gen)], 1).topk(k_pad, dim=1)
        total += int((top.indices >= k_pad).sum(1).max())
        running = top.values
    return total / tiles


def predict(label: str, launch, insertion: bool) -> dict:
    args = gc.launch_arguments(launch)
    plan = gc.expander_encode_plan(args)
    stats = gc.compile_launch(launch, ARCH)
    loops = loop_sizes(gc.launch_asm(launch, ARCH)["sass"])
    bb, bn, k_pad, d = args["BLOCK_B"], args["BLOCK_N"], args["K_PAD"], args["D"]
    warps, tiles = stats["num_warps"], args["TILES_PER_SPLIT"]
    passes = passes_per_tile(bb, bn, k_pad, tiles) if insertion else 0.0
    straight = loops["tile"] - loops["gather"] - loops["fold"]
    per_trip = getattr(importlib.import_module("topk_kernels.expander_encode"), "DEGREES_PER_TRIP", 1)
    # An odd degree run apart from the loop is in the tile's straight-line code already.
    trips = d // per_trip if args.get("ODD_APART", False) else -(-d // per_trip)
    per_tile = warps * (trips * loops["gather"] + straight + passes * loops["fold"])
    programs = plan["token_blocks"] * plan["splits"]
    instr = programs * tiles * per_tile
    l2 = plan["gather_bytes_l2"] + plan["atom_bytes_l2"] + plan["cand_bytes"]
    t_l2, t_hbm = l2 / H100["l2"], plan["hbm_bytes"] / H100["hbm"]
    t_issue = instr / (H100["sms"] * H100["issue"] * H100["clock"])
    return {
        "label": label, "tile": f"{bb}x{bn}, {warps} warps", "registers": stats["registers"],
        "spills": stats["spill_stores"] + stats["spill_loads"], "ctas_per_sm": stats["ctas_per_sm"],
        "sectors_per_value": plan["sectors_per_value"], "gather_gb": plan["gather_bytes_l2"] / 1e9,
        "l2_gb": l2 / 1e9, "hbm_mb": plan["hbm_bytes"] / 1e6,
        "sass": loops["total"], "static_per_pre": loops["total"] * warps / (bb * bn),
        "loops": f"{loops['gather']} / {straight} / {loops['fold']}", "passes": passes,
        "dynamic_per_pre": per_tile / (bb * bn), "t_l2_ms": 1e3 * t_l2, "t_hbm_ms": 1e3 * t_hbm,
        "t_issue_ms": 1e3 * t_issue, "predicted_ms": 1e3 * max(t_l2, t_hbm, t_issue),
        "waves": programs / (stats["ctas_per_sm"] * H100["sms"]),
        "slab_kib": stats["ctas_per_sm"] * bb * args["xt_ptr"].shape[0] * plan["elt_bytes"] / 1024,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose topk_kernels to model")
    parser.add_argument("--name", default=None, help="build name for the table")
    parser.add_argument("--tiles", default="", help="comma-separated BxNxWARPS tiles to model at K_PAD=64 in "
                        "place of the shipped one (e.g. 32x512x16)")
    opts = parser.parse_args(argv)
    sys.path.insert(0, str(opts.tree.resolve()))
    for mod in [m for m in sys.modules if m.startswith("topk_kernels")]:
        del sys.modules[mod]
    pkg = importlib.import_module("topk_kernels")
    if not Path(pkg.__file__).resolve().is_relative_to(opts.tree.resolve()):
        raise SystemExit(f"--tree: topk_kernels came from {pkg.__file__}, not {opts.tree}")
    te = importlib.import_module("topk_kernels.topk_encode")
    if not hasattr(te, "tensor_core_generation"):  # builds before it: gpu_compile patches it
        te.tensor_core_generation = lambda device: 0
    ee = importlib.import_module("topk_kernels.expander_encode")
    insertion = "fold_tile" in Path(ee.__file__).read_text()
    name = opts.name or str(opts.tree)
    print(f"| build | dtype | tile | regs | spills | CTAs/SM | token slabs KiB/SM | sectors / gathered value "
          f"| gather L2 GB | L2 GB | HBM MB | SASS | static / pre-act | loops gather / tile / insertion "
          f"| passes / tile | dynamic / pre-act | L2 ms | HBM ms | issue ms | PREDICTED ms | waves |")
    print("|" + "---|" * 21)
    k_pad = gc.EXPANDER["k"]
    shipped = ee.EXPANDER_ENCODE_CONFIGS[k_pad]
    tiles = [tuple(int(v) for v in t.split("x")) for t in opts.tiles.split(",") if t] or [shipped]
    for tile in tiles:
        ee.EXPANDER_ENCODE_CONFIGS[k_pad] = tile
        for spec in gc._expander_encode_specs():
            if spec.label.startswith("chunked") or not spec.label.endswith(f",K_PAD={k_pad}"):
                continue
            (launch,) = gc.capture(spec, ARCH)
            if gc.compile_launch(launch, ARCH)["ctas_per_sm"] == 0:  # too many registers for one CTA an SM
                print(f"| {name} | {spec.label.split(',')[0]} | {tile} | 0 CTAs an SM: cannot launch |", flush=True)
                continue
            r = predict(spec.label, launch, insertion)
            print(f"| {name} | {spec.label.split(',')[0]} | {r['tile']} | {r['registers']} | {r['spills']} "
                  f"| {r['ctas_per_sm']} | {r['slab_kib']:.0f} | {r['sectors_per_value']:.4g} | {r['gather_gb']:.0f} "
                  f"| {r['l2_gb']:.0f} | {r['hbm_mb']:.0f} | {r['sass']} | {r['static_per_pre']:.2f} | {r['loops']} "
                  f"| {r['passes']:.2f} | {r['dynamic_per_pre']:.2f} | {r['t_l2_ms']:.1f} | {r['t_hbm_ms']:.2f} "
                  f"| {r['t_issue_ms']:.1f} | {r['predicted_ms']:.1f} | {r['waves']:.2f} |", flush=True)
    ee.EXPANDER_ENCODE_CONFIGS[k_pad] = shipped
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
