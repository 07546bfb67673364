"""Where a causal language model keeps its decoder layers, and hooks on a layer's output.

The one place that knows model layouts: Llama-style models (Llama, Mistral, Qwen2, Gemma, SmolLM2:
``model.model.layers``), GPT-2 (``model.transformer.h``) and GPT-NeoX / Pythia
(``model.gpt_neox.layers``), each as the ``*ForCausalLM`` wrapper or the bare base model.
Harvesting (``sae.data.harvest``), evaluation (``sae.evaluate``) and the CLI find layers here.

A decoder layer's output is the residual stream after that layer: a tensor, or (in older
``transformers`` versions and some architectures) a tuple led by it. ``layer_output_hook``
hides that difference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["decoder_layer", "decoder_layers", "layer_output_hook", "n_decoder_layers"]

# attribute paths from the model object to its ModuleList of decoder layers, tried in order
_LAYOUTS = {
    "model.layers": "Llama-style *ForCausalLM (Llama, Mistral, Qwen2, Gemma, SmolLM2)",
    "layers": "Llama-style base model",
    "transformer.h": "GPT-2 *LMHeadModel",
    "h": "GPT-2 base model",
    "gpt_neox.layers": "GPT-NeoX *ForCausalLM",
    "model.language_model.layers": "multimodal *ForConditionalGeneration (Gemma 3)",
}


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers in order (a ``ModuleList``)."""
    for path in _LAYOUTS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    known = "; ".join(f"{desc}: .{path}" for path, desc in _LAYOUTS.items())
    raise TypeError(f"model: expected a decoder-only transformer with its layers at one of [{known}], "
                    f"got {type(model).__name__}")


def n_decoder_layers(model: torch.nn.Module) -> int:
    """How many decoder layers the model has (valid ``layer`` values are ``0 .. n - 1``)."""
    return len(decoder_layers(model))


def decoder_layer(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Decoder layer number ``layer`` (0-based; ``0 <= layer < n_decoder_layers(model)``)."""
    layers = decoder_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer: expected 0 <= layer < {len(layers)} ({type(model).__name__} has "
                         f"{len(layers)} decoder layers), got {layer}")
    return layers[layer]


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(output, new: torch.Tensor):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    return new


@contextlib.contextmanager
def layer_output_hook(model: torch.nn.Module, layer: int,
                      fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Calls ``fn(hidden)`` on the output of decoder layer ``layer`` (``hidden``: ``[b, T, d_model]``,
    the residual stream after the layer) on every forward pass inside the ``with`` block.
    When ``fn`` returns a tensor, it replaces the hidden states (cast to their dtype); ``None``
    leaves them unchanged. Exceptions raised by ``fn`` propagate (harvesting uses one to stop the
    forward pass). The hook is removed on exit, also on errors."""
    module = decoder_layer(model, layer)

    def hook(mod, args, output):
        h = _hidden(output)
        new = fn(h)
        return None if new is None else _with_hidden(output, new.to(h.dtype))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
