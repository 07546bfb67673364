"""PREDICTION: the fused expander encoder's time with waits, from a small issue-and-wait simulation.

``benchmarks/expander_encode_model.py`` bounds the kernel by instructions and L2 bytes, and so
says nothing about waits; the H100 measured the one-degree-a-trip build (8e09c25) at 2x its
bound (bf16: 25.6 ms against 12.7). This script models one SM scheduler. It holds W warps, one
per resident CTA, since a CTA's 4 warps spread over the 4 schedulers. Each warp runs tile after
tile, and a tile is a list of segments: issue n instructions, then wait L cycles for a global
load, or do not wait. The scheduler issues one instruction a cycle from a ready warp, round robin.
A warp issues at most one every ``cpi`` cycles, which stands for dependent-instruction and
shared-memory latency. Barriers are not modelled: a CTA's warps run the same code in step.

The segments come from the sm_90 bf16 K_PAD=64 SASS (tests/gpu_compile.py; RESULTS.md, "two
degrees a trip"). Their split into "before the wait" and "after" is read from where the loads and
their first uses sit:
- one degree a trip (155 loop instructions): tap loads (~10), then a wait; conversions and the
  gather (~25), then a wait; unpacking and FFMAs (~120).
- two degrees a trip (9b9b35f, 269): two taps (~20), then a wait; conversions and 8 gathers
  (~60), then a wait; the rest (~189).
- odd degree apart (this, bf16 only: ``odd_apart``): at odd d the first degree runs alone
  before the loop (~112 instructions: its tap, a wait, conversions and 4 gathers, a wait, the
  rest), then floor(d / 2) trips of the two-degree loop (266); the same 8 waits a tile at d=7,
  ~160 fewer instructions.
- "prefetch", the rejected alternative (285): the next trip's taps are loaded at the top of this
  trip. It then waits once per trip, plus once for the tile's first taps, but it needs 158
  registers in bf16, so 3 CTAs per SM (128 spills).
Every tile also waits once for its bias, then runs its straight code and insertion passes
(628 + 1.29 x 852 instructions; passes simulated by expander_encode_model.py).

L is calibrated so that the one-degree build at 4 CTAs takes the measured 25.6 ms, for each cpi
tried. The other builds are then predicted with the same L. B=4096, n=2**20, 32 x 128 tiles:
1,048,576 tiles over 132 SMs at 1.755 GHz.

    python benchmarks/expander_latency_sim.py
"""

from __future__ import annotations

import argparse
import sys

TILES_PER_SM = 128 * 8192 / 132
CLOCK = 1.755e9
MEASURED_ONE_DEGREE_MS = 25.6  # H100, bf16, tenth session (RESULTS.md)
FOLD = 628 + round(1.29 * 852)

# build -> (segments of one tile as (instructions, waits), resident CTAs per SM)
BUILDS = {
    "one degree a trip (8e09c25, measured)": ([(10, True), (25, True), (120, False)] * 7, 4),
    "two degrees a trip (9b9b35f)": ([(20, True), (60, True), (189, False)] * 4, 4),
    "odd degree apart (this, bf16)": ([(10, True), (25, True), (77, False)]
                                + [(20, True), (60, True), (186, False)] * 3, 4),
    "prefetch, rejected (3 CTAs)": ([(10, True)] + [(100, True), (185, False)] * 4, 3),
}


def cycles_per_tile(segments, warps: int, wait: float, cpi: float, tiles: int = 40) -> float:
    """Cycles per tile and warp slot, with ``warps`` warps on one scheduler, each running ``tiles``
    tiles of ``segments`` + a bias wait + the fold."""
    program = [(n, wait if w else 0.0) for n, w in segments + [(20, True), (FOLD, False)]] * tiles
    seg = [0] * warps
    left = [program[0][0]] * warps
    ready = [7.0 * w for w in range(warps)]  # staggered starts
    finished = [None] * warps
    t, start = 0.0, 0
    while any(f is None for f in finished):
        for k in range(warps):
            w = (start + k) % warps
            if finished[w] is None and ready[w] <= t:
                left[w] -= 1
                ready[w] = t + cpi
                if left[w] <= 0:
                    ready[w] = t + max(cpi, program[seg[w]][1])
                    seg[w] += 1
                    if seg[w] == len(program):
                        finished[w] = t
                    else:
                        left[w] = program[seg[w]][0]
                start = (w + 1) % warps
                t += 1
                break
        else:
            t = max(t + 1, min(r for r, f in zip(ready, finished) if f is None))
    return max(finished) / tiles


def milliseconds(build: str, wait: float, cpi: float) -> float:
    segments, ctas = BUILDS[build]
    return 1e3 * cycles_per_tile(segments, ctas, wait, cpi) * TILES_PER_SM / ctas / CLOCK


def calibrate(cpi: float) -> float:
    """The wait L at which the one-degree build takes the measured time (bisection)."""
    base = next(iter(BUILDS))
    lo, hi = 0.0, 5000.0
    for _ in range(18):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if milliseconds(base, mid, cpi) < MEASURED_ONE_DEGREE_MS else (lo, mid)
    return (lo + hi) / 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpi", type=float, nargs="+", default=[1.0, 2.0, 3.0],
                        help="cycles between two instructions of one warp")
    opts = parser.parse_args(argv)
    print("| cpi | calibrated L (cycles) | " + " | ".join(BUILDS) + " |")
    print("|---|---|" + "---|" * len(BUILDS))
    for cpi in opts.cpi:
        wait = calibrate(cpi)
        cells = " | ".join(f"{milliseconds(b, wait, cpi):.1f}" for b in BUILDS)
        print(f"| {cpi:g} | {wait:.0f} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
