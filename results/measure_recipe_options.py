"""Chooses the recipe options' defaults by measurement (issue 10, item 3): one short run per
option setting on the real model, scored on the validation split, the way the frontier's lr sweep
scores learning rates.

Every run: SmolLM2-135M-Instruct layer 15 (the frontier's workspace and defaults), k = 64, seeds
0 and 1, 500,000 training tokens (the lr sweep's length), at the learning rate the frontier's
sweep chose for that (arch, n, degree) (read from ``--sweeps``, the grid's ``sweeps.json``), one
option changed from the defaults at a time. Scored by FVU on the validation split (never the test
split) and the training-time dead fraction. Resumable: a finished run is reused.

    OMP_NUM_THREADS=1 python results/measure_recipe_options.py \\
        --sweeps ~/.cache/topk-sae/runs/frontier-v2/sweeps.json \\
        --runs ~/.cache/topk-sae/runs/recipe-options --out results/recipe_options.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from sae.cli import _point_configs, _point_name, _train_one, _Workspace, build_parser
from sae.rundir import write_json

TOKENS = 500_000
K = 64
SEEDS = (0, 1)
# (variant name, SAE overrides, train overrides, lr factor): one option changed at a time.
COMMON = [
    ("defaults", {}, {}, 1.0),
    ("auxk_norm=residual", {"auxk_norm": "residual"}, {}, 1.0),
    ("normalize_activations", {"normalize_activations": True}, {}, 1.0),
    # Normalised inputs change the scale the swept lr was chosen at: bracket it.
    ("normalize_activations, lr/2", {"normalize_activations": True}, {}, 0.5),
    ("normalize_activations, lr*2", {"normalize_activations": True}, {}, 2.0),
    ("dead_fraction=0.0625", {}, {"dead_fraction": 0.0625}, 1.0),
]
EXPANDER_ONLY = [
    ("renorm_values", {"renorm_values": True}, {}, 1.0),
    # Unit-norm values keep the effective step the lr itself: the swept lr (chosen while the
    # values' norm grows) may be far too hot for them, so renormalisation also runs at lr / 8.
    ("renorm_values, lr/8", {"renorm_values": True}, {}, 0.125),
    ("signed (no ReLU)", {"signed": True}, {}, 1.0),
]
POINTS = [dict(arch="topk", k=K, n=4608, degree=None), dict(arch="expander", k=K, n=4608, degree=7)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", required=True, help="the frontier's sweeps.json (learning rates per point)")
    ap.add_argument("--runs", required=True, help="folder for the runs (one per variant and seed)")
    ap.add_argument("--out", default="results/recipe_options.json")
    opts = ap.parse_args()
    sweeps = {(s["arch"], s["n_latents"], s["degree"]): s["lr"] for s in json.loads(Path(opts.sweeps).read_text())}
    args = build_parser().parse_args(["frontier", "--no-progress"])
    ws = _Workspace(args)
    runs = Path(opts.runs)
    rows = []
    for seed in SEEDS:  # every variant at seed 0 first: a partial run is already a full comparison
        for point in POINTS:
            variants = COMMON + (EXPANDER_ONLY if point["arch"] == "expander" else [])
            for name, sae_over, train_over, lr_factor in variants:
                p = dict(point, seed=seed)
                lr = sweeps[(p["arch"], p["n"], p["degree"])] * lr_factor
                slug = (name.replace(" ", "").replace(",", "_").replace("(", "").replace(")", "").replace("/", "div")
                        .replace("*", "x"))
                run_dir = runs / f"{_point_name(p['arch'], K, p['n'], p['degree'], seed)}_{slug}"
                done = run_dir / "row.json"
                if done.exists():
                    row = json.loads(done.read_text())
                else:
                    print(f"[options] {run_dir.name}: lr {lr:.3g}, {TOKENS:,} tokens", flush=True)
                    sae_cfg, train_cfg = _point_configs(args, p, lr, total_tokens=TOKENS, sae=dict(sae_over),
                                                        **train_over)
                    row = _train_one(ws, sae_cfg, train_cfg, run_dir, args, split="validation")
                rows.append({"arch": p["arch"], "degree": p["degree"], "seed": seed, "variant": name, "lr": lr,
                             "val_fvu": row["val_fvu"], "training_dead_fraction": row["training_dead_fraction"],
                             "training_dead_window_tokens": row["training_dead_window_tokens"]})
                print(f"[options] {run_dir.name}: val FVU {row['val_fvu']:.4f}, training dead "
                      f"{row['training_dead_fraction']:.3f}", flush=True)
    summary = []
    for point in POINTS:
        for name in dict.fromkeys(r["variant"] for r in rows if r["arch"] == point["arch"]):
            rs = [r for r in rows if r["arch"] == point["arch"] and r["variant"] == name]
            fvu = [r["val_fvu"] for r in rs]
            summary.append({"arch": point["arch"], "degree": point["degree"], "variant": name,
                            "seeds": [r["seed"] for r in rs], "val_fvu_mean": statistics.fmean(fvu),
                            "val_fvu": fvu, "training_dead_fraction": [r["training_dead_fraction"] for r in rs]})
    write_json(Path(opts.out), {"tokens": TOKENS, "k": K, "split": "validation", "provenance": ws.provenance,
                                "rows": rows, "summary": summary})
    for s in summary:
        print(f"{s['arch']:9s} {s['variant']:24s} val FVU {s['val_fvu_mean']:.4f} "
              f"({', '.join(f'{v:.4f}' for v in s['val_fvu'])})  dead {s['training_dead_fraction']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
