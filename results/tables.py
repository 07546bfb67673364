"""Markdown tables of a frontier.json, for results/README.md and the README's results section.

The tables are printed from the file, never typed by hand:

    python results/tables.py [results/frontier.json]

Three tables:

1. **The frontier**: one line per point (architecture, k, n, degree), the seed mean of CE-loss
   recovered (SAELens convention) +- its standard deviation over seeds, the union of the seeds' 95%
   bootstrap intervals over test contexts (the widest honest range: each seed's interval, pooled),
   dCE = CE_sae - CE_clean in nats with the same two spreads, KL(clean || spliced), FVU, L0 and the
   training-time dead fraction.
2. **The paper's claim**: each Expander point beside the dense SAE of matched decoder storage, the
   difference of seed means, and whether the pooled intervals overlap.
3. **The control**: the paper-faithful row in both CE conventions.
4. **The paper's convention** (when ``paper_convention.json`` lies beside the frontier file): the
   committed seed-0 SAE files, re-evaluated by ``python -m sae evaluate`` in both conventions, and
   the share of the full dense SAE's CE-loss recovered that the Expander SAE keeps.

A partial grid prints too (with a warning on stderr), so the script can be tried while the grid
runs; only a file with ``complete: true`` belongs in results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _points(rows: list) -> dict:
    """(arch, k, n, degree) -> the rows of its seeds, for the grid's rows (the control excluded)."""
    out: dict = {}
    for r in rows:
        if r.get("control"):
            continue
        out.setdefault((r["arch"], r["k"], r["n_latents"], r["degree"]), []).append(r)
    return out


def _spread(rs: list, key: str) -> tuple[float, float | None, float, float]:
    """(seed mean, seed standard deviation or None for one seed, pooled interval low, high)."""
    vals = [r[key] for r in rs]
    sd = statistics.stdev(vals) if len(vals) > 1 else None
    return statistics.fmean(vals), sd, min(r[f"{key}_low"] for r in rs), max(r[f"{key}_high"] for r in rs)


def _fmt(mean: float, sd: float | None, low: float, high: float, digits: int) -> str:
    pm = f" ± {sd:.{digits}f}" if sd is not None else ""
    return f"{mean:.{digits}f}{pm} [{low:.{digits}f}, {high:.{digits}f}]"


def _label(arch: str, n: int, degree, rs: list) -> str:
    if arch == "expander":
        return f"Expander d = {degree}"
    matched = rs[0].get("matched_degree")
    return f"dense n = {n}" + (f" (matched to d = {matched})" if matched else "")


def frontier_table(rows: list) -> str:
    lines = ["| k | SAE | decoder values | seeds | CE-loss recovered | dCE (nats) | KL | FVU | L0 | training dead |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    points = _points(rows)
    for (arch, k, n, degree), rs in sorted(points.items(), key=lambda kv: (kv[0][1], -kv[1][0]["decoder_values"],
                                                                          kv[0][0])):
        rs = sorted(rs, key=lambda r: r["seed"])
        kl = statistics.fmean(r["kl"] for r in rs)
        lines.append(
            f"| {k} | {_label(arch, n, degree, rs)} | {rs[0]['decoder_values']:,} | {len(rs)} "
            f"| {_fmt(*_spread(rs, 'ce_recovered'), 4)} | {_fmt(*_spread(rs, 'delta_ce'), 3)} | {kl:.3f} "
            f"| {statistics.fmean(r['fvu'] for r in rs):.4f} | {statistics.fmean(r['l0'] for r in rs):.1f} "
            f"| {statistics.fmean(r['training_dead_fraction'] for r in rs):.3f} |")
    return "\n".join(lines)


def claim_table(rows: list) -> str:
    """Each Expander point against the dense point whose ``matched_degree`` is its degree (same k)."""
    points = _points(rows)
    lines = ["| k | d | Expander CE-loss recovered | matched dense n | its storage ratio | dense CE-loss recovered "
             "| Expander - dense | intervals overlap |",
             "|---|---|---|---|---|---|---|---|"]
    for (arch, k, n, degree), rs in sorted(points.items(), key=lambda kv: (kv[0][1], kv[0][3] or 0)):
        if arch != "expander":
            continue
        dense = [(key, ds) for key, ds in points.items()
                 if key[0] == "topk" and key[1] == k and ds[0].get("matched_degree") == degree]
        if not dense:
            continue
        (_, _, dn, _), ds = dense[0]
        e, d = _spread(rs, "ce_recovered"), _spread(ds, "ce_recovered")
        overlap = "yes" if e[2] <= d[3] and d[2] <= e[3] else "no"
        lines.append(f"| {k} | {degree} | {_fmt(*e, 4)} | {dn} | {ds[0].get('storage_ratio', 1.0):.3f} "
                     f"| {_fmt(*d, 4)} | {e[0] - d[0]:+.4f} | {overlap} |")
    return "\n".join(lines)


def control_table(rows: list) -> str:
    lines = ["| row | convention | CE-loss recovered [95% CI] | dCE (nats) | FVU | training dead |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("control"):
            continue
        name = f"control ({r['control']}): Expander d = {r['degree']}, k = {r['k']}, seed {r['seed']}"
        lines.append(f"| {name} | SAELens | {r['ce_recovered']:.4f} [{r['ce_recovered_low']:.4f}, "
                     f"{r['ce_recovered_high']:.4f}] | {r['delta_ce']:.3f} | {r['fvu']:.4f} "
                     f"| {r['training_dead_fraction']:.3f} |")
        if "paper_ce_recovered" in r:
            low, high = r.get("paper_ce_recovered_low"), r.get("paper_ce_recovered_high")
            ci = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
            dce = r.get("paper_delta_ce")
            lines.append(f"| | paper | {r['paper_ce_recovered']:.4f}{ci} | "
                         f"{'' if dce is None else f'{dce:.3f}'} | | |")
    return "\n".join(lines)


def paper_table(evals: dict) -> str:
    """``paper_convention.json``'s rows: CE-loss recovered in both conventions with their 95%
    bootstrap intervals, then each Expander row's share of the full dense SAE's (the largest
    dense row), the figure the paper quotes."""
    def ci(r: dict, prefix: str) -> str:
        return (f"{r[prefix + 'ce_recovered']:.4f} [{r[prefix + 'ce_recovered_low']:.4f}, "
                f"{r[prefix + 'ce_recovered_high']:.4f}]")

    rows = evals["rows"]
    lines = ["| SAE (seed 0) | decoder values | CE-loss recovered, SAELens [95% CI] | CE-loss recovered, "
             "paper convention [95% CI] | dCE, paper convention (nats) | FVU |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['decoder_values']:,} | {ci(r, '')} | {ci(r, 'paper_')} "
                     f"| {r['paper_delta_ce']:.3f} | {r['fvu']:.4f} |")
    dense = max((r for r in rows if r["arch"] == "TopKSAE"), key=lambda r: r["decoder_values"], default=None)
    if dense is not None:
        for r in rows:
            if r["arch"] == "ExpanderSAE":
                lines.append("")
                lines.append(f"{r['name']} keeps {r['ce_recovered'] / dense['ce_recovered']:.2%} (SAELens) and "
                             f"{r['paper_ce_recovered'] / dense['paper_ce_recovered']:.2%} (paper convention) of "
                             f"{dense['name']}'s CE-loss recovered, with {dense['decoder_values'] / r['decoder_values']:.0f}x "
                             f"fewer decoder values.")
    return "\n".join(lines)


def render(frontier: dict, evals: dict | None = None) -> str:
    rows = frontier["rows"]
    r0 = rows[0]
    head = (f"{r0['model']} (`{r0['model_file']}`, SHA-256 {r0['model_sha256'][:12]}...), layer {r0['layer']}, "
            f"BOS id {r0['bos_id']}; CE over {r0['ce_tokens']:,} non-BOS test predictions "
            f"({r0['test_tokens']:,} test tokens); CE clean {r0['ce_clean']:.4f}, zero-ablated "
            f"{r0['ce_zero']:.4f}, mean-ablated {r0['ce_mean_ablation']:.4f} nats. Each cell: seed mean ± seed "
            f"standard deviation [lowest low, highest high of the seeds' 95% bootstrap intervals].")
    parts = [head, "", frontier_table(rows), "", claim_table(rows)]
    if any(r.get("control") for r in rows):
        parts += ["", control_table(rows)]
    if evals is not None:
        parts += ["", paper_table(evals)]
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("frontier", nargs="?", default=str(Path(__file__).with_name("frontier.json")))
    args = p.parse_args(argv)
    frontier = json.loads(Path(args.frontier).read_text())
    if not frontier.get("complete"):
        print(f"warning: {args.frontier} is a partial grid (complete: false)", file=sys.stderr)
    paper = Path(args.frontier).with_name("paper_convention.json")
    print(render(frontier, json.loads(paper.read_text()) if paper.exists() else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
