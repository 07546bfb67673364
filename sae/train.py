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
- a non-finite loss or parameter stops training with ``NonFiniteError`` naming the step before
  anything is written, so the newest checkpoint on disk is the last good one. On CUDA the check
  accumulates a flag on the device, read at log and checkpoint steps (no host sync per step).

fp16 SAEs are refused (Adam's second moment underflows in fp16); bf16 trains with the same eps,
which bf16 represents.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import CheckpointError, read_checkpoint, save_sae
from .config import TrainConfig
from .errors import NonFiniteError, TrainingInterrupted
from .rundir import RunLock, write_json

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"
# Settings whose change on resume makes the run a different run: refused unless allowed.
_RESUME_KEYS = ("batch_size", "base_lr", "total_tokens", "warmup_steps", "decay_fraction", "seed", "lr_schedule",
                "resample_every")

__all__ = ["CHECKPOINT", "METRICS", "CheckpointError", "NonFiniteError", "TrainingInterrupted", "TrainConfig",
           "TrainResult", "train", "save_checkpoint", "load_checkpoint"]


@dataclass
class TrainResult:
    step: int
    tokens: int
    history: list = field(default_factory=list)
    final: dict = field(default_factory=dict)


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


def load_checkpoint(path: str | os.PathLike, sae, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load a training checkpoint into ``sae`` (and ``optimizer``); returns its ``train`` record
    (step, tokens, train_config, ...). Raises ``CheckpointError`` when the file is missing,
    truncated, corrupt, not a training checkpoint, or for an SAE of another class or shape."""
    ckpt = read_checkpoint(path)
    if ckpt.train is None:
        raise CheckpointError(f"checkpoint: {path} is a final SAE, not a training checkpoint (no train record)")
    mine = sae.config()
    if ckpt.class_name != type(sae).__name__ or any(mine.get(k, object()) != v for k, v in ckpt.config.items()):
        raise CheckpointError(f"checkpoint: {path} holds a {ckpt.class_name} {ckpt.config}, "
                              f"expected a {type(sae).__name__} {mine}")
    sae.load_state_dict(ckpt.sae_tensors)
    if optimizer is not None:
        state: dict = {}
        for name, value in ckpt.optimizer_tensors.items():
            i, key = name.split(".", 1)
            state.setdefault(int(i), {})[key] = value
        groups = optimizer.state_dict()["param_groups"]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return ckpt.train


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def resume_changes(record: dict, cfg: TrainConfig, base_lr: float, allow: bool, out: Path,
                   names: Optional[dict] = None) -> dict:
    """{setting: (old, new)} for the settings of ``_RESUME_KEYS`` that differ from the checkpoint's
    ``record``; raises ``ValueError`` naming them (as ``names`` spells them) unless ``allow``."""
    old = {**record["train_config"], "base_lr": record.get("base_lr", base_lr)}
    new = {**asdict(cfg), "base_lr": base_lr}
    diff = {k: (old.get(k), new[k]) for k in _RESUME_KEYS if k in old and old[k] != new[k]}
    if diff and not allow:
        named = ", ".join(f"{(names or {}).get(k, k)} {a} -> {b}" for k, (a, b) in diff.items())
        raise ValueError(f"resume: the checkpoint in {out} was trained with other settings ({named}); "
                         f"use the original values, or allow_config_change (--allow-config-change) to continue "
                         f"anyway")
    return diff


class _FiniteWatch:
    """A device-side flag for the first step with a non-finite loss, read only when asked."""

    def __init__(self, sae: nn.Module, device: torch.device):
        self.sae = sae
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.sync_every_step = device.type != "cuda"

    def record(self, step: int, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.bad_step < 0)
        self.bad_step = torch.where(bad, torch.full_like(self.bad_step, step), self.bad_step)

    def check(self, step: int, last_good: int, params: bool = True) -> None:
        """Raise ``NonFiniteError`` if a loss so far or (``params``) a parameter is not finite."""
        bad = int(self.bad_step)
        hint = (f"Nothing after step {last_good} was written. Likely causes: non-finite activations, a batch "
                f"with zero variance (FVU undefined), a learning rate or auxk_coef that is not finite or too large.")
        if bad >= 0:
            raise NonFiniteError(f"step {bad}: the training loss is not finite. {hint}")
        if params:
            for name, p in self.sae.named_parameters():
                if not bool(torch.isfinite(p).all()):
                    raise NonFiniteError(f"step {step}: parameter {name} is not finite. {hint}")


@torch.no_grad()
def _resample(sae, optimizer: torch.optim.Optimizer, x: torch.Tensor, seed: int) -> int:
    """``sae.resample_dead`` on batch ``x``; zeroes the Adam moments of every per-latent row of the
    resampled latents (parameters whose first dimension is n_latents). Returns how many."""
    idx = sae.resample_dead(x, generator=torch.Generator().manual_seed(seed))
    if idx.numel():
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.dim() >= 1 and p.shape[0] == sae.n_latents:
                    for value in optimizer.state.get(p, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == p.shape:
                            value[idx.to(value.device)] = 0
    return int(idx.numel())


def train(sae: nn.Module, buffer, cfg: Optional[TrainConfig] = None, out_dir: str | os.PathLike = "runs/train", *,
          resume: bool = False, allow_config_change: bool = False,
          evaluate: Optional[Callable[[nn.Module], dict]] = None,
          on_step: Optional[Callable[[int, dict], None]] = None) -> TrainResult:
    """Train ``sae`` on ``buffer`` (an ``sae.data.ActivationBuffer``) for ``cfg.total_tokens``.

    Writes ``out_dir/checkpoint.safetensors`` every ``cfg.checkpoint_every`` steps and at the end,
    and ``out_dir/metrics.json`` (training log + evaluations). ``evaluate(sae) -> dict`` runs every
    ``cfg.eval_every`` steps and at the end. ``on_step(step, log)`` is called after each step.
    An SAE whose ``dead_tokens_threshold`` is None gets ``cfg.dead_tokens()``.
    """
    cfg = TrainConfig() if cfg is None else cfg
    cfg.validate()
    out = Path(out_dir)
    params = [p for p in sae.parameters() if p.requires_grad]
    if any(p.dtype == torch.float16 for p in params):
        raise ValueError("sae: fp16 training is not supported (Adam's squared gradients and eps underflow in fp16); "
                         "train in fp32 or bf16 and cast the trained SAE with .half() for inference")
    if cfg.batch_size > len(buffer):
        raise ValueError(f"batch_size: expected <= the {len(buffer)} activations in the buffer, got {cfg.batch_size}")
    if getattr(sae, "dead_tokens_threshold", 0) is None:
        sae.dead_tokens_threshold = cfg.dead_tokens()
    with RunLock(out):
        return _train_locked(sae, buffer, cfg, out, params, resume, allow_config_change, evaluate, on_step)


def _train_locked(sae, buffer, cfg, out, params, resume, allow_config_change, evaluate, on_step) -> TrainResult:
    from tqdm.auto import tqdm

    total = cfg.steps()
    base_lr = cfg.lr_for(sae)
    optimizer = torch.optim.Adam(params, lr=base_lr, betas=tuple(cfg.betas), eps=cfg.eps)

    step, tokens, history, changes = 0, 0, [], []
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        record = load_checkpoint(ckpt, sae, optimizer)
        step, tokens = record["step"], record["tokens"]
        history = list(record.get("history", []))
        changes = list(record.get("config_changes", []))
        diff = resume_changes(record, cfg, base_lr, allow_config_change, out)
        # Steps left from the tokens left, so a changed batch size still trains total_tokens in all.
        total = step + max(0, -(-(cfg.total_tokens - tokens) // cfg.batch_size))
        if diff:
            changes.append({"step": step, "changed": {k: list(v) for k, v in diff.items()}})
        print(f"[sae] resuming from step {step} of {total} ({tokens:,} tokens trained) in {out}", flush=True)
    elif ckpt.exists() and not resume:
        raise FileExistsError(f"out_dir: {out} already holds a checkpoint; pass resume=True or use a new directory")

    sae.train()
    epochs = -(-total // buffer.steps_per_epoch(cfg.batch_size))
    device = next(sae.parameters()).device
    watch = _FiniteWatch(sae, device)
    batches = buffer.batches(cfg.batch_size, epochs, seed=cfg.seed, start_step=step, device=device)
    bar = tqdm(total=total * cfg.batch_size, initial=step * cfg.batch_size, unit="tok", unit_scale=True,
               disable=not cfg.progress, desc=f"{type(sae).__name__} n={sae.n_latents} k={sae.k}")
    t0, fvu_sum, fvu_n = time.perf_counter(), torch.zeros((), device=device), 0
    last_ckpt = step
    extra = lambda: {"base_lr": base_lr, "history": history, "config_changes": changes}  # noqa: E731
    try:
        while step < total:
            x = next(batches)
            if watch.sync_every_step and x.numel() and not bool(torch.isfinite(x).all()):
                raise NonFiniteError(f"step {step + 1}: the training activations (x) hold NaN or inf. "
                                     f"Nothing after step {last_ckpt} was written.")
            try:
                output = sae(x)
            except ValueError:
                # An op refusing non-finite inputs (e.g. x - b_dec) names its own argument; name the
                # parameter that actually broke instead.
                watch.check(step + 1, last_ckpt)
                raise
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            touched = output.top_indices if output.auxk_indices is None else torch.cat(
                [output.top_indices.reshape(-1), output.auxk_indices.reshape(-1)])
            sae.remove_parallel_grads(touched)
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            lr = _lr_at(step, total, base_lr, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            sae.normalize_decoder()
            step += 1
            tokens += x.shape[0]
            resampled = None
            if cfg.resample_every and step % cfg.resample_every == 0 and step != total:
                resampled = _resample(sae, optimizer, x, cfg.seed * 1_000_003 + step)
            watch.record(step, output.loss)
            if watch.sync_every_step:
                watch.check(step, last_ckpt, params=False)
            fvu_sum, fvu_n = fvu_sum + output.fvu.detach(), fvu_n + 1
            bar.update(x.shape[0])
            log = None
            at_checkpoint = step % cfg.checkpoint_every == 0 or step == total
            if step % cfg.log_every == 0 or at_checkpoint:
                watch.check(step, last_ckpt)
                elapsed = time.perf_counter() - t0
                log = {"step": step, "tokens": tokens, "fvu": float(fvu_sum) / fvu_n, "lr": lr,
                       "auxk_loss": None if output.auxk_loss is None else float(output.auxk_loss.detach()),
                       "dead_fraction": sae.dead_fraction(),
                       "grad_norm": None if grad_norm is None else float(grad_norm),
                       "tokens_per_s": fvu_n * cfg.batch_size / max(elapsed, 1e-9)}
                # The bar shows the training batches' running FVU, not the held-out figure reported at the end.
                bar.set_postfix(train_fvu=f"{log['fvu']:.4f}", dead=f"{log['dead_fraction']:.3f}")
                t0, fvu_sum, fvu_n = time.perf_counter(), torch.zeros((), device=device), 0
            if resampled is not None:
                log = dict(log or {"step": step, "tokens": tokens}, resampled=resampled)
            if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                log = dict(log or {"step": step, "tokens": tokens}, eval=evaluate(sae))
                sae.train()
            if log is not None:
                history.append(log)
            if at_checkpoint:
                save_checkpoint(out / CHECKPOINT, sae, optimizer, step, tokens, cfg, **extra())
                last_ckpt = step
                write_json(out / METRICS, {"history": history, "config_changes": changes})
            if on_step is not None:
                on_step(step, log or {"step": step})
    except KeyboardInterrupt:
        raise TrainingInterrupted(step, total, last_ckpt, out) from None
    finally:
        bar.close()

    final = evaluate(sae) if evaluate is not None else {}
    sae.train()
    result = TrainResult(step=step, tokens=tokens, history=history, final=final)
    write_json(out / METRICS, {"history": history, "final": final, "step": step, "tokens": tokens,
                               "config_changes": changes, "sae_class": type(sae).__name__,
                               "sae_config": sae.config()})
    return result
