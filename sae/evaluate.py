"""How good an SAE is: reconstruction on activations, and the language model's loss with the SAE
spliced in.

- ``reconstruction_metrics``: FVU, relative error, L0 and the fraction of latents that never fire
  on the evaluated activations.
- ``ce_baseline`` (once per model, layer and tokens) and ``ce_loss_recovered`` (per SAE): the
  model's next-token cross-entropy clean, with the layer's output ablated, and with the SAE's
  reconstruction spliced in; the loss rise ``dCE = CE_sae - CE_clean`` and ``KL(clean || spliced)``
  per token, each with a bootstrap confidence interval over contexts.
- ``firing_density`` / ``plot_firing_density``: how often each latent fires, as a log10 histogram.
- ``training_dead_fraction``: latents that did not fire in the last N training tokens, read from
  the SAE's ``tokens_since_fired`` counter.
- ``activation_mean``: the mean activation for the mean-ablation baseline (take it from the
  training split).

CE conventions. The headline follows SAELens (``convention="saelens"``): for CE_zero the layer's
output is zeroed at every position, BOS included; the SAE (and the mean ablation) is spliced at
every non-BOS position, the BOS positions keep the model's own activation; CE and KL are averaged
over the predictions made at non-BOS positions. The paper's convention (``convention="paper"``)
zeroes and splices every position, BOS included, and averages over every prediction. In a
bias-free Llama zeroing every position makes the logits uniform, so CE_zero = ln(vocabulary). The previous convention (``pos0_kept``, a
labelled secondary figure) zeroes and splices only the non-BOS positions and averages CE over
every prediction; position 0 then keeps its value, later positions copy it, and CE_zero comes out
worse than uniform (15.4 against 10.8 nats for SmolLM2 at layer 15), which inflates CE-loss
recovered. Every context must start with the BOS token (``sae.data.token_splits`` makes them so);
its id is recorded in every result.

Cost. Per batch of contexts the clean model runs once in full; each splice (SAE or ablation)
then reruns only the layers after the spliced one, the final norm and the head, from the clean
pass's output of that layer (``sae.data.layouts.layer_replay``). The later layers see bitwise the
inputs of a full pass, so every sum is bitwise that of full passes (checked per model, with a
fallback to full passes).

An SAE here is anything with ``encode(x) -> (top_acts, top_indices)``,
``decode(top_acts, top_indices) -> x_hat`` and ``n_latents``; for the CE splice a plain callable
``x -> x_hat`` works too.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import ActivationBuffer, decoder_layer, layer_output_hook
from .data.layouts import eval_mode as _evaluating, layer_replay

__all__ = [
    "CONVENTIONS",
    "CEBaseline",
    "CEResult",
    "FiringDensity",
    "Interval",
    "ReconstructionMetrics",
    "activation_mean",
    "ce_baseline",
    "ce_loss_recovered",
    "firing_density",
    "plot_firing_density",
    "reconstruction_metrics",
    "training_dead_fraction",
]


def _progress(it, enabled: bool, total: int, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="batch", leave=False)


def _sae_dtype_device(sae) -> tuple[torch.dtype, torch.device]:
    param = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    if param is None:
        return torch.float32, torch.device("cpu")
    return param.dtype, param.device


def _activation_batches(x, batch_size: int) -> tuple[Iterable[torch.Tensor], int | None]:
    """(batches, number of rows when known) of a tensor, an ActivationBuffer or an iterable."""
    if isinstance(x, torch.Tensor):
        if x.dim() < 2:
            raise ValueError(f"x: expected activations [N, d_model], got shape {tuple(x.shape)}")
        x = x.reshape(-1, x.shape[-1])
        return x.split(batch_size), x.shape[0]
    if isinstance(x, ActivationBuffer):  # read in order, slice by slice
        return (x[i:i + batch_size] for i in range(0, len(x), batch_size)), len(x)
    return _batch_rows(x), None


def _batch_rows(batches):
    """Each batch of an iterable as rows ``[b, d_model]`` (a ``[..., d_model]`` batch flattened, as a
    tensor is); a 1-D batch (a single row, say, from iterating over a tensor) is refused: counted by
    its length, it gave wrong token counts, L0 and FVU."""
    for xb in batches:
        if xb.dim() < 2:
            raise ValueError(f"x: expected batches of activations [b, d_model], got a batch of shape {tuple(xb.shape)}")
        yield xb.reshape(-1, xb.shape[-1])


def _capped(batches, max_tokens: int | None):
    n = 0
    for xb in batches:
        if max_tokens is not None:
            if n >= max_tokens:
                return
            xb = xb[: max_tokens - n]
        n += xb.shape[0]
        yield xb


# --------------------------------------------------------------------------------------------
# Reconstruction metrics
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReconstructionMetrics:
    """Metrics over ``n_tokens`` activations.

    fvu: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean over the same tokens).
    rel_error: mean over tokens of ||x - x_hat|| / ||x||.
    l0: mean number of active latents (nonzero top_acts) per token.
    dead_fraction: fraction of the n_latents latents active on none of the tokens (a latent with
        firing rate 1e-5 looks dead on 16K tokens most of the time: prefer
        ``training_dead_fraction`` and ``firing_density`` over many tokens).
    decoder_values: numbers the decoder stores (from the caller or ``sae.decoder_values``;
        None when neither gives it)."""

    fvu: float
    rel_error: float
    l0: float
    dead_fraction: float
    n_tokens: int
    n_latents: int
    decoder_values: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def _n_latents(sae) -> int:
    n_latents = getattr(sae, "n_latents", None)
    if isinstance(n_latents, bool) or not isinstance(n_latents, int) or n_latents < 1:
        raise TypeError(f"sae: expected an SAE with an int n_latents >= 1, got {n_latents!r}")
    return n_latents


@torch.no_grad()
def reconstruction_metrics(sae, x, *, batch_size: int = 4096, decoder_values: int | None = None,
                           max_tokens: int | None = None, progress: bool = False) -> ReconstructionMetrics:
    """Streams activations through ``sae`` and measures the reconstruction.

    ``x``: a tensor ``[N, d_model]`` (or ``[..., d_model]``), an ``ActivationBuffer``, or an
    iterable of ``[b, d_model]`` tensors. Each batch goes to the SAE in the dtype and device of the
    SAE's first parameter (float32 when it has none). ``max_tokens`` stops after that many
    tokens. Sums are accumulated in float64."""
    n_latents = _n_latents(sae)
    if decoder_values is None:
        decoder_values = getattr(sae, "decoder_values", None)
        decoder_values = int(decoder_values) if decoder_values is not None else None
    dtype, device = _sae_dtype_device(sae)
    batches, n_rows = _activation_batches(x, batch_size)
    total = None if n_rows is None else -(-min(n_rows, max_tokens or n_rows) // batch_size)

    n = 0
    sq_err = 0.0
    rel_err = 0.0
    active_count = 0
    sum_x: torch.Tensor | None = None
    sum_sq = 0.0
    fired = torch.zeros(n_latents, dtype=torch.bool, device=device)
    with _evaluating(sae):
        for xb in _progress(_capped(batches, max_tokens), progress, total, "reconstruction"):
            x64 = xb.to(device=device, dtype=torch.float64)  # the error against the activations as given,
            xb = xb.to(device=device, dtype=dtype)              # not as rounded to a bf16 SAE's dtype
            top_acts, top_indices = sae.encode(xb)
            x_hat = sae.decode(top_acts, top_indices)
            err = (x64 - x_hat.double()).pow(2).sum(-1)
            norm_sq = x64.pow(2).sum(-1)
            sq_err += err.sum().item()
            rel_err += (err.sqrt() / norm_sq.sqrt().clamp_min(1e-30)).sum().item()
            sum_sq += norm_sq.sum().item()
            sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
            active = top_acts != 0
            active_count += int(active.sum().item())
            fired[top_indices[active]] = True
            n += xb.shape[0]
    if n == 0:
        raise ValueError("x: expected at least one activation, got none")
    total_var = sum_sq - sum_x.pow(2).sum().item() / n
    fvu = sq_err / total_var if total_var > 0 else math.nan
    return ReconstructionMetrics(
        fvu=fvu,
        rel_error=rel_err / n,
        l0=active_count / n,
        dead_fraction=1.0 - fired.sum().item() / n_latents,
        n_tokens=n,
        n_latents=n_latents,
        decoder_values=decoder_values,
    )


@torch.no_grad()
def activation_mean(x, *, batch_size: int = 65536, max_tokens: int | None = None) -> torch.Tensor:
    """Mean activation ``[d_model]`` (float32, summed in float64) of a tensor, an
    ``ActivationBuffer`` or an iterable of batches: the mean-ablation baseline's value. Take it
    from the training split, never from the tokens being evaluated."""
    total, n = None, 0
    for xb in _capped(_activation_batches(x, batch_size)[0], max_tokens):
        s = xb.double().sum(0)
        total = s if total is None else total + s
        n += xb.shape[0]
    if n == 0:
        raise ValueError("x: expected at least one activation, got none")
    return (total / n).float()


# --------------------------------------------------------------------------------------------
# Dead and rare latents
# --------------------------------------------------------------------------------------------

def training_dead_fraction(sae, window_tokens: int | None = None) -> dict:
    """``{"dead_fraction", "window_tokens"}``: the fraction of latents that went more than
    ``window_tokens`` training tokens without firing, from the SAE's ``tokens_since_fired`` buffer
    (counted by the trainer; the SAE's own dead count for AuxK and the training log uses the same
    strict ``>``). ``window_tokens`` defaults to the SAE's ``dead_tokens_threshold``. A window
    longer than the run counts nothing as dead: report it with the tokens trained."""
    since = getattr(sae, "tokens_since_fired", None)
    if not isinstance(since, torch.Tensor):
        raise TypeError(f"sae: expected a tokens_since_fired tensor (a trained TopKSAE / ExpanderSAE), "
                        f"got {type(since).__name__}")
    if window_tokens is None:
        window_tokens = getattr(sae, "dead_tokens_threshold", None)
        if window_tokens is None:
            raise ValueError("window_tokens: expected an int (the SAE has no dead_tokens_threshold), got None")
    if isinstance(window_tokens, bool) or not isinstance(window_tokens, int) or window_tokens < 1:
        raise ValueError(f"window_tokens: expected an int >= 1, got {window_tokens!r}")
    dead = int((since > window_tokens).sum()) / since.numel()  # as the SAE counts dead (models.py)
    return {"dead_fraction": dead, "window_tokens": int(window_tokens)}


@dataclass(frozen=True)
class FiringDensity:
    """``density[j]``: the fraction of ``n_tokens`` tokens on which latent j fired (a nonzero
    top_act)."""

    density: torch.Tensor
    n_tokens: int

    def never_fired(self) -> int:
        return int((self.density == 0).sum())

    def log10_histogram(self, bins: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts [bins], edges [bins + 1]) of log10(density) over the latents that fired, on
        [log10(1 / n_tokens), 0]."""
        low = -math.log10(self.n_tokens)
        # log10(1 / n) rounds below -log10(n) for some n (19, 24, 103, ...): clamp, or histc drops
        # the latents that fired once
        fired = self.density[self.density > 0].double().log10().clamp(low, 0.0)
        if self.n_tokens == 1:  # one token: every latent that fired has density 1 (histc would read
            counts = torch.zeros(bins, dtype=fired.dtype)  # min == max == 0 as "the data's range")
            counts[-1] = fired.numel()
            return counts, torch.zeros(bins + 1, dtype=torch.float64)
        counts = torch.histc(fired, bins=bins, min=low, max=0.0)
        return counts, torch.linspace(low, 0.0, bins + 1, dtype=torch.float64)


@torch.no_grad()
def firing_density(sae, x, *, batch_size: int = 4096, max_tokens: int | None = None,
                   progress: bool = False) -> FiringDensity:
    """How often each latent fires over the activations ``x`` (as for ``reconstruction_metrics``).
    Use at least 1M tokens for rates down to 1e-6 to show (the evaluation split is too small)."""
    n_latents = _n_latents(sae)
    dtype, device = _sae_dtype_device(sae)
    batches, n_rows = _activation_batches(x, batch_size)
    total = None if n_rows is None else -(-min(n_rows, max_tokens or n_rows) // batch_size)
    counts = torch.zeros(n_latents, dtype=torch.int64, device=device)
    n = 0
    with _evaluating(sae):
        for xb in _progress(_capped(batches, max_tokens), progress, total, "firing density"):
            top_acts, top_indices = sae.encode(xb.to(device=device, dtype=dtype))
            counts += torch.bincount(top_indices[top_acts != 0].flatten(), minlength=n_latents)
            n += xb.shape[0]
    if n == 0:
        raise ValueError("x: expected at least one activation, got none")
    return FiringDensity(density=(counts.double() / n).cpu(), n_tokens=n)


def plot_firing_density(density: FiringDensity, path: str | os.PathLike, *, title: str = "",
                        bins: int = 50) -> Path:
    """Saves the log10 firing-density histogram of one SAE to ``path`` (any format matplotlib
    writes, by its suffix); latents that never fired are counted in the legend. Returns the path."""
    from matplotlib.figure import Figure

    counts, edges = density.log10_histogram(bins)
    n = density.density.numel()
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.stairs(counts.numpy(), edges.numpy(), fill=True, alpha=0.7,
              label=f"{n - density.never_fired():,} of {n:,} latents fired")
    ax.axvline(-math.log10(density.n_tokens), color="k", ls=":", lw=1,
               label=f"1 / {density.n_tokens:,} tokens ({density.never_fired():,} latents never fired)")
    ax.set_xlabel("log10 firing density (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(title or f"Firing density over {density.n_tokens:,} tokens", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------------
# The language model's loss with the layer ablated or the SAE spliced in
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """An estimate with a bootstrap confidence interval [low, high] (percentile method, over
    contexts resampled with replacement)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class CEBaseline:
    """Clean and ablated next-token CE (nats per prediction) of a model on a set of contexts, for
    reuse across many SAEs. SAELens convention: ``ce_clean``, ``ce_zero`` (every position zeroed),
    ``ce_mean_ablation`` (non-BOS positions set to the given mean; None without one), averaged
    over the ``n_tokens`` predictions at non-BOS positions. ``pos0_kept``: the previous convention
    (see the module docstring). ``context_sums`` holds per-context sums for the bootstrap;
    ``tokens_hash`` and ``layer`` catch reuse on other tokens or another layer, ``batch_size``
    makes SAE runs batch the contexts the same way (an identity splice then reproduces
    ``ce_clean`` exactly)."""

    layer: int
    bos_id: int
    ce_clean: float
    ce_zero: float
    ce_mean_ablation: float | None
    n_tokens: int
    n_contexts: int
    pos0_kept: dict
    tokens_hash: str
    batch_size: int
    context_sums: dict = field(repr=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (safetensors: the per-context sums as tensors, the rest as metadata),
        atomically, so that a later sitting of a long evaluation need not recompute it."""
        import json

        from safetensors.torch import save_file

        from .rundir import atomic_write

        meta = {k: v for k, v in asdict(self).items() if k != "context_sums"}
        tensors = {k: v.contiguous() for k, v in self.context_sums.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"ce_baseline": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CEBaseline":
        """Read what ``save`` wrote."""
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["ce_baseline"])
            sums = {k: f.get_tensor(k).clone() for k in f.keys()}  # owned: not views of the file's mapping
        return cls(**meta, context_sums=sums)


@dataclass(frozen=True)
class CEResult:
    """One SAE spliced into the model, SAELens convention (module docstring).

    recovered: ``(ce_zero - ce_sae) / (ce_zero - ce_clean)``; 1 for a perfect reconstruction, 0 for
        one as bad as zeroing the layer. ``recovered_ci`` holds it with its interval.
    delta_ce: ``ce_sae - ce_clean`` (nats per prediction). kl: ``KL(clean || spliced)`` of the
        next-token distributions, nats per non-BOS position (``n_kl_positions`` of them).
    recovered_vs_mean: ``(ce_mean - ce_sae) / (ce_mean - ce_clean)`` against mean ablation.
    pos0_kept: the previous convention's ce_clean, ce_zero, ce_sae, recovered (secondary).
    bootstrap: ``{"n", "seed", "level"}`` of the intervals."""

    ce_clean: float
    ce_zero: float
    ce_sae: float
    recovered: float
    n_tokens: int
    recovered_ci: Interval
    delta_ce: Interval
    kl: Interval
    n_kl_positions: int
    ce_mean_ablation: float | None
    recovered_vs_mean: float | None
    pos0_kept: dict
    bos_id: int
    n_contexts: int
    bootstrap: dict
    convention: str = "saelens"

    def as_dict(self) -> dict:
        """A flat dict for a results row (intervals as ``*_low`` / ``*_high``)."""
        out = {"ce_convention": self.convention, "bos_id": self.bos_id, "ce_tokens": self.n_tokens,
               "ce_contexts": self.n_contexts, "ce_clean": self.ce_clean, "ce_zero": self.ce_zero,
               "ce_sae": self.ce_sae, "ce_mean_ablation": self.ce_mean_ablation,
               "ce_recovered_vs_mean": self.recovered_vs_mean}
        for name, iv in (("ce_recovered", self.recovered_ci), ("delta_ce", self.delta_ce), ("kl", self.kl)):
            out.update({name: iv.value, f"{name}_low": iv.low, f"{name}_high": iv.high})
        out.update({f"pos0_kept_{k}": v for k, v in self.pos0_kept.items()})
        out.update({f"bootstrap_{k}": v for k, v in self.bootstrap.items()})
        return out


def _tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha1(tokens.cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _check_tokens(model, tokens, bos_id: int | None) -> tuple[torch.Tensor, int]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
        raise ValueError(f"tokens: expected a LongTensor [n_ctx >= 1, T >= 2], "
                         f"got {getattr(tokens, 'shape', type(tokens))}")
    if bos_id is None:
        bos_id = getattr(getattr(model, "config", None), "bos_token_id", None)
        if bos_id is None:
            raise ValueError("bos_id: expected the BOS token id every context starts with (the model's "
                             "config names none), got None")
    first = tokens[:, 0]
    if not bool((first == bos_id).all()):
        raise ValueError(f"tokens: expected every context to start with the BOS id {bos_id} (as "
                         f"sae.data.token_splits makes them), got first tokens {first.unique()[:8].tolist()}")
    return tokens, int(bos_id)


def _reconstructor(sae) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [N, m] -> x_hat [N, m]`` from an SAE (encode, then decode) or a callable, in the SAE's
    dtype and on its device."""
    if hasattr(sae, "encode") and hasattr(sae, "decode"):
        fn = lambda x: sae.decode(*sae.encode(x))  # noqa: E731
    elif callable(sae):
        fn = sae
    else:
        raise TypeError(f"sae: expected an SAE with encode/decode or a callable x -> x_hat, got {type(sae).__name__}")
    dtype, device = _sae_dtype_device(sae)
    return lambda x: fn(x.to(device=device, dtype=dtype)).to(device=x.device, dtype=x.dtype)


def _splice(reconstruct) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A replacement of the hidden states ``h [b, T, m]`` at the positions in ``mask [b, T]``."""
    def replace(h, mask):
        out = h.clone()
        out[mask] = reconstruct(h[mask])
        return out
    return replace


def _replay_matches(model, ids, replay) -> bool:
    """Whether a replay from the recorded layer (no splice) reproduces a full pass's logits on
    ``ids`` bitwise; a model whose later layers need more than the hidden states (or a layout the
    replay does not know) fails here and is evaluated with full passes."""
    with replay.recording():
        clean = model(input_ids=ids, use_cache=False).logits
    try:
        with replay.replaying():
            logits = model(input_ids=ids, use_cache=False).logits
    except TypeError as e:
        reason = str(e)
    else:
        if torch.equal(logits, clean):
            return True
        reason = "a replay from the spliced layer did not reproduce the full pass's logits bitwise"
    warnings.warn(f"CE evaluation of {type(model).__name__}: full forward passes for every splice ({reason})",
                  stacklevel=3)
    return False


def _kl(clean_logp: torch.Tensor, clean_p: torch.Tensor, clean_zero: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(clean || spliced) per position, ``sum_v p (log p - log q)`` with 0 log 0 = 0 where the
    clean probability underflows (``clean_zero``: ``not clean_p > 0``). Overwrites ``logp``: in
    place, without four vocabulary-sized temporaries, and bitwise
    ``where(p > 0, p * (log p - log q), 0).sum(-1)`` (each element rounds once either way)."""
    return torch.sub(clean_logp, logp, out=logp).mul_(clean_p).masked_fill_(clean_zero, 0.0).sum(-1)


@torch.no_grad()
def _passes(model, tokens: torch.Tensor, layer: int, bos_id: int, splices: dict, batch_size: int,
            progress: bool, desc: str, splice_all: bool = False, replay: bool = True, kl: bool = True) -> dict:
    """Per-context sums (float64 [n_ctx]) of next-token CE and KL(clean || spliced) for the clean
    model and for each splice ``name -> replace(h, mask)`` at ``layer``. Keys: ``count`` (non-BOS
    predictions), ``count_all`` (all predictions), ``count_kl`` (non-BOS positions); per name
    ``{name}.ce`` (non-BOS predictions), ``{name}.ce_all`` and, for splices, ``{name}.kl`` and
    ``{name}.kl_all`` (every position; ``count_all_pos`` of them). ``splice_all``: the splices
    replace every position, BOS included (the paper's convention), not only the non-BOS ones.
    ``kl=False``: no KL sums (the baselines need none).

    ``replay``: each spliced pass reruns only what the splice changes (the layers after ``layer``,
    the final norm and the head) from the clean pass's output of ``layer`` (``layer_replay``); the
    sums are bitwise those of full passes. Checked first on the start of the first context (a replay
    without a splice must give a full pass's logits bitwise); when it does not, full passes with a
    warning. ``False``: full passes (the reference the tests compare with)."""
    device = next(model.parameters()).device
    sums: dict[str, list] = {}
    active: dict = {"replace": None, "mask": None}

    def hook(h):
        return None if active["replace"] is None else active["replace"](h, active["mask"])

    def add(key, value):
        sums.setdefault(key, []).append(value.double().cpu())

    batches = tokens.split(batch_size)
    # the model in eval mode: with dropout on, CE is noise and the replay check fails on layer 0's input
    with _evaluating(model), layer_output_hook(model, layer, hook), layer_replay(model, layer) as cache:
        if replay and splices:  # a short check: 64 tokens of one context
            replay = _replay_matches(model, tokens[:1, :64].to(device), cache)
        for ids in _progress(batches, progress, len(batches), desc):
            ids = ids.to(device)
            mask = ids != bos_id  # positions spliced, and whose predictions are averaged
            targets = ids[:, 1:, None]
            pred_mask = mask[:, :-1]
            add("count", pred_mask.sum(1))
            add("count_all", torch.full((len(ids),), targets.shape[1]))
            add("count_kl", mask.sum(1))
            add("count_all_pos", torch.full((len(ids),), ids.shape[1]))
            splice_mask = torch.ones_like(mask) if splice_all else mask
            for name, replace in [("clean", None), *splices.items()]:
                active.update(replace=replace, mask=splice_mask)
                with cache.recording() if replace is None else cache.replaying() if replay else nullcontext():
                    logits = model(input_ids=ids, use_cache=False).logits
                logp = F.log_softmax(logits.float(), dim=-1)
                del logits
                ce = -logp[:, :-1].gather(-1, targets)[..., 0]  # [b, T-1]
                add(f"{name}.ce", (ce * pred_mask).sum(1))
                add(f"{name}.ce_all", ce.sum(1))
                if replace is None:
                    if kl:
                        clean_logp, clean_p = logp, logp.exp()
                        clean_zero = (clean_p > 0).logical_not_()
                elif kl:
                    div = _kl(clean_logp, clean_p, clean_zero, logp)  # [b, T]
                    add(f"{name}.kl", (div * mask).sum(1))
                    add(f"{name}.kl_all", div.sum(1))
                del logp
            active.update(replace=None, mask=None)
    return {key: torch.cat(values) for key, values in sums.items()}


def ce_baseline(model, tokens: torch.Tensor, layer: int, *, bos_id: int | None = None, batch_size: int = 4,
                mean_activation: torch.Tensor | None = None, progress: bool = False) -> CEBaseline:
    """Clean CE and the ablation baselines over ``tokens`` ``[n_ctx, T]`` (each context starting
    with ``bos_id``, by default the model config's ``bos_token_id``); compute once and pass to
    ``ce_loss_recovered`` for every SAE. ``mean_activation`` ``[d_model]`` (``activation_mean`` of
    the training split) adds the mean-ablation baseline."""
    tokens, bos_id = _check_tokens(model, tokens, bos_id)
    if not bool((tokens[:, :-1] != bos_id).any()):
        raise ValueError(f"tokens: expected at least one prediction made at a non-BOS position (the CE average), "
                         f"got none in {tuple(tokens.shape)} tokens")
    decoder_layer(model, layer)
    splices = {
        "zero": lambda h, mask: torch.zeros_like(h),
        "zero_pos0_kept": lambda h, mask: h.masked_fill(mask[..., None], 0.0),
    }
    if mean_activation is not None:
        mean_activation = torch.as_tensor(mean_activation).detach()
        if mean_activation.dim() != 1:
            raise ValueError(f"mean_activation: expected a [d_model] vector, got shape {tuple(mean_activation.shape)}")
        splices["mean"] = lambda h, mask: torch.where(mask[..., None], mean_activation.to(h), h)
    sums = _passes(model, tokens, layer, bos_id, splices, batch_size, progress, "CE baseline", kl=False)
    n, n_all = sums["count"].sum().item(), sums["count_all"].sum().item()

    def mean(key, count):
        return sums[key].sum().item() / count

    pos0 = {"ce_clean": mean("clean.ce_all", n_all), "ce_zero": mean("zero_pos0_kept.ce_all", n_all),
            "n_tokens": int(n_all)}
    return CEBaseline(layer=layer, bos_id=bos_id, ce_clean=mean("clean.ce", n), ce_zero=mean("zero.ce", n),
                      ce_mean_ablation=mean("mean.ce", n) if "mean.ce" in sums else None, n_tokens=int(n),
                      n_contexts=len(tokens), pos0_kept=pos0, tokens_hash=_tokens_hash(tokens),
                      batch_size=batch_size, context_sums=sums)


def _bootstrap(stat: Callable[[dict], torch.Tensor], sums: dict, n_bootstrap: int, seed: int,
               level: float) -> Interval:
    """``stat`` of the summed per-context values, with a percentile interval over ``n_bootstrap``
    resamplings of the contexts (the same resamplings for every statistic of one seed)."""
    value = float(stat({k: v.sum() for k, v in sums.items()}))
    n_ctx = len(next(iter(sums.values())))
    idx = torch.randint(n_ctx, (n_bootstrap, n_ctx), generator=torch.Generator().manual_seed(seed), device="cpu")
    boot = stat({k: v[idx].sum(1) for k, v in sums.items()})
    low, high = torch.nanquantile(boot, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=boot.dtype))
    return Interval(value, float(low), float(high))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), torch.nan)


CONVENTIONS = ("saelens", "paper")


def ce_loss_recovered(model, sae, tokens: torch.Tensor, layer: int, *, baseline: CEBaseline | None = None,
                      bos_id: int | None = None, batch_size: int | None = None, n_bootstrap: int = 1000,
                      seed: int = 0, level: float = 0.95, progress: bool = False, convention: str = "saelens"):
    """Splices ``sae``'s reconstruction into the output of decoder layer ``layer`` at the non-BOS
    positions of ``tokens`` ``[n_ctx, T]`` and compares the model's loss with the clean and
    ablated baselines (SAELens convention; the previous one in ``pos0_kept``).

    ``sae``: an SAE, a callable ``x -> x_hat``, or a mapping ``name -> SAE`` (then the clean pass
    that KL needs is shared and a dict ``name -> CEResult`` comes back). The hidden states at the
    spliced positions go to the SAE in its parameter dtype and device and come back in the
    model's. ``baseline``: a ``ce_baseline`` result on the same tokens and layer (computed here
    when None); ``batch_size`` defaults to the baseline's, as other batch shapes round
    differently. Intervals: ``n_bootstrap`` resamplings of the contexts from ``seed``, at
    ``level``.

    ``convention="paper"``: the paper's convention instead, every position zeroed for CE_zero and
    every position (BOS included) spliced, CE averaged over every prediction and KL over every
    position; ``pos0_kept`` is then empty and there is no mean-ablation figure."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    paper = convention == "paper"
    many = isinstance(sae, Mapping)
    saes = dict(sae) if many else {"sae": sae}
    if not saes:
        raise ValueError("sae: expected an SAE or a non-empty mapping of SAEs, got an empty mapping")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap: expected an int >= 1, got {n_bootstrap!r}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected in (0, 1), got {level}")
    tokens, bos_id = _check_tokens(model, tokens, bos_id if baseline is None or bos_id is not None else baseline.bos_id)
    if baseline is None:
        baseline = ce_baseline(model, tokens, layer, bos_id=bos_id, batch_size=batch_size or 4, progress=progress)
    elif (baseline.layer, baseline.bos_id, baseline.tokens_hash) != (layer, bos_id, _tokens_hash(tokens)):
        same = "the same" if baseline.tokens_hash == _tokens_hash(tokens) else "other"
        raise ValueError(f"baseline: expected a CEBaseline for layer {layer}, BOS id {bos_id} on these tokens, got "
                         f"one for layer {baseline.layer}, BOS id {baseline.bos_id} on {same} tokens")
    splices = {f"s{i}": _splice(_reconstructor(s)) for i, s in enumerate(saes.values())}
    with _evaluating(*saes.values()):
        sums = _passes(model, tokens, layer, bos_id, splices, batch_size or baseline.batch_size, progress,
                       "CE with SAE" if not many else f"CE with {len(saes)} SAEs", splice_all=paper)
    # per prediction: the contexts' absolute differences summed over all predictions (the largest one
    # over all predictions let a tolerance grow with the number of contexts)
    drift = (sums["clean.ce"] - baseline.context_sums["clean.ce"]).abs().sum().item() / max(baseline.n_tokens, 1)
    if drift > 1e-4:
        raise ValueError(f"baseline: its clean CE differs from this model's on these tokens by {drift:.2e} nats per "
                         "prediction; it was computed with another model or other weights")
    base = baseline.context_sums
    boot = dict(n=n_bootstrap, seed=seed, level=level)
    results = {}
    for name, key in zip(saes, splices):
        if paper:
            s = {"clean": sums["clean.ce_all"], "zero": base["zero.ce_all"], "sae": sums[f"{key}.ce_all"],
                 "count": sums["count_all"], "kl": sums[f"{key}.kl_all"], "count_kl": sums["count_all_pos"]}
        else:
            s = {"clean": sums["clean.ce"], "zero": base["zero.ce"], "sae": sums[f"{key}.ce"], "count": sums["count"],
                 "kl": sums[f"{key}.kl"], "count_kl": sums["count_kl"]}
        if "mean.ce" in base and not paper:
            s["mean"] = base["mean.ce"]
        recovered = _bootstrap(lambda t: _ratio(t["zero"] - t["sae"], t["zero"] - t["clean"]), s, n_bootstrap, seed, level)
        delta = _bootstrap(lambda t: (t["sae"] - t["clean"]) / t["count"], s, n_bootstrap, seed, level)
        kl = _bootstrap(lambda t: t["kl"] / t["count_kl"], s, n_bootstrap, seed, level)
        n = s["count"].sum().item()
        ce_clean, ce_zero, ce_sae = (s[k].sum().item() / n for k in ("clean", "zero", "sae"))
        ce_mean = None if paper else baseline.ce_mean_ablation
        n_all = baseline.pos0_kept["n_tokens"]
        ce_sae_all = sums[f"{key}.ce_all"].sum().item() / n_all
        p0 = baseline.pos0_kept
        pos0 = {"ce_clean": p0["ce_clean"], "ce_zero": p0["ce_zero"], "ce_sae": ce_sae_all,
                "recovered": _ratio(torch.tensor(p0["ce_zero"] - ce_sae_all),
                                    torch.tensor(p0["ce_zero"] - p0["ce_clean"])).item(),
                "n_tokens": n_all}
        if paper:
            pos0 = {}  # the SAE was spliced at position 0 too: the previous convention's figure does not apply
        results[name] = CEResult(
            ce_clean=ce_clean, ce_zero=ce_zero, ce_sae=ce_sae, recovered=recovered.value, n_tokens=int(n),
            recovered_ci=recovered, delta_ce=delta, kl=kl, n_kl_positions=int(s["count_kl"].sum().item()),
            ce_mean_ablation=ce_mean,
            recovered_vs_mean=None if ce_mean is None else _ratio(torch.tensor(ce_mean - ce_sae),
                                                                  torch.tensor(ce_mean - ce_clean)).item(),
            pos0_kept=pos0, bos_id=bos_id, n_contexts=len(tokens), bootstrap=boot, convention=convention)
    return results if many else results["sae"]
