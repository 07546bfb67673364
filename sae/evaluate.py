"""How good an SAE is: reconstruction metrics on activations and CE loss recovered in the model.

- ``reconstruction_metrics`` streams activations through an SAE and reports FVU, relative
  error, L0, the fraction of dead latents and the decoder's stored values.
- ``ce_baseline`` measures, once per (model, layer, held-out tokens), the clean next-token CE
  and the CE with the layer's output zero-ablated; ``ce_loss_recovered`` then splices an SAE's
  reconstruction into the model at that layer and reports
  ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``, reusing the baseline across many SAEs.

Position 0 is outside every SAE's domain (its residual norm is an outlier; ``sae.data`` never
harvests it), so every spliced variant, zero ablation included, keeps the model's own
activation at position 0. This matters for the zero baseline: in a bias-free Llama, zeroing
every position makes all later residuals zero and the logits uniform (CE = ln(vocab), 10.80
for SmolLM2), whereas keeping position 0 gives a worse CE (~15.0-15.3 nats at layer 15 on
Austen, context 512), so CE-recovered numbers are only comparable under the same convention.

An SAE here is anything with ``encode(x) -> (top_acts, top_indices)``,
``decode(top_acts, top_indices) -> x_hat`` and ``n_latents``; for the CE splice a plain
callable ``x -> x_hat`` works too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import ActivationBuffer, decoder_layer as _decoder_layer
from .data.layouts import _hidden

__all__ = [
    "CEBaseline",
    "CEResult",
    "ReconstructionMetrics",
    "ce_baseline",
    "ce_loss_recovered",
    "reconstruction_metrics",
]


# --------------------------------------------------------------------------------------------
# Reconstruction metrics
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReconstructionMetrics:
    """Metrics over ``n_tokens`` activations.

    fvu: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean over the same tokens).
    rel_error: mean over tokens of ||x - x_hat|| / ||x||.
    l0: mean number of active latents (nonzero top_acts) per token.
    dead_fraction: fraction of the n_latents latents active on none of the tokens.
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
        return dict(self.__dict__)


def _as_batches(x, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() < 2:
            raise ValueError(f"x: expected activations [N, d_model], got shape {tuple(x.shape)}")
        return x.reshape(-1, x.shape[-1]).split(batch_size)
    if isinstance(x, ActivationBuffer):  # read in order, slice by slice
        return (x[i:i + batch_size] for i in range(0, len(x), batch_size))
    return x


@torch.no_grad()
def reconstruction_metrics(sae, x, *, batch_size: int = 4096, decoder_values: int | None = None,
                           max_tokens: int | None = None) -> ReconstructionMetrics:
    """Streams activations through ``sae`` and measures the reconstruction.

    ``x``: a tensor ``[N, d_model]`` (or ``[..., d_model]``), an ``ActivationBuffer``, or an
    iterable of ``[b, d_model]`` tensors. Each batch is cast to the dtype and device of the
    SAE's first parameter (float32 when it has none). ``max_tokens`` stops after that many
    tokens. Sums are accumulated in float64."""
    n_latents = getattr(sae, "n_latents", None)
    if not isinstance(n_latents, int) or n_latents < 1:
        raise TypeError(f"sae: expected an SAE with an int n_latents >= 1, got {n_latents!r}")
    if decoder_values is None:
        decoder_values = getattr(sae, "decoder_values", None)
        decoder_values = int(decoder_values) if decoder_values is not None else None
    param = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")

    n = 0
    sq_err = 0.0
    rel_err = 0.0
    active_count = 0
    sum_x: torch.Tensor | None = None
    sum_sq = 0.0
    fired = torch.zeros(n_latents, dtype=torch.bool, device=device)
    for xb in _as_batches(x, batch_size):
        if max_tokens is not None and n >= max_tokens:
            break
        if max_tokens is not None:
            xb = xb[: max_tokens - n]
        xb = xb.to(device=device, dtype=dtype)
        top_acts, top_indices = sae.encode(xb)
        x_hat = sae.decode(top_acts, top_indices)
        x64 = xb.double()
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


# --------------------------------------------------------------------------------------------
# CE loss recovered
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CEBaseline:
    """Clean and zero-ablated next-token CE (nats per predicted token) of a model on a set
    of held-out contexts, with the layer and a fingerprint of the tokens so that reusing it
    on other tokens or another layer is caught. ``batch_size`` is kept so that SAE runs batch
    the contexts the same way (an identity splice then reproduces ``ce_clean`` exactly)."""

    layer: int
    ce_clean: float
    ce_zero: float
    n_tokens: int
    tokens_hash: str
    batch_size: int


@dataclass(frozen=True)
class CEResult:
    """``recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)``: 1 for a perfect
    reconstruction, 0 for one as bad as zero ablation."""

    ce_clean: float
    ce_zero: float
    ce_sae: float
    recovered: float
    n_tokens: int


def _tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha1(tokens.cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _check_tokens(tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens: expected a LongTensor [n_ctx, T] with T >= 2, got {getattr(tokens, 'shape', type(tokens))}"
        )
    return tokens


def _reconstructor(sae) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [..., m] -> x_hat [..., m]`` from an SAE (encode, then decode) or a callable."""
    if hasattr(sae, "encode") and hasattr(sae, "decode"):
        return lambda x: sae.decode(*sae.encode(x))
    if callable(sae):
        return sae
    raise TypeError(f"sae: expected an SAE with encode/decode or a callable x -> x_hat, got {type(sae).__name__}")


@torch.no_grad()
def _mean_ce(model, tokens: torch.Tensor, layer: int, replace, batch_size: int) -> tuple[float, int]:
    """Mean next-token CE over all predicted positions of ``tokens`` ``[n_ctx, T]`` while the
    output of ``model.model.layers[layer]`` at positions 1.. is replaced by
    ``replace(h[:, 1:])`` (``replace=None``: no change)."""
    module = _decoder_layer(model, layer)
    device = next(model.parameters()).device

    def hook(mod, args, output):
        h = _hidden(output)
        new = h.clone()
        new[:, 1:] = replace(h[:, 1:]).to(h.dtype)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        if isinstance(output, list):
            return [new] + list(output[1:])
        return new

    handle = module.register_forward_hook(hook) if replace is not None else None
    total, count = 0.0, 0
    try:
        for ids in tokens.split(batch_size):
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            targets = ids[:, 1:]
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
            total += ce.item()
            count += targets.numel()
    finally:
        if handle is not None:
            handle.remove()
    return total / count, count


def ce_baseline(model, tokens: torch.Tensor, layer: int, *, batch_size: int = 4) -> CEBaseline:
    """Clean CE and zero-ablated CE (layer output set to 0 at positions 1..) over ``tokens``
    ``[n_ctx, T]``; compute once and pass to ``ce_loss_recovered`` for every SAE."""
    tokens = _check_tokens(tokens)
    _decoder_layer(model, layer)
    ce_clean, n = _mean_ce(model, tokens, layer, None, batch_size)
    ce_zero, _ = _mean_ce(model, tokens, layer, torch.zeros_like, batch_size)
    return CEBaseline(layer=layer, ce_clean=ce_clean, ce_zero=ce_zero, n_tokens=n,
                      tokens_hash=_tokens_hash(tokens), batch_size=batch_size)


def ce_loss_recovered(model, sae, tokens: torch.Tensor, layer: int, *,
                      baseline: CEBaseline | None = None, batch_size: int | None = None) -> CEResult:
    """Splices ``sae``'s reconstruction into the output of ``model.model.layers[layer]`` (at
    positions 1..; position 0 keeps the model's activation) over held-out ``tokens``
    ``[n_ctx, T]`` and compares the CE with the clean and zero-ablated CE.

    The layer output (a tensor, or a tuple led by one) is reshaped to ``[b, T-1, m]``, cast to
    the SAE's parameter dtype and device, reconstructed, and cast back. ``baseline``: a
    ``ce_baseline`` result on the same tokens and layer (computed here when None).
    ``batch_size`` defaults to the baseline's (4 without one): matmuls of other shapes round
    differently, which would move CE in the 7th digit."""
    tokens = _check_tokens(tokens)
    if baseline is None:
        baseline = ce_baseline(model, tokens, layer, batch_size=batch_size or 4)
    elif baseline.layer != layer or baseline.tokens_hash != _tokens_hash(tokens):
        raise ValueError(
            f"baseline: expected a CEBaseline for layer {layer} on these tokens, got one for "
            f"layer {baseline.layer} on {'the same' if baseline.tokens_hash == _tokens_hash(tokens) else 'other'} tokens"
        )
    fn = _reconstructor(sae)
    param = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None

    def replace(h: torch.Tensor) -> torch.Tensor:
        x = h if param is None else h.to(device=param.device, dtype=param.dtype)
        x_hat = fn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return x_hat.to(device=h.device)

    ce_sae, n = _mean_ce(model, tokens, layer, replace, batch_size or baseline.batch_size)
    denom = baseline.ce_zero - baseline.ce_clean
    recovered = (baseline.ce_zero - ce_sae) / denom if denom != 0 else math.nan
    return CEResult(ce_clean=baseline.ce_clean, ce_zero=baseline.ce_zero, ce_sae=ce_sae,
                    recovered=recovered, n_tokens=n)
