"""One trainer for ``TopKSAE`` and ``ExpanderSAE`` on a stream of activations.

Adam with linear warm-up and a linear decay at the end (or a cosine decay), gradient clipping,
the decoder constraints (unit-norm rows, gradient parallel to each row removed), dead-latent
tracking and AuxK (inside the models), optional dead-latent resampling (their Adam moments
zeroed), periodic evaluation, tqdm progress in tokens/s, JSON metrics, and checkpoints that
survive being killed at any moment:

- a checkpoint is one file in the format of ``sae.checkpoint`` (SAE tensors, Adam moments, and a
  ``train`` record with the step, tokens trained, TrainConfig and the metrics history), written to a
  unique temporary file and renamed over the old one; ``metrics.json`` is a copy of the history;
- ``resume=True`` loads it and continues at the next step on exactly the batches an uninterrupted
  run would have seen (the activation buffer's order depends only on the seed and the step); a
  changed batch size, learning rate, schedule or seed is refused unless ``allow_config_change``
  (then recorded in the history);
- one process per run directory (``sae.rundir.RunLock``); stale temporary files are removed;
- SIGTERM or a first Ctrl-C stops after the step in hand and checkpoints it (``_StopSignals``;
  under ``torchrun`` the ranks agree at the next log step), raising ``TrainingInterrupted``; a
  second one stops at once;
- a non-finite loss or parameter (or, before a checkpoint, Adam state, which the loader would
  refuse) stops training with ``NonFiniteError`` naming the step before anything is written, so
  the newest checkpoint on disk is the last good one. On CUDA the check accumulates a flag on the
  device, read at log and checkpoint steps (no host sync per step).

fp16 SAEs are refused (Adam's second moment underflows in fp16); bf16 trains with the same eps,
which bf16 represents.

Under ``torchrun`` the same loop trains on every rank (``TrainConfig.parallel``: "data" or
"latent", the hooks of ``sae.distributed``); ``batch_size`` is the global batch, so the run matches
one process step for step. Rank 0 alone takes the lock, shows progress, evaluates and writes; the
checkpoint is the single-process one (latent shards gathered), and resumes on any world size (in
"latent" mode each rank copies only its rows of it: no rank builds the whole SAE or Adam state).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import CheckpointError, _non_finite, _one_line, _saved_state, read_checkpoint, save_sae
from .config import TrainConfig, derived_seed
from .errors import NonFiniteError, TrainingInterrupted
from .rundir import RunLock, write_json

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"
# Settings whose change on resume makes the run a different run: refused unless allowed.
_RESUME_KEYS = ("batch_size", "base_lr", "total_tokens", "warmup_steps", "decay_fraction", "seed", "lr_schedule",
                "resample_every", "grad_clip", "betas", "eps", "dead_fraction")
# Activations that initialise a fresh SAE's b_dec (and act_scale), as many as fit, drawn by a fixed seed.
INIT_SAMPLE = 16384

__all__ = ["CHECKPOINT", "METRICS", "CheckpointError", "NonFiniteError", "TrainingInterrupted", "TrainConfig",
           "TrainResult", "train", "save_checkpoint", "load_checkpoint", "adam"]

# Devices whose parameters get PyTorch's fused Adam (torch >= 2.4 has it on both; pyproject asks 2.6).
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def adam(params, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Adam:
    """The trainer's optimizer: ``torch.optim.Adam``, fused (one pass over each parameter, its
    gradient and moments) when every parameter is a float tensor on a device of
    FUSED_ADAM_DEVICES, else PyTorch's default implementation. Measured here (2 threads, one
    process, medians of 7): a step over a TopK SAE's 37.8M fp32 parameters (n=24576, m=768) took
    31-32 ms fused against 242-255 ms by default, bf16 26-33 against 134-141
    (benchmarks/RESULTS.md, "Fused Adam"). Same update; in fp32 within an ulp of the default's."""
    params = list(params)
    fused = all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params) or None
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


@dataclass
class TrainResult:
    step: int
    tokens: int
    history: list = field(default_factory=list)
    final: dict = field(default_factory=dict)  # evaluate()'s result; on rank 0 only under torchrun
    model: Optional[nn.Module] = None  # what trained: the SAE, or in "latent" mode its LatentShardedSAE


def _lr_at(step: int, total: int, base: float, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    decay_start = int(total * (1 - cfg.decay_fraction))
    if cfg.decay_fraction > 0 and step >= decay_start:
        return base * max(0.0, (total - step) / max(1, total - decay_start))
    return base


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict:
    tensors = {}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{i}.{key}"] = torch.as_tensor(value).detach().contiguous()
    return tensors


def save_checkpoint(path: str | os.PathLike, sae, optimizer: torch.optim.Optimizer, step: int, tokens: int,
                    train_config: TrainConfig, **extra) -> None:
    """Atomically write SAE + Adam state + the ``train`` record (step, tokens, config, ``extra``)."""
    record = {"step": step, "tokens": tokens, "train_config": asdict(train_config), **extra}
    save_sae(sae, path, optimizer_tensors=_optimizer_tensors(optimizer), train=record)


def load_checkpoint(path: str | os.PathLike, sae, optimizer: Optional[torch.optim.Optimizer] = None, *,
                    derived: tuple = ()) -> dict:
    """Load a training checkpoint into ``sae`` (and ``optimizer``); returns its ``train`` record
    (step, tokens, train_config, ...). Raises ``CheckpointError`` when the file is missing,
    truncated, corrupt, not a training checkpoint, for an SAE of another class or shape, or holds
    a tensor (parameter, buffer, Adam moment or step) that is not finite.
    ``derived``: config keys the trainer set from the TrainConfig (the dead-latent threshold),
    not compared: ``sae`` keeps its own value."""
    params = None if optimizer is None else [p for group in optimizer.param_groups for p in group["params"]]
    record, state, opt_state = _verified_checkpoint(path, sae, params, derived)
    try:
        sae.load_state_dict(state)
    except Exception as exc:  # e.g. an ExpanderSAE's rows that are not a valid expander graph
        raise CheckpointError(f"checkpoint: {path} its tensors do not fit a {type(sae).__name__} "
                              f"({_one_line(exc)})") from exc
    if optimizer is not None:
        groups = optimizer.state_dict()["param_groups"]
        # clones: safetensors hands out views of its mapping of the file, which torch's
        # load_state_dict keeps as they are, so the moments stayed backed by the checkpoint file
        state = {i: {key: value.clone() for key, value in entries.items()} for i, entries in opt_state.items()}
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return record


def _verified_checkpoint(path, sae, params: Optional[list], derived: tuple = (), *,
                         cast: bool = True) -> tuple[dict, dict, Optional[dict]]:
    """``load_checkpoint``'s reading and checks, loading nothing: (the ``train`` record, the SAE's
    state, the optimizer's state for ``params`` or None without them), every tensor checked and
    still a view of safetensors' mapping of the file (nothing of a tensor's size is allocated: a
    latent shard copies its own rows of them). ``sae`` may be a shell on the meta device
    (``LatentShardedSAE._full_shell``): only its class, config, state-dict names, shapes and dtypes
    and parameter names are read. ``cast``: integer tensors in the SAE's dtypes (else as saved;
    ``load_state_dict`` casts them as it copies)."""
    ckpt = read_checkpoint(path)
    if ckpt.train is None:
        raise CheckpointError(f"checkpoint: {path} is a final SAE, not a training checkpoint (no train record)")
    mine = sae.config()
    differ = {k: (v, mine.get(k)) for k, v in ckpt.config.items() if k not in derived and mine.get(k, object()) != v}
    if ckpt.class_name != type(sae).__name__ or differ:
        # The keys that differ first: two full configs side by side hide which one it is.
        named = "class" if ckpt.class_name != type(sae).__name__ else ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(f"checkpoint: {path} holds another SAE than the one to resume ({named}): a "
                              f"{ckpt.class_name} {ckpt.config}, expected a {type(sae).__name__} {mine}")
    if "dead_tokens_threshold" in derived:
        # Not compared only where the checkpoint's run derived it too: a threshold set on the SAE
        # that trained would otherwise silently become this run's derived one.
        saved, own = ckpt.config.get("dead_tokens_threshold"), _derived_dead_tokens(ckpt.train)
        if saved is not None and own is not None and saved != own:
            raise CheckpointError(f"checkpoint: {path} was trained with dead_tokens_threshold={saved} set on the SAE "
                                  f"(its run derives {own}); build the SAE with dead_tokens_threshold={saved} to "
                                  f"resume it")
    # Names and shapes checked here: a file that verifies but does not fit (written by another
    # version) is a CheckpointError naming it, as load_sae gives, not load_state_dict's RuntimeError.
    state = _saved_state(sae, ckpt.sae_tensors, f"checkpoint: {path}", cast=cast)
    current = sae.state_dict()
    param_names = {name for name, _ in sae.named_parameters()}
    for name, tensor in state.items():
        if tensor.is_floating_point() and current[name].dtype != tensor.dtype:
            if name not in param_names:
                # A floating buffer (act_scale, batch_threshold): TopKSAE(dtype=bf16) keeps it in
                # fp32 and .bfloat16() casts it, the same SAE either way. It keeps the resuming
                # SAE's dtype (fp32 holds a bf16 value exactly; the other way rounds a running mean
                # or a fixed scale once, as the cast that built such an SAE did).
                state[name] = tensor.to(current[name].dtype)
                continue
            raise CheckpointError(f"checkpoint: {path} holds {name} in {tensor.dtype}, the SAE to resume is "
                                  f"{current[name].dtype}; build it with dtype={tensor.dtype} to go on")
    opt_state = None
    if params is not None:
        names = {id(p): name for name, p in sae.named_parameters()}
        opt_state = _optimizer_state(path, params, ckpt.optimizer_tensors, names)
    return ckpt.train, state, opt_state


def _derived_dead_tokens(record: dict) -> Optional[int]:
    """The dead-latent threshold the run of a ``train`` record derives (``TrainConfig.dead_tokens``),
    or None where its record lacks what that needs (an old file)."""
    saved = record.get("train_config") or {}
    try:
        return TrainConfig(**{k: saved[k] for k in ("batch_size", "total_tokens", "dead_fraction")}).dead_tokens()
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _optimizer_state(path, params: list, tensors: dict, names: Optional[dict] = None) -> dict:
    """A checkpoint's optimizer tensors (``<parameter index>.<key>``) as the state of an optimizer of
    ``params`` (in its order), checked: PyTorch's ``load_state_dict`` checks neither the indices nor
    the shapes nor the values, and moments of another shape or a NaN moment or step reach the fused
    step, which turns them into NaN weights without an error (an infinite exp_avg_sq freezes its
    weight for good). A parameter without state is allowed (Adam keeps none for a parameter that
    never had a gradient). The tensors are returned as given (views of the file: the caller copies
    what it keeps). ``names``: ``id(parameter) -> name``, for the messages."""
    state: dict = {}
    for name, value in tensors.items():
        i, dot, key = name.partition(".")
        if not (dot and key and i.isascii() and i.isdigit() and int(i) < len(params)):
            raise CheckpointError(f"checkpoint: {path} is corrupt (optimizer tensor {name}: expected "
                                  f"<parameter index below {len(params)}>.<key>)")
        state.setdefault(int(i), {})[key] = value
    keys = sorted({tuple(sorted(s)) for s in state.values()})
    if len(keys) > 1:
        raise CheckpointError(f"checkpoint: {path} is corrupt (the parameters' optimizer state holds different "
                              f"keys: {[list(k) for k in keys]})")
    for i, entries in sorted(state.items()):
        for key, value in entries.items():
            if key != "step" and value.shape != params[i].shape:
                raise CheckpointError(f"checkpoint: {path} is corrupt (optimizer tensor {i}.{key} has shape "
                                      f"{tuple(value.shape)}; its parameter has {tuple(params[i].shape)})")
            kind = _non_finite(value)
            if kind is not None:
                owner = (names or {}).get(id(params[i]), f"parameter {i}")
                raise CheckpointError(f"checkpoint: {path} optimizer tensor {i}.{key} (the state of {owner}) is "
                                      f"not finite (it holds {kind}); expected finite optimizer state")
    return state


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def config_differences(record: dict, cfg: TrainConfig, base_lr: float, keys=_RESUME_KEYS) -> dict:
    """{setting: (the record's, cfg's)} over ``keys`` where a checkpoint's ``train`` record and
    ``cfg`` (with its base learning rate) differ; tuples as lists, as the record's JSON holds them."""
    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    old = {**record.get("train_config", {}), "base_lr": record.get("base_lr", base_lr)}
    new = {**asdict(cfg), "base_lr": base_lr}
    return {k: (plain(old[k]), plain(new[k])) for k in keys if k in old and k in new and plain(old[k]) != plain(new[k])}


def resume_changes(record: dict, cfg: TrainConfig, base_lr: float, allow: bool, out: Path) -> dict:
    """{setting: (old, new)} for the settings of ``_RESUME_KEYS`` that differ from the checkpoint's
    ``record``; raises ``ValueError`` naming them unless ``allow`` (the CLI checks them first, by flag)."""
    diff = config_differences(record, cfg, base_lr)
    if diff and not allow:
        named = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise ValueError(f"resume: the checkpoint in {out} was trained with other settings ({named}); "
                         f"use the original values, or allow_config_change (--allow-config-change) to continue "
                         f"anyway")
    return diff


class _FiniteWatch:
    """A device-side flag for the first step with a non-finite loss, read only when asked; the
    parameters and (before a checkpoint) ``optimizer``'s state, checked when asked."""

    def __init__(self, sae: nn.Module, device: torch.device, any_rank: Callable[[bool], bool] = bool,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        self.sae, self.any_rank, self.optimizer = sae, any_rank, optimizer
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.sync_every_step = device.type != "cuda"

    def record(self, step: int, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.bad_step < 0)
        self.bad_step = torch.where(bad, torch.full_like(self.bad_step, step), self.bad_step)

    def check(self, step: int, last_good: int, params: bool = True, moments: bool = False) -> None:
        """Raise ``NonFiniteError`` if a loss so far, (``params``) a parameter or (``moments``) the
        optimizer's state is not finite.

        The loss is the global one (equal on every rank); parameters and optimizer state are checked
        on every rank and the verdict shared, so all ranks stop together. ``_non_finite`` reads each
        tensor once without a temporary of its size (``isfinite(p).all()`` wrote about 1.8x the
        largest parameter's bytes at every log step)."""
        bad = int(self.bad_step)
        written = f"Nothing after step {last_good} was written."
        hint = (f"{written} Likely causes: non-finite activations, a batch with zero variance (FVU undefined), "
                f"a learning rate or auxk_coef that is not finite or too large.")
        if bad >= 0:
            raise NonFiniteError(f"step {bad}: the training loss is not finite. {hint}")
        if params:
            broken = next((name for name, p in self.sae.named_parameters() if _non_finite(p) is not None), None)
            if self.any_rank(broken is not None):
                where = f"parameter {broken}" if broken else "a parameter (on another rank)"
                raise NonFiniteError(f"step {step}: {where} is not finite. {hint}")
        if moments and self.optimizer is not None:
            # Checked before a checkpoint: the loader refuses non-finite Adam state (it would turn
            # into NaN weights or freeze a weight), so writing it would replace the last good
            # checkpoint with one that cannot be resumed. Weights and loss can stay finite while it
            # is not: an exp_avg_sq that overflows (a gradient whose square does, no clipping) gives
            # that weight updates of 0 from then on.
            broken = self._broken_state()
            if self.any_rank(broken is not None):
                where = f"the Adam state {broken}" if broken else "the Adam state of a parameter (on another rank)"
                raise NonFiniteError(f"step {step}: {where} is not finite, so a checkpoint of it could not be "
                                     f"resumed. {written} Likely causes: gradients too large to square in the "
                                     f"parameters' dtype (train with grad_clip > 0), a learning rate that is too "
                                     f"large.")

    def _broken_state(self) -> Optional[str]:
        """'<key> of <parameter>' for the first optimizer state tensor that is not finite, else None."""
        names = {id(p): name for name, p in self.sae.named_parameters()}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and _non_finite(value) is not None:
                    return f"{key} of {names.get(id(p), 'a parameter')}"
        return None


class _StopSignals:
    """SIGTERM (a scheduler preempting the job) and a first Ctrl-C ask the loop to stop after the step
    in hand and write a checkpoint there, so nothing trained is lost; a second signal interrupts at
    once (the newest checkpoint on disk is then the last complete one: writes are atomic).

    Handlers are installed only in the main thread (Python delivers signals there alone) and only
    over the defaults: an ignored SIGINT (a background job) or a caller's own handler is kept.
    ``signum``: the first signal received, or None."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(sig) is default:
                    self._old[sig] = signal.signal(sig, self._received)
        return self

    def _received(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Ranks:
    """What ``cfg.parallel`` changes in the loop: the module that runs (the SAE, or its
    ``LatentShardedSAE``), the rows a rank reads, the loss it backpropagates, the gradient hooks,
    and how the checkpoint is gathered and loaded. "none" is one process: the plain SAE."""

    def __init__(self, sae: nn.Module, cfg: TrainConfig, group=None):
        from . import distributed as sd

        self.mode, self.sae, self.group, self.dp, self.rows = cfg.parallel, sae, group, None, None
        self.sharded = isinstance(sae, sd.LatentShardedSAE)
        if self.sharded and self.mode != "latent":
            raise ValueError(f"sae: a LatentShardedSAE trains with parallel='latent', got parallel={self.mode!r}")
        if self.mode != "none" and getattr(cfg, "resample_every", 0):  # the field arrives with branch front
            raise NotImplementedError(f"resample_every: dead-latent resampling runs in one process only "
                                      f"(parallel='none'), got parallel={self.mode!r}")
        self.rank, self.world = sd.rank_and_world(group) if self.mode != "none" else (0, 1)
        self.inner = sae.shard if self.sharded else sae  # the SAE whose options the run reads
        # Config keys set here from cfg: a resume compares them with the checkpoint's through cfg
        # (batch_size, total_tokens, dead_fraction), not as SAE options.
        self.derived = ()
        if getattr(self.inner, "dead_tokens_threshold", 0) is None:
            self.derived = ("dead_tokens_threshold",)
            self.inner.dead_tokens_threshold = cfg.dead_tokens()
            if self.sharded:
                sae.full_config["dead_tokens_threshold"] = cfg.dead_tokens()
        self.last_full, self.saved_step = None, None  # the full model gathered for the last checkpoint (rank 0)
        if self.mode == "data":
            self.dp = sd.DataParallel(sae, group)  # every rank starts from rank 0's weights
            self.rows = self.dp.local_slice(cfg.batch_size)
        # From a full model the shard lands on the current CUDA device in an NCCL group.
        self.model = sd.LatentShardedSAE.from_model(sae, group) if self.mode == "latent" and not self.sharded else sae
        self.device = next(self.model.parameters()).device

    def any_rank(self, flag: bool) -> bool:
        from .distributed import any_rank

        return any_rank(flag, self.group, self.device) if self.world > 1 else bool(flag)

    def largest(self, value: int) -> int:
        """The largest of an int over the ranks (``value`` itself in one process)."""
        from .distributed import min_max_over_ranks

        return min_max_over_ranks(value, self.group, self.device)[1] if self.world > 1 else value

    def together(self, what: str, fn: Callable):
        """``fn()`` (no collectives inside) on every rank; if it raises on one, every rank raises."""
        try:
            result = fn()
        except Exception:
            self.any_rank(True)
            raise
        if self.any_rank(False):
            raise RuntimeError(f"{what} failed on another rank; see that rank's error")
        return result

    def on_lead(self, what: str, fn: Callable, otherwise=None):
        """``fn()`` on rank 0 alone (what only it does: write, evaluate), ``otherwise`` elsewhere; an
        error there stops every rank (``together``) rather than leaving them in their next collective."""
        return self.together(what, lambda: fn() if self.rank == 0 else otherwise)

    def batches(self, buffer, cfg: TrainConfig, epochs: int, start_step: int):
        if self.rows is None:
            return buffer.batches(cfg.batch_size, epochs, seed=cfg.seed, start_step=start_step, device=self.device)
        return (buffer[idx[self.rows]].to(self.device)
                for idx in buffer.batch_indices(cfg.batch_size, epochs, seed=cfg.seed, start_step=start_step))

    def objective(self, x: torch.Tensor, output) -> tuple[torch.Tensor, dict]:
        """The loss to backpropagate, and the global fvu / auxk_loss / loss to log."""
        if self.dp is not None:
            return self.dp.objective(x, output)
        return output.loss, {"fvu": output.fvu, "auxk_loss": output.auxk_loss, "loss": output.loss}

    def constrain_and_clip(self, output, params: list, max_norm: float) -> Optional[torch.Tensor]:
        """Between backward and the optimizer step: gradients summed over ranks (data), the decoder
        constraint, clipping by the global norm (returned; None without clipping)."""
        if self.dp is not None:
            self.dp.sum_gradients()
            self.sae.remove_parallel_grads(None)  # rows touched on any rank; untouched rows have zero gradient
        else:
            touched = output.top_indices if output.auxk_indices is None else torch.cat(
                [output.top_indices.reshape(-1), output.auxk_indices.reshape(-1)])
            self.model.remove_parallel_grads(touched)
        if max_norm <= 0:
            return None
        if self.mode == "latent":
            return self.model.clip_grad_norm_(max_norm)
        return nn.utils.clip_grad_norm_(params, max_norm)

    def after_step(self, x: torch.Tensor) -> None:
        self.model.normalize_decoder()
        if self.dp is not None:
            self.dp.merge_dead_counts(x.shape[0])

    def full_model(self) -> Optional[nn.Module]:
        """The whole trained SAE on rank 0 (None elsewhere in "latent" mode: a collective there)."""
        if self.mode != "latent":
            return self.sae
        return self.model.to_model()

    def save(self, path: Path, optimizer, step: int, tokens: int, cfg: TrainConfig, base_lr: float, extra: dict):
        """Rank 0 writes the single-process checkpoint; in "latent" mode every rank joins the gather."""
        full, opt = self.full_model(), optimizer
        if self.mode == "latent":
            state = self.model.full_optimizer_state(optimizer)
            if self.rank == 0:
                opt = adam([p for p in full.parameters() if p.requires_grad], base_lr, cfg.betas, cfg.eps)
                opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
            self.last_full, self.saved_step = full, step
        self.on_lead("writing the checkpoint", lambda: save_checkpoint(path, full, opt, step, tokens, cfg, **extra))

    def load(self, path: Path, optimizer) -> dict:
        """Every rank reads the checkpoint (a shared filesystem on several nodes) and keeps its part.

        In "latent" mode no rank builds the whole SAE or its Adam state (a dictionary sharded
        because it does not fit in one process could not resume when each rank did): the file is
        checked as ``load_checkpoint`` checks it, against a shell of the whole model on the meta
        device, through views of safetensors' mapping of the file (every rank hashes and checks
        every tensor whole, so all of them reach the same verdict without a collective, and each
        verifies the bytes it keeps); each rank then copies only its rows of the SAE's tensors and
        Adam moments, and the replicated ones."""
        if self.mode != "latent":
            return load_checkpoint(path, self.sae, optimizer, derived=self.derived)
        shell = self.model._full_shell()
        params = [p for p in shell.parameters() if p.requires_grad]  # the order the checkpoint's Adam had
        record, state, opt_state = _verified_checkpoint(path, shell, params, self.derived, cast=False)
        try:
            self.model.load_full_state_dict(state)
        except Exception as exc:  # e.g. a repeated row in one of this rank's latents of an expander graph
            lo, hi = self.model.lo, self.model.hi
            raise CheckpointError(f"checkpoint: {path} its tensors do not fit a {type(shell).__name__} in the "
                                  f"latents {lo}..{hi - 1} this rank reads (their ids below count from {lo}: "
                                  f"{_one_line(exc)})") from exc
        self.model.load_full_optimizer_state(optimizer, opt_state)
        return record

    def finish(self, step: int) -> Optional[nn.Module]:
        """The trained full SAE on rank 0 ("latent": gathered, or taken from the checkpoint of this
        ``step``, and copied into ``sae`` there)."""
        if self.mode != "latent":
            return self.sae
        if self.saved_step != step:
            self.last_full, self.saved_step = self.full_model(), step
        if self.rank == 0 and not self.sharded:
            self.sae.load_state_dict(self.last_full.state_dict())
            return self.sae
        return self.last_full


def init_sample(buffer) -> torch.Tensor:
    """The activations that initialise a fresh SAE: ``INIT_SAMPLE`` rows of ``buffer`` in a fixed
    random order (all of them in a smaller buffer)."""
    order = torch.randperm(len(buffer), generator=torch.Generator().manual_seed(0))
    return buffer[order[:INIT_SAMPLE]]


@torch.no_grad()
def _resample(sae, optimizer: torch.optim.Optimizer, x: torch.Tensor, seed: int) -> int:
    """``sae.resample_dead`` on batch ``x``; zeroes the Adam moments of every per-latent row of the
    resampled latents (parameters whose first dimension is n_latents; b_dec [m] is not one, also
    when m = n). Returns how many."""
    idx = sae.resample_dead(x, generator=torch.Generator().manual_seed(seed))
    if idx.numel():
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.dim() >= 1 and p.shape[0] == sae.n_latents and p is not sae.b_dec:
                    for value in optimizer.state.get(p, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == p.shape:
                            value[idx.to(value.device)] = 0
    return int(idx.numel())


def train(sae: nn.Module, buffer, cfg: Optional[TrainConfig] = None, out_dir: str | os.PathLike = "runs/train", *,
          resume: bool = False, allow_config_change: bool = False,
          evaluate: Optional[Callable[[nn.Module], dict]] = None,
          on_step: Optional[Callable[[int, dict], None]] = None, group=None) -> TrainResult:
    """Train ``sae`` on ``buffer`` (an ``sae.data.ActivationBuffer``) for ``cfg.total_tokens``.

    Writes ``out_dir/checkpoint.safetensors`` every ``cfg.checkpoint_every`` steps and at the end,
    and ``out_dir/metrics.json`` (training log + evaluations). ``evaluate(sae) -> dict`` runs every
    ``cfg.eval_every`` steps and at the end. ``on_step(step, log)`` is called after each step.
    An SAE whose ``dead_tokens_threshold`` is None gets ``cfg.dead_tokens()``.

    With ``cfg.parallel`` "data" or "latent", every rank of ``group`` (default: the torchrun world,
    ``sae.distributed.init_distributed``) calls ``train`` with the same arguments and the same
    ``sae`` (same seed), or in "latent" mode a ``LatentShardedSAE`` (built, trained and resumed
    without any rank holding the whole SAE; rank 0 gathers it to write checkpoints). Rank 0
    evaluates and writes; ``out_dir`` must be one shared folder for every node. In "latent" mode
    the trained weights are copied into ``sae`` on rank 0 only; ``result.model`` is the sharded
    model on every rank.

    A fresh run (no checkpoint in ``out_dir``) of an SAE as constructed (never initialised from
    data, loaded or resumed) first sets its b_dec (``b_dec_init``) and act_scale
    (``normalize_activations``) from ``INIT_SAMPLE`` activations of the buffer, as
    ``python -m sae train`` does. ``evaluate`` sees the SAE in eval mode.
    """
    cfg = TrainConfig() if cfg is None else cfg
    cfg.validate()
    out = Path(out_dir)
    if cfg.batch_size > len(buffer):
        raise ValueError(f"batch_size: expected <= the {len(buffer)} activations in the buffer, got {cfg.batch_size}")
    if any(p.dtype == torch.float16 for p in sae.parameters() if p.requires_grad):
        raise ValueError("sae: fp16 training is not supported (Adam's squared gradients and eps underflow in fp16); "
                         "train in fp32 or bf16 and cast the trained SAE with .half() for inference")
    from .distributed import LatentShardedSAE

    # A LatentShardedSAE.create()d SAE is as constructed too: its shards' b_dec and act_scale (replicated) are set.
    inner = sae.shard if isinstance(sae, LatentShardedSAE) else sae
    if getattr(inner, "_fresh", False) and not (out / CHECKPOINT).exists():
        sample = init_sample(buffer).to(inner.b_dec.device)
        if not bool(torch.isfinite(sample).all()):
            raise NonFiniteError(f"buffer: the training activations (x) hold NaN or inf: {len(sample)} of them, "
                                 f"drawn to initialise b_dec, hold one. Nothing was trained.")
        inner.init_b_dec(sample)
    ranks = _Ranks(sae, cfg, group)
    with contextlib.ExitStack() as stack:
        # only rank 0 writes: it alone holds the run directory
        ranks.on_lead("locking out_dir", lambda: stack.enter_context(RunLock(out)))
        return _train_locked(ranks, buffer, cfg, out, resume, allow_config_change, evaluate, on_step)


def _train_locked(ranks, buffer, cfg, out, resume, allow_config_change, evaluate, on_step) -> TrainResult:
    from tqdm.auto import tqdm

    model, lead = ranks.model, ranks.rank == 0
    params = [p for p in model.parameters() if p.requires_grad]
    total = cfg.steps()
    base_lr = cfg.lr_for(ranks.inner)
    optimizer = adam(params, base_lr, cfg.betas, cfg.eps)

    step, tokens, history, changes = 0, 0, [], []
    ckpt = out / CHECKPOINT
    if ranks.world > 1:  # loading takes collectives: every rank must take the same branch below
        from .distributed import min_max_over_ranks

        lo, hi = min_max_over_ranks(int(ckpt.exists()), ranks.group, ranks.device)
        if lo != hi:
            raise RuntimeError(f"out_dir: some ranks found a checkpoint in {out} and some none; every node must see "
                               f"the same out_dir (a shared filesystem)")
    if resume and ckpt.exists():
        record = ranks.together("loading the checkpoint", lambda: ranks.load(ckpt, optimizer))
        step, tokens = record["step"], record["tokens"]
        history = list(record.get("history", []))
        changes = list(record.get("config_changes", []))
        diff = resume_changes(record, cfg, base_lr, allow_config_change, out)
        # Steps left from the tokens left, so a changed batch size still trains total_tokens in all.
        total = step + max(0, -(-(cfg.total_tokens - tokens) // cfg.batch_size))
        if diff:
            changes.append({"step": step, "changed": {k: list(v) for k, v in diff.items()}})
        if lead:
            print(f"[sae] resuming from step {step} of {total} ({tokens:,} tokens trained) in {out}", flush=True)
    elif ckpt.exists() and not resume:
        raise FileExistsError(f"out_dir: {out} already holds a checkpoint; pass resume=True or use a new directory")
    if ranks.world > 1:
        from .distributed import min_max_over_ranks

        lo, hi = min_max_over_ranks(step, ranks.group, ranks.device)
        if lo != hi:
            raise RuntimeError(f"out_dir: the ranks found checkpoints at steps {lo}..{hi} in {out}; every node "
                               f"must see the same out_dir (a shared filesystem)")

    model.train()
    epochs = -(-total // buffer.steps_per_epoch(cfg.batch_size))
    device = ranks.device
    # Shards differ, so their verdicts are shared; data-parallel replicas are equal, and sharing
    # would pair a collective with another rank's all-reduce after an error on one rank's rows.
    watch = _FiniteWatch(model, device, ranks.any_rank if ranks.mode == "latent" else bool, optimizer)
    batches = ranks.batches(buffer, cfg, epochs, step)
    parallel = "" if ranks.mode == "none" else f" x{ranks.world} {ranks.mode}"
    bar = tqdm(total=total * cfg.batch_size, initial=step * cfg.batch_size, unit="tok", unit_scale=True,
               disable=not cfg.progress or not lead,
               desc=f"{type(ranks.inner).__name__} n={model.n_latents} k={model.k}{parallel}")
    t0, fvu_sum, fvu_n = time.perf_counter(), torch.zeros((), device=device), 0
    last_ckpt = step
    extra = lambda: {"base_lr": base_lr, "history": history, "config_changes": changes}  # noqa: E731

    def evaluated() -> dict:
        full = ranks.full_model()  # a collective in "latent" mode: every rank joins
        result = ranks.on_lead("evaluate()", lambda: evaluate(full.eval()), {})
        model.train()
        return result

    def checkpoint() -> int:
        ranks.save(out / CHECKPOINT, optimizer, step, tokens, cfg, base_lr, extra())
        ranks.on_lead("writing metrics.json",
                      lambda: write_json(out / METRICS, {"history": history, "config_changes": changes}))
        return step

    with _StopSignals() as stop:  # its handlers live as long as the loop
        try:
            while step < total:
                x = next(batches)
                bad_x = watch.sync_every_step and x.numel() and not bool(torch.isfinite(x).all())
                if ranks.mode == "data" and watch.sync_every_step:
                    bad_x = ranks.any_rank(bad_x)  # the ranks read different rows: every rank stops, none waits
                if bad_x:
                    raise NonFiniteError(f"step {step + 1}: the training activations (x) hold NaN or inf. "
                                         f"Nothing after step {last_ckpt} was written.")
                try:
                    output = model(x)
                except ValueError:
                    # An op refusing non-finite inputs (e.g. x - b_dec) names its own argument; name the
                    # parameter that actually broke instead.
                    watch.check(step + 1, last_ckpt)
                    raise
                optimizer.zero_grad(set_to_none=True)
                loss, logged = ranks.objective(x, output)
                loss.backward()
                grad_norm = ranks.constrain_and_clip(output, params, cfg.grad_clip)
                lr = _lr_at(step, total, base_lr, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                ranks.after_step(x)
                step += 1
                tokens += cfg.batch_size
                resampled = None
                if cfg.resample_every and step % cfg.resample_every == 0 and step != total:
                    resampled = _resample(model, optimizer, x, derived_seed(cfg.seed, step))
                watch.record(step, logged["loss"])
                if watch.sync_every_step:
                    watch.check(step, last_ckpt, params=False)
                fvu_sum, fvu_n = fvu_sum + logged["fvu"].detach(), fvu_n + 1
                bar.update(cfg.batch_size)
                log = None
                at_checkpoint = step % cfg.checkpoint_every == 0 or step == total
                if step % cfg.log_every == 0 or at_checkpoint:
                    watch.check(step, last_ckpt, moments=at_checkpoint)
                    elapsed = time.perf_counter() - t0
                    auxk = logged["auxk_loss"]
                    log = {"step": step, "tokens": tokens, "fvu": float(fvu_sum) / fvu_n, "lr": lr,
                           "auxk_loss": None if auxk is None else float(auxk.detach()),
                           "dead_fraction": model.dead_fraction(),
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "tokens_per_s": fvu_n * cfg.batch_size / max(elapsed, 1e-9)}
                    # The bar shows the training batches' running FVU, not the held-out figure reported at the end.
                    bar.set_postfix(train_fvu=f"{log['fvu']:.4f}", dead=f"{log['dead_fraction']:.3f}")
                    t0, fvu_sum, fvu_n = time.perf_counter(), torch.zeros((), device=device), 0
                if resampled is not None:
                    log = dict(log or {"step": step, "tokens": tokens}, resampled=resampled)
                if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                    log = dict(log or {"step": step, "tokens": tokens}, eval=evaluated())
                if log is not None:
                    history.append(log)
                if at_checkpoint:
                    last_ckpt = checkpoint()
                if on_step is not None:
                    ranks.together("on_step()", lambda: on_step(step, log or {"step": step}))
                # A stop asked by signal, at a step boundary. Ranks agree on it at log steps (one
                # small all-reduce each), so that all of them write the same checkpoint.
                asked = int(stop.signum or 0)
                if ranks.world > 1:
                    asked = ranks.largest(asked) if step % cfg.log_every == 0 or at_checkpoint else 0
                if asked:
                    if last_ckpt != step:
                        watch.check(step, last_ckpt, moments=True)
                        last_ckpt = checkpoint()
                    raise TrainingInterrupted(step, total, last_ckpt, out, asked)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise TrainingInterrupted(step, total, last_ckpt, out, int(stop.signum or signal.SIGINT)) from None
        finally:
            bar.close()

    full = ranks.finish(step)
    final = ranks.on_lead("evaluate()", lambda: evaluate(full.eval()), {}) if evaluate is not None else {}
    for trained in {id(m): m for m in (model, full) if m is not None}.values():
        trained.train()
    result = TrainResult(step=step, tokens=tokens, history=history, final=final, model=model)
    ranks.on_lead("writing metrics.json", lambda: write_json(
        out / METRICS, {"history": history, "final": final, "step": step, "tokens": tokens, "config_changes": changes,
                        "sae_class": type(full).__name__, "sae_config": full.config(), "parallel": ranks.mode,
                        "world_size": ranks.world}))
    return result
