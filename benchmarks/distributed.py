"""Distributed training on paper and on gloo: bytes per step, and measured CPU step times.

    python benchmarks/distributed.py              # both tables (markdown)
    python benchmarks/distributed.py --no-measure # the bytes table only

1. Bytes each rank exchanges per step (``sae.distributed.communication_per_step``) for data
   parallel and latent-sharded training at B=4096, m=2048, k=64, P=8, n=2^20 and 2^24, and the
   time an NCCL ring needs for them at 450 GB/s bus bandwidth (NVLink, 8xH100 node). Beside it a
   *prediction* of the compute floor of a TopK SAE: the encoder GEMM of one rank
   (2*B_rank*n_rank*m flops) at an H100's dense bf16 peak (989 TFLOP/s); an Expander encoder is
   gather-bound, not flop-bound, so it gets no such floor.
2. Measured: tokens/s of ``sae.train.train`` in one process and on 2 gloo processes in both
   modes (``TrainConfig.parallel``), at a small size, from the runs' own logs (median over log windows
   after the first). This machine has 2 cores: 2 processes cannot show speed-up here; the numbers
   show the overhead of the collectives, not scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae.distributed import communication_per_step  # noqa: E402

BUS = 450e9
H100_BF16 = 989e12


def bytes_table(B=4096, m=2048, k=64, P=8, degree=32) -> str:
    lines = ["| n | SAE | mode | bytes / rank / step | of which | NCCL ring time at 450 GB/s | encoder GEMM floor per rank (prediction) |",
             "|---|---|---|---|---|---|---|"]
    mib = 2**20
    for n in (2**20, 2**24):
        for arch in ("topk", "expander"):
            for mode, aux in (("data", False), ("latent", False), ("latent", True)):
                c = communication_per_step(mode, batch=B, d_model=m, n_latents=n, k=k, world=P, arch=arch,
                                           degree=degree, auxk_active=aux, bus_bandwidth=BUS)
                parts = ", ".join(f"{name} {b / mib:,.1f} MiB" for name, b in c["parts"].items() if b >= mib / 10)
                tokens, latents = (B // P, n) if mode == "data" else (B, n // P)
                floor = f"{2 * tokens * latents * m / H100_BF16 * 1e3:,.2f} ms" if arch == "topk" else "gather-bound"
                label = mode + (" + AuxK (k_aux = 1024)" if aux else "")
                lines.append(f"| 2^{n.bit_length() - 1} | {'TopK' if arch == 'topk' else f'Expander d={degree}'} "
                             f"| {label} | {c['bytes'] / mib:,.1f} MiB | {parts} | {c['seconds_at_bus_bandwidth'] * 1e3:,.2f} ms "
                             f"| {floor} |")
        lines.append(f"| 2^{n.bit_length() - 1} | any | a dense [B, n] fp32 latent tensor, for scale | "
                     f"{4 * B * n / mib:,.0f} MiB | | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measured on gloo
# ---------------------------------------------------------------------------------------------

SIZE = dict(B=2048, m=128, n=8192, k=32, degree=16, steps=30, log_every=5)


def _make(arch):
    from sae.models import ExpanderSAE, TopKSAE

    torch.manual_seed(0)
    s = SIZE
    if arch == "topk":
        return TopKSAE(s["m"], s["n"], s["k"], backend="torch")
    return ExpanderSAE(s["m"], s["n"], s["k"], degree=s["degree"], backend="torch")


def _setup():
    from sae.data import ActivationBuffer
    from sae.train import TrainConfig

    s = SIZE
    buffer = ActivationBuffer(torch.randn(8 * s["B"], s["m"], generator=torch.Generator().manual_seed(1)))
    cfg = TrainConfig(batch_size=s["B"], total_tokens=s["B"] * s["steps"], lr=1e-3, checkpoint_every=10**9,
                      log_every=s["log_every"], progress=False)
    return buffer, cfg


def _tokens_per_s(history):
    return statistics.median(h["tokens_per_s"] for h in history[1:])


def _worker(rank, world, port, out, threads):
    from sae.train import train

    torch.set_num_threads(threads)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=600))
    buffer, cfg = _setup()
    results = {}
    for arch in ("topk", "expander"):
        for mode in ("data", "latent"):
            result = train(_make(arch), buffer, dataclasses.replace(cfg, parallel=mode), Path(out) / f"{arch}-{mode}")
            results[(arch, mode)] = _tokens_per_s(result.history)
    if rank == 0:
        torch.save(results, Path(out) / "dist.pt")
    torch.distributed.destroy_process_group()


def measure() -> str:
    import torch.multiprocessing as mp

    from sae.train import train

    buffer, cfg = _setup()
    rows, load_before = {}, os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for arch in ("topk", "expander"):
                result = train(_make(arch), buffer, cfg, Path(out) / f"single-{arch}-{threads}")
                rows[(arch, f"one process, {threads} thread{'s' if threads > 1 else ''}")] = _tokens_per_s(result.history)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(2, port, out, 1), nprocs=2, join=True, start_method="spawn")
        for (arch, mode), tps in torch.load(Path(out) / "dist.pt").items():
            rows[(arch, f"2 gloo processes x 1 thread, {mode}")] = tps
    s = SIZE
    lines = [f"B={s['B']} (global batch), m={s['m']}, n={s['n']}, k={s['k']}, expander d={s['degree']}, fp32, "
             f"{s['steps']} steps, median tokens/s over windows of {s['log_every']} steps after the first",
             f"(1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on 2 cores)",
             "", "| SAE | run | tokens/s | step ms | vs one process, 1 thread |", "|---|---|---|---|---|"]
    for arch in ("topk", "expander"):
        base = rows[(arch, "one process, 1 thread")]
        for (a, run), tps in rows.items():
            if a == arch:
                lines.append(f"| {'TopK' if arch == 'topk' else 'Expander'} | {run} | {tps:,.0f} | "
                             f"{1e3 * s['B'] / tps:,.1f} | {tps / base:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-measure", action="store_true", help="print the bytes table only")
    args = parser.parse_args(argv)
    print(bytes_table())
    if not args.no_measure:
        print()
        print(measure())


if __name__ == "__main__":
    main()
