"""Compile every Triton kernel for real GPUs exactly as its launcher launches it, without a GPU.

How: each op block below runs the package's real launchers on ``meta`` tensors at the sizes the
benchmarks use; the JIT's ``run`` is replaced by a recorder, so every launch is captured with its
real arguments, constexprs, ``num_warps``, ``num_stages`` (Triton's default of 3 when a launcher
names none) and ``debug``. The launch's specialisation is then computed by Triton 3.7's own
binder (``create_function_from_signature`` + ``JITFunction._pack_args``) for a CUDA target:
integers equal to 1 become constexprs, integers and pointers divisible by 16 get
``tt.divisibility=16`` (meta tensors report address 0: PyTorch's CUDA allocator returns 512-byte
aligned blocks, so that is what a launch sees). The encoders size their grid by the SM count,
which is taken as an A100's (108) for sm_80 and an H100 SXM's (132) for sm_90.

Each capture is lowered to a cubin with the ptxas in Triton's wheel. Per kernel and arch the
report gives: registers, spill bytes and stack (ptxas), shared memory (compiled metadata),
occupancy (CTAs per SM from registers, shared memory, threads and the 32-CTA cap), and from the
SASS (nvdisasm, also in the wheel) the total instruction count, the instruction count of the
main loop (the largest innermost loop: a backward branch and its target), the number of
``MEMBAR`` fences, and the memory atomics with those of them behind a ``MEMBAR.ALL.GPU`` (the
fence Triton's default ``acq_rel`` semantics put before each atomic; ``sem="relaxed"`` has none). Must run WITHOUT ``TRITON_INTERPRET``, so tests call it in a subprocess:

    python tests/gpu_compile.py            # JSON on stdout
    python tests/gpu_compile.py --markdown # the table for benchmarks/RESULTS.md
    python tests/gpu_compile.py --queue F  # the units it claims from counter file F (one process a core)
    python tests/gpu_compile.py --jobs N --markdown  # N such processes, merged: the table, N times faster
    python tests/gpu_compile.py --help     # these options; any other argument is an error

To prove a new kernel, add (or extend) its op's block: a function returning ``Spec``s whose
``run`` calls the launcher on meta tensors, registered in ``SPEC_BLOCKS``. A test fails for any
``@triton.jit`` kernel of the package without a spec.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = (80, 90)
SM_COUNT = {80: 108, 90: 132}  # A100 SXM, H100 SXM
# Per-SM limits of compute capability 8.0 and 9.0 (CUDA occupancy calculator): registers,
# shared memory at the largest carveout, resident threads, resident CTAs (1 KiB of shared memory
# is reserved per CTA: ``_topk.SMEM_RESERVED_PER_CTA``).
SM_LIMITS = {
    80: dict(regs=65536, smem=167936, threads=2048, ctas=32),
    90: dict(regs=65536, smem=233472, threads=2048, ctas=32),
}

# The sizes the launches are captured at: the benchmark shapes.
TOPK = dict(B=8192, m=2048, n=131072, k=64)
EXPANDER = dict(B=4096, m=2048, n=2**20, d=7, k=64)
DTYPES = ("fp32", "bf16")


@dataclass
class Spec:
    """One launcher call: ``run()`` calls it on meta tensors; every kernel it launches is compiled."""

    op: str
    label: str
    run: Callable[[], object]
    # Specs of one ``group`` build the same kernels (they are compiled in one process, once);
    # ``weight`` is a rough cost, so that a work queue hands out the longest groups first.
    group: str = ""
    weight: float = 1.0


def _mod(name: str):
    return importlib.import_module(f"topk_kernels.{name}")  # the package re-exports same-named functions


def _t(*shape, dtype="fp32"):
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "i64": torch.int64}[dtype]
    return torch.empty(*shape, dtype=dt, device="meta")


def _torch_dtype(dt: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]


@contextlib.contextmanager
def _tf32(on: bool):
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# --- sparse_decode: forward and grad of the activations --------------------------------------

def _sparse_decode_specs() -> list[Spec]:
    sd = _mod("sparse_decode")
    B, m, n, k = TOPK["B"], TOPK["m"], TOPK["n"], TOPK["k"]
    specs = []
    for dt in DTYPES:
        acts, idx, w, bias = _t(B, k, dtype=dt), _t(B, k, dtype="i64"), _t(n, m, dtype=dt), _t(m, dtype=dt)
        specs.append(Spec("sparse_decode", f"forward,{dt}",
                          lambda a=acts, i=idx, w=w, b=bias, dt=dt: sd.triton_forward(a, i, w, b, _torch_dtype(dt))))
        specs.append(Spec("sparse_decode", f"grad acts,{dt}",
                          lambda i=idx, w=w, dt=dt: sd.triton_grad_acts(_t(B, m, dtype=dt), i, w, _torch_dtype(dt))))
    return specs


# --- sparse_decode: weight gradient, written once per row (topk_kernels._rowgrad) -------------

def _sparse_decode_weight_grad_specs() -> list[Spec]:
    """Both decoder gradients from one pass (training); the weight gradient alone, which is also
    topk_encode's (x in place of the output gradient); and the widest row one program holds."""
    sd = _mod("sparse_decode")
    B, m, n, k = TOPK["B"], TOPK["m"], TOPK["n"], TOPK["k"]
    wide = _mod("_rowgrad").MAX_BLOCK_C
    specs = []
    for dt in DTYPES:
        for width in (m, wide):
            specs.append(Spec("sparse_decode", f"grad acts+weight,{dt},m={width}",
                              lambda dt=dt, w=width: sd._triton_grad_acts_and_weight(
                                  _t(B, w, dtype=dt), _t(B, k, dtype=dt), _t(B, k, dtype="i64"), _t(n, w, dtype=dt))))
        specs.append(Spec("sparse_decode", f"grad weight (also topk_encode's),{dt}",
                          lambda dt=dt: sd.triton_grad_weight(_t(B, m, dtype=dt), _t(B, k, dtype=dt),
                                                              _t(B, k, dtype="i64"), n, _torch_dtype(dt))))
    return specs


# --- topk_encode ------------------------------------------------------------------------------

def _topk_encode_specs() -> list[Spec]:
    """The fused kernel (``_fused_forward``, whatever the dispatcher would pick) for every row of
    both tile tables: ENCODE_CONFIGS (exact fp32, and bf16 where no tensor-core tile is listed),
    ENCODE_TC_TILES ("half": bf16 at every K_PAD, fp16 at the benchmark's; "mixed": fp32 x with a
    bf16 weight; "tf32": fp32 with TF32 allowed), each kind at every K_PAD of the table."""
    te = _mod("topk_encode")
    B, m, n = TOPK["B"], TOPK["m"], TOPK["n"]
    tf32_k_pads = {kp for kind, kp, _ in te.ENCODE_TC_TILES if kind == "tf32"} | {TOPK["k"]}
    specs = []

    def add(label, x_dt, w_dt, k, tf32=False):
        def run():
            with _tf32(tf32):
                return te._fused_forward(_t(B, m, dtype=x_dt), _t(n, m, dtype=w_dt), _t(n, dtype=w_dt), k,
                                         _torch_dtype("fp32" if "fp32" in (x_dt, w_dt) else w_dt))
        specs.append(Spec("topk_encode", label, run))

    for dt in DTYPES:
        for k_pad in te.ENCODE_CONFIGS:
            add(f"{dt},K_PAD={k_pad}", dt, dt, k_pad)
            if dt == "fp32" and k_pad in tf32_k_pads:
                add(f"{dt},K_PAD={k_pad},tf32", dt, dt, k_pad, tf32=True)
    # Every other row of ENCODE_TC_TILES: "mixed" (fp32 x with a bf16 weight) at each K_PAD, and
    # "half" in fp16 at the benchmark K_PAD (the bf16 build with F16 operands: same tile, same code).
    for k_pad in sorted({kp for kind, kp, _ in te.ENCODE_TC_TILES if kind == "mixed"}):
        add(f"fp32 x bf16 weight,K_PAD={k_pad}", "fp32", "bf16", k_pad)
    add(f"fp16,K_PAD={TOPK['k']}", "fp16", "fp16", TOPK["k"])
    # The chunked strategy's selection kernel (its GEMMs are cuBLAS): every K_PAD it serves.
    for k_pad in te.SELECT_CONFIGS:
        specs.append(Spec("topk_encode", f"chunked,bf16,K_PAD={k_pad}", lambda k=k_pad: te._chunked_forward(
            _t(B, m, dtype="bf16"), _t(n, m, dtype="bf16"), _t(n, dtype="bf16"), k, _torch_dtype("bf16")),
            weight=max(1.0, k_pad / 64)))  # ~5 s a build to K_PAD 128, ~37 s at 2048 (sm_90, one core)
    # The threshold strategy's selection kernel (its GEMMs are cuBLAS), at the k it is dispatched for
    # (SAMPLE_TOP, its one k-dependent constexpr, is 64 / 128 there), and at k = 1, which Triton
    # specialises into a constexpr (a launch there once failed to compile on the H100).
    for k in (1, 512, 1024, 2048, 4096):
        specs.append(Spec("topk_encode", f"threshold,bf16,k={k}", lambda k=k: te._threshold_forward(
            _t(B, m, dtype="bf16"), _t(n, m, dtype="bf16"), _t(n, dtype="bf16"), k, _torch_dtype("bf16")),
            group="threshold", weight=10))  # three builds an arch, ~30 s each
    # The read that is not shipped (THRESHOLD_TILE's APPEND_SCAN flipped), at both SAMPLE_TOPs, for
    # benchmarks/threshold_phases.py's A/B on a GPU.
    flipped = dict(te.THRESHOLD_TILE, APPEND_SCAN=1 - te.THRESHOLD_TILE["APPEND_SCAN"])
    for k in (1024, 4096):
        specs.append(Spec("topk_encode", f"threshold,bf16,k={k},APPEND_SCAN={flipped['APPEND_SCAN']}",
                          lambda k=k: _with_tile(te, flipped, lambda: te._threshold_forward(
                              _t(B, m, dtype="bf16"), _t(n, m, dtype="bf16"), _t(n, dtype="bf16"), k,
                              _torch_dtype("bf16"))), group="threshold, flipped read", weight=7))
    return specs


def _with_tile(te, tile: dict, run: Callable[[], object]):
    """``run()`` with ``te.THRESHOLD_TILE`` set to ``tile``."""
    saved = te.THRESHOLD_TILE
    te.THRESHOLD_TILE = tile
    try:
        return run()
    finally:
        te.THRESHOLD_TILE = saved


# --- expander_encode --------------------------------------------------------------------------

def _expander_encode_specs() -> list[Spec]:
    ee = _mod("expander_encode")
    B, m, n, d = EXPANDER["B"], EXPANDER["m"], EXPANDER["n"], EXPANDER["d"]
    specs = []
    for dt in DTYPES:
        for k_pad in ee.EXPANDER_ENCODE_CONFIGS:
            specs.append(Spec("expander_encode", f"{dt},K_PAD={k_pad}", lambda dt=dt, k=k_pad: ee._triton_forward(
                _t(B, m, dtype=dt), _t(n, d, dtype=dt), _t(n, d, dtype="i64"), _t(n, dtype=dt), k, _torch_dtype(dt))))
        # The chunked strategy: its gather kernel (and the selection kernel it shares with topk_encode).
        specs.append(Spec("expander_encode", f"chunked,{dt},K_PAD={EXPANDER['k']}", lambda dt=dt: ee._chunked_forward(
            _t(B, m, dtype=dt), _t(n, d, dtype=dt), _t(n, d, dtype="i64"), _t(n, dtype=dt), EXPANDER["k"],
            _torch_dtype(dt))))
    return specs


SECTOR_BYTES = 32  # the unit of L1/L2 traffic on sm_80 / sm_90
VECTOR_BYTES = 16  # the widest per-thread load (LDG.128), which Triton's coalescing aims for


def gather_sectors_per_value(token_stride: int, run: int, elt_bytes: int, aligned: bool) -> float:
    """Predicted 32-byte sectors per gathered value of a warp-wide gather in which the lanes that
    share a latent read ``run`` tokens of one model coordinate, ``token_stride`` elements apart:
    contiguous (stride 1), the run spans ceil(run * elt / 32) sectors (one more unless it starts on
    a sector); 32 bytes apart or more, every value takes a sector of its own. The warp's other
    latents read other coordinates, far apart, which share no sector with these."""
    if token_stride * elt_bytes >= SECTOR_BYTES:
        return 1.0
    if token_stride != 1:
        raise ValueError(f"token_stride: expected 1 or >= {SECTOR_BYTES} bytes, got {token_stride} elements")
    return (-(-run * elt_bytes // SECTOR_BYTES) + (0 if aligned else 1)) / run


def expander_encode_plan(args: dict) -> dict:
    """Memory traffic of one ``_expander_encode_fwd_kernel`` launch, from its arguments by name
    (tensors may be meta): sectors per gathered value, and bytes per launch at L2 (what the
    programs request, in sectors) and at HBM (each tensor once, a lower bound). Understands the
    gather from x row-major (``x_ptr`` [B, m]: tokens m apart, one lane per token) and from x
    transposed (``xt_ptr`` [m, LD]: BLOCK_B contiguous tokens per latent, spread over lanes in
    16-byte vectors, each token block starting at a multiple of BLOCK_B)."""
    B, N, D, bb, k_pad = args["B"], args["N"], args["D"], args["BLOCK_B"], args["K_PAD"]
    cand = args["cand_ptr"]
    token_blocks = -(-B // bb)
    if "xt_ptr" in args:
        src = args["xt_ptr"]
        elt = src.element_size()
        vec = min(VECTOR_BYTES // elt, bb)
        run = min(bb, 32 * vec)
        aligned = (src.stride(0) * elt) % SECTOR_BYTES == 0 and (bb * elt) % SECTOR_BYTES == 0
        spv = gather_sectors_per_value(src.stride(1), run, elt, aligned)
        gathered = src.shape[1] * N * D  # padded tokens are gathered too
        transpose = (B * src.shape[0] + src.numel()) * elt  # the launcher's x.T copy: read + write
        x_bytes = src.numel() * elt
    else:
        src = args["x_ptr"]
        elt = src.element_size()
        spv = gather_sectors_per_value(src.stride(0), 1, elt, True)
        gathered = B * N * D
        transpose = 0
        x_bytes = src.numel() * elt
    if "taps_ptr" in args:  # rows and values packed per degree, [D, N] int64
        atoms = args["taps_ptr"].numel() * args["taps_ptr"].element_size()
    else:
        atoms = N * D * (args["rows_ptr"].element_size() + args["values_ptr"].element_size())
    atoms += N * args["bias_ptr"].element_size() if args["HAS_BIAS"] else 0
    cand_bytes = cand.numel() * cand.element_size()
    return {
        "elt_bytes": elt, "sectors_per_value": spv, "gathered_values": gathered,
        "gather_bytes_l2": gathered * spv * SECTOR_BYTES,
        "atom_bytes_l2": token_blocks * atoms,  # every token block reads its splits' rows, values, bias
        "cand_bytes": cand_bytes, "transpose_bytes": transpose,
        "hbm_bytes": x_bytes + atoms + cand_bytes + transpose,
        "token_blocks": token_blocks, "splits": cand.shape[1] // k_pad,
    }


_GATHER_LOAD = re.compile(r"tt\.load .*:\s*tensor<(\d+)x(\d+)x!tt\.ptr<\w+>, #(\w+)>")
_BLOCKED = re.compile(r"^#(\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
                      r"warpsPerCTA = \[([\d, ]+)\], order = \[([\d, ]+)\]\}>", re.M)


def compile_quietly(launch: Launch, arch: int, log: io.StringIO | None = None):
    """The compiled kernel of a launch for ``arch``, always compiled afresh (a cache hit would skip
    ptxas and its report); what the compiler prints (ptxas's report, if on) goes to ``log``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialise(launch, arch)
    src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    triton.knobs.compilation.always_compile = True
    with contextlib.redirect_stdout(log if log is not None else io.StringIO()):
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)


def disassemble(cubin: bytes) -> str:
    """nvdisasm's listing of a cubin (the nvdisasm in Triton's wheel)."""
    from triton import knobs

    nvdisasm = Path(knobs.nvidia.cuobjdump.path).with_name("nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def expander_gather_layout(launch: Launch, arch: int) -> dict:
    """Compile an expander_encode launch; return the register layout Triton gave its gathers (the
    kernel's 2-D loads, [BLOCK_B tokens, BLOCK_N latents], all in one layout) from the TTGIR, the
    tokens of one latent that one warp-wide load reads (elements per thread x lanes, along
    tokens), the global-load opcodes of the SASS with their counts, and the gather loop's order
    (``gather_loop_order``)."""
    asm = launch_asm(launch, arch)
    ttgir = asm["ttgir"]
    layouts = {name: [[int(v) for v in group.split(",")] for group in groups]
               for name, *groups in _BLOCKED.findall(ttgir)}
    gathers = _GATHER_LOAD.findall(ttgir)
    if not gathers or len(set(gathers)) != 1:
        raise RuntimeError(f"{launch.kernel.__name__}: expected 2-D loads of one shape and layout, found {gathers}")
    spt, tpw, wpc, order = layouts[gathers[0][2]]
    sass = asm["sass"]
    loads: dict = {}
    for _, ins in _SASS_LINE.findall(sass):
        op = re.search(r"\bLDG\S*", ins)
        if op:
            loads[op.group(0)] = loads.get(op.group(0), 0) + 1
    return {"size_per_thread": spt, "threads_per_warp": tpw, "warps_per_cta": wpc, "order": order,
            "tokens_per_warp_load": spt[0] * tpw[0], "global_loads": loads, "gather_loop": gather_loop_order(sass)}


def gather_loop_order(sass: str) -> dict:
    """Where the waits fall in the gather loop (the innermost loop holding a 16-byte global load):
    its global loads (``LDG``), in program order, as (index in the loop, opcode); the index of its
    first ``BAR.SYNC`` and of its first ``FFMA``. A load issued before the first FFMA is in flight
    before anything accumulates; one before the first barrier, before any layout conversion."""
    instrs, loops = sass_loops(sass)
    inner = innermost_loops(loops)
    body = next(instrs[s:e + 1] for s, e in inner if any("LDG.E.128" in i for i in instrs[s:e + 1]))
    first = lambda pattern: next((i for i, ins in enumerate(body) if re.search(pattern, ins)), len(body))  # noqa: E731
    return {"loads": [(i, re.search(r"\bLDG\S*", ins).group(0)) for i, ins in enumerate(body) if "LDG" in ins],
            "first_barrier": first(r"\bBAR\.SYNC"), "first_ffma": first(r"\bFFMA\b"), "size": len(body)}


def launch_arguments(launch: Launch) -> dict:
    """A captured launch's arguments by parameter name (constexprs included)."""
    return {**dict(zip(signature_names(launch.kernel), launch.args)), **launch.kwargs}


# --- expander_decode: forward -----------------------------------------------------------------

def _expander_decode_specs() -> list[Spec]:
    ed = _mod("expander_decode")
    B, m, n, k = EXPANDER["B"], EXPANDER["m"], EXPANDER["n"], EXPANDER["k"]
    specs = []
    for dt in DTYPES:
        for d in (EXPANDER["d"], 45):  # the usual degree, and atoms wider than the 32-entry tile
            specs.append(Spec("expander_decode", f"forward,{dt},d={d}", lambda dt=dt, d=d: ed.triton_forward(
                _t(B, k, dtype=dt), _t(B, k, dtype="i64"), _t(n, d, dtype=dt), _t(n, d, dtype="i64"), m,
                _t(m, dtype=dt), _torch_dtype(dt))))
    return specs


# --- expander_decode: backward (values written once per atom by _rowgrad; activations alone) --

def _expander_decode_backward_specs() -> list[Spec]:
    """Both gradients (training); the activation gradient alone (values frozen); the value
    gradient alone, which is also expander_encode's (x in place of the output gradient)."""
    ed = _mod("expander_decode")
    B, m, n, k = EXPANDER["B"], EXPANDER["m"], EXPANDER["n"], EXPANDER["k"]
    specs = []
    for dt in DTYPES:
        for d in (EXPANDER["d"], 45):
            for need_acts, need_values, what in ((True, True, "backward"), (True, False, "grad acts"),
                                                 (False, True, "grad values (also expander_encode's)")):
                if d != EXPANDER["d"] and not (need_acts and need_values):
                    continue  # the wide atom only where both gradients share the gathers
                specs.append(Spec("expander_decode", f"{what},{dt},d={d}",
                                  lambda dt=dt, d=d, a=need_acts, v=need_values: ed.triton_backward(
                                      _t(B, m, dtype=dt), _t(B, k, dtype=dt), _t(B, k, dtype="i64"),
                                      _t(n, d, dtype=dt), _t(n, d, dtype="i64"), a, v)))
    return specs


SPEC_BLOCKS = [
    _sparse_decode_specs,
    _sparse_decode_weight_grad_specs,
    _topk_encode_specs,
    _expander_encode_specs,
    _expander_decode_specs,
    _expander_decode_backward_specs,
]


def all_specs() -> list[Spec]:
    return [spec for block in SPEC_BLOCKS for spec in block()]


# --- capturing launches -----------------------------------------------------------------------

@dataclass
class Launch:
    kernel: object  # triton JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def _recording(arch: int):
    """Replace JITFunction.run by a recorder and make the encoders size grids for ``arch``'s SMs."""
    from triton.runtime.jit import JITFunction

    topk = _mod("_topk")
    launches = _Launches()
    saved_run, saved_count = JITFunction.run, topk.multiprocessor_count
    saved_splits = {name: _mod(name).latent_splits for name in ("topk_encode", "expander_encode")}
    saved_generation = _mod("topk_encode").tensor_core_generation
    saved_resident = {name: _mod(name).resident_ctas for name in ("topk_encode", "expander_encode")}
    fake_cuda = types.SimpleNamespace(type="cuda")

    def record(self, *args, grid, warmup, **kwargs):
        if not warmup:  # a launcher's warmup (to read the compiled occupancy) is not a launch
            launches.append(Launch(self, args, kwargs))

    JITFunction.run = record
    topk.multiprocessor_count = lambda device: SM_COUNT[arch]
    for name, fn in saved_splits.items():
        setattr(_mod(name), "latent_splits", lambda tb, nt, device, *rest, fn=fn: fn(tb, nt, fake_cuda, *rest))
    _mod("topk_encode").tensor_core_generation = lambda device: arch // 10

    def occupancy(kernel, device, args, kwargs):  # what resident_ctas reads from a GPU build
        launches.probes.append(Launch(kernel, args, kwargs))
        # At least 1, as resident_ctas returns: a build with no resident CTA fails at its launch,
        # which compile_launch's ctas_per_sm (0) shows.
        return max(1, compile_launch(launches.probes[-1], arch)["ctas_per_sm"])

    for name in saved_resident:
        setattr(_mod(name), "resident_ctas", occupancy)
    try:
        yield launches
    finally:
        JITFunction.run = saved_run
        topk.multiprocessor_count = saved_count
        for name, fn in saved_splits.items():
            setattr(_mod(name), "latent_splits", fn)
        _mod("topk_encode").tensor_core_generation = saved_generation
        for name, fn in saved_resident.items():
            setattr(_mod(name), "resident_ctas", fn)


class _Launches(list):
    """The launches recorded, and in ``probes`` the builds the launchers' occupancy queries asked for."""

    def __init__(self):
        super().__init__()
        self.probes: list[Launch] = []


def _specialised_params(launch: Launch, arch: int) -> dict:
    """(parameter name, "constexpr" | "attrs") -> how the launch specialises it on ``arch``."""
    names = signature_names(launch.kernel)
    _, constexprs, attrs, _ = specialise(launch, arch)
    return {**{(names[k[0]], "constexpr"): repr(v) for k, v in constexprs.items()},
            **{(names[k[0]], "attrs"): repr(v) for k, v in attrs.items()}}


def capture(spec: Spec, arch: int) -> list[Launch]:
    """The spec's launches on ``arch``. Fails when a launcher's occupancy query (``resident_ctas``)
    asked for a build that none of its launches runs: its CTAs per SM would describe another build,
    and a GPU would JIT-compile both (Triton specialises ints equal to 1 or divisible by 16, so an
    integer that depends on the split count must be left unspecialised or kept aligned)."""
    with _recording(arch) as launches:
        spec.run()
    if not launches:
        raise RuntimeError(f"{spec.op}[{spec.label}]: the launcher launched no kernel")
    built = {build_key(launch, arch) for launch in launches}
    for probe in launches.probes:
        if build_key(probe, arch) not in built:
            mine = _specialised_params(probe, arch)
            # against the nearest launch of the same kernel
            differ = min((sorted({name for (name, _), _v in _specialised_params(launch, arch).items() ^ mine.items()})
                          for launch in launches if launch.kernel is probe.kernel),
                         key=len, default=["(not launched)"])
            raise RuntimeError(f"{spec.op}[{spec.label}] sm_{arch}: the occupancy query of {probe.kernel.__name__} "
                               f"compiled a build no launch runs (specialised differently: {differ})")
    return list(launches)


# --- compiling one launch ---------------------------------------------------------------------

_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def specialise(launch: Launch, arch: int):
    """What ``JITFunction.run`` computes for this launch on ``arch``: (signature, constexprs,
    attrs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


# One compile per build: the launchers' occupancy queries, the report and the models that read a
# build's SASS or TTGIR all share it. build key -> (report, {"ttgir": text, "sass": nvdisasm listing}).
_BUILDS: dict = {}


def build_key(launch: Launch, arch: int) -> tuple:
    """What tells one build of a kernel from another: the launch's specialisation on ``arch``."""
    signature, constexprs, attrs, options = specialise(launch, arch)
    return (launch.kernel, arch, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
            repr(options))


def _build(launch: Launch, arch: int) -> tuple[dict, dict]:
    key = build_key(launch, arch)
    if key not in _BUILDS:
        _BUILDS[key] = _compile(launch, arch, *specialise(launch, arch))
    return _BUILDS[key]


def compile_launch(launch: Launch, arch: int) -> dict:
    """A launch's build for ``arch``: registers, shared memory, spills, CTAs per SM, SASS counts."""
    return dict(_build(launch, arch)[0])


def launch_asm(launch: Launch, arch: int) -> dict:
    """The same build's TTGIR (``"ttgir"``) and disassembled SASS (``"sass"``), without compiling it
    again."""
    return _build(launch, arch)[1]


def _compile(launch: Launch, arch: int, signature, constexprs, attrs, options) -> tuple[dict, dict]:
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    compiled = compile_quietly(launch, arch, log)
    text = log.getvalue()
    used, spill = _USED.findall(text), _SPILL.findall(text)
    if not used or not spill:
        raise RuntimeError(f"{launch.kernel.__name__} sm_{arch}: no ptxas report found in:\n{text}")
    stack, stores, loads = (int(v) for v in spill[-1])
    regs, shared = int(used[-1]), int(compiled.metadata.shared)
    listing = disassemble(compiled.asm["cubin"])
    divisible = sorted(signature_names(launch.kernel)[k[0]] for k, v in attrs.items() if v)
    return {
        "registers": regs, "shared_bytes": shared, "stack_bytes": stack, "spill_stores": stores,
        "spill_loads": loads, "num_warps": options.num_warps, "num_stages": options.num_stages,
        "ctas_per_sm": ctas_per_sm(arch, regs, shared, options.num_warps), **sass_stats(listing),
        "divisible_by_16": divisible,
        "constexprs": {signature_names(launch.kernel)[k[0]]: _jsonable(v) for k, v in constexprs.items()},
    }, {"ttgir": compiled.asm["ttgir"], "sass": listing}


def signature_names(kernel) -> list[str]:
    return [p.name for p in kernel.params]


def _jsonable(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def ctas_per_sm(arch: int, regs: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per SM on ``arch``: the launchers' own rule (``_topk.ctas_per_sm``)."""
    return _mod("_topk").ctas_per_sm(regs, shared, num_warps, SM_LIMITS[arch])


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*\.?(L_x_\d+|\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`?\(?\.?(L_x_\d+)")


# Memory atomics (not REDUX, a warp reduction) and the GPU-wide fence that Triton's default
# acq_rel semantics put before each one (sem="relaxed" has none).
_ATOMIC = re.compile(r"\b(ATOMG|ATOMS|ATOM|REDG|RED)\.")
_FENCE = "MEMBAR.ALL.GPU"


def sass_atomics(instructions: list[str]) -> tuple[int, list[str]]:
    """(number of atomics, the atomics preceded by a MEMBAR.ALL.GPU) in one kernel's SASS
    instructions, in program order."""
    count, fenced, behind_fence = 0, [], False
    for ins in instructions:
        if _FENCE in ins:
            behind_fence = True
        elif _ATOMIC.search(ins):
            count += 1
            if behind_fence:
                fenced.append(ins)
    return count, fenced


def sass_listing(text: str) -> tuple[list[str], dict[str, int], list[tuple[int, str]]]:
    """A kernel's disassembled SASS -> (its instructions in program order, each label's
    instruction index, every branch as (its index, its target label) in program order)."""
    instrs, labels, branches = [], {}, []
    for line in text.splitlines():
        lab = _LABEL.match(line)
        if lab:
            labels[lab.group(1).lstrip(".")] = len(instrs)
            continue
        ins = _SASS_LINE.search(line)
        if ins:
            body = ins.group(2).strip()
            br = _BRANCH.search(body)
            if br:
                branches.append((len(instrs), br.group(1).lstrip(".")))
            instrs.append(body)
    return instrs, labels, branches


def sass_loops(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """A kernel's disassembled SASS -> (its instructions in program order, every loop as the
    (first, last) instruction index of a backward branch and its target, in branch order; a
    branch to itself, such as the trailing ``BRA`` after ``EXIT``, is a loop of one)."""
    instrs, labels, branches = sass_listing(text)
    return instrs, [(labels[t], at) for at, t in branches if t in labels and labels[t] <= at]


def innermost_loops(loops: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The loops of ``sass_loops`` that hold no other loop."""
    return [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]


def sass_stats(listing: str) -> dict:
    """Total instructions, main-loop instructions (the largest innermost loop), every innermost
    loop's size, the tensor-core loop's size, MEMBAR fences and atomics (all, and those behind a
    GPU-wide fence) of a kernel's disassembled SASS."""
    instrs, loops = sass_loops(listing)
    innermost = innermost_loops(loops)
    main = max((e - s + 1 for s, e in innermost), default=0)
    # The tensor-core loop: the innermost loop holding an MMA (HGMMA on sm_90, HMMA on sm_80).
    mma = max((e - s + 1 for s, e in innermost if any(re.match(r"(HGMMA|HMMA)\b", i) for i in instrs[s:e + 1])),
              default=0)
    atomics, fenced = sass_atomics(instrs)
    return {
        "sass_instructions": len(instrs),
        "main_loop_instructions": main,
        "innermost_loops": sorted((e - s + 1 for s, e in innermost), reverse=True),
        "mma_loop_instructions": mma,
        "mma_opcodes": sorted({m.group(0) for i in instrs for m in [re.match(r"(HGMMA|HMMA)\.[\w.]+", i)] if m}),
        "membar": sum(1 for i in instrs if "MEMBAR" in i),
        "atomics": atomics,
        "fenced_atomics": fenced,
    }


# --- the report -------------------------------------------------------------------------------

def work_units() -> list[list[Spec]]:
    """The specs in groups (a spec without ``group`` alone), heaviest total ``weight`` first."""
    groups: dict[str, list[Spec]] = {}
    for i, spec in enumerate(all_specs()):
        groups.setdefault(spec.group or f"#{i}", []).append(spec)
    return sorted(groups.values(), key=lambda unit: -sum(spec.weight for spec in unit))


def _claim(queue: Path) -> int:
    """The next unit's index from a counter file shared by the processes of one report."""
    import fcntl

    with open(queue, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        index = int(f.read().strip() or 0)
        f.seek(0)
        f.write(str(index + 1))
        f.truncate()
    return index


def compile_all(queue: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Every spec's launches on both archs; with ``queue`` (a file holding 0), only the work units
    this process claims from it: ``compile_parallel`` runs one process a core on one queue, so a
    core that finishes early takes more, and each group's builds are compiled once."""
    units = work_units()

    def mine():
        if queue is None:
            yield from units
            return
        while (index := _claim(queue)) < len(units):
            yield units[index]

    rows, failures, seen = [], [], set()
    for spec in (spec for unit in mine() for spec in unit):
        for arch in ARCHS:
            try:
                launches = capture(spec, arch)
            except Exception as exc:
                failures.append({"op": spec.op, "label": spec.label, "arch": f"sm_{arch}", "error": repr(exc)[:2000]})
                continue
            for launch in launches:
                name = launch.kernel.__name__
                try:
                    key = build_key(launch, arch)
                    if key in seen:  # the same build launched twice by one launcher
                        continue
                    seen.add(key)
                    rows.append({"op": spec.op, "label": spec.label, "kernel": name, "arch": f"sm_{arch}",
                                 "build": repr(key), **compile_launch(launch, arch)})
                except Exception as exc:  # report every failure, not just the first
                    failures.append({"op": spec.op, "label": spec.label, "kernel": name, "arch": f"sm_{arch}",
                                     "error": repr(exc)[:2000]})
    return rows, failures


def compile_parallel(jobs: int, timeout: float = 1500) -> tuple[list[dict], list[dict]]:
    """``compile_all`` in ``jobs`` processes claiming units from one queue (ptxas is single-threaded),
    merged back into spec order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="gpu_compile_") as tmp:
        queue = Path(tmp) / "queue"
        queue.write_text("0")
        command = [sys.executable, str(Path(__file__).resolve()), "--queue", str(queue)]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(jobs)]
        rows, failures = [], []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                raise
            if not out.strip():
                raise RuntimeError(f"gpu_compile --queue printed nothing (exit {proc.returncode}); "
                                   f"stderr:\n{err[-4000:]}")
            part = json.loads(out.strip().splitlines()[-1])
            rows += part["rows"]
            failures += part["failures"]
    order = {(spec.op, spec.label): i for i, spec in enumerate(all_specs())}
    rows.sort(key=lambda r: (order.get((r["op"], r["label"]), len(order)), r["arch"]))
    # A build that two specs launch is reported once, under the first spec (as one process does).
    seen: set[str] = set()
    rows = [r for r in rows if not (r["build"] in seen or seen.add(r["build"]))]
    return rows, failures


def markdown(rows: list[dict], failures: list[dict]) -> str:
    head = ("| kernel | launch | arch | warps | stages | registers | shared (B) | spill st/ld (B) | CTAs/SM "
            "| SASS instrs | main-loop instrs | MEMBAR | atomics (fenced) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r['kernel']} | {r['label']} | {r['arch']} | {r['num_warps']} | {r['num_stages']} "
                   f"| {r['registers']} | {r['shared_bytes']} | {r['spill_stores']}/{r['spill_loads']} "
                   f"| {r['ctas_per_sm']} | {r['sass_instructions']} | {r['main_loop_instructions']} "
                   f"| {r['membar']} | {r['atomics']} ({len(r['fenced_atomics'])}) |")
    for f in failures:
        out.append(f"| {f.get('kernel', f['op'])} | {f['label']} | {f['arch']} | FAILED: {f['error'][:200]} |")
    return "\n".join(out)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:  # --jobs 0 ran no process and reported no kernel and no failure: a pass
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (``--help``: usage); an unknown argument is an error, not a full compile."""
    parser = argparse.ArgumentParser(
        prog="gpu_compile.py", description="Compile every Triton kernel of topk_kernels for sm_80 and sm_90 as its "
        "launcher launches it (no GPU needed; run without TRITON_INTERPRET) and report registers, spills, shared "
        "memory, occupancy and SASS counts: JSON on stdout, or a markdown table.")
    parser.add_argument("--markdown", action="store_true", help="print the table for benchmarks/RESULTS.md")
    work = parser.add_mutually_exclusive_group()
    work.add_argument("--queue", type=Path, metavar="FILE",
                      help="compile only the work units this process claims from counter file FILE (shared "
                           "with other processes; --jobs runs them)")
    work.add_argument("--jobs", type=_positive_int, metavar="N",
                      help="N processes claiming work units from one queue, merged in spec order")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)  # first: --help or a wrong argument never starts a compile
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_compile: unset TRITON_INTERPRET to compile for real GPUs", file=sys.stderr)
        return 2
    if args.jobs is not None:
        rows, failures = compile_parallel(args.jobs)
    else:
        rows, failures = compile_all(args.queue)
    if args.markdown:
        print(markdown(rows, failures))
    else:
        print(json.dumps({"rows": rows, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
