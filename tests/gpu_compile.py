"""Compile every Triton kernel ahead of time for real GPUs, on a machine without one.

Each kernel is lowered to a cubin for sm_80 (A100) and sm_90a (H100) with the ptxas shipped in
Triton's wheel, at the block shapes its launcher uses; ptxas's own report gives registers, spill
bytes and stack, the compiled metadata the shared memory. Must run WITHOUT ``TRITON_INTERPRET``,
so tests call it in a subprocess:

    python tests/gpu_compile.py            # JSON rows on stdout
    python tests/gpu_compile.py --markdown # the table for benchmarks/RESULTS.md

To prove a new kernel, add a ``Spec`` to ``SPECS`` with the dtypes and constexprs it is launched
with.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field

ARCHS = (80, 90)


@dataclass
class Spec:
    module: str
    kernel: str
    signature: dict  # arg -> "*fp32" | "*bf16" | "*i64" | "i32" | "constexpr"
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""
    extra: dict = field(default_factory=dict)
    divisible_by_16: tuple = ()  # args the JIT would specialize so (16-byte aligned pointers, sizes)

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.label}]" if self.label else self.kernel


def _decode_specs() -> list[Spec]:
    import importlib

    sd = importlib.import_module("topk_kernels.sparse_decode")  # the package re-exports the function
    mod = sd.__name__
    specs = []
    for dt in ("fp32", "bf16"):
        specs.append(Spec(mod, "_decode_fwd_kernel", {
            "acts_ptr": f"*{dt}", "idx_ptr": "*i64", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
            "out_ptr": f"*{dt}", "B": "i32", "M": "i32", "K": "i32",
            "HAS_BIAS": "constexpr", "BLOCK_B": "constexpr", "BLOCK_M": "constexpr",
        }, {"HAS_BIAS": True, "BLOCK_B": sd.BLOCK_B, "BLOCK_M": sd.BLOCK_M}, label=dt))
        specs.append(Spec(mod, "_decode_bwd_acts_kernel", {
            "grad_ptr": f"*{dt}", "idx_ptr": "*i64", "w_ptr": f"*{dt}", "gacts_ptr": f"*{dt}",
            "M": "i32", "K": "i32", "BLOCK_K": "constexpr", "BLOCK_M": "constexpr",
        }, {"BLOCK_K": sd.BLOCK_K_ACTS, "BLOCK_M": sd.BLOCK_M_ACTS}, label=dt))
    return specs


def all_specs() -> list[Spec]:
    """Every kernel the package launches. Op families add their builders here."""
    specs = _decode_specs()
    for builder in _EXTRA_BUILDERS:
        specs.extend(builder())
    return specs


_EXTRA_BUILDERS: list = []


def _expander_decode_specs() -> list[Spec]:
    import importlib

    ed = importlib.import_module("topk_kernels.expander_decode")  # the package re-exports the function
    mod = ed.__name__
    specs = []
    for dt in ("fp32", "bf16"):
        for bd in (8, ed.BLOCK_D):  # d = 7/8, the usual degree, and the widest atom tile
            label = f"{dt},BLOCK_D={bd}"
            specs.append(Spec(mod, "_expander_decode_fwd_kernel", {
                "acts_ptr": f"*{dt}", "idx_ptr": "*i64", "values_ptr": f"*{dt}", "rows_ptr": "*i64",
                "bias_ptr": f"*{dt}", "acc_ptr": "*fp32", "out_ptr": f"*{dt}",
                "B": "i32", "M": "i32", "K": "i32", "D": "i32",
                "HAS_BIAS": "constexpr", "CAST_OUT": "constexpr",
                "BLOCK_B": "constexpr", "BLOCK_D": "constexpr", "BLOCK_M": "constexpr",
            }, {"HAS_BIAS": True, "CAST_OUT": dt != "fp32", "BLOCK_B": ed.BLOCK_B, "BLOCK_D": bd,
                "BLOCK_M": ed.BLOCK_M}, num_stages=1, label=label))
            specs.append(Spec(mod, "_expander_decode_bwd_kernel", {
                "grad_ptr": f"*{dt}", "idx_ptr": "*i64", "values_ptr": f"*{dt}", "rows_ptr": "*i64",
                "gacts_ptr": f"*{dt}", "NNZ": "i32", "M": "i32", "K": "i32", "D": "i32",
                "BLOCK_E": "constexpr", "BLOCK_D": "constexpr",
            }, {"BLOCK_E": ed._block_e(bd), "BLOCK_D": bd}, label=label))
    return specs


_EXTRA_BUILDERS.append(_expander_decode_specs)


# --- topk_kernels._rowgrad: the decoders' weight / value gradients, written once per row -------
def _rowgrad_specs() -> list[Spec]:
    import importlib

    rg = importlib.import_module("topk_kernels._rowgrad")
    specs = []
    for dt in ("fp32", "bf16"):
        # (label, width C, GATHER, FUSE_ACTS): the sparse decoder at m=2048 (weight + activation
        # grads), the encoder's weight grad at m=2048, the widest row, and the expander at d=8.
        for label, width, gather, fuse in (
            ("decoder,m=2048", 2048, False, True), ("encoder,m=2048", 2048, False, False),
            ("decoder,m=4096", rg.MAX_BLOCK_C, False, True), ("expander,d=8", 8, True, True),
        ):
            block = rg.block_c(width)
            specs.append(Spec(rg.__name__, "_rowgrad_chunk_kernel", {
                "src_ptr": f"*{dt}", "scale_ptr": f"*{dt}", "sorted_ptr": "*i32", "order_ptr": "*i64",
                "bounds_ptr": "*i64", "atom_ptr": f"*{dt}", "cols_ptr": "*i64", "out_ptr": f"*{dt}",
                "part_ptr": "*fp32", "gscale_ptr": f"*{dt}",
                "N": "i32", "M": "i32", "C": "i32", "K": "i32", "CHUNK": "i32",
                "GATHER": "constexpr", "FUSE_ACTS": "constexpr", "DEBUG": "constexpr", "BLOCK_C": "constexpr",
            }, {"GATHER": gather, "FUSE_ACTS": fuse, "DEBUG": False, "BLOCK_C": block},
                num_warps=rg.chunk_warps(block), label=f"{dt},{label}",
                divisible_by_16=_ALIGNED_POINTERS + (("M",) if gather else ("M", "C"))))
        specs.append(Spec(rg.__name__, "_rowgrad_finish_kernel", {
            "bounds_ptr": "*i64", "part_ptr": "*fp32", "out_ptr": f"*{dt}",
            "N": "i32", "C": "i32", "NNZ": "i32", "CHUNK": "i32",
            "DEBUG": "constexpr", "ROWS": "constexpr", "BLOCK_C": "constexpr",
        }, {"DEBUG": False, "ROWS": rg.FINISH_ROWS, "BLOCK_C": rg.FINISH_BLOCK_C}, label=dt,
            divisible_by_16=("bounds_ptr", "part_ptr", "out_ptr", "C")))
    return specs


# torch allocations start 16-byte aligned; m = 2048 / 4096 is a multiple of 16, d = 8 is not.
_ALIGNED_POINTERS = ("src_ptr", "scale_ptr", "sorted_ptr", "order_ptr", "bounds_ptr", "atom_ptr",
                     "cols_ptr", "out_ptr", "part_ptr", "gscale_ptr")
_EXTRA_BUILDERS.append(_rowgrad_specs)


def _topk_encode_specs() -> list[Spec]:
    import importlib

    te = importlib.import_module("topk_kernels.topk_encode")  # the package re-exports the function
    specs = []
    for dt in ("fp32", "bf16"):
        for k_pad, (bb, bn, bm, nw) in te.ENCODE_CONFIGS.items():
            precisions = ("ieee", "tf32") if (dt == "fp32" and k_pad == 32) else ("ieee",)
            for precision in precisions:
                label = f"{dt},K_PAD={k_pad}" + (",tf32" if precision == "tf32" else "")
                specs.append(Spec(te.__name__, "_encode_fwd_kernel", {
                    "x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "cand_ptr": "*i64",
                    "B": "i32", "N": "i32", "M": "i32", "TILES_PER_SPLIT": "i32", "C": "i32",
                    "HAS_BIAS": "constexpr", "BLOCK_B": "constexpr", "BLOCK_N": "constexpr",
                    "BLOCK_M": "constexpr", "K_PAD": "constexpr", "CAST_FP32": "constexpr",
                    "INPUT_PRECISION": "constexpr",
                }, {"HAS_BIAS": True, "BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_M": bm, "K_PAD": k_pad,
                    "CAST_FP32": False, "INPUT_PRECISION": precision}, num_warps=nw, label=label))
    return specs


_EXTRA_BUILDERS.append(_topk_encode_specs)


def _expander_encode_specs() -> list[Spec]:
    import importlib

    ee = importlib.import_module("topk_kernels.expander_encode")  # the package re-exports the function
    specs = []
    for dt in ("fp32", "bf16"):
        for k_pad, (bb, bn, nw) in ee.EXPANDER_ENCODE_CONFIGS.items():
            specs.append(Spec(ee.__name__, "_expander_encode_fwd_kernel", {
                "x_ptr": f"*{dt}", "values_ptr": f"*{dt}", "rows_ptr": "*i64", "bias_ptr": f"*{dt}",
                "cand_ptr": "*i64", "B": "i32", "N": "i32", "M": "i32", "D": "i32",
                "TILES_PER_SPLIT": "i32", "C": "i32", "HAS_BIAS": "constexpr", "BLOCK_B": "constexpr",
                "BLOCK_N": "constexpr", "K_PAD": "constexpr",
            }, {"HAS_BIAS": True, "BLOCK_B": bb, "BLOCK_N": bn, "K_PAD": k_pad}, num_warps=nw,
                label=f"{dt},K_PAD={k_pad}"))
    return specs


_EXTRA_BUILDERS.append(_expander_encode_specs)


# sm_90 machine code: memory atomics (not REDUX, a warp reduction) and the GPU-wide fence that
# Triton's default acq_rel semantics put before each one (sem="relaxed" has none).
_ATOMIC = re.compile(r"\b(ATOMG|ATOMS|ATOM|REDG|RED)\.")
_FENCE = "MEMBAR.ALL.GPU"


def sass_atomics(sass: str) -> tuple[int, list]:
    """(number of atomics, atomics with a MEMBAR.ALL.GPU anywhere before them in their function)."""
    count, fenced, behind_fence = 0, [], False
    for line in sass.splitlines():
        if line.lstrip().startswith("Function"):
            behind_fence = False
            continue
        instruction = line.split("\t")[-1].strip()
        if _FENCE in instruction:
            behind_fence = True
        elif _ATOMIC.search(instruction):
            count += 1
            if behind_fence:
                fenced.append(instruction)
    return count, fenced


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_kernel(spec: Spec, arch: int):
    """Compile one kernel for one architecture: (Triton's compiled kernel, ptxas's log)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec.module), spec.kernel)
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible_by_16}
    src = ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            src, target=target, options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
        )
    return compiled, log.getvalue()


def compile_spec(spec: Spec, arch: int) -> dict:
    """Compile one kernel for one architecture; returns a row of resource usage."""
    compiled, text = compile_kernel(spec, arch)
    used = _USED.findall(text)
    spill = _SPILL.findall(text)
    if not used or not spill:
        raise RuntimeError(f"{spec.name} sm_{arch}: no ptxas report found in:\n{text}")
    stack, stores, loads = (int(v) for v in spill[-1])
    return {
        "kernel": spec.name,
        "arch": f"sm_{arch}",
        "registers": int(used[-1]),
        "shared_bytes": int(compiled.metadata.shared),
        "stack_bytes": stack,
        "spill_stores": stores,
        "spill_loads": loads,
        "num_warps": spec.num_warps,
        **_sass_facts(compiled, arch),
    }


def _sass_facts(compiled, arch: int) -> dict:
    if arch != 90:
        return {}
    sass = compiled.asm["sass"]  # cuobjdump from Triton's wheel
    atomics, fenced = sass_atomics(sass)
    instructions = sum(1 for line in sass.splitlines() if "\t" in line and not line.rstrip().endswith(":"))
    return {"sass_instructions": instructions, "atomics": atomics, "fenced_atomics": fenced}


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_compile: unset TRITON_INTERPRET to compile for real GPUs", file=sys.stderr)
        return 2
    rows, failures = [], []
    for spec in all_specs():
        for arch in ARCHS:
            try:
                rows.append(compile_spec(spec, arch))
            except Exception as exc:  # report every failure, not just the first
                failures.append({"kernel": spec.name, "arch": f"sm_{arch}", "error": repr(exc)[:2000]})
    if "--markdown" in argv:
        print("| kernel | arch | warps | registers | shared memory (B) | stack (B) | spill stores (B) | spill loads (B) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kernel']} | {r['arch']} | {r['num_warps']} | {r['registers']} | {r['shared_bytes']} "
                  f"| {r['stack_bytes']} | {r['spill_stores']} | {r['spill_loads']} |")
        for f in failures:
            print(f"| {f['kernel']} | {f['arch']} | FAILED: {f['error'][:200]} |")
    else:
        print(json.dumps({"rows": rows, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
