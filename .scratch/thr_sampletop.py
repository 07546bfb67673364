import sys, time
sys.path.insert(0, "tests")
import gpu_compile as gc
te = gc._mod("topk_encode")
for n, k in [(8192, 4096), (4096, 2048), (2048, 1024), (16384, 4096)]:
    print(n, k, te._threshold_sizes(n, k, te.THRESHOLD_TILE), flush=True)
    spec = gc.Spec("topk_encode", f"thr n={n} k={k}", lambda n=n, k=k: te._threshold_forward(
        gc._t(8192, 2048, dtype="bf16"), gc._t(n, 2048, dtype="bf16"), gc._t(n, dtype="bf16"), k, gc._torch_dtype("bf16")))
    for arch in (90, 80):
        t = time.time()
        for launch in gc.capture(spec, arch):
            r = gc.compile_launch(launch, arch)
            print(arch, launch.kernel.__name__, {x: r[x] for x in ("registers", "shared_bytes", "spill_stores", "spill_loads", "ctas_per_sm")}, f"{time.time()-t:.0f}s", flush=True)
