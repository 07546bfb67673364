"""Where a training step's time goes: ``torch.profiler`` over Adam steps of ``TopKSAE`` and
``ExpanderSAE`` (the step of ``benchmarks/gpu.py``: forward, backward, ``remove_parallel_grads``,
Adam, ``normalize_decoder``), printed as one markdown table per model: the kernels (CUDA) or
operators (CPU) with the most self time, per step, and their share of the step.

gpu.py times whole steps (TopK SAE, bf16, H100: 30.2 ms, of which ``topk_encode`` forward and
backward take ~12.9 and ``sparse_decode`` ~3.2); this says what the rest is.

    python benchmarks/step_profile.py                            # CUDA, bf16, gpu.py's sizes
    python benchmarks/step_profile.py --device cpu --small       # anywhere: small odd sizes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import train_step  # noqa: E402

SIZES = {  # gpu.py's REAL_TOPK / REAL_EXPANDER, and small odd ones for a CPU run
    "topk": dict(B=8192, m=2048, n=131072, k=64),
    "expander": dict(B=4096, m=2048, n=2**20, d=7, k=64),
}
SMALL = {"topk": dict(B=257, m=96, n=3001, k=17), "expander": dict(B=257, m=96, n=6007, d=7, k=17)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build(kind: str, size: dict, dtype: torch.dtype, device: torch.device):
    from sae.models import ExpanderSAE, TopKSAE

    with torch.device(device):
        if kind == "topk":
            model = TopKSAE(size["m"], size["n"], size["k"])
        else:
            model = ExpanderSAE(size["m"], size["n"], size["k"], size["d"])
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(size["B"], size["m"], device=device, dtype=dtype)
    return train_step(model, x, ours=True)


def profile(step, device: torch.device, steps: int, warmup: int) -> tuple[float, list]:
    """(wall ms per step, [(name, calls per step, self ms per step)] by self time)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = 1e3 * (time.perf_counter() - t0) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    rows = []
    for evt in prof.key_averages():
        self_us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        if self_us > 0:
            rows.append((evt.key, evt.count / steps, self_us / 1e3 / steps))
    rows.sort(key=lambda r: -r[2])
    return wall, rows


def markdown(title: str, wall: float, rows: list, top: int) -> str:
    total = sum(r[2] for r in rows)
    out = [f"### {title}", "",
           f"Wall time per step (unprofiled): **{wall:.2f} ms**; profiled self time per step: {total:.2f} ms.", "",
           "| kernel / operator | calls a step | self ms a step | share |", "|---|---|---|---|"]
    for name, calls, ms in rows[:top]:
        out.append(f"| `{name[:90]}` | {calls:g} | {ms:.3f} | {100 * ms / total:.1f} % |")
    rest = sum(r[2] for r in rows[top:])
    if rest:
        out.append(f"| (the other {len(rows) - top}) | | {rest:.3f} | {100 * rest / total:.1f} % |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--models", default="topk,expander", help="comma-separated: topk, expander")
    p.add_argument("--small", action="store_true", help="small odd sizes (a CPU run)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --small)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    for kind in args.models.split(","):
        if kind not in SIZES:
            raise SystemExit(f"--models: expected topk and/or expander, got {kind!r}")
        size = (SMALL if args.small else SIZES)[kind]
        step = build(kind, size, DTYPES[args.dtype], device)
        wall, rows = profile(step, device, args.steps, args.warmup)
        dims = " ".join(f"{key}={val}" for key, val in size.items())
        model = "TopKSAE" if kind == "topk" else "ExpanderSAE"
        print(markdown(f"{model} train step, {name}, {args.dtype} {dims}", wall, rows, args.top), "\n", flush=True)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
