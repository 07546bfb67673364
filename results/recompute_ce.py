"""Independent recomputation of CE_zero and CE_sae for saved SAE files, against their frontier rows.

Issue 10 asks that anyone can re-evaluate the committed SAEs (results/saes/) and land within 0.01
nats of their rows in frontier.json. This script does it without ``sae.evaluate`` or the layer
replay of ``sae.data.layouts``: one plain forward hook on the model's decoder layer, full forward
passes, and CE averaged over the predictions made at non-BOS positions (SAELens's convention):

- CE_zero: the layer's output zeroed at every position, BOS included;
- CE_sae: the output replaced by the SAE's reconstruction at every non-BOS position.

It uses the package only to load the model, the text and the SAE file, and to cut the same test
split (``sae.data.token_splits`` with the frontier's defaults). Run from the repository root:

    OMP_NUM_THREADS=1 python results/recompute_ce.py results/saes/*.safetensors \\
        [--frontier results/frontier.json] [--contexts N]

Prints each file's recomputed numbers beside its row's, and exits 1 when any differs by 0.01 nats
or more. ``--contexts N`` recomputes on the first N test contexts only (a quick look; the rows are
over the whole test split, so only a full run can be compared with them).
tests/test_frontier.py runs ``recompute_ce`` on the tiny model's frontier.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TOLERANCE = 0.01  # nats


def recompute_ce(model, tokens: torch.Tensor, layer: int, sae, bos_id: int, batch: int = 4) -> tuple[float, float]:
    """(CE_zero, CE_sae) of ``model`` on ``tokens`` [contexts, ctx_len], both averaged over the
    predictions made at non-BOS positions: the output of decoder layer ``layer`` zeroed at every
    position, or replaced by ``sae``'s reconstruction at every non-BOS position."""
    state: dict = {"mode": None, "ids": None}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if state["mode"] == "zero":
            h = torch.zeros_like(h)
        elif state["mode"] == "sae":
            mask = state["ids"] != bos_id
            h = h.clone()
            h[mask] = sae.decode(*sae.encode(h[mask].float())).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[layer].register_forward_hook(hook)
    sums = {"zero": 0.0, "sae": 0.0}
    count = 0
    try:
        with torch.no_grad():
            for ids in tokens.split(batch):
                state["ids"] = ids
                keep = (ids != bos_id)[:, :-1]  # predictions made at non-BOS positions
                for mode in sums:
                    state["mode"] = mode
                    logits = model(input_ids=ids).logits.float()
                    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           ids[:, 1:].reshape(-1), reduction="none")
                    sums[mode] += float((ce.view(ids.shape[0], -1) * keep).sum())
                count += int(keep.sum())
    finally:
        handle.remove()
    return sums["zero"] / count, sums["sae"] / count


def _row_for(path: Path, rows: list[dict]) -> dict:
    """The frontier row of an SAE file named like its run: <arch>_k<k>_n<n>[_d<d>]_s<seed>."""
    from sae.cli import _point_name

    stem = path.stem if path.name != "sae.safetensors" else path.parent.name
    for r in rows:
        name = _point_name(r["arch"], r["k"], r["n_latents"], r["degree"], r["seed"])
        if (r.get("control") and stem == f"control_{r['control']}_{name}") or (not r.get("control") and stem == name):
            return r
    raise SystemExit(f"{path}: no row of the frontier is named {stem!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saes", nargs="+", type=Path, help="SAE files named <run>.safetensors (or run folders' sae.safetensors)")
    ap.add_argument("--frontier", type=Path, default=Path("results/frontier.json"))
    ap.add_argument("--contexts", type=int, default=None, help="only the first N test contexts (no comparison)")
    args = ap.parse_args(argv)

    from sae.checkpoint import load_sae
    from sae.data import load_austen_texts, load_model, token_splits

    rows = json.loads(args.frontier.read_text())["rows"]
    targets = [(p, _row_for(p, rows)) for p in args.saes]
    first = targets[0][1]
    model, tokenizer = load_model(dtype=getattr(torch, first["model_dtype"]))
    splits = token_splits(load_austen_texts(), tokenizer, first["ctx_len"], min_test_tokens=80_000)
    test = splits.test if args.contexts is None else splits.test[: args.contexts]
    if args.contexts is None and test.numel() != first["test_tokens"]:
        raise SystemExit(f"test split: {test.numel()} tokens here, {first['test_tokens']} in the rows")
    worst = 0.0
    for path, row in targets:
        sae = load_sae(path).eval()
        ce_zero, ce_sae = recompute_ce(model, test, row["layer"], sae, row["bos_id"])
        line = f"{path.name}: CE_zero {ce_zero:.4f} (row {row['ce_zero']:.4f}), CE_sae {ce_sae:.4f} (row {row['ce_sae']:.4f})"
        if args.contexts is None:
            diff = max(abs(ce_zero - row["ce_zero"]), abs(ce_sae - row["ce_sae"]))
            worst = max(worst, diff)
            line += f", largest difference {diff:.5f} nats"
        print(line, flush=True)
    if args.contexts is None:
        print(f"largest difference {worst:.5f} nats: {'within' if worst < TOLERANCE else 'NOT within'} {TOLERANCE}")
    return 0 if worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
