# Newcomers: `make repro` runs the whole pipeline offline; `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup repro test ui serve-model chat clean-venv

setup: $(STAMP)

# Re-runs only when a requirements file changed since the last successful install.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	# the library itself, editable: `touchvl` on the venv's PATH, importable from any directory
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# `touchvl plots --template` first: this clone's `dvc plots show|diff` then inline Vega instead of loading a CDN
repro: setup
	$(BIN)/touchvl plots --template
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Two xdist workers, one file per worker at a time (module fixtures are built once); PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The locally fine-tuned model (finetune.provider: local) on an OpenAI-compatible endpoint, 127.0.0.1:8765 by default.
serve-model: setup
	$(BIN)/touchvl finetune serve

# The TouchQA chat page on http://127.0.0.1:7860 (chat.host / chat.port); with no API key it answers offline.
chat: setup
	$(BIN)/touchvl chat

# Prefect UI on http://127.0.0.1:4200 with the build, review and nightly reindex deployments (Ctrl-C stops both).
ui: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m flows.serve --start-server

clean-venv:
	rm -rf $(VENV)
