"""One trainer for ``TopKSAE`` and ``ExpanderSAE`` on a stream of activations.

Adam with linear warm-up and a linear decay at the end, gradient clipping, the decoder
constraints (unit-norm rows, gradient parallel to each row removed), dead-latent tracking and
AuxK (inside the models), periodic evaluation, tqdm progress in tokens/s, JSON metrics, and
checkpoints that survive being killed at any moment:

- a checkpoint is one safetensors file (SAE tensors, Adam moments, step, configs, a SHA-256 of
  every tensor byte) written to a temporary file and renamed over the old one, so a kill leaves
  either the old or the new checkpoint, never half of one;
- ``resume=True`` loads it and continues at the next step on exactly the batches an uninterrupted
  run would have seen (the activation buffer's order depends only on the seed and the step);
- a truncated or corrupt checkpoint is refused with ``CheckpointError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: missing, truncated, corrupt or for another run."""


@dataclass
class TrainConfig:
    batch_size: int = 1024
    total_tokens: int = 2_000_000
    lr: Optional[float] = None  # None: Gao et al.'s 2e-4 / sqrt(n_latents / 2**14)
    betas: tuple = (0.9, 0.999)
    eps: float = 6.25e-10
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # the last fraction of steps decays linearly to 0
    grad_clip: float = 1.0
    eval_every: int = 0  # steps; 0: only at the end
    checkpoint_every: int = 200  # steps
    log_every: int = 20  # steps
    seed: int = 0  # data order
    progress: bool = True

    def steps(self) -> int:
        """Steps to see at least ``total_tokens`` tokens."""
        return max(1, -(-self.total_tokens // self.batch_size))


@dataclass
class TrainResult:
    step: int
    tokens: int
    history: list = field(default_factory=list)
    final: dict = field(default_factory=dict)


def default_lr(n_latents: int) -> float:
    return 2e-4 / math.sqrt(n_latents / 2**14)


def _lr_at(step: int, total: int, base: float, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    decay_start = int(total * (1 - cfg.decay_fraction))
    if cfg.decay_fraction > 0 and step >= decay_start:
        return base * max(0.0, (total - step) / max(1, total - decay_start))
    return base


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, sae, optimizer: torch.optim.Optimizer, step: int, tokens: int,
                    train_config: TrainConfig) -> None:
    """Atomically write SAE + Adam state + step to ``path`` (write a temporary file, then rename)."""
    from safetensors.torch import save_file

    tensors = {f"sae.{k}": v.detach().contiguous() for k, v in sae.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().contiguous()
    meta = {
        "step": str(step),
        "tokens": str(tokens),
        "sae_class": type(sae).__name__,
        "sae_config": json.dumps(sae.config()),
        "train_config": json.dumps(asdict(train_config)),
        "sha256": _digest(tensors),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, sae, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` into ``sae`` (and ``optimizer``).

    Returns its metadata (step, tokens, configs). Raises ``CheckpointError`` when the file is
    missing, truncated, corrupt, or was written for an SAE of another shape or class.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header or size
        raise CheckpointError(f"checkpoint: {path} is truncated or corrupt ({exc})") from exc
    if "sha256" not in meta or "step" not in meta:
        raise CheckpointError(f"checkpoint: {path} is not a training checkpoint (no step/sha256 in its metadata)")
    if _digest(tensors) != meta["sha256"]:
        raise CheckpointError(f"checkpoint: {path} is corrupt (its tensors do not match the stored SHA-256)")
    if meta.get("sae_class") != type(sae).__name__ or json.loads(meta["sae_config"]) != json.loads(
            json.dumps(sae.config())):
        raise CheckpointError(
            f"checkpoint: {path} holds a {meta.get('sae_class')} {meta.get('sae_config')}, "
            f"expected a {type(sae).__name__} {json.dumps(sae.config())}"
        )
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    if optimizer is not None:
        state: dict = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, i, key = name.split(".", 2)
                state.setdefault(int(i), {})[key] = value
        groups = optimizer.state_dict()["param_groups"]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return {"step": int(meta["step"]), "tokens": int(meta["tokens"]),
            "train_config": json.loads(meta["train_config"])}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def train(sae: nn.Module, buffer, cfg: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
          evaluate: Optional[Callable[[nn.Module], dict]] = None,
          on_step: Optional[Callable[[int, dict], None]] = None) -> TrainResult:
    """Train ``sae`` on ``buffer`` (an ``sae.data.ActivationBuffer``) for ``cfg.total_tokens``.

    Writes ``out_dir/checkpoint.safetensors`` every ``cfg.checkpoint_every`` steps and at the end,
    and ``out_dir/metrics.json`` (training log + evaluations). ``evaluate(sae) -> dict`` runs every
    ``cfg.eval_every`` steps and at the end. ``on_step(step, log)`` is called after each step.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size > len(buffer):
        raise ValueError(f"batch_size: expected <= the {len(buffer)} activations in the buffer, got {cfg.batch_size}")
    total = cfg.steps()
    spe = buffer.steps_per_epoch(cfg.batch_size)
    epochs = -(-total // spe)
    base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.n_latents)
    params = [p for p in sae.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=base_lr, betas=tuple(cfg.betas), eps=cfg.eps)

    step, history = 0, []
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        meta = load_checkpoint(ckpt, sae, optimizer)
        step = meta["step"]
        if (out / METRICS).exists():
            history = [h for h in json.loads((out / METRICS).read_text()).get("history", []) if h["step"] <= step]
    elif ckpt.exists() and not resume:
        raise FileExistsError(f"out_dir: {out} already holds a checkpoint; pass resume=True or use a new directory")

    sae.train()
    device = next(sae.parameters()).device
    batches = buffer.batches(cfg.batch_size, epochs, seed=cfg.seed, start_step=step, device=device)
    bar = tqdm(total=total * cfg.batch_size, initial=step * cfg.batch_size, unit="tok", unit_scale=True,
               disable=not cfg.progress, desc=f"{type(sae).__name__} n={sae.n_latents} k={sae.k}")
    t0, fvu_sum, fvu_n = time.perf_counter(), 0.0, 0
    while step < total:
        x = next(batches)
        output = sae(x)
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
        fvu_sum, fvu_n = fvu_sum + float(output.fvu.detach()), fvu_n + 1
        bar.update(cfg.batch_size)
        log = None
        if step % cfg.log_every == 0 or step == total:
            elapsed = time.perf_counter() - t0
            log = {"step": step, "tokens": step * cfg.batch_size, "fvu": fvu_sum / fvu_n, "lr": lr,
                   "auxk_loss": None if output.auxk_loss is None else float(output.auxk_loss.detach()),
                   "dead_fraction": sae.dead_fraction(),
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "tokens_per_s": fvu_n * cfg.batch_size / max(elapsed, 1e-9)}
            bar.set_postfix(fvu=f"{log['fvu']:.4f}", dead=f"{log['dead_fraction']:.3f}")
            t0, fvu_sum, fvu_n = time.perf_counter(), 0.0, 0
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != total:
            log = dict(log or {"step": step, "tokens": step * cfg.batch_size}, eval=evaluate(sae))
            sae.train()
        if log is not None:
            history.append(log)
        if step % cfg.checkpoint_every == 0 or step == total:
            save_checkpoint(ckpt, sae, optimizer, step, step * cfg.batch_size, cfg)
            _write_json(out / METRICS, {"history": history})
        if on_step is not None:
            on_step(step, log or {"step": step})
    bar.close()

    final = evaluate(sae) if evaluate is not None else {}
    sae.train()
    result = TrainResult(step=step, tokens=step * cfg.batch_size, history=history, final=final)
    _write_json(out / METRICS, {"history": history, "final": final, "step": step, "tokens": result.tokens,
                                "sae_class": type(sae).__name__, "sae_config": sae.config()})
    return result
