"""Checkpoint manifests: the size and SHA-256 of every file of a step checkpoint, written beside it
(`step=N.ckpt.manifest.json`) before the checkpoint is published, and checked before a retried attempt resumes
from it. A checkpoint that a full disk truncated, a bad copy or a flipped bit damaged is passed over for the
newest intact one, and the log names the file and what was wrong with it (jobs/resume.py).

    .venv/bin/python -m pytest tests/jobs/test_resume.py -q -k manifest
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SUFFIX = ".manifest.json"


def manifest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + SUFFIX)


def _files(path: Path) -> dict[str, Path]:
    """A checkpoint's files by name relative to it ('.' for a one-file checkpoint; DeepSpeed's is a folder)."""
    if path.is_file():
        return {".": path}
    return {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write(partial: Path, final: Path) -> None:
    """Describe the complete checkpoint `partial` (to be renamed `final`) in `final`'s manifest, published
    atomically and fsynced before the checkpoint itself is renamed: a published checkpoint always has one."""
    files = {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in _files(partial).items()}
    target = manifest_path(final)
    pending = target.with_name(target.name + ".tmp")  # `*.tmp`: removed with other partial writes on resume
    with open(pending, "w") as f:
        json.dump({"checkpoint": final.name, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pending, target)


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a published checkpoint (None: every file has its recorded size and checksum)."""
    try:
        recorded = json.loads(manifest_path(checkpoint).read_text())["files"]
    except FileNotFoundError:
        return "it has no manifest (a complete checkpoint is published after its manifest)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its manifest is unreadable ({type(exc).__name__})"
    present = _files(checkpoint)
    for name, expected in recorded.items():
        path = present.get(name)
        where = checkpoint.name if name == "." else f"{checkpoint.name}/{name}"
        if path is None:
            return f"{where} is missing"
        if (size := path.stat().st_size) != expected["bytes"]:
            return f"{where} has {size} bytes, {expected['bytes']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{where} does not match the SHA-256 written with it"
    return None
