"""Export of a MiniLM student: where the teacher loaded, the student loads.

Always a transformers directory (`AutoModel`/`AutoTokenizer.from_pretrained(dir)`). When the teacher
is a sentence-transformers directory (it has `modules.json`, e.g. all-MiniLM-L6-v2 with its mean
pooling and normalisation), the export is one too: `SentenceTransformer(dir)` runs the same module
list, the transformer module pointing at the student's weights at the directory root and the pooling
width set to the student's. Beside the weights, `training_notes.txt` says what no loss trained (for
the model card).

Tests: `.venv/bin/python -m pytest tests/distill/minilm/test_export.py -q`
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from athanor.convert.recipe_types import RecipeError

# Module classes whose config does not depend on the encoder's width (Pooling's is patched).
WIDTH_FREE = {"Transformer", "Pooling", "Normalize"}
ROOT_FILES = ("config_sentence_transformers.json",)
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
FINE_TUNE = "downstream fine-tuning expected"


def _pooling_mode(config: dict[str, Any]) -> str:
    """The pooling mode of a Pooling config, new (`pooling_mode`) or legacy (`pooling_mode_*` flags)."""
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [name for key, name in _LEGACY_MODES.items() if config.get(key)]
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else "+".join(mode)
    return str(mode)


def read_st_modules(path: Path) -> list[dict[str, Any]]:
    """modules.json entries of a sentence-transformers directory ([] for a plain one), each with
    `kind` (the class name) and, for Pooling, `mode`."""
    index = Path(path) / "modules.json"
    if not index.is_file():
        return []
    modules = json.loads(index.read_text(encoding="utf-8"))
    for module in modules:
        module["kind"] = module["type"].rsplit(".", 1)[-1]
        config = Path(path) / module["path"] / "config.json"
        if module["kind"] == "Pooling" and config.is_file():
            module["mode"] = _pooling_mode(json.loads(config.read_text(encoding="utf-8")))
    return modules


def check_st_student(modules: list[dict[str, Any]], teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """A sentence-transformers head with width-bound modules (Dense, ...) needs the teacher's width."""
    bound = sorted({m["kind"] for m in modules} - WIDTH_FREE)
    if bound and student.config.hidden_size != teacher.config.hidden_size:
        raise RecipeError("student.hidden_size", student.config.hidden_size,
                          f"the teacher's sentence-transformers modules {bound} expect width "
                          f"{teacher.config.hidden_size}: keep the teacher's hidden size")


def write_st_modules(st_dir: Path, modules: list[dict[str, Any]], out_dir: Path, width: int) -> None:
    """Copy the teacher's module list into `out_dir`; the transformer module becomes the root (the
    student's weights), the pooling width the student's."""
    entries = []
    for module in modules:
        entry = {k: module[k] for k in ("idx", "name", "path", "type")}
        source = st_dir / module["path"]
        if module["kind"] == "Transformer":
            config = source / "sentence_bert_config.json"
            if config.is_file():
                shutil.copy2(config, out_dir / "sentence_bert_config.json")
            entry["path"] = ""
        elif module["path"] and source.is_dir():
            shutil.copytree(source, out_dir / module["path"], dirs_exist_ok=True)
            pooling = out_dir / module["path"] / "config.json"
            if module["kind"] == "Pooling" and pooling.is_file():
                config = json.loads(pooling.read_text(encoding="utf-8"))
                key = "embedding_dimension" if "embedding_dimension" in config else "word_embedding_dimension"
                config[key] = width
                pooling.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        entries.append(entry)
    (out_dir / "modules.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    for name in ROOT_FILES:
        if (st_dir / name).is_file():
            shutil.copy2(st_dir / name, out_dir / name)


def training_notes(output_loss: str, init: str) -> str:
    """What the model card should say about the parts of the student that no loss trained."""
    lines = ["# Training notes (athanor, MiniLM distillation)", ""]
    if output_loss == "none":
        lines.append(f"Relation losses only: the last layer's attention output, feed-forward and the pooler were "
                     f"copied from teacher layers and not adapted to this student; {FINE_TUNE} before use as "
                     "a sentence encoder.")
    elif output_loss == "similarity":
        lines.append("Relation losses plus an output term (similarity) on mean-pooled embeddings: the cosine "
                     "similarities between sentences follow the teacher's; the embedding vectors themselves live "
                     "in a space of their own (use mean pooling and cosine similarity).")
    else:
        lines.append(f"Relation losses plus an output term ({output_loss}) on mean-pooled embeddings: the "
                     "mean-pooled last hidden state is trained to match the teacher's; use mean pooling.")
    if init == "config":
        lines.append(f"The student was built from a config: `pooler_output` (CLS pooler) is randomly initialised "
                     f"and untrained; {FINE_TUNE} for tasks that read it.")
    elif output_loss != "none":
        lines.append("`pooler_output` is the teacher's pooler, not trained against this student.")
    return "\n".join(lines) + "\n"


def export_encoder(student: PreTrainedModel, tokenizer: Any, st_dir: Path | None, st_modules: list[dict[str, Any]],
                   out_dir: Path, output_loss: str, init: str) -> Path:
    """Write the student (transformers, plus sentence-transformers when the teacher is one) and notes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if st_dir is not None and st_modules:
        write_st_modules(Path(st_dir), st_modules, out_dir, student.config.hidden_size)
    (out_dir / "training_notes.txt").write_text(training_notes(output_loss, init), encoding="utf-8")
    return out_dir
