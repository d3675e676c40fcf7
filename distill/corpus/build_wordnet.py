"""Rebuild `distill/corpus/wordnet.tsv.gz` from Debian's `wordnet-base` (WordNet 3.0, Princeton).

Why WordNet: its glosses and usage examples are short, everyday English about every topic, the
register sentence encoders are used on, which Python docstrings (the rest of the built-in corpus)
lack. The WordNet 3.0 licence allows copying and redistribution with its notice, which sits beside
the data in `WORDNET_LICENSE`. Each row is `lexicographer file<TAB>passage`: the lexicographer file
(noun.food, verb.motion, ...) is the topic the built-in corpus holds out by.

Run once (needs `apt-get install wordnet-base`; the output is committed, training never needs it):
    .venv/bin/python distill/corpus/build_wordnet.py [/usr/share/wordnet]
Tests of the shipped file: `.venv/bin/python -m pytest tests/distill/test_text_data.py -q`
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

# WordNet 3.0 lexicographer files, by number (field 2 of every data.* line).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
MIN_WORDS = 4
OUT = Path(__file__).resolve().parent / "wordnet.tsv.gz"


def passages(line: str) -> tuple[str, list[str]]:
    """(lexicographer file, [\"lemma: definition\", example, ...]) of one data.* line."""
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    lexfile, lemma = LEXNAMES[int(parts[1])], parts[4].replace("_", " ")
    pieces = [p.strip().strip(";").strip() for p in gloss.strip().split('; "')]
    definition, examples = pieces[0], [p.strip('"').strip() for p in pieces[1:]]
    out = [f"{lemma}: {definition}"] if len(definition.split()) >= MIN_WORDS else []
    out += [e for e in examples if len(e.split()) >= MIN_WORDS and "\t" not in e]
    return lexfile, out


def main(root: Path) -> None:
    rows: list[str] = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:  # licence header lines
                continue
            lexfile, texts = passages(line)
            rows += [f"{lexfile}\t{t}" for t in texts]
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:  # mtime 0: the same input gives the same bytes
        f.write(("\n".join(dict.fromkeys(rows)) + "\n").encode("utf-8"))
    print(f"{len(rows)} rows -> {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/wordnet"))
