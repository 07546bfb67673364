"""Training on several processes with ``torch.distributed``: data parallel and latent-sharded SAEs.

Launch with ``torchrun`` (NCCL on GPUs, gloo on CPUs); everything here is PyTorch's own collectives,
routed through four small wrappers that count the bytes they move (``count_communication``).

- **Data parallel** (``DataParallel``): every rank holds the whole SAE and trains on a disjoint
  block of each step's batch. The loss is the *global-batch* objective (FVU over all ranks' tokens,
  with the global mean and variance), so N ranks at B/N tokens each train exactly like one process
  at B tokens: gradients are summed, dead-latent counters merged (a latent fired if it fired on any
  rank), and the checkpoint is the ordinary single-process one, written by rank 0.
- **Latent-sharded** (``LatentShardedSAE``): rank r holds latents ``[lo_r, hi_r)``: rows of
  ``W_enc``/``W_dec`` for ``TopKSAE``, rows of ``values``/``rows`` for ``ExpanderSAE`` (the graph is
  drawn once for all n latents from the seed, then sliced: a shard's n/P latents need not cover the
  m coordinates by themselves, so up to n ranks work). Every rank sees the same batch. Each
  rank runs the fused top-k on its shard; the k candidates per token per rank (values + global ids)
  are all-gathered and merged into the global top-k; each rank decodes its own latents and the
  partial reconstructions are all-reduced. Per step that is O(B*k*P) candidates plus one [B, m]
  all-reduce (a second one, and O(B*k_aux*P) candidates, while AuxK is active), never [B, n].
  Backward mirrors it without moving [B, *] tensors: the gather's gradient is the rank's own slice,
  the all-reduce's gradient is the identity, and only b_dec's [m] gradient is summed.

``sae.train.train`` is the training loop for both modes (``TrainConfig.parallel``): it calls these
hooks between its own steps, so every mode gets the same schedule, checks, checkpoints and resume.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DataParallel", "LatentShardedSAE", "any_rank", "communication_per_step", "count_communication",
    "init_distributed", "latent_range", "load_sharded", "min_max_over_ranks", "rank_and_world",
]


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------

def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment; returns (rank, world size).

    Backend: NCCL when CUDA is available, else gloo. A process not started by torchrun (no
    ``WORLD_SIZE``) and not already in a group is a world of one: (0, 1), nothing initialised.
    """
    if _in_group():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _nccl(group=None) -> bool:
    return _in_group() and dist.get_backend(group) == "nccl"


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) outside a process group."""
    if not _in_group():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)



def any_rank(flag: bool, group=None, device=None) -> bool:
    """True on every rank if ``flag`` is True on any rank (so all ranks stop together, none hangs)."""
    if not _in_group():
        return bool(flag)
    return bool(_all_reduce(torch.tensor([int(bool(flag))], device=device), op=dist.ReduceOp.MAX, group=group))


def min_max_over_ranks(value: int, group=None, device=None) -> tuple[int, int]:
    """(smallest, largest) of an int over the ranks: equal when every rank holds the same value."""
    if not _in_group():
        return value, value
    both = _all_reduce(torch.tensor([value, -value], device=device), op=dist.ReduceOp.MAX, group=group)
    return -int(both[1]), int(both[0])


def latent_range(n_latents: int, rank: int, world: int) -> tuple[int, int]:
    """Latents ``[lo, hi)`` of ``rank`` among ``world``: contiguous, sizes differ by at most one."""
    base, extra = divmod(n_latents, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


# ---------------------------------------------------------------------------------------------
# Collectives, counted
# ---------------------------------------------------------------------------------------------

@dataclass
class CommRecord:
    """One collective as this rank saw it: bytes = the tensor it contributed times what it received."""

    op: str
    shape: tuple
    dtype: torch.dtype
    bytes: int


@dataclass
class CommLog:
    records: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.records)

    @property
    def largest_numel(self) -> int:
        return max((math.prod(r.shape) for r in self.records), default=0)


_LOGS: list[CommLog] = []


@contextlib.contextmanager
def count_communication():
    """Record every collective this module issues inside the block (forward and backward).

    Bytes: an all-reduce or broadcast of S bytes counts S; an all-gather of S bytes per rank
    counts P*S (its output). Multiply by the ring factors in ``communication_per_step`` for the
    bytes a link carries.
    """
    log = CommLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(op: str, tensor: Tensor, factor: int = 1) -> None:
    for log in _LOGS:
        log.records.append(CommRecord(op, tuple(tensor.shape), tensor.dtype,
                                      tensor.numel() * tensor.element_size() * factor))


def _all_reduce(tensor: Tensor, op=None, group=None) -> Tensor:
    """In place; returns ``tensor``. Outside a process group (a world of one): nothing to do."""
    if not _in_group():
        return tensor
    _record("all_reduce", tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


def _all_gather(tensor: Tensor, group=None) -> Tensor:
    """[*shape] on every rank -> [P, *shape]."""
    if not _in_group():
        return tensor.unsqueeze(0)
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))  # gloo wants the ranks stacked on dim 0
    _record("all_gather", tensor, world)
    _gather_single(out, tensor, group=group)
    return out.view(world, *tensor.shape)


# torch 2.13 renamed all_gather_into_tensor; keep both spellings working.
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _broadcast(tensor: Tensor, src: int = 0, group=None) -> Tensor:
    _record("broadcast", tensor)
    dist.broadcast(tensor, src, group=group)
    return tensor


def _gather_rows(shard: Tensor, n_rows: int, group=None) -> Optional[Tensor]:
    """Stack every rank's row block (sizes from ``latent_range``) on rank 0; None elsewhere."""
    rank, world = rank_and_world(group)
    if world == 1:
        return shard
    widest = latent_range(n_rows, 0, world)[1]
    padded = shard.new_zeros((widest, *shard.shape[1:]))
    padded[: shard.shape[0]] = shard
    out = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    _record("gather", padded, world)
    dist.gather(padded, out, dst=0, group=group)
    if rank != 0:
        return None
    return torch.cat([block[: hi - lo] for block, (lo, hi) in
                      zip(out, (latent_range(n_rows, r, world) for r in range(world)))])


class _GatherCandidates(torch.autograd.Function):
    """all-gather [B, c] -> [P, B, c]; backward: this rank's slice of the gradient.

    Everything downstream of the gather runs identically on every rank, so the gradient for this
    rank's candidates is already complete here: nothing to communicate.
    """

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.rank = rank_and_world(group)[0]
        return _all_gather(local, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.rank], None


class _SumPartials(torch.autograd.Function):
    """all-reduce SUM of partial reconstructions; backward: identity (the loss is replicated)."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        return _all_reduce(partial.clone(), group=group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _SharedInput(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (a replicated tensor feeding shards)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad.contiguous().clone(), group=ctx.group), None


# ---------------------------------------------------------------------------------------------
# Data parallel
# ---------------------------------------------------------------------------------------------

def _check_no_batch_topk(sae) -> None:
    if getattr(sae, "batch_topk", False):
        raise NotImplementedError(
            "sae.batch_topk: distributed training supports per-token TopK only, got batch_topk=True")


class DataParallel:
    """Hooks that make N ranks, each holding the whole SAE, train like one process on N x the batch.

    Per step (as ``sae.train`` runs them with ``parallel="data"``)::

        x = dp.local_rows(global_batch)          # or read only these rows
        output = sae(x)
        loss, logged = dp.objective(x, output)   # this rank's share of the global-batch loss
        loss.backward(); dp.sum_gradients()
        ... clip, optimizer step, decoder constraints (identical on every rank) ...
        dp.merge_dead_counts(x.shape[0])
    """

    def __init__(self, sae: nn.Module, group=None):
        _check_no_batch_topk(sae)
        if _nccl(group) and next(sae.parameters()).device.type != "cuda":
            raise ValueError(f"sae: NCCL moves CUDA tensors only; expected the SAE on "
                             f"cuda:{torch.cuda.current_device()} (LOCAL_RANK), got {next(sae.parameters()).device}")
        self.sae, self.group = sae, group
        self.rank, self.world = rank_and_world(group)
        self.broadcast_state()

    @torch.no_grad()
    def broadcast_state(self) -> None:
        """Make every rank's parameters and buffers equal to rank 0's."""
        if self.world > 1:
            for tensor in self.sae.state_dict().values():
                _broadcast(tensor, 0, self.group)

    def local_slice(self, global_batch: int) -> slice:
        """This rank's rows of a global batch: contiguous, disjoint blocks of equal size."""
        if global_batch % self.world:
            raise ValueError(f"batch_size: expected a multiple of the world size {self.world}, got {global_batch}")
        per = global_batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def local_rows(self, batch: Tensor) -> Tensor:
        return batch[self.local_slice(batch.shape[0])]

    def objective(self, x: Tensor, output) -> tuple[Tensor, dict]:
        """This rank's term of the global-batch loss, and the global fvu / auxk_loss / loss.

        FVU = sum over all ranks' tokens of ||x - x_hat||^2 over the global total variance (two
        small all-reduces: the coordinate sums and count, then three scalars). Summing the ranks'
        gradients of the returned term gives the gradient of the global loss. The AuxK term is
        normalised by global statistics too, from the model's unnormalised sum (``auxk_sq_error``),
        which a rank whose own rows have no variance (identical rows) still gives.
        """
        from .models import _auxk_denominator, _loss_dtype

        m = x.shape[-1]
        wide = _loss_dtype(x.dtype, output.x_hat.dtype)
        flat = x.reshape(-1, m).to(wide)
        stats = torch.cat([flat.sum(0), flat.new_tensor([flat.shape[0]])])
        _all_reduce(stats, group=self.group)
        mean = stats[:m] / stats[m]
        error = (flat - output.x_hat.reshape(-1, m).to(wide)).pow(2).sum()
        aux = output.auxk_sq_error if output.auxk_loss is not None else error.new_zeros(())
        sums = torch.stack([(flat - mean).pow(2).sum(), error.detach(), aux.detach().to(wide)])
        _all_reduce(sums, group=self.group)
        total_variance = sums[0]
        # aux already carries the fewer-dead-latents weight (and is in x's units, like the sums), so only
        # the models' denominator is left to apply, from the global sums.
        aux_norm = _auxk_denominator(getattr(self.sae, "auxk_norm", "variance"), sums[1], total_variance)
        loss = error / total_variance + output.auxk_coef * aux / aux_norm
        fvu, auxk = sums[1] / total_variance, sums[2] / aux_norm
        # Dead counters are equal on every rank, so AuxK runs on all of them or on none.
        logged = {"fvu": fvu, "auxk_loss": auxk if output.auxk_loss is not None else None,
                  "loss": fvu + output.auxk_coef * auxk}
        return loss, logged

    @torch.no_grad()
    def sum_gradients(self) -> None:
        """All-reduce SUM of every parameter's gradient (a missing gradient counts as zeros)."""
        for p in self.sae.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            _all_reduce(p.grad, group=self.group)

    @torch.no_grad()
    def merge_dead_counts(self, local_tokens: int) -> None:
        """After a training forward on ``local_tokens`` tokens per rank: counters as if one process
        had seen every rank's tokens (a latent fired if it fired on any rank)."""
        counts = self.sae.tokens_since_fired
        fired = (counts == 0).to(torch.uint8)
        _all_reduce(fired, op=dist.ReduceOp.MAX, group=self.group)
        counts.add_(local_tokens * (self.world - 1)).masked_fill_(fired.bool(), 0)


# ---------------------------------------------------------------------------------------------
# Latent-sharded SAE
# ---------------------------------------------------------------------------------------------

def _shard_config(config: dict, n_local: int) -> dict:
    return dict(config, n_latents=n_local, k=min(config["k"], n_local))


def _sharded_keys(full_shapes: dict, shard_state: dict, n: int) -> set:
    """The state keys split along latents: those whose shard shape differs from the full one."""
    keys = set()
    for key, tensor in shard_state.items():
        if key not in full_shapes:
            raise KeyError(f"state: the shard has {key!r}, the full model does not")
        full = tuple(full_shapes[key])
        if full != tuple(tensor.shape):
            if full[0] != n or full[1:] != tuple(tensor.shape[1:]):
                raise ValueError(f"state[{key!r}]: expected [n_latents={n}, ...] to split, got {full}")
            keys.add(key)
    return keys


class LatentShardedSAE(nn.Module):
    """A ``TopKSAE`` or ``ExpanderSAE`` whose latents are split over the ranks of ``group``.

    ``.shard`` is an ordinary SAE of the same class holding latents ``[lo, hi)`` (its parameter
    and buffer names are the full model's). ``forward(x)`` takes the same batch on every rank and
    returns the same ``SAEOutput`` fields as the full model (``top_indices`` global ids;
    ``dead_mask`` this shard's), with identical values on every rank.

    Build with ``LatentShardedSAE.from_model(full)`` (every rank holds the same full model, e.g. the
    same seed), ``LatentShardedSAE.create(cls, config)`` (fresh, no full model anywhere) or
    ``load_sharded(path)`` (reads only this rank's rows of a file, for any world size);
    ``to_model()`` / ``save(path)`` reassemble one full model on rank 0 that loads in one process
    (collectives: every rank calls them).
    """

    def __init__(self, shard: nn.Module, full_class: type, full_config: dict, sharded_keys: set, group=None):
        super().__init__()
        _check_no_batch_topk(shard)
        self.shard, self.full_class, self.full_config = shard, full_class, dict(full_config)
        self.sharded_keys, self.group = set(sharded_keys), group
        self.rank, self.world = rank_and_world(group)
        self.n_latents, self.k, self.d_model = full_config["n_latents"], full_config["k"], full_config["d_model"]
        self.lo, self.hi = latent_range(self.n_latents, self.rank, self.world)
        # The full model's k_aux (the shard's own is capped at its size): Gao et al.'s default d_model / 2.
        k_aux = full_config.get("k_aux")
        self.k_aux = min(self.n_latents, k_aux if k_aux is not None else max(1, self.d_model // 2))
        names = {id(p): n for n, p in shard.named_parameters()}
        self._sharded_params = [p for p in shard.parameters() if names[id(p)] in self.sharded_keys]
        self._replicated_params = [p for p in shard.parameters() if names[id(p)] not in self.sharded_keys]

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_model(cls, full: nn.Module, group=None, device=None) -> "LatentShardedSAE":
        """Slice a full SAE (the same on every rank) into this rank's shard, on ``device`` (default:
        the current CUDA device in an NCCL group, else the full model's device)."""
        rank, world = rank_and_world(group)
        n = full.n_latents
        lo, hi = latent_range(n, rank, world)
        if hi - lo < 1:
            raise ValueError(f"group: expected at most n_latents={n} ranks, got {world}")
        full_state = full.state_dict()
        if device is None:
            on_gpu = _nccl(group)
            device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else next(full.parameters()).device
        rows = full_state["rows"][lo:hi] if "rows" in full_state else None  # an expander's slice of its graph
        shard = _build_shard(type(full), full.config(), hi - lo, device, getattr(full, "backend", None), rows)
        _cast_like(shard, full_state)  # a bf16 (or fp64) SAE's shard keeps its dtypes
        keys = _sharded_keys({k: v.shape for k, v in full_state.items()}, shard.state_dict(), n)
        model = cls(shard, type(full), full.config(), keys, group)
        model.load_full_state_dict(full_state)
        return model

    @classmethod
    def create(cls, full_class: type, config: dict, seed: int = 0, group=None, device=None,
               backend=None) -> "LatentShardedSAE":
        """A freshly initialised sharded SAE without ever building the full one.

        Each rank initialises its latents with the class's own rule (``reset_parameters``) from
        the seed ``(seed, rank)``, so the initial dictionary depends on the world size (it is
        not the one ``full_class(**config)`` would draw). An Expander SAE's graph is
        ``expander_mask(m, n, degree, config seed)`` for all n latents, sliced (no shard draws a graph
        of its own).
        """
        from . import models
        from .config import derived_seed
        from .masks import expander_mask

        rank, world = rank_and_world(group)
        n = config["n_latents"]
        lo, hi = latent_range(n, rank, world)
        if hi - lo < 1:
            raise ValueError(f"group: expected at most n_latents={n} ranks, got {world}")
        _check_full_config(full_class, config)  # before the graph: refused with the SAE's names, not the mask's
        rows = None
        if issubclass(full_class, models.ExpanderSAE):  # the shard takes its slice; it draws no graph itself
            rows = expander_mask(config["d_model"], n, config["degree"], seed=config.get("seed", 0))[lo:hi]
        rank_seed = derived_seed(seed, rank)
        # SAEs that seed their initialisation from config["seed"] get the rank's seed there (and the
        # configured seed back afterwards: the expander graph is the configured seed's); others draw
        # from the global generator.
        shard_config = dict(config, seed=rank_seed) if "seed" in config else config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rank_seed)
            shard = _build_shard(full_class, shard_config, hi - lo, device, backend, rows)
        del rows  # the shard holds a copy of its slice: the whole graph is not kept
        if hasattr(shard, "seed"):
            shard.seed = config.get("seed", 0)
        return cls(shard, full_class, config, _latent_keys(full_class, config), group)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict) -> None:
        """Take this rank's rows of a full model's state dict (the inverse of ``full_state_dict``)."""
        device = self.shard.b_enc.device
        self.shard.load_state_dict({k: (v[self.lo:self.hi] if k in self.sharded_keys else v).to(device)
                                    for k, v in state.items()})

    def to_model(self) -> Optional[nn.Module]:
        """Gather every shard into one full SAE on rank 0 (None on the other ranks)."""
        state = self.full_state_dict()
        if state is None:
            return None
        model = self.empty_full_model()
        model.load_state_dict(state)
        return model

    def empty_full_model(self) -> nn.Module:
        """A new full SAE of this config (its own initialisation) in the shard's dtypes, to load a full state into."""
        return _cast_like(self.full_class(**self.full_config), self.shard.state_dict())

    def _full_shell(self) -> nn.Module:
        """The full SAE of this config as a shell on the meta device (``models._empty_build``: no
        weights or graph drawn, nothing allocated) in the shard's dtypes: its class, config, state
        shapes and parameter order, to check a whole model's file against (``sae.train``'s resume)."""
        from . import models

        with models._empty_build():
            shell = self.full_class(**self.full_config)
        return _cast_like(shell, self.shard.state_dict())

    def full_state_dict(self) -> Optional[dict]:
        """The full model's state dict on rank 0 (CPU copies), None elsewhere. Gathers one tensor at a time."""
        out = {}
        for key, tensor in self.shard.state_dict().items():
            if key in self.sharded_keys:
                full = _gather_rows(tensor.detach(), self.n_latents, self.group)
                if full is not None:
                    out[key] = full.to("cpu", copy=True)
            elif self.rank == 0:
                out[key] = tensor.detach().to("cpu", copy=True)
        return out if self.rank == 0 else None

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file for the whole SAE, written by rank 0 (``full_class.load`` reads it;
        ``save`` writes atomically)."""
        model = self.to_model()
        if model is not None:
            model.save(path)
        if self.world > 1:
            dist.barrier(self.group)

    def config(self) -> dict:
        return dict(self.full_config)

    # -- the forward pass -----------------------------------------------------------------------
    def _merged_topk(self, x_centered: Tensor, bias: Tensor, k: int, **encode_options) -> tuple[Tensor, Tensor]:
        """Global top-k [B, k] (values, global int64 ids) from every shard's k candidates.

        Merged by |value|, as the shards selected them (ReLU codes are >= 0; signed codes are not).
        """
        n_local = self.hi - self.lo
        k_local = min(k, n_local)
        acts, idx = self.shard._encode_with(x_centered, bias, k_local, **encode_options)
        widest = min(k, latent_range(self.n_latents, 0, self.world)[1])
        if k_local < widest:  # a narrower shard pads with zero codes: they decode to nothing if chosen
            acts = torch.cat([acts, acts.new_zeros((acts.shape[0], widest - k_local))], 1)
            idx = torch.cat([idx, idx.new_zeros((idx.shape[0], widest - k_local))], 1)
        # int32 ids halve the bytes; n < 2^31 always holds for a dictionary that exists.
        ids = (idx + self.lo).to(torch.int32 if self.n_latents < 2**31 else torch.int64)
        cand_acts = _GatherCandidates.apply(acts, self.group)                   # [P, B, c]
        cand_ids = _all_gather(ids, self.group)                                 # [P, B, c]
        B = x_centered.shape[0]
        cand_acts = cand_acts.permute(1, 0, 2).reshape(B, -1)
        cand_ids = cand_ids.permute(1, 0, 2).reshape(B, -1)
        pos = cand_acts.detach().abs().topk(k, dim=-1, sorted=True).indices
        return cand_acts.gather(-1, pos), cand_ids.gather(-1, pos).long()

    def _decode_partial(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Sum over ranks of each rank's own latents' atoms: [B, m] without bias, fp32 (fp64 for fp64
        codes; each rank's partial accumulated in fp32 by the decoder and never rounded to a half type)."""
        from .models import _loss_dtype

        mine = (top_indices >= self.lo) & (top_indices < self.hi)
        local_acts = torch.where(mine, top_acts, torch.zeros_like(top_acts)).to(_loss_dtype(top_acts.dtype))
        local_ids = torch.where(mine, top_indices - self.lo, torch.zeros_like(top_indices))
        partial = self.shard._decode_atoms(local_acts, local_ids)
        return _SumPartials.apply(partial, self.group)

    # The model's optional features, read so that SAEs without them (older versions) work too.
    def _scale_in(self, x: Tensor) -> Tensor:
        return self.shard._scale_in(x) if hasattr(self.shard, "_scale_in") else x

    def _scale_out(self, x: Tensor) -> Tensor:
        return self.shard._scale_out(x) if hasattr(self.shard, "_scale_out") else x

    def _dead_threshold(self) -> int:
        return getattr(self.shard, "_dead_threshold", self.shard.dead_tokens_threshold)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., m] (the same on every rank) -> (top_acts, top_indices) [..., k], global ids."""
        self.shard._check_input(x)
        flat = self._scale_in(x).reshape(-1, self.d_model)
        acts, ids = self._merged_topk(flat - _SharedInput.apply(self.shard.b_dec, self.group), self.shard.b_enc,
                                      self.k)
        return acts.reshape(*x.shape[:-1], self.k), ids.reshape(*x.shape[:-1], self.k)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        shape = top_acts.shape
        out = self._decode_partial(top_acts.reshape(-1, shape[-1]), top_indices.reshape(-1, shape[-1]))
        return self._scale_out(out + self.shard.b_dec).reshape(*shape[:-1], self.d_model)

    def forward(self, x: Tensor):
        """x [..., m], the same on every rank -> ``SAEOutput`` (the full model's loss terms)."""
        from .models import SAEOutput, _auxk_normalised, _loss_dtype

        shard = self.shard
        shard._check_input(x)
        flat_x = self._scale_in(x).reshape(-1, self.d_model)
        b_dec_shared = _SharedInput.apply(shard.b_dec, self.group)  # one [m] all-reduce in backward
        top_acts, top_indices = self._merged_topk(flat_x - b_dec_shared, shard.b_enc, self.k)
        # The ranks' partial sums and b_dec added in fp32, rounded once to the SAE's dtype, as the
        # full model's decoder (bias inside the kernel) does: a bf16 SAE's partials, all-reduced and
        # biased in bf16, were rounded up to three times (~40 % of x_hat's entries off by an ulp
        # even on one rank).
        out_dtype = torch.promote_types(top_acts.dtype, shard.b_dec.dtype)  # the full model's x_hat dtype
        partial = self._decode_partial(top_acts, top_indices)
        x_hat = (partial + shard.b_dec.to(partial.dtype)).to(out_dtype)
        # Losses in fp32 (fp64 for fp64 inputs), as the models compute them.
        wide = _loss_dtype(flat_x.dtype, x_hat.dtype)
        flat_f = flat_x.to(wide)
        error = flat_f - x_hat.to(wide)
        total_variance = (flat_f - flat_f.mean(0)).pow(2).sum()
        fvu = error.pow(2).sum() / total_variance

        dead_mask = auxk_loss = auxk_indices = sq = None
        if self.training:
            dead_mask = shard.tokens_since_fired > self._dead_threshold()
            num_dead = int(_all_reduce(dead_mask.sum().reshape(1), group=self.group))
            if shard.auxk and num_dead > 0:
                k_aux = min(self.k_aux, num_dead)
                dead_bias = shard.b_enc.masked_fill(~dead_mask, torch.finfo(shard.b_enc.dtype).min / 2)
                options = {"signed": False} if hasattr(shard, "signed") else {}  # AuxK codes are ReLU codes
                aux_acts, auxk_indices = self._merged_topk(flat_x - b_dec_shared, dead_bias, k_aux, **options)
                sq = (self._decode_partial(aux_acts, auxk_indices).to(wide) - error.detach()).pow(2).sum()
                # The global dead count and the full model's k_aux: the one-process normalisation.
                auxk_loss, sq = _auxk_normalised(
                    sq, error.detach().pow(2).sum(), total_variance, num_dead, self.k_aux,
                    getattr(shard, "auxk_norm", "variance"),
                    shard.act_scale if getattr(shard, "normalize_activations", False) else None)
                auxk_indices = auxk_indices.reshape(*x.shape[:-1], k_aux)
            self._update_dead_counts(top_acts, top_indices, flat_x.shape[0])
        lead = x.shape[:-1]
        return SAEOutput(self._scale_out(x_hat).reshape(x.shape), top_acts.reshape(*lead, self.k),
                         top_indices.reshape(*lead, self.k), fvu, auxk_loss, dead_mask, auxk_indices,
                         shard.auxk_coef, sq)

    @torch.no_grad()
    def _update_dead_counts(self, top_acts: Tensor, top_indices: Tensor, num_tokens: int) -> None:
        ids = top_indices.reshape(-1)[top_acts.reshape(-1) != 0]
        ids = ids[(ids >= self.lo) & (ids < self.hi)] - self.lo
        counts = self.shard.tokens_since_fired
        counts += num_tokens
        counts[ids] = 0

    # -- what the trainer calls between backward and the optimizer step -------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip by the global gradient norm (sharded parameters summed over ranks, replicated once);
        returns that norm. Same rule as ``nn.utils.clip_grad_norm_``."""
        from .models import _loss_dtype

        wide = _loss_dtype(*(p.dtype for p in self.shard.parameters()))

        def sq(params):
            return sum((p.grad.to(wide).pow(2).sum() for p in params if p.grad is not None),
                       torch.zeros((), dtype=wide, device=self.shard.b_enc.device))

        total = _all_reduce(sq(self._sharded_params).reshape(1), group=self.group)[0] + sq(self._replicated_params)
        norm = total.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in self.shard.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return norm

    def remove_parallel_grads(self, indices: Optional[Tensor] = None) -> None:
        """Decoder constraint on this shard's rows (``indices``: global ids; rows of other shards are ignored)."""
        if indices is not None:
            indices = indices.reshape(-1)
            indices = indices[(indices >= self.lo) & (indices < self.hi)] - self.lo
        self.shard.remove_parallel_grads(indices)

    def normalize_decoder(self) -> None:
        self.shard.normalize_decoder()

    def dead_fraction(self, threshold: Optional[int] = None) -> float:
        t = self._dead_threshold() if threshold is None else threshold
        dead = (self.shard.tokens_since_fired > t).sum().reshape(1)
        return float(_all_reduce(dead, group=self.group)) / self.n_latents

    # -- optimizer state ------------------------------------------------------------------------
    def _param_names(self) -> list:
        """The names of the parameters the optimizer holds, in its order: trainable ones only, as
        ``adam`` is built (a frozen b_dec has no state; were it not the last parameter, counting it
        would shift every later parameter's state index)."""
        return [n for n, p in self.shard.named_parameters() if p.requires_grad]

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> Optional[dict]:
        """Adam-style per-parameter state gathered to the full model's shapes on rank 0 (index ->
        {key: tensor}, parameter order of the full model); None elsewhere."""
        state = optimizer.state_dict()["state"]
        out: dict = {}
        for i, name in enumerate(self._param_names()):
            for key, value in sorted(state.get(i, {}).items()):
                value = torch.as_tensor(value)
                if name in self.sharded_keys and value.ndim > 0:
                    value = _gather_rows(value.detach(), self.n_latents, self.group)
                if self.rank == 0:
                    out.setdefault(i, {})[key] = value.detach().to("cpu", copy=True)
        return out if self.rank == 0 else None

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, full_state: dict) -> None:
        """Inverse of ``full_optimizer_state``: every rank passes the full state (or views of a file's)
        and keeps copies of its rows."""
        names = self._param_names()
        # load_state_dict moves moments to each parameter's device and keeps Adam's step where it belongs.
        # Clones: load_state_dict keeps a tensor already of the parameter's dtype and device as it is,
        # and a slice is a view of the whole tensor: every rank kept the whole moments alive (a
        # resume held 2x the whole model's bytes on each rank for the rest of the run).
        state = {i: {key: (v[self.lo:self.hi] if names[i] in self.sharded_keys and v.ndim > 0 else v).clone()
                     for key, v in entries.items()}
                 for i, entries in full_state.items()}
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _cast_like(module: nn.Module, like: dict) -> nn.Module:
    """Give ``module``'s floating-point parameters and buffers the dtypes of the same-named tensors of
    the state dict ``like`` (a model's constructor makes them in the default dtype)."""
    state = module.state_dict()
    if any(k in like and v.is_floating_point() and v.dtype != like[k].dtype for k, v in state.items()):
        with torch.no_grad():
            module.load_state_dict({k: v.to(like[k].dtype) if k in like and v.is_floating_point() else v
                                    for k, v in state.items()}, assign=True)
    return module


def _check_full_config(full_class: type, full_config: dict) -> None:
    """Refuse a config the whole model's constructor refuses, with its message: a shard alone does not
    check what only the whole model must satisfy (an expander graph covering every coordinate). Built
    as a meta shell: no weights or graph drawn."""
    from . import models

    with models._empty_build():
        full_class(**full_config)


def _build_shard(full_class: type, full_config: dict, n_local: int, device, backend=None,
                 rows: Optional[Tensor] = None) -> nn.Module:
    """A ``full_class`` SAE holding ``n_local`` of the latents of ``full_config``, moved to ``device``.

    An Expander shard takes ``rows``, its slice of the whole model's graph, and draws no graph of its
    own: a slice need not cover the m coordinates by itself (n/P * degree < m is fine; the whole graph
    covers them), so any number of ranks up to n_latents works. In an ``_empty_build`` the rows may
    be left out: a meta placeholder that a file's rows are assigned into. The whole config is the
    caller's to check (``_check_full_config``): a shard's own checks do not cover it.
    """
    from . import models

    config = _shard_config(full_config, n_local)
    if backend is not None and "backend" not in config:
        config["backend"] = backend  # a runtime choice some versions keep out of config()
    if rows is None and models._EMPTY_BUILD.get() and issubclass(full_class, models.ExpanderSAE):
        rows = torch.empty(n_local, full_config["degree"], dtype=torch.int64, device="meta")
    with models._given_rows(rows) if rows is not None else contextlib.nullcontext():
        shard = full_class(**config)
    return shard if device is None else shard.to(device)


def _latent_keys(full_class: type, config: dict) -> set:
    """The state keys that grow with n_latents, found on two tiny models of the class."""
    small = max(config["k"], -(-config["d_model"] // config.get("degree", config["d_model"]))) + 1
    with torch.random.fork_rng(devices=[]):
        a, b = (full_class(**_shard_config(config, size)).state_dict() for size in (small, small + 1))
    return {key for key in a if a[key].shape != b[key].shape}


def load_sharded(path: str | os.PathLike, group=None, device="cpu", *, verify: bool = True,
                 backend: Optional[str] = None) -> LatentShardedSAE:
    """Read this rank's latents of an SAE file (``save``, ``TopKSAE.save``, or a training checkpoint)
    for any world size.

    With ``verify`` (and a file that stores per-tensor SHA-256 sums) each tensor is read whole,
    checked and sliced, one at a time; ``verify=False`` reads only this rank's rows from disk.
    A NaN or inf in what a rank reads is a ``CheckpointError`` on every rank (as ``load_sae``
    refuses it), and an error on one rank stops every rank: a rank that raised alone would leave
    the others waiting in their next collective (a collective, so every rank of ``group`` calls it).
    """
    from .checkpoint import CheckpointError, _check_no_meta, _non_finite, _one_line

    rank, world = rank_and_world(group)
    flags = torch.device("cuda", torch.cuda.current_device()) if _nccl(group) else torch.device("cpu")
    # Each rank's outcome, 0: loaded, 1: a tensor is not finite, 2: an error; the largest decides.
    try:
        shard, full_class, config, keys, state = _read_shard(path, rank, world, device, verify, backend)
        broken = next(((key, kind) for key, t in state.items() if (kind := _non_finite(t)) is not None), None)
        if broken is None:
            with torch.no_grad():  # may raise on one rank alone: its rows of an expander graph are checked
                # assign: the shell's tensors become the file's, floats in the file's dtypes and
                # integers in the SAE's (an older file's int32 rows or counters), as load_sae does
                mine = shard.state_dict()
                state = {k: t if t.is_floating_point() or k not in mine else t.to(mine[k].dtype)
                         for k, t in state.items()}
                try:
                    shard.load_state_dict(state, assign=True)
                except Exception as exc:  # e.g. a repeated row in one of this rank's latents
                    lo, hi = latent_range(config["n_latents"], rank, world)
                    raise CheckpointError(
                        f"checkpoint: {path} its tensors do not fit a {full_class.__name__} in the "
                        f"latents {lo}..{hi - 1} this rank reads (their ids below count from {lo}: "
                        f"{_one_line(exc)})") from exc
            _check_no_meta(shard, f"checkpoint: {path}")
            shard = shard if device is None else shard.to(device)
            model = LatentShardedSAE(shard, full_class, config, keys, group)
    except Exception:
        min_max_over_ranks(2, group, flags)
        raise
    verdict = min_max_over_ranks(0 if broken is None else 1, group, flags)[1]
    if verdict == 2:
        raise RuntimeError(f"load_sharded: reading {path} failed on another rank; see that rank's error")
    if verdict == 1:
        where = (f"tensor {broken[0]} is not finite (it holds {broken[1]})" if broken is not None
                 else "holds a tensor that is not finite (in another rank's latents)")
        raise CheckpointError(f"checkpoint: {path} {where}; expected finite parameters and buffers")
    return model


def _read_shard(path, rank: int, world: int, device, verify: bool, backend: Optional[str]) -> tuple:
    """``load_sharded``'s reading, on one rank: (its shard, a shell on the meta device, the class,
    the config, the sharded keys, its rows of the file's state)."""
    from safetensors import safe_open

    from . import models
    from .checkpoint import CheckpointError, _one_line, read_header, tensor_sha256

    classes = getattr(models, "SAE_CLASSES", {"TopKSAE": models.TopKSAE, "ExpanderSAE": models.ExpanderSAE})
    header = read_header(path)  # any format; a current-format header is checked against its digest
    if header is None:
        raise CheckpointError(f"checkpoint: {path} is not an SAE file of this package (no format in its metadata)")
    class_name, config, sums, prefix = header["class"], header["config"], header["sha256"], header["tensor_prefix"]
    if class_name not in classes:
        raise CheckpointError(f"checkpoint: {path} holds a {class_name!r}; expected one of {sorted(classes)}")
    full_class = classes[class_name]
    n = config["n_latents"]
    lo, hi = latent_range(n, rank, world)
    try:
        _check_full_config(full_class, config)
        with models._empty_build():  # a shell on the meta device (no weights or graph drawn), assigned into
            shard = _build_shard(full_class, config, hi - lo, None, backend)
    except Exception as exc:  # a config the class refuses, whatever it raises for it (as load_sae says)
        raise CheckpointError(f"checkpoint: {path} its config does not describe a {class_name} "
                              f"({_one_line(exc)})") from exc
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = [k for k in f.keys() if k.startswith(prefix) and not k.startswith("optimizer.")]
        keys = _sharded_keys({k[len(prefix):]: f.get_slice(k).get_shape() for k in names}, shard.state_dict(), n)
        state = {}
        for name in names:
            key = name[len(prefix):]
            if verify and name in sums:
                tensor = f.get_tensor(name)
                if tensor_sha256(tensor) != sums[name]:
                    raise CheckpointError(f"checkpoint: {path} is corrupt ({name} does not match its stored SHA-256)")
                state[key] = (tensor[lo:hi] if key in keys else tensor).clone()
                del tensor
            else:
                # clones: views of safetensors' mapping of the file would keep the whole file mapped
                # and leave the shard backed by it (a file rewritten in place would change it)
                state[key] = (f.get_slice(name)[lo:hi] if key in keys else f.get_tensor(name)).clone()
    return shard, full_class, config, keys, state


# ---------------------------------------------------------------------------------------------
# Bytes per step, on paper
# ---------------------------------------------------------------------------------------------

def communication_per_step(mode: str, *, batch: int, d_model: int, n_latents: int, k: int, world: int,
                           arch: str = "topk", degree: Optional[int] = None, k_aux: Optional[int] = None,
                           auxk_active: bool = False, bus_bandwidth: float = 450e9) -> dict:
    """Bytes each rank exchanges per training step (fp32 values, int32 ids), and the time an NCCL ring
    would take at ``bus_bandwidth`` (bytes/s of bus bandwidth, nccl-tests' definition: an all-reduce
    of S bytes moves 2(P-1)/P * S per rank, an all-gather of P*S bytes moves (P-1)/P of that).

    "data": one all-reduce of every gradient (parameter bytes) + the fired mask (n bytes) + the
    variance statistics. "latent" (``batch`` tokens on every rank): all-gather of B*k candidates
    per rank (+ B*k_aux with AuxK), one [B, m] all-reduce (+ one with AuxK), b_dec's [m] gradient
    and scalars. The numbers match what ``count_communication`` records for the same step. On
    CPUs, where the trainer checks each batch for NaN before the step, data parallel adds one int64
    all-reduce a step (8 bytes) so that a bad row on one rank stops every rank.
    """
    P, B, m, n = world, batch, d_model, n_latents
    ring_reduce, ring_gather = 2 * (P - 1) / P, (P - 1) / P
    k_aux = max(1, m // 2) if k_aux is None else k_aux
    parts = {}
    if mode == "data":
        params = 2 * n * m + n + m if arch == "topk" else n * degree + n + m
        parts["gradient all-reduce"] = (4 * params, ring_reduce)
        parts["fired-latent all-reduce (uint8)"] = (n, ring_reduce)
        parts["variance statistics"] = (4 * (m + 1 + 3), ring_reduce)
    elif mode == "latent":
        widest = latent_range(n, 0, P)[1]  # each rank sends as many candidates as the widest shard can
        parts["top-k candidate all-gather"] = (P * B * min(k, widest) * 8, ring_gather)
        parts["reconstruction all-reduce [B, m]"] = (4 * B * m, ring_reduce)
        if auxk_active:  # with at least k_aux dead latents (fewer narrow AuxK's top-k to their number)
            parts["AuxK candidate all-gather"] = (P * B * min(k_aux, n, widest) * 8, ring_gather)
            parts["AuxK reconstruction all-reduce [B, m]"] = (4 * B * m, ring_reduce)
        parts["b_dec gradient + scalars"] = (4 * m + 8 + 4, ring_reduce)  # + dead count (int64), grad norm
    else:
        raise ValueError(f"mode: expected 'data' or 'latent', got {mode!r}")
    total = sum(b for b, _ in parts.values())
    wire = sum(b * f for b, f in parts.values())
    return {"parts": {name: b for name, (b, _) in parts.items()}, "bytes": total, "bus_bytes": wire,
            "seconds_at_bus_bandwidth": wire / bus_bandwidth, "dense_latents_bytes": 4 * B * n}
