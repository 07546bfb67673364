"""Harvesting a decoder layer's output (the residual stream after it) from a language model.

``harvest_activations`` runs the model only up to the hooked layer (the hook raises a private
exception right after it, so later layers and the LM head cost nothing) and yields the layer's
output without position 0 (the BOS position: its residual norm is an outlier, and the SAE
metrics leave it out too). ``ActivationBuffer.harvest`` (``sae.data.buffer``) caches the result
on disk.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .layouts import decoder_layer, eval_mode, layer_output_hook

__all__ = ["harvest_activations"]


class _StopForward(Exception):
    """Raised by the harvesting hook to end the forward pass after the hooked layer."""


def _iter_token_batches(tokens, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"token_batches: expected a [N, T] tensor, got shape {tuple(tokens.shape)}")
        yield from tokens.split(batch_size)
    else:
        for batch in tokens:
            batch = torch.as_tensor(batch)
            if batch.dim() != 2:
                raise ValueError(
                    f"token_batches: expected [b, T] batches, got shape {tuple(batch.shape)}"
                )
            yield batch


@torch.no_grad()
def _run_to_layer(model, layer: int, input_ids: torch.Tensor, autocast_dtype) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def capture(h):
        captured.append(h)
        raise _StopForward

    device = next(model.parameters()).device
    with layer_output_hook(model, layer, capture), eval_mode(model):
        try:
            if autocast_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                    model(input_ids=input_ids.to(device), use_cache=False)
            else:
                model(input_ids=input_ids.to(device), use_cache=False)
        except _StopForward:
            pass
    if not captured:
        raise RuntimeError("harvest: the hooked layer did not run during the forward pass")
    return captured[0]


def harvest_activations(model, token_batches, layer: int, *, batch_size: int = 8,
                        skip_first: bool = True, autocast_dtype: torch.dtype | None = None,
                        out_dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """Residual-stream output of decoder layer ``layer`` (``sae.data.decoder_layer``), batch by batch.

    ``token_batches``: a LongTensor ``[N, T]`` (split into ``batch_size`` rows at a time) or an
    iterable of ``[b, T]`` LongTensors. Yields ``[b * (T - 1), d_model]`` tensors of
    ``out_dtype`` (``[b * T, d_model]`` with ``skip_first=False``), rows ordered by sequence
    then position. The forward pass stops right after the hooked layer, so later layers and the
    LM head cost nothing. The model computes in its own dtype (load it in bf16 for bf16
    harvesting) or, with ``autocast_dtype``, under ``torch.autocast`` in that dtype."""
    decoder_layer(model, layer)  # a bad layer fails here, before any batch
    for ids in _iter_token_batches(token_batches, batch_size):
        if ids.numel() == 0:
            raise ValueError(f"token_batches: expected batches of at least one token, got a batch of shape "
                             f"{tuple(ids.shape)}")
        h = _run_to_layer(model, layer, ids, autocast_dtype)
        if skip_first:
            h = h[:, 1:]
        out = h.reshape(-1, h.shape[-1]).to(out_dtype)
        if not bool(torch.isfinite(out).all()):  # one pass over the batch; a model forward costs far more
            where = ("the model's own activations are" if not bool(torch.isfinite(h).all())
                     else f"activations of magnitude up to {h.abs().max().item():.3g} overflow it, as")
            raise ValueError(f"out_dtype: harvesting layer {layer} into {out_dtype} gives non-finite values: "
                             f"{where} NaN or infinite (harvest into float32 or bfloat16 instead)")
        yield out
