"""Chooses the recipe options' defaults by measurement (issue 10, item 3): one short run per
option setting on the real model, scored on the validation split, the way the frontier's lr sweep
scores learning rates.

Every run: SmolLM2-135M-Instruct layer 15 (the frontier's workspace and defaults), k = 64,
500,000 training tokens (the lr sweep's length), at the learning rate the frontier's sweep chose
for that (arch, n, degree) (read from ``--sweeps``, the grid's ``sweeps.json``) times a factor,
one option changed from the defaults at a time. Seed 0 runs every option at each of its lr
factors (options that change the scale the lr was swept at get a bracket); seed 1 runs each
option at the factor that won at seed 0. Scored by FVU on the validation split (never the test
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

from sae.cli import _data_config, _point_configs, _point_name, _train_one, _Workspace, build_parser
from sae.rundir import write_json

TOKENS = 500_000
K = 64
# (option, SAE overrides, train overrides, lr factors): one option changed from the defaults at a
# time. Options that change the scale the swept lr was chosen at get their own lr bracket: seed 0
# runs every factor, seed 1 the factor that won at seed 0.
OPTIONS = [
    ("defaults", {}, {}, (1.0,)),
    ("auxk_norm=residual", {"auxk_norm": "residual"}, {}, (1.0,)),
    ("normalize_activations", {"normalize_activations": True}, {}, (1.0, 0.5, 2.0, 0.25, 0.125)),
    ("dead_fraction=0.0625", {}, {"dead_fraction": 0.0625}, (1.0,)),
]
EXPANDER_ONLY = [
    # Unit-norm values keep the effective step the lr itself: the swept lr (chosen while the
    # values' norm grows) may be far too hot for them.
    ("renorm_values", {"renorm_values": True}, {}, (1.0, 0.125, 0.25, 0.0625)),
    ("signed (no ReLU)", {"signed": True}, {}, (1.0,)),
]
POINTS = [dict(arch="topk", k=K, n=4608, degree=None), dict(arch="expander", k=K, n=4608, degree=7)]


def _variant(option: str, factor: float) -> str:
    if factor == 1:
        return option
    return f"{option}, lr/{1 / factor:g}" if factor < 1 else f"{option}, lr*{factor:g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", required=True, help="the frontier's sweeps.json (learning rates per point)")
    ap.add_argument("--runs", required=True, help="folder for the runs (one per variant and seed)")
    ap.add_argument("--out", default="results/recipe_options.json")
    opts = ap.parse_args()
    sweeps = {(s["arch"], s["n_latents"], s["degree"]): s["lr"] for s in json.loads(Path(opts.sweeps).read_text())}
    args = build_parser().parse_args(["frontier", "--no-progress"])
    ws = _Workspace(_data_config(args), progress=False)
    runs = Path(opts.runs)
    rows = []

    def run(point: dict, option: str, sae_over: dict, train_over: dict, factor: float, seed: int) -> dict:
        p = dict(point, seed=seed)
        lr = sweeps[(p["arch"], p["n"], p["degree"])] * factor
        name = _variant(option, factor)
        slug = (name.replace(" ", "").replace(",", "_").replace("(", "").replace(")", "").replace("/", "div")
                .replace("*", "x"))
        run_dir = runs / f"{_point_name(p['arch'], K, p['n'], p['degree'], seed)}_{slug}"
        done = run_dir / "row.json"
        if done.exists():
            row = json.loads(done.read_text())
        else:
            print(f"[options] {run_dir.name}: lr {lr:.3g}, {TOKENS:,} tokens", flush=True)
            sae_cfg, train_cfg = _point_configs(args, p, lr, total_tokens=TOKENS, sae=dict(sae_over), **train_over)
            row = _train_one(ws, sae_cfg, train_cfg, run_dir, args, split="validation")
        print(f"[options] {run_dir.name}: val FVU {row['val_fvu']:.4f}, training dead "
              f"{row['training_dead_fraction']:.3f}", flush=True)
        out = {"arch": p["arch"], "degree": p["degree"], "seed": seed, "option": option, "lr_factor": factor,
               "lr": lr, "val_fvu": row["val_fvu"], "training_dead_fraction": row["training_dead_fraction"],
               "training_dead_window_tokens": row["training_dead_window_tokens"]}
        rows.append(out)
        return out

    best: dict = {}
    for point in POINTS:  # seed 0: every option at every lr factor
        for option, sae_over, train_over, factors in OPTIONS + (EXPANDER_ONLY if point["arch"] == "expander" else []):
            results = [run(point, option, sae_over, train_over, f, 0) for f in factors]
            best[(point["arch"], option)] = (min(results, key=lambda r: r["val_fvu"])["lr_factor"], sae_over, train_over)
    for point in POINTS:  # seed 1: each option at the lr factor that won at seed 0
        for (arch, option), (factor, sae_over, train_over) in best.items():
            if arch == point["arch"]:
                run(point, option, sae_over, train_over, factor, 1)
    summary = []
    for (arch, option), (factor, _, _) in best.items():
        bracket = {f"{r['lr_factor']:g}": r["val_fvu"] for r in rows
                   if r["arch"] == arch and r["option"] == option and r["seed"] == 0}
        at_best = [r for r in rows if r["arch"] == arch and r["option"] == option and r["lr_factor"] == factor]
        fvu = [r["val_fvu"] for r in at_best]
        summary.append({"arch": arch, "option": option, "best_lr_factor": factor, "seed0_val_fvu_by_lr_factor": bracket,
                        "seeds": [r["seed"] for r in at_best], "val_fvu": fvu, "val_fvu_mean": statistics.fmean(fvu),
                        "training_dead_fraction": [r["training_dead_fraction"] for r in at_best]})
    write_json(Path(opts.out), {"tokens": TOKENS, "k": K, "split": "validation", "provenance": ws.provenance,
                                "rows": rows, "summary": summary})
    for s in summary:
        print(f"{s['arch']:9s} {s['option']:24s} lr x{s['best_lr_factor']:g}: val FVU {s['val_fvu_mean']:.4f} "
              f"({', '.join(f'{v:.4f}' for v in s['val_fvu'])}), dead {s['training_dead_fraction']}; "
              f"seed 0 by lr factor {s['seed0_val_fvu_by_lr_factor']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
