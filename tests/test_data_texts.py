"""Tests of sae.data.texts and its private R reader (sae.data._rdata): an R lazy-load database
written here from R's documented XDR serialisation reads back exactly; Austen's novels and plain
text files load as expected."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from sae import data as sdata
from sae.data import load_austen_texts, load_texts
from sae.data._rdata import read_lazy_load_db, unserialize


# --------------------------------------------------------------------------------------------
# A writer of R's XDR serialisation, just enough for character vectors and named lists
# --------------------------------------------------------------------------------------------

class _RWriter:
    def __init__(self, version: int = 3):
        self.version = version
        self.symbols: dict[str, int] = {}  # symbol -> reference index (1-based)

    @staticmethod
    def int(v: int) -> bytes:
        return struct.pack(">i", v)

    def header(self) -> bytes:
        out = b"X\n" + self.int(self.version) + self.int(0x040201) + self.int(0x030500)
        if self.version == 3:
            out += self.int(5) + b"UTF-8"
        return out

    def charsxp(self, s) -> bytes:
        if s is None:
            return self.int(9) + self.int(-1)
        raw = s.encode("utf-8")
        levels = 64 if raw.isascii() else 8  # ASCII_MASK or UTF8_MASK
        return self.int(9 | (levels << 12)) + self.int(len(raw)) + raw

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:  # REFSXP with the index packed into the flags
            return self.int((self.symbols[name] << 8) | 255)
        self.symbols[name] = len(self.symbols) + 1
        return self.int(1) + self.charsxp(name)

    def attrs(self, names) -> bytes:
        # pairlist(names = <character vector>) : LISTSXP with a tag, then NILVALUE
        return self.int(2 | (1 << 10)) + self.symbol("names") + self.strsxp(names) + self.int(254)

    def strsxp(self, strings, names=None) -> bytes:
        flags = 16 | ((1 << 9) if names is not None else 0)
        out = self.int(flags) + self.int(len(strings)) + b"".join(self.charsxp(s) for s in strings)
        return out + (self.attrs(names) if names is not None else b"")

    def intsxp(self, values) -> bytes:
        return self.int(13) + self.int(len(values)) + b"".join(
            self.int(-(2**31) if v is None else v) for v in values)

    def realsxp(self, values) -> bytes:
        return self.int(14) + self.int(len(values)) + struct.pack(f">{len(values)}d", *values)

    def lglsxp(self, values) -> bytes:
        return self.int(10) + self.int(len(values)) + b"".join(self.int(int(v)) for v in values)

    def named_list(self, items: dict[str, bytes]) -> bytes:
        flags = 19 | (1 << 9)
        return (self.int(flags) + self.int(len(items)) + b"".join(items.values())
                + self.attrs(list(items)))

    def serialize(self, body: bytes) -> bytes:
        return self.header() + body


def _write_lazy_load_db(stem, variables: dict[str, list], version: int = 3) -> None:
    """Writes ``stem.rdx`` (gzip) + ``stem.rdb`` (length-prefixed zlib blobs), as R's
    makeLazyLoadDB does, with each value a character vector."""
    blob = b""
    positions = {}
    for name, strings in variables.items():
        w = _RWriter(version)
        ser = w.serialize(w.strsxp(strings))
        chunk = struct.pack(">I", len(ser)) + zlib.compress(ser)
        positions[name] = (len(blob), len(chunk))
        blob += chunk
    w = _RWriter(version)
    index = w.named_list({
        "variables": w.named_list({name: w.intsxp(list(pos)) for name, pos in positions.items()}),
        "references": w.named_list({}),
        "compressed": w.lglsxp([True]),
    })
    with open(f"{stem}.rdb", "wb") as f:
        f.write(blob)
    with open(f"{stem}.rdx", "wb") as f:
        f.write(gzip.compress(w.serialize(index)))


@pytest.mark.parametrize("version", [2, 3])
def test_r_lazy_load_db_round_trip(tmp_path, version):
    variables = {
        "greeting": ["It is a truth universally acknowledged,", None, "", "caf\u00e9 na\u00efve"],
        "empty": [],
        "long": [f"line {i}" for i in range(5000)],
    }
    _write_lazy_load_db(tmp_path / "Rdata", variables, version)
    db = read_lazy_load_db(tmp_path / "Rdata")
    assert set(db) == set(variables)
    for name, strings in variables.items():
        assert list(db[name]) == strings


def test_r_lazy_load_db_blob_markers(tmp_path):
    """Blobs of compressed = 2 / 3 databases: a type byte after the length, then R's stream: 'Z'
    raw LZMA2 (no .xz container, as R's lzma_raw_encoder writes), '2' bzip2, '1' zlib, '0' stored."""
    import bz2
    import lzma

    from sae.data._rdata import _decompress_blob

    w = _RWriter(3)
    ser = w.serialize(w.strsxp([f"line {i}" for i in range(300)]))
    raw_lzma2 = lzma.compress(ser, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    for marker, body in ((b"Z", raw_lzma2), (b"2", bz2.compress(ser)), (b"1", zlib.compress(ser)), (b"0", ser)):
        assert _decompress_blob(struct.pack(">I", len(ser)) + marker + body) == ser, marker


def test_r_unserialize_numbers_and_named_list():
    w = _RWriter(3)
    ser = w.serialize(w.named_list({
        "i": w.intsxp([1, None, -7]),
        "x": w.realsxp([1.5, -2.25]),
        "b": w.lglsxp([True, False]),
        "s": w.strsxp(["a", "b"], names=["first", "second"]),
    }))
    obj = unserialize(ser)
    assert obj.attrs["names"] == ["i", "x", "b", "s"]
    assert list(obj[0]) == [1, None, -7]
    assert list(obj[1]) == [1.5, -2.25]
    assert list(obj[2]) == [True, False]
    assert list(obj[3]) == ["a", "b"] and obj[3].attrs["names"] == ["first", "second"]
    with pytest.raises(ValueError, match="truncated"):
        unserialize(ser[:-6])
    with pytest.raises(ValueError, match="XDR"):
        unserialize(b"A\n" + ser[2:])
    # a long vector's length is two unsigned ints: 2**31 raw bytes (low word 0x80000000) is far
    # more than the stream holds, not a negative length that reads nothing
    long_raw = w.header() + w.int(24) + w.int(-1) + w.int(0) + struct.pack(">I", 2**31) + b"abc"
    with pytest.raises(ValueError, match="truncated"):
        unserialize(long_raw)
    # any other negative length is corrupt data, not an empty read that misplaces the stream
    with pytest.raises(ValueError, match="negative length"):
        unserialize(w.header() + w.int(24) + w.int(-5) + b"abcdef")


def test_load_austen_texts_from_generated_db(tmp_path):
    folder = tmp_path / "usr/lib/R/site-library/janeaustenr/data"
    folder.mkdir(parents=True)
    novels = {name: [name.upper(), "", "First line of", "a paragraph.", "", "", "Second."]
              for name in sdata.AUSTEN_NOVELS}
    _write_lazy_load_db(folder / "Rdata", novels)
    texts = load_austen_texts(tmp_path)
    assert len(texts) == 6
    assert texts[0] == "SENSESENSIBILITY\n\nFirst line of a paragraph.\n\nSecond."
    raw = load_austen_texts(folder, reflow=False)
    assert raw[1] == "PRIDEPREJUDICE\n\nFirst line of\na paragraph.\n\n\nSecond."
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_austen_texts(tmp_path / "nowhere")


def test_load_texts(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first \u00e9")
    (tmp_path / "skip.md").write_text("not text")
    assert load_texts(tmp_path) == ["first \u00e9", "second"]
    assert load_texts([tmp_path / "b.txt", str(tmp_path / "a.txt")]) == ["second", "first \u00e9"]
    with pytest.raises(FileNotFoundError, match="paths"):
        load_texts(tmp_path / "missing.txt")
