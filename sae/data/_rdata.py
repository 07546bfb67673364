"""A reader of R's binary (XDR) serialisation and of R lazy-load databases, just enough for data
packages: Debian's ``r-cran-janeaustenr`` stores Jane Austen's novels as a lazy-load database
(``Rdata.rdx`` index + ``Rdata.rdb`` blobs, each blob a zlib-compressed serialisation of a
character vector), and reading it here means no R is needed. Private: ``sae.data.texts`` is its
only user.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

__all__ = ["read_lazy_load_db", "unserialize"]


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
        if n < 0:
            raise ValueError(f"R serialisation: a negative length {n} at offset {self._pos} (corrupt data)")
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
        if n == -1:  # long vector: two more ints, unsigned (R's ReadLENGTH)
            hi, lo = self._int() & 0xFFFFFFFF, self._int() & 0xFFFFFFFF
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


def unserialize(data: bytes, persistent=None):
    """Parses one R object from ``data`` (an XDR serialisation, ``b'X\\n'...``)."""
    return _RUnserializer(data, persistent).read()


def read_lazy_load_db(stem: str | os.PathLike) -> dict:
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
    index = unserialize(_decompress_index(raw))
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

    return {name: unserialize(blob_at(pos), persistent) for name, pos in zip(names, variables)}


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
    elif body[:1] == b"1":  # compressed = 3 falls back to zlib
        out = zlib.decompress(body[1:])
    elif body[:1] == b"2":
        import bz2
        out = bz2.decompress(body[1:])
    elif body[:1] == b"Z":  # compressed = 3: a raw LZMA2 stream (no .xz container); matches reach
        import lzma         # back at most the whole output, so a dictionary that long decodes any preset
        out = lzma.decompress(body[1:], format=lzma.FORMAT_RAW,
                              filters=[{"id": lzma.FILTER_LZMA2, "dict_size": max(expected, 4096)}])
    elif body[:1] == b"0":
        out = bytes(body[1:])
    else:
        raise ValueError(f"R lazy-load blob: unknown compression marker {body[:1]!r}")
    if len(out) != expected:
        raise ValueError(
            f"R lazy-load blob: header says {expected} bytes, decompressed {len(out)}"
        )
    return out
