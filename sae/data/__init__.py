"""Text, language models and activation data for training and evaluating SAEs, offline.

One module per concern:

- ``texts``: Jane Austen's novels (read from Debian's ``r-cran-janeaustenr``; its R lazy-load
  database is read by the private ``_rdata``) and plain text files.
- ``language_model``: ``load_model`` (the embedded SmolLM2-135M-Instruct GGUF or any local
  ``transformers`` causal LM; ``local_files_only``, no environment changes) and ``model_source``.
- ``tokens``: contexts of fixed length and the train / validation / test split by position.
- ``layouts``: where a model keeps its decoder layers (Llama-style, GPT-2, GPT-NeoX) and a hook
  on a layer's output; harvesting, evaluation and the CLI all find layers here.
- ``harvest``: a decoder layer's output, batch by batch, stopping the forward pass after it.
- ``buffer``: ``ActivationBuffer``, shuffled resumable minibatches from memory or from a
  resumable on-disk cache of harvested activations.

Everything public is importable from ``sae.data`` itself.
"""

from .buffer import ActivationBuffer
from .harvest import harvest_activations
from .language_model import DEFAULT_MODEL_NAME, load_model, model_source
from .layouts import decoder_layer, decoder_layers, layer_output_hook, n_decoder_layers
from .texts import AUSTEN_NOVELS, data_root, load_austen_texts, load_texts
from .tokens import TokenSplits, token_splits, tokenize_contexts

__all__ = [
    "AUSTEN_NOVELS",
    "ActivationBuffer",
    "DEFAULT_MODEL_NAME",
    "TokenSplits",
    "data_root",
    "decoder_layer",
    "decoder_layers",
    "harvest_activations",
    "layer_output_hook",
    "load_austen_texts",
    "load_model",
    "load_texts",
    "model_source",
    "n_decoder_layers",
    "token_splits",
    "tokenize_contexts",
]
