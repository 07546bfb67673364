"""SAEs saved by SAELens and sparsify, in and out.

- SAELens (``SAE.save_model``): a folder with ``cfg.json`` (``architecture`` "topk", ``d_in``,
  ``d_sae``, ``k``, ``apply_b_dec_to_input``, ``rescale_acts_by_decoder_norm``,
  ``normalize_activations``, ...) and ``sae_weights.safetensors`` (``W_enc [m, n]``,
  ``W_dec [n, m]``, ``b_enc [n]``, ``b_dec [m]``). Its TopK SAE computes
  ``pre = ((x - a * b_dec) @ W_enc + b_enc) * r``, keeps the top k, ReLU, and decodes
  ``(acts / r) @ W_dec + b_dec``, with ``a = apply_b_dec_to_input`` and ``r = ||W_dec_j||`` when
  ``rescale_acts_by_decoder_norm`` (else 1). Both settings fold exactly into a ``TopKSAE``.
- sparsify (``SparseCoder.save_to_disk``): a folder with ``cfg.json`` (``activation``, ``k``,
  ``num_latents`` / ``expansion_factor``, ``d_in``, ``skip_connection``, ``transcode``, ...) and
  ``sae.safetensors`` (``encoder.weight [n, m]``, ``encoder.bias [n]``, ``W_dec [n, m]``,
  ``b_dec [m]``). It computes ``topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))``,
  decoded as ``acts @ W_dec + b_dec``: a ``TopKSAE`` as is.

Settings a ``TopKSAE`` cannot represent (other architectures, per-token input normalisation,
skip connections, transcoders, signed codes) are refused with ``UnsupportedPeerFormat``.
Export writes ours in either layout; an ``ExpanderSAE`` is exported as its dense dictionary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .rundir import atomic_write, write_json

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CFG = "cfg.json"


class UnsupportedPeerFormat(ValueError):
    """A peer SAE whose settings a TopKSAE cannot represent (or ours, for a peer's format)."""


def detect(path: str | os.PathLike) -> Optional[str]:
    """"saelens", "sparsify" or None for a folder."""
    path = Path(path)
    if not (path / CFG).is_file():
        return None
    if (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    return None


def load(path: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None):
    """A ``TopKSAE`` computing the same function as the peer SAE saved in folder ``path``."""
    kind = detect(path)
    if kind is None:
        raise FileNotFoundError(f"path: {path} holds neither SAELens ({CFG} + {SAELENS_WEIGHTS}) nor sparsify "
                                f"({CFG} + {SPARSIFY_WEIGHTS}) files")
    # SAELens's folds are computed in fp64: cast them once, to dtype when given, not via the file's
    # dtype. Both build the SAE in dtype: casting a built one would allocate the model a second time.
    sae = load_saelens(path, dtype=dtype) if kind == "saelens" else load_sparsify(path, dtype=dtype)
    return sae.to(device=device, dtype=dtype) if dtype is not None else sae.to(device)


def _read(path: Path, weights: str) -> tuple[dict, dict]:
    """cfg.json and the weights; a file that cannot be parsed raises ``CheckpointError`` naming it."""
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, _one_line

    try:
        cfg = json.loads((path / CFG).read_text())
    except ValueError as exc:  # invalid JSON (json.JSONDecodeError) or not UTF-8
        raise CheckpointError(f"peer cfg: {path / CFG} is not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"peer cfg: {path / CFG} holds a JSON {type(cfg).__name__}, expected an object")
    try:
        tensors = load_file(str(path / weights))
    except Exception as exc:  # safetensors raises its own error types for a bad header or size
        raise CheckpointError(f"peer weights: {path / weights} is truncated or corrupt ({_one_line(exc)})") from exc
    return cfg, tensors


def _positive_int(cfg: dict, key: str, where: str) -> int:
    """``cfg[key]``: a missing key raises ``CheckpointError``, a value that is not a positive int
    ``UnsupportedPeerFormat``, each naming the file and the key."""
    from .checkpoint import CheckpointError

    if key not in cfg:
        raise CheckpointError(f"{where}: missing key {key!r}")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedPeerFormat(f"{where}: expected a positive int {key}, got {value!r}")
    return value


def _expect_keys(tensors: dict, want: set, where: str) -> None:
    extra, missing = set(tensors) - want, want - set(tensors)
    if missing:
        raise UnsupportedPeerFormat(f"{where}: missing tensors {sorted(missing)}")
    if extra:
        raise UnsupportedPeerFormat(f"{where}: tensors {sorted(extra)} have no counterpart in a TopKSAE")


def _check_tensors(tensors: dict, shapes: dict, where: str) -> None:
    """Each named tensor is floating-point with exactly its expected shape (a bias of shape [1] or []
    would otherwise broadcast into every latent's bias)."""
    for name, shape in shapes.items():
        t = tensors[name]
        if not t.is_floating_point():
            raise UnsupportedPeerFormat(f"{where}: tensor {name} is {t.dtype}; expected a floating-point tensor")
        if tuple(t.shape) != tuple(shape):
            raise UnsupportedPeerFormat(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


# Elements per block of latents that the import (load_saelens's folds) and the export
# (_dense_weights) convert at a time: a block is max(1, _BLOCK_ELEMS // m) latents, so each fp64
# working copy of a block of an [n, m] matrix holds at most 2**22 values (32 MiB) whatever the
# model's size, where whole fp64 copies of both matrices cost several times the model. Tests
# shrink it to fold and export over several blocks.
_BLOCK_ELEMS = 2**22


def _topk_sae(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, where: str = "peer SAE"):
    """A TopKSAE holding these tensors (W_enc [n, m]; fresh tensors in one dtype, not views of a
    file: they become its parameters as they are).

    Built as an empty shell (``models._empty_build``), as ``load_sae`` builds ours: a TopKSAE built
    for real would draw its random weights ([n, m] fp32) and allocate both matrices only for them to
    be overwritten. Its buffers (dead-latent counters, BatchTopK's threshold) start at zero in the
    dtypes a new SAE's have (a cast of the SAE, ``.to(dtype)``, casts the floating-point ones)."""
    from .checkpoint import _check_no_meta
    from .models import TopKSAE, _empty_build

    n, m = W_dec.shape
    _check_k(k, n, where)
    with _empty_build():
        sae = TopKSAE(m, n, k)
    state = {name: torch.zeros(b.shape, dtype=b.dtype) for name, b in sae.named_buffers()}
    state.update({"W_enc": W_enc, "b_enc": b_enc, "decoder.weight": W_dec, "decoder.bias": b_dec})
    sae.load_state_dict(state, assign=True)  # requires_grad as the shell's (b_dec_init "zero": b_dec frozen)
    _check_no_meta(sae, f"{where}:")
    sae._fresh = False  # trained weights: train() must not initialise b_dec from data
    return sae


def _check_k(k: int, n: int, where: str) -> None:
    if k > n:
        raise UnsupportedPeerFormat(f"{where}: k={k} is more than its {n} latents")


def _param_dtype(dtype: Optional[torch.dtype], file_dtype: torch.dtype, where: str) -> torch.dtype:
    """The SAE's parameter dtype: ``dtype`` if given (one a TopKSAE takes), else the file's, refused
    (before anything is allocated) where a TopKSAE cannot hold it, such as float8."""
    from .layers import _PARAM_DTYPES, check_param_dtype

    check_param_dtype(dtype)
    if dtype is not None:
        return dtype
    if file_dtype not in _PARAM_DTYPES:
        raise UnsupportedPeerFormat(f"{where}: its W_dec is {file_dtype}, which a TopKSAE cannot hold "
                                    f"(float32, bfloat16, float16 or float64); pass dtype= to cast it")
    return file_dtype


def load_saelens(path: str | os.PathLike, dtype: Optional[torch.dtype] = None):
    """The TopKSAE of a SAELens folder, in ``dtype`` (default: the file's) cast from the fp64 folds.

    The folds are computed one block of latents at a time, in one fp64 buffer, and each block is
    rounded straight into the SAE's own [n, m] matrices (transposing SAELens's W_enc [m, n] on the
    way): those are the only tensors of the model's size allocated. Whole fp64 copies of both
    matrices, their folded copies, and a TopKSAE drawn at random to copy them into made the import
    about six times the model. Measured (2026-11-24, fp32, m = 2048, n = 32768: a 512 MiB model,
    peak RSS above the process's after import, in a fresh process): 2,899 MiB before, 1,138 MiB
    now, of which 512 MiB are the file's pages that safetensors maps."""
    path = Path(path)
    cfg, t = _read(path, SAELENS_WEIGHTS)
    where = f"SAELens cfg {path / CFG}"
    arch = cfg.get("architecture")
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    if arch == "topk" or (arch in (None, "standard") and act == "topk"):
        kwargs = cfg.get("activation_fn_kwargs")
        k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    else:
        raise UnsupportedPeerFormat(f"{where}: architecture {arch!r} (activation {act!r}) is not a TopK SAE; "
                                    f"only 'topk' can be represented")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UnsupportedPeerFormat(f"{where}: expected a positive int k, got {k!r}")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise UnsupportedPeerFormat(f"{where}: normalize_activations={norm!r} cannot be represented (only 'none'; "
                                    f"fold a constant scaling factor into the weights first)")
    _expect_keys(t, {"W_enc", "W_dec", "b_enc", "b_dec"}, f"SAELens weights {path / SAELENS_WEIGHTS}")
    d_in, d_sae = _positive_int(cfg, "d_in", where), _positive_int(cfg, "d_sae", where)
    _check_tensors(t, {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)},
                   f"SAELens weights {path / SAELENS_WEIGHTS} (d_in={d_in}, d_sae={d_sae})")
    _check_k(k, d_sae, where)  # before the weights are read
    out = _param_dtype(dtype, t["W_dec"].dtype, where)
    centre = not cfg.get("apply_b_dec_to_input", True)  # x @ W = (x - b_dec) @ W + b_dec @ W
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)  # r_j = ||W_dec_j||, folded as SAELens does
    m, n = d_in, d_sae
    W_enc, W_dec = torch.empty(n, m, dtype=out), torch.empty(n, m, dtype=out)
    # Copies (copy=True: an fp64 file's .double() would be a view of the file, folded in place and
    # then kept as the SAE's parameter).
    b_dec, b_enc = t["b_dec"].to(torch.float64, copy=True), t["b_enc"].to(torch.float64, copy=True)
    r = torch.empty(n, dtype=torch.float64)
    step = min(n, max(1, _BLOCK_ELEMS // m))
    buf = torch.empty(step * m, dtype=torch.float64)  # one block of either matrix, folded in place
    with torch.no_grad():
        for j0 in range(0, n, step):
            j1 = min(n, j0 + step)
            block = buf[:(j1 - j0) * m].view(j1 - j0, m).copy_(t["W_dec"][j0:j1])
            if rescale:
                r[j0:j1] = block.norm(dim=-1)
                if not bool((r[j0:j1] > 0).all()):
                    raise UnsupportedPeerFormat(f"{where}: rescale_acts_by_decoder_norm with a zero decoder row")
                block.div_(r[j0:j1, None])
            W_dec[j0:j1].copy_(block)
            block = buf[:m * (j1 - j0)].view(m, j1 - j0).copy_(t["W_enc"][:, j0:j1])
            if centre:
                b_enc[j0:j1] += b_dec @ block
            if rescale:
                block.mul_(r[j0:j1])
            W_enc[j0:j1].copy_(block.T)
        if rescale:
            b_enc.mul_(r)
    sae = _topk_sae(W_enc, b_enc.to(out), W_dec, b_dec.to(out), k, where)
    return sae.to(out)  # its buffers; the parameters are in out already (no copy)


def load_sparsify(path: str | os.PathLike, dtype: Optional[torch.dtype] = None):
    """The TopKSAE of a sparsify folder, in the file's W_dec dtype, then cast to ``dtype`` if given.
    Each parameter is allocated once, as the cast (or copy) of the file's tensor."""
    path = Path(path)
    cfg, t = _read(path, SPARSIFY_WEIGHTS)
    where = f"sparsify cfg {path / CFG}"
    if cfg.get("activation", "topk") != "topk":
        raise UnsupportedPeerFormat(f"{where}: activation {cfg['activation']!r} cannot be represented (only 'topk')")
    for name in ("skip_connection", "transcode"):
        if cfg.get(name, False):
            raise UnsupportedPeerFormat(f"{where}: {name}=true cannot be represented by a TopKSAE")
    _expect_keys(t, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, f"sparsify weights {path / SPARSIFY_WEIGHTS}")
    d_in, k = _positive_int(cfg, "d_in", where), _positive_int(cfg, "k", where)
    n = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
    _check_tensors(t, {"encoder.weight": (n, d_in), "W_dec": (n, d_in), "encoder.bias": (n,), "b_dec": (d_in,)},
                   f"sparsify weights {path / SPARSIFY_WEIGHTS} (d_in={d_in}, {n} latents)")
    _check_k(k, n, where)
    from .layers import _PARAM_DTYPES

    out = _param_dtype(dtype, t["W_dec"].dtype, where)
    # As the SAE was built in W_dec's dtype, then cast; a W_dec no TopKSAE holds (float8) goes to
    # dtype directly.
    via = t["W_dec"].dtype if t["W_dec"].dtype in _PARAM_DTYPES else out

    def param(name: str) -> Tensor:
        # Rounded to W_dec's dtype first, then to dtype (two roundings where the file mixes dtypes,
        # as the SAE built in W_dec's dtype and then cast gave); a copy, never a view of the file.
        src = t[name]
        cast = src.to(via)  # src itself where it is in W_dec's dtype
        return cast.to(out, copy=cast is src)

    sae = _topk_sae(param("encoder.weight"), param("encoder.bias"), param("W_dec"), param("b_dec"), k, where)
    return sae.to(dtype) if dtype is not None else sae  # its buffers; the parameters are in dtype already


def _dense_weights(sae, encoder_transposed: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W_enc, b_enc, W_dec, b_dec) of the function ``sae`` computes, for peers' formula, in the SAE's
    dtype (b_enc's) and contiguous; W_enc [n, m], or [m, n] with ``encoder_transposed`` (SAELens).

    The folds (activation normalisation) are computed in fp64 and rounded once, one block of
    latents at a time, straight into the two dense outputs: the only [n, m] tensors allocated.
    Whole fp64 copies made an Expander SAE's export about three times its output (n = 2^20,
    m = 2048: the two fp32 matrices are 16 GiB, fp64 copies and the dense decoder's out-of-place
    scatter added 32 GiB more)."""
    from .models import ExpanderSAE, TopKSAE

    name = type(sae).__name__
    if getattr(sae, "batch_topk", False):
        raise UnsupportedPeerFormat(f"sae: a {name} with batch_topk=True selects by a learned threshold at "
                                    f"inference; the peers' TopK format cannot represent it")
    if getattr(sae, "signed", False):
        raise UnsupportedPeerFormat(f"sae: a {name} with signed=True keeps negative codes; the peers apply ReLU")
    if isinstance(sae, TopKSAE):
        enc, dec, rows = sae.W_enc, sae.W_dec, None
    elif isinstance(sae, ExpanderSAE):  # values [n, d] on rows [n, d]: scattered into the dense rows
        enc, dec, rows = sae._encoder_values(), sae.atoms(), sae.rows
    else:
        raise UnsupportedPeerFormat(f"sae: expected a TopKSAE or ExpanderSAE, got {name}")
    dtype, n, m = sae.b_enc.dtype, sae.n_latents, sae.d_model
    s = float(sae.act_scale) if sae.normalize_activations else None  # x * s in, / s out: folded in
    with torch.no_grad():
        W_enc = torch.zeros(m, n, dtype=dtype) if encoder_transposed else torch.zeros(n, m, dtype=dtype)
        W_dec = torch.zeros(n, m, dtype=dtype)
        step = max(1, _BLOCK_ELEMS // m)
        for j0 in range(0, n, step):
            j1 = min(n, j0 + step)
            for src, out, fold in ((enc, W_enc.T if encoder_transposed else W_enc, lambda v: v * s),
                                   (dec, W_dec, lambda v: v / s)):
                block = src[j0:j1].detach().cpu().double()
                block = block if s is None else fold(block)
                if rows is None:
                    out[j0:j1].copy_(block)
                else:  # added to zeros, as the dense dictionary's scatter_add is
                    out[j0:j1].scatter_add_(1, rows[j0:j1].cpu(), block.to(dtype))
        b_enc, b_dec = sae.b_enc.detach().cpu().double(), sae.b_dec.detach().cpu().double()
        if s is not None:
            b_dec = b_dec / s
    return W_enc, b_enc.to(dtype), W_dec, b_dec.to(dtype)


def export_saelens(sae, path: str | os.PathLike) -> Path:
    """Write ``sae`` as a SAELens TopK SAE folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    from safetensors.torch import save_file

    W_enc, b_enc, W_dec, b_dec = _dense_weights(sae, encoder_transposed=True)  # W_enc [m, n], as SAELens holds it
    dtype = sae.b_enc.dtype
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    atomic_write(path / SAELENS_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    write_json(path / CFG, {
        "architecture": "topk", "d_in": sae.d_model, "d_sae": sae.n_latents, "k": sae.k,
        "dtype": str(dtype).removeprefix("torch."), "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
        "metadata": {"exported_from": type(sae).__name__},
    })
    return path


def export_sparsify(sae, path: str | os.PathLike) -> Path:
    """Write ``sae`` as a sparsify SAE folder (``cfg.json`` + ``sae.safetensors``)."""
    from safetensors.torch import save_file

    W_enc, b_enc, W_dec, b_dec = _dense_weights(sae)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": W_enc, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    atomic_write(path / SPARSIFY_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    write_json(path / CFG, {
        "activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_model), "normalize_decoder": True,
        "num_latents": sae.n_latents, "k": sae.k, "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": sae.d_model,
    })
    return path
