"""Text data for distillation: local files, any `datasets` loader, or a built-in offline corpus.

The built-in corpus mixes two registers, half each: technical prose (docstrings of a fixed list of
installed packages, read with `ast`, nothing imported, split into paragraphs) and everyday English
(WordNet 3.0 glosses and usage examples shipped in `distill/corpus/wordnet.tsv.gz`, see its
builder for source and licence). Every passage has a source (`docstrings:<package>`,
`wordnet:<topic>`); the built-in held-out set is drawn from whole sources that training never
sees, so evaluation measures text the student was not fitted on, not just unseen lines.

`load_texts` returns (train, held_out); `TokenizeCollate` turns passages into tokenized,
dynamically padded batches (for `distill.loaders.SeededLoader`).

Tests: `.venv/bin/python -m pytest tests/distill/test_text_data.py -q`
"""

from __future__ import annotations

import ast
import collections
import glob
import gzip
import importlib.util
import itertools
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from athanor.distill.spec import DataSpec, RecipeError

# Stdlib first (always present), then the project's own dependencies. Order matters: passages are
# read in this order until `max_texts` is reached.
BUILTIN_PACKAGES = (
    "json", "logging", "email", "http", "urllib", "asyncio", "concurrent", "unittest",
    "importlib", "collections", "xml", "multiprocessing", "argparse", "pathlib", "typing",
    "dataclasses", "functools", "inspect", "pydoc", "tarfile", "zipfile", "subprocess",
    "threading", "datetime", "decimal", "fractions", "statistics", "random", "textwrap",
    "pydantic", "yaml", "rich", "datasets", "lightning", "transformers", "torch",
)
_MIN_WORDS, _MAX_CHARS = 8, 1200
_PROSE = re.compile(r"[A-Za-z]")
WORDNET = Path(__file__).resolve().parent / "corpus" / "wordnet.tsv.gz"


def _source_files(package: str) -> list[Path]:
    """The .py files of an installed top-level module or package, sorted; [] when absent."""
    try:
        spec = importlib.util.find_spec(package)  # top-level: locates without importing
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        files: list[Path] = []
        for root in sorted(spec.submodule_search_locations):
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
        return files
    return [Path(spec.origin)] if spec.origin and spec.origin.endswith(".py") else []


def _docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return
    for node in _definitions(tree):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)


def _definitions(tree: ast.Module) -> list[ast.AST]:
    """The module and its classes and functions in `ast.walk`'s breadth-first order (the corpus order), visiting
    statements only: no definition lives inside an expression, and skipping them halves the walk's time."""
    found: list[ast.AST] = [tree]
    queue = collections.deque([tree])
    while queue:
        for child in ast.iter_child_nodes(queue.popleft()):
            if isinstance(child, _BLOCKS):
                if isinstance(child, _DEFINITIONS):
                    found.append(child)
                queue.append(child)
    return found


def split_passages(doc: str) -> list[str]:
    """Split a docstring into prose paragraphs (code, doctests and short fragments dropped)."""
    passages = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln.strip() for ln in para.strip().splitlines()]
        if not lines or any(ln.startswith((">>>", "...", "$ ", "```")) for ln in lines):
            continue
        text = " ".join(ln for ln in lines if ln)
        letters = len(_PROSE.findall(text))
        if len(text.split()) >= _MIN_WORDS and letters >= 0.6 * len(text):
            passages.append(text[:_MAX_CHARS])
    return passages


def _package_passages(package: str) -> Iterator[str]:
    """Docstring passages of one package, lazily (files are parsed only as far as needed)."""
    for path in _source_files(package):
        for doc in _docstrings(path):
            yield from split_passages(doc)


def wordnet_passages() -> dict[str, list[str]]:
    """The shipped WordNet passages by topic (lexicographer file, e.g. 'noun.food'), file order."""
    by_topic: dict[str, list[str]] = {}
    with gzip.open(WORDNET, "rt", encoding="utf-8") as f:
        for line in f:
            topic, _, text = line.rstrip("\n").partition("\t")
            if text:
                by_topic.setdefault(topic, []).append(text)
    return by_topic


def _round_robin(streams: dict[str, Iterable[str]], limit: int, seen: set[str]) -> dict[str, list[str]]:
    """Up to `limit` new passages, one per stream in turn, so every source gets a share."""
    out: dict[str, list[str]] = {name: [] for name in streams}
    alive = {name: iter(stream) for name, stream in streams.items()}
    total = 0
    while alive and total < limit:
        for name in list(alive):
            passage = next((p for p in alive[name] if p not in seen), None)
            if passage is None:
                del alive[name]
                continue
            seen.add(passage)
            out[name].append(passage)
            total += 1
            if total >= limit:
                break
    return {name: texts for name, texts in out.items() if texts}


def builtin_sources(limit: int) -> dict[str, list[str]]:
    """Up to `limit` unique passages by source: half docstrings (round robin over BUILTIN_PACKAGES),
    half WordNet (round robin over topics, each topic in a fixed shuffled order). Deterministic."""
    seen: set[str] = set()
    wordnet = wordnet_passages()
    for topic, texts in wordnet.items():
        random.Random(topic).shuffle(texts)  # topic order is alphabetical by headword otherwise
    docs = _round_robin({f"docstrings:{p}": _package_passages(p) for p in BUILTIN_PACKAGES}, limit // 2, seen)
    words = _round_robin({f"wordnet:{t}": texts for t, texts in sorted(wordnet.items())},
                         limit - sum(map(len, docs.values())), seen)
    return docs | words


def builtin_corpus(limit: int) -> list[str]:
    """Up to `limit` unique built-in passages (both registers), in a fixed order."""
    sources = builtin_sources(limit)
    return [t for texts in itertools.zip_longest(*sources.values()) for t in texts if t is not None]


def split_by_source(sources: dict[str, list[str]], eval_texts: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held_out): whole sources, alternating registers in a seeded order, are held out until
    they hold 2 × eval_texts passages; `eval_texts` of those are sampled, the rest of them unused."""
    rng = random.Random(seed)
    kinds: dict[str, list[str]] = {}
    for name in sorted(sources):
        kinds.setdefault(name.partition(":")[0], []).append(name)
    for names in kinds.values():
        rng.shuffle(names)
    order = [n for group in itertools.zip_longest(*kinds.values()) for n in group if n is not None]
    held: set[str] = set()
    for name in order:
        if sum(len(sources[h]) for h in held) >= 2 * eval_texts or len(held) == len(order) - 1:
            break
        held.add(name)
    pool = [t for name in sorted(held) for t in sources[name]]
    train = [t for name in order if name not in held for t in sources[name]]
    if len(pool) < eval_texts or not train:
        raise RecipeError("data.eval_texts", eval_texts,
                          f"the built-in corpus has too few passages to hold out {eval_texts}: raise data.max_texts")
    rng.shuffle(train)
    return train, rng.sample(pool, eval_texts)


def _read_files(paths: list[str]) -> list[str]:
    texts: list[str] = []
    for pattern in paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise RecipeError("data.paths", pattern, "no file matches this path or glob")
        for match in matches:
            if os.path.isfile(match):
                with open(match, encoding="utf-8", errors="replace") as f:
                    texts += [line.strip() for line in f if line.strip()]
    return texts


def _read_datasets(spec: DataSpec) -> list[str]:
    import datasets  # heavy import, only when used

    if not spec.loader:
        raise RecipeError(
            "data.loader", None, "set 'text', 'json', 'csv', 'parquet' or 'disk' for kind 'datasets'"
        )
    try:
        if spec.loader == "disk":
            if len(spec.paths) != 1:
                raise RecipeError("data.paths", spec.paths, "give exactly one save_to_disk directory")
            ds: Any = datasets.load_from_disk(os.path.expanduser(spec.paths[0]))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise RecipeError("data.split", spec.split, f"the saved dataset has {list(ds)}")
                ds = ds[spec.split]
        else:
            files = [os.path.expanduser(p) for p in spec.paths] or None
            ds = datasets.load_dataset(spec.loader, data_files=files, split=spec.split)
    except RecipeError:
        raise
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        key = "data.paths" if spec.paths else "data.loader"
        raise RecipeError(key, spec.paths or spec.loader, f"could not load: {exc}") from exc
    if spec.text_column not in ds.column_names:
        raise RecipeError("data.text_column", spec.text_column, f"columns are {ds.column_names}")
    # Twice max_texts rows leaves room for duplicates without reading a huge dataset whole.
    column = ds.select(range(min(len(ds), spec.max_texts * 2)))[spec.text_column]
    return [str(t).strip() for t in column if t is not None and str(t).strip()]


def load_texts(spec: DataSpec) -> tuple[list[str], list[str]]:
    """(train, held_out) passages: deduplicated, capped at max_texts, shuffled with `spec.seed`; the
    built-in corpus holds out whole sources (see `split_by_source`), files and datasets random lines."""
    if spec.kind == "builtin":
        return split_by_source(builtin_sources(spec.max_texts), spec.eval_texts, spec.seed)
    if spec.kind == "files":
        if not spec.paths:
            raise RecipeError("data.paths", [], "list text files (one passage per line)")
        texts = _read_files(spec.paths)
    else:
        texts = _read_datasets(spec)
    texts = list(dict.fromkeys(texts))[: spec.max_texts]
    if not texts:
        key = "data.kind" if spec.kind == "builtin" else "data.paths"
        raise RecipeError(key, spec.paths or spec.kind, "the data has no non-empty text")
    if len(texts) <= spec.eval_texts:
        raise RecipeError(
            "data.eval_texts", spec.eval_texts,
            f"only {len(texts)} passages: hold out fewer or add data (training needs at least one)",
        )
    random.Random(spec.seed).shuffle(texts)
    return texts[spec.eval_texts:], texts[: spec.eval_texts]


class TokenizeCollate:
    """Tokenize a list of passages into a padded batch (a class, so worker processes can pickle it)."""

    def __init__(self, tokenizer: Any, max_length: int, pad_to_max: bool = False) -> None:
        self.tokenizer, self.max_length, self.pad_to_max = tokenizer, max_length, pad_to_max

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(
            texts, truncation=True, max_length=self.max_length, return_tensors="pt",
            padding="max_length" if self.pad_to_max else "longest",
        ))
