"""Text for training and evaluating SAEs, offline.

``load_austen_texts`` reads Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` package
(unpacked by ``.ci/setup-data``; stored as an R lazy-load database, read by ``sae.data._rdata``).
``load_texts`` reads plain ``.txt`` files. ``data_root`` is where ``.ci/setup-data`` puts data and
where the activation cache lives by default.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ._rdata import read_lazy_load_db

__all__ = ["AUSTEN_NOVELS", "data_root", "load_austen_texts", "load_texts"]

#: The six novels in publication order, as named in the janeaustenr database.
AUSTEN_NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)


def data_root() -> Path:
    """``$TOPK_SAE_DATA``, or ``~/.cache/topk-sae`` when it is unset."""
    return Path(os.environ.get("TOPK_SAE_DATA", Path.home() / ".cache" / "topk-sae"))


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
    data_dir = Path(data_dir) if data_dir is not None else data_root() / "janeaustenr"
    db = read_lazy_load_db(_find_austen_db(data_dir))
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
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
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
