"""Where a causal language model keeps its decoder layers, and hooks on a layer's output.

The one place that knows model layouts: Llama-style models (Llama, Mistral, Qwen2, Gemma, SmolLM2:
``model.model.layers``), GPT-2 (``model.transformer.h``) and GPT-NeoX / Pythia
(``model.gpt_neox.layers``), each as the ``*ForCausalLM`` wrapper or the bare base model.
Harvesting (``sae.data.harvest``), evaluation (``sae.evaluate``) and the CLI find layers here.
``layer_replay`` lets evaluation rerun only the layers after a splice point: it records a layer's
output on one pass and, on later passes over the same inputs, skips every layer up to it.

A decoder layer's output is the residual stream after that layer: a tensor, or (in older
``transformers`` versions and some architectures) a tuple led by it. ``layer_output_hook``
hides that difference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["LayerReplay", "decoder_layer", "decoder_layers", "eval_mode", "layer_output_hook", "layer_replay",
           "n_decoder_layers"]

# attribute paths from the model object to its ModuleList of decoder layers, tried in order
_LAYOUTS = {
    "model.layers": "Llama-style *ForCausalLM (Llama, Mistral, Qwen2, Gemma, SmolLM2)",
    "layers": "Llama-style base model",
    "transformer.h": "GPT-2 *LMHeadModel",
    "h": "GPT-2 base model",
    "gpt_neox.layers": "GPT-NeoX *ForCausalLM",
    "model.language_model.layers": "multimodal *ForConditionalGeneration (Gemma 3)",
}


@contextlib.contextmanager
def eval_mode(*modules) -> Iterator[None]:
    """The ``nn.Module``s among ``modules`` in eval mode inside, every submodule's own mode restored
    after. For harvesting and evaluation: a model built from a config starts in training mode
    (dropout), and a BatchTopK SAE left in it would select by the batch."""
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


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


def _hidden_arg(args, kwargs) -> torch.Tensor:
    """The hidden states a decoder layer was called with (first positional or ``hidden_states=``)."""
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise TypeError("layer_replay: expected decoder layers to get their hidden states first or as hidden_states=, "
                        f"got positional {[type(a).__name__ for a in args]} and keywords {sorted(kwargs)}")
    return h


class LayerReplay:
    """Records the output of one decoder layer and replays it (``layer_replay`` makes one).

    ``recording()``: a forward pass inside it runs in full and keeps layer ``layer``'s output (as the
    layer returned it, before any other hook) and the hidden states layer 0 got.
    ``replaying()``: a forward pass inside it runs the model's own forward, but decoder layers
    ``0 .. layer-1`` return their input unchanged and layer ``layer`` returns a copy of the recorded
    output without computing; the embedding, attention mask and position embeddings are computed by
    the model as usual, the layers after ``layer`` run on bitwise the same inputs as in the recorded
    pass, and hooks on layer ``layer`` (``layer_output_hook``) still run on its output. Layer 0 must
    get bitwise the hidden states it got when recording (else ``RuntimeError``): replay only the
    inputs recorded. The layers' forwards are restored on exit, also on errors."""

    def __init__(self, layers: torch.nn.ModuleList, layer: int):
        self._layers, self._layer = layers, layer
        self._mode: str | None = None
        self._output = self._hidden = self._first_input = None

    def _record_input(self, module, args, kwargs):
        if self._mode == "record":
            h = args[0] if args else kwargs.get("hidden_states")
            self._first_input = h.clone() if isinstance(h, torch.Tensor) else None

    def _record_output(self, module, args, output):
        if self._mode == "record":
            self._output, self._hidden = output, _hidden(output).clone()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self._output = self._hidden = self._first_input = None
        self._mode = "record"
        try:
            yield
        finally:
            self._mode = None

    def _check_first_input(self, args, kwargs) -> None:
        h = _hidden_arg(args, kwargs)
        if self._first_input is None or not torch.equal(h, self._first_input):
            raise RuntimeError("layer_replay: expected a replay on the inputs of the recorded pass, got other "
                               "hidden states at decoder layer 0")

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        if self._output is None:
            raise RuntimeError("layer_replay: expected a recorded pass (replay.recording()) before replaying, got none")
        output, hidden = self._output, self._hidden

        def passthrough(index):
            def forward(*args, **kwargs):
                if index == 0:
                    self._check_first_input(args, kwargs)
                return _with_hidden(output, _hidden_arg(args, kwargs))
            return forward

        def replayed(*args, **kwargs):
            if self._layer == 0:
                self._check_first_input(args, kwargs)
            return _with_hidden(output, hidden.clone())  # a copy: hooks may not spoil the recording

        patched = [(self._layers[i], passthrough(i)) for i in range(self._layer)]
        patched.append((self._layers[self._layer], replayed))
        saved = [module.__dict__.get("forward") for module, _ in patched]  # accelerate may patch forward too
        try:
            for module, forward in patched:
                module.forward = forward
            yield
        finally:
            for (module, _), old in zip(patched, saved):
                if old is None:
                    del module.forward
                else:
                    module.forward = old


@contextlib.contextmanager
def layer_replay(model: torch.nn.Module, layer: int) -> Iterator[LayerReplay]:
    """A ``LayerReplay`` for decoder layer ``layer`` of ``model``: a pass under ``recording()``
    keeps the layer's output, passes under ``replaying()`` on the same inputs skip layers
    ``0 .. layer`` and reuse it. Valid only when the layers after ``layer`` depend on the earlier ones
    through the hidden states alone (true of the layouts above with ``use_cache=False``; a caller
    can check a replay against a recorded pass). Its hooks are removed on exit, also on errors."""
    layers = decoder_layers(model)
    decoder_layer(model, layer)
    replay = LayerReplay(layers, layer)
    handles = [layers[0].register_forward_pre_hook(replay._record_input, with_kwargs=True),
               layers[layer].register_forward_hook(replay._record_output, prepend=True)]
    try:
        yield replay
    finally:
        for handle in handles:
            handle.remove()
