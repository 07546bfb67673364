"""A prediction, without a GPU, of the decoders' kernels on an H100 SXM at issue 9's sizes: static
SASS per element, bytes moved per launch, and the roofline time.

    python benchmarks/decoder_roofline.py [--dtypes bf16,fp32]

Each kernel is launched by its real launcher on meta tensors (tests/gpu_compile.py records the
launch: grid, constexprs, warps) at the benchmark sizes (TopK: B=8192, m=2048, n=131072, k=64;
expander: B=4096, m=2048, n=2^20, d=7, k=64) and compiled for sm_90 with ptxas. From the SASS:
the kernel's work loop (its largest loop, any inner loop included: one active (token, slot)
entry per trip), whose instructions x warps / the elements one trip handles give the static
warp instructions per element. An element is one gathered weight value times one activation
(decoder forward: W[idx, col] * act; its activation gradient: W[idx, col] * grad[col]; the
expander's: one atom entry, padded to the power of two the kernel steps by; ``_rowgrad``'s chunk
kernel: one sorted entry times one column of its row; its finish kernel: one latent's row).

Bytes per launch come from the launch plan (the recorded arguments and grid), counted as DRAM
traffic with no reuse of gathered rows across tokens (the upper bound: W is 512 MiB in bf16
against a 50 MB L2, and with uniform indices a row is used ~4 times in B*k = 524K draws), plus
each small operand read once and each output written once. The prediction is the larger of the
memory time (bytes at 3.35 TB/s) and the issue time (warp instructions at 9.3e11/s: 132 SMs x 4
schedulers x 1.755 GHz); neither counts latency, so it is a floor. Of these kernels issue 9
redesigned only the weight / value gradients (``_rowgrad``; their predecessors are compared in
RESULTS.md, "Decoder weight and value gradients, written once"). RESULTS.md, "Decoder kernels:
per element, bytes, roofline".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

HBM_BYTES_PER_S = 3.35e12  # H100 SXM
WARP_INSTR_PER_S = 132 * 4 * 1.755e9  # one warp instruction per scheduler per clock
ELEM_BYTES = {"fp32": 4, "bf16": 2}


def plan(kernel: str, a: dict, s: int) -> dict:
    """Per kernel, from its launch arguments ``a`` and element size ``s``: elements one trip of
    the work loop handles per program, the launch's elements, and its bytes (no reuse of gathered
    rows)."""
    if kernel == "_decode_fwd_kernel":
        B, M, K = a["B"], a["M"], a["K"]
        return {"per_trip": a["BLOCK_B"] * a["BLOCK_M"], "elements": B * K * M,
                "bytes": B * K * (8 + s) + B * K * M * s + B * M * s + M * s}
    if kernel == "_decode_bwd_acts_kernel":
        M, K = a["M"], a["K"]
        B = a["gacts_ptr"].shape[0]
        return {"per_trip": a["BLOCK_K"] * a["BLOCK_M"], "elements": B * K * M,
                "bytes": B * K * (8 + s) + B * K * M * s + B * M * s}
    if kernel == "_expander_decode_fwd_kernel":
        B, M, K, D = a["B"], a["M"], a["K"], a["D"]
        d_pad = a["BLOCK_D"] * -(-D // a["BLOCK_D"])  # BLOCK_D: the launcher's step, pow2(d) up to 32
        # The fp32 output rows are initialised, read-modified-written per entry (d entries of
        # a token's row, within the program's 16 rows: counted as L2 hits) and, for a half
        # output, read once more and cast into the output.
        out = 2 * B * M * 4 + B * M * s if a["CAST_OUT"] else B * M * 4
        return {"per_trip": a["BLOCK_B"] * a["BLOCK_D"], "elements": B * K * d_pad,
                "bytes": B * K * (8 + s) + B * K * D * (s + 8) + out}
    if kernel == "_expander_decode_bwd_kernel":
        nnz, M, K, D = a["NNZ"], a["M"], a["K"], a["D"]
        d_pad = a["BLOCK_D"] * -(-D // a["BLOCK_D"])
        return {"per_trip": a["BLOCK_E"] * a["BLOCK_D"], "elements": nnz * d_pad,
                "bytes": nnz * (8 + s) + nnz * D * (s + 8 + s) + (nnz // K) * M * s}
    if kernel == "_rowgrad_chunk_kernel":
        # Sorted entries (B*k) each gather one row of ``src`` (the output gradient, or x for an
        # encoder) and, per latent segment, the latent's atom row (FUSE_ACTS) and columns
        # (GATHER); rows of at most min(n, B*k) active latents are written once.
        nnz, N, C = a["order_ptr"].shape[0], a["N"], a["C"]
        active = min(N, nnz)
        isz = {name: a[name].element_size() for name in ("src_ptr", "scale_ptr", "sorted_ptr", "order_ptr",
                                                          "out_ptr", "atom_ptr", "cols_ptr", "gscale_ptr")}
        per_entry = C * isz["src_ptr"] + isz["scale_ptr"] + isz["sorted_ptr"] + isz["order_ptr"]
        per_latent = C * isz["out_ptr"]
        if a["FUSE_ACTS"]:
            per_entry += isz["gscale_ptr"]
            per_latent += C * isz["atom_ptr"]
        if a["GATHER"]:
            per_latent += C * isz["cols_ptr"]
        return {"per_trip": a["BLOCK_C"], "elements": nnz * C, "bytes": nnz * per_entry + active * per_latent}
    if kernel == "_rowgrad_finish_kernel":
        # One trip a latent row: zeros for an inactive latent, the sum of a cut one's partial
        # rows (counted as if every row were written here: an upper bound).
        N, C = a["N"], a["C"]
        return {"per_trip": a["BLOCK_C"], "elements": N * C,
                "bytes": N * C * a["out_ptr"].element_size() + (N + 1) * a["bounds_ptr"].element_size()}
    raise KeyError(kernel)


def rows(dtypes: list[str]) -> list[str]:
    import gpu_compile as gc

    wanted = {"_decode_fwd_kernel", "_decode_bwd_acts_kernel", "_expander_decode_fwd_kernel",
              "_expander_decode_bwd_kernel", "_rowgrad_chunk_kernel", "_rowgrad_finish_kernel"}
    # The launches that run these kernels: the forwards, the activation gradients alone, and the
    # weight / value gradients (``_rowgrad``: with the activation gradient fused, and alone).
    firsts = ("forward,", "grad acts,", "grad acts+weight,", "grad weight", "backward,", "grad values")
    specs = [sp for sp in gc.all_specs()
             if sp.op in ("sparse_decode", "expander_decode") and sp.label.startswith(firsts)
             and sp.label.split(",")[1] in dtypes and "d=45" not in sp.label and "m=4096" not in sp.label]
    out = []
    for sp in specs:
        with contextlib.redirect_stderr(io.StringIO()):
            launches = [lc for lc in gc.capture(sp, 90) if lc.kernel.__name__ in wanted]
        for lc in launches:
            name = lc.kernel.__name__
            args = gc.launch_arguments(lc)
            report = gc.compile_launch(lc, 90)
            instrs, loops = gc.sass_loops(gc.launch_asm(lc, 90)["sass"])
            start, end = max(((b, e) for b, e in loops if e - b > 2), key=lambda be: be[1] - be[0])
            body = end - start + 1
            warps = report["num_warps"]
            p = plan(name, args, ELEM_BYTES[sp.label.split(",")[1]])
            per_element = body * warps / p["per_trip"]
            issue_s = per_element * p["elements"] / WARP_INSTR_PER_S
            mem_s = p["bytes"] / HBM_BYTES_PER_S
            bound = "memory" if mem_s >= issue_s else "issue"
            out.append(f"| `{name}` | {sp.label} | {report['registers']} | {report['ctas_per_sm']} | {body} x {warps} "
                       f"/ {p['per_trip']} | **{per_element:.2f}** | {p['elements'] / 1e6:.0f}M | "
                       f"{p['bytes'] / 1e9:.2f} GB | {mem_s * 1e3:.3f} | {issue_s * 1e3:.3f} | "
                       f"**{max(mem_s, issue_s) * 1e3:.2f}** ({bound}) |")
            print(out[-1], file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args(argv)
    body = rows(args.dtypes.split(","))
    header = ["kernel", "launch", "registers (sm_90)", "CTAs/SM", "work-loop instrs x warps / elements a trip",
              "static warp instr. per element", "elements", "bytes (no reuse)", "memory ms", "issue ms",
              "predicted ms (floor)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
