"""Predicted H100 time of the fused TopK encoder, without a GPU (a PREDICTION, not a measurement).

    python benchmarks/encoder_roofline.py                      # B=8192, m=2048, n=131072, k=64, bf16
    python benchmarks/encoder_roofline.py --B 4096 --m 768 --n 24576 --k 32

It predicts both CUDA strategies of ``topk_encode``: the fused kernel and the chunked one.

It compiles the kernel exactly as ``topk_encode``'s launcher launches it for sm_90
(tests/gpu_compile.py: registers, shared memory, CTAs per SM, the SASS loop sizes), takes the grid
from the launcher's own occupancy rule (``_topk.latent_splits``), and counts the insertion passes
of ``_topk.fold_tile`` by replaying one program's latent scan on Gaussian pre-activations (real
SAE pre-activations are not Gaussian; more insertions late in the scan would cost more). From
those it gives one floor per resource (each is a lower bound; the largest is the prediction):

- tensor cores: 2*B*n*m FLOPs at 989 TFLOP/s dense bf16 over the SMs the grid keeps busy;
- instruction issue: every warp's instructions (tensor-core loop x k-steps x tiles + the tile's
  other code + insertion passes x the insertion loop) at 4 warp-instructions per clock per SM;
- the same, serialised: the GEMM at the tensor-core rate, then the insertion passes, since one
  CTA per SM leaves nothing to overlap them with;
- L2 -> SM traffic: x re-read per latent tile, W per token block, at an ASSUMED L2 bandwidth
  (5.5 TB/s as used elsewhere in RESULTS.md; a 10 TB/s row shows how much rests on it);
- HBM: x, W and the candidates once at 3.35 TB/s.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

H100 = dict(sms=132, clock=1.755e9, issue=4, bf16_flops=989e12, hbm=3.35e12)
L2_ASSUMED = (5.5e12, 10e12)


def insertion_passes(rows: int, tiles: int, block_n: int, k_pad: int, seed: int = 0) -> int:
    """Passes of ``fold_tile`` over one program's scan: per tile, the most insertions any of its
    rows needs (the loop runs until every row is done)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    running = torch.full((rows, k_pad), -math.inf)
    passes = 0
    for _ in range(tiles):
        tile = torch.randn(rows, block_n, generator=g)
        both = torch.cat([running, tile], 1)
        top = both.topk(k_pad, dim=1).values
        passes += int((tile >= top[:, -1:]).sum(1).max())
        running = top
    return passes


def predict(B: int, m: int, n: int, k: int) -> dict:
    import gpu_compile as gc
    import torch

    te = gc._mod("topk_encode")
    topk = gc._mod("_topk")
    spec = gc.Spec("topk_encode", "bf16", lambda: te._fused_forward(
        gc._t(B, m, dtype="bf16"), gc._t(n, m, dtype="bf16"), gc._t(n, dtype="bf16"), k, torch.bfloat16))
    (launch,) = gc.capture(spec, 90)
    row = gc.compile_launch(launch, 90)
    ce = row["constexprs"]
    block_b, block_n, block_m, k_pad = ce["BLOCK_B"], ce["BLOCK_N"], ce["BLOCK_M"], ce["K_PAD"]
    warps, ctas = row["num_warps"], row["ctas_per_sm"]
    token_blocks, n_tiles = -(-B // block_b), -(-n // block_n)
    splits = topk._fewest_waves_splits(token_blocks, n_tiles, H100["sms"] * ctas,
                                       te._fill_cost_tiles(m, block_m, k_pad))
    per = -(-n_tiles // splits)
    programs = token_blocks * splits
    waves = -(-programs // (H100["sms"] * ctas))
    busy_sms = min(H100["sms"], -(-programs // waves) / ctas)
    passes = insertion_passes(min(block_b, B), per, block_n, k_pad)

    k_steps = -(-m // block_m)
    mma_loop = row["mma_loop_instructions"]
    fold_loop = row["main_loop_instructions"] if row["main_loop_instructions"] != mma_loop else 0
    other = row["sass_instructions"] - mma_loop - fold_loop  # per tile at most: straight-line code
    gemm_warp = per * (k_steps * mma_loop + other)
    fold_warp = passes * fold_loop
    per_sm_clock = H100["issue"] * H100["clock"]
    t_issue = waves * ctas * warps * (gemm_warp + fold_warp) / per_sm_clock
    t_tensor = 2 * B * n * m / (H100["bf16_flops"] * busy_sms / H100["sms"])
    t_fold = waves * ctas * warps * fold_warp / per_sm_clock
    l2_bytes = 2 * B * m * n_tiles + 2 * n * m * token_blocks + 8 * B * splits * k_pad
    hbm_bytes = 2 * B * m + 2 * n * m + 8 * B * splits * k_pad
    return {
        "shape": f"B={B} m={m} n={n} k={k} bf16", "tile": f"{block_b}x{block_n}x{block_m}, {warps} warps",
        "registers": row["registers"], "spills": row["spill_stores"], "ctas_per_sm": ctas,
        "grid": f"{token_blocks} x {splits} = {programs} programs, {waves} wave(s), {per} tiles each",
        "sass": row["sass_instructions"], "mma_loop": mma_loop, "fold_loop": fold_loop,
        "static_per_element": row["sass_instructions"] * warps / (block_b * block_n),
        "insertion_passes": passes,
        "ms": {
            "tensor cores": 1e3 * t_tensor,
            "instruction issue": 1e3 * t_issue,
            "GEMM at the tensor rate, then the insertions": 1e3 * (t_tensor + t_fold),
            **{f"L2 -> SM {l2_bytes / 1e9:.1f} GB at {bw / 1e12:g} TB/s (assumed)": 1e3 * l2_bytes / bw
               for bw in L2_ASSUMED},
            f"HBM {hbm_bytes / 1e9:.2f} GB": 1e3 * hbm_bytes / H100["hbm"],
        },
    }


def predict_chunked(B: int, m: int, n: int, k: int, gemm_efficiency=(0.7, 0.8)) -> dict:
    """The chunked strategy: cuBLAS bf16 GEMMs per chunk (at ``gemm_efficiency`` of the dense
    peak: an assumption about cuBLAS, not a measurement) and one ``_select_kernel`` pass per
    chunk, the two in sequence on one stream."""
    import gpu_compile as gc
    import torch

    te = gc._mod("topk_encode")
    topk = gc._mod("_topk")
    spec = gc.Spec("topk_encode", "chunked", lambda: te._chunked_forward(
        gc._t(B, m, dtype="bf16"), gc._t(n, m, dtype="bf16"), gc._t(n, dtype="bf16"), k, torch.bfloat16))
    launches = gc.capture(spec, 90)
    row = gc.compile_launch(launches[0], 90)
    ce = row["constexprs"]
    block_b, block_n, k_pad = ce["BLOCK_B"], ce["BLOCK_N"], ce["K_PAD"]
    warps, ctas = row["num_warps"], row["ctas_per_sm"]
    chunk_b = min(B, te.CHUNK_MAX_BLOCK_B)
    chunk_n = min(n, max(1, te.CHUNK_TILE_ELEMS // chunk_b))
    token_blocks, chunk_tiles = -(-chunk_b // block_b), -(-chunk_n // block_n)
    splits = topk._fewest_waves_splits(token_blocks, chunk_tiles, H100["sms"] * ctas, 0.0)
    tiles = -(-n // block_n) // splits  # per program, over every chunk
    waves = -(-token_blocks * splits // (H100["sms"] * ctas)) * -(-B // chunk_b)
    passes = insertion_passes(min(block_b, B), tiles, block_n, k_pad)
    fold_loop = row["main_loop_instructions"]
    other = row["sass_instructions"] - fold_loop
    per_sm_clock = H100["issue"] * H100["clock"]
    t_select_issue = waves * ctas * warps * (tiles * other + passes * fold_loop) / per_sm_clock
    t_select_bytes = (4 * B * n + 8 * B * splits * k_pad) / H100["hbm"]
    t_gemm = [2 * B * n * m / (H100["bf16_flops"] * e) for e in gemm_efficiency]
    t_select = max(t_select_issue, t_select_bytes)
    return {
        "select": f"{block_b}x{block_n}, {warps} warps, {row['registers']} registers, {row['spill_stores']} spilled, "
                  f"grid {token_blocks} x {splits} per chunk, {len(launches)} chunks, {tiles} tiles per program",
        "insertion_passes": passes,
        "ms": {
            f"cuBLAS GEMM at {gemm_efficiency[0]:.0%}-{gemm_efficiency[1]:.0%} of peak (assumed)":
                (1e3 * t_gemm[1], 1e3 * t_gemm[0]),
            "selection passes, instruction issue": 1e3 * t_select_issue,
            f"selection passes, HBM {4 * B * n / 1e9:.1f} GB of fp32 pre-activations": 1e3 * t_select_bytes,
            "in sequence": (1e3 * (t_gemm[1] + t_select), 1e3 * (t_gemm[0] + t_select)),
        },
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=8192)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--k", type=int, default=64)
    args = p.parse_args(argv)
    r = predict(args.B, args.m, args.n, args.k)
    print(f"PREDICTION (no GPU), H100 SXM, {r['shape']}")
    for key in ("tile", "registers", "spills", "ctas_per_sm", "grid", "sass", "mma_loop", "fold_loop",
                "insertion_passes"):
        print(f"  {key}: {r[key]}")
    print(f"  static SASS per pre-activation element: {r['static_per_element']:.2f} warp-instructions")
    for name, ms in r["ms"].items():
        print(f"  {name}: {ms:.2f} ms")
    c = predict_chunked(args.B, args.m, args.n, args.k)
    print(f"PREDICTION (no GPU), chunked strategy: {c['select']}; insertion passes {c['insertion_passes']}")
    for name, ms in c["ms"].items():
        print(f"  {name}: " + (f"{ms[0]:.2f}-{ms[1]:.2f} ms" if isinstance(ms, tuple) else f"{ms:.2f} ms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
