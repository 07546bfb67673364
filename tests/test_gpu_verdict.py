"""benchmarks/gpu.py keeps working: its --dry-run (CPU, Triton interpreter, tiny sizes) runs every
correctness check and every timed case the CUDA run would, and every check passes."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"

OPS = ("topk_encode", "sparse_decode", "expander_encode", "expander_decode")
GROUPS = ("topk_encode fwd ", "topk_encode fwd+bwd ", "sparse_decode fwd ", "sparse_decode fwd+bwd ",
          "expander_encode fwd ", "expander_encode fwd+bwd ", "expander_decode fwd ", "expander_decode fwd+bwd ",
          "TopK SAE train step ", "Expander SAE train step ")


def test_dry_run_reports_every_op_and_step(tmp_path):
    out = tmp_path / "verdict.md"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TOPK_KERNELS_CPU_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"  # tiny tensors: threads only add scheduling stalls on a shared CI box
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    checks = [line for line in report.splitlines() if line.startswith(tuple(f"| {op} |" for op in OPS))]
    assert checks and all(line.rstrip().endswith("| PASS |") for line in checks), report
    for op in OPS:
        assert sum(line.startswith(f"| {op} |") for line in report.splitlines()) >= 3, op
    for group in GROUPS:
        rows = [line for line in report.splitlines() if line.startswith(f"| {group}")]
        assert len(rows) >= 2 and not any("Error" in r or "OOM" in r for r in rows), (group, rows)
    trained = report.split("### (c) Training on the device", 1)[1].splitlines()
    trained = [line for line in trained if line.startswith(("| TopKSAE |", "| ExpanderSAE"))]
    assert len(trained) == 4 and all(line.rstrip().endswith("| PASS |") for line in trained), trained


def test_step_profile_runs_on_cpu(capsys):
    """benchmarks/step_profile.py (gpu_session.sh's PART=f) keeps working: on CPU at its small
    sizes it prints one table per model whose rows are the step's operators, shares summing to
    100 % with the remainder row."""
    sys.path.insert(0, str(SCRIPT.parent))
    import step_profile

    assert step_profile.main(["--device", "cpu", "--small", "--steps", "1", "--warmup", "1", "--top", "5"]) == 0
    text = capsys.readouterr().out
    for model in ("TopKSAE", "ExpanderSAE"):
        table = text.split(f"### {model} train step, CPU", 1)[1].split("###", 1)[0]
        shares = [float(line.rsplit("|", 2)[1].strip(" %")) for line in table.splitlines()
                  if line.startswith("| `") or line.startswith("| (the other")]
        assert len(shares) == 6 and abs(sum(shares) - 100) < 0.5, table
