# make run  : create .venv, install, start the node on its embedded defaults
# make test : install what the tests need (Debian peers included) and run lint, types, tests
# make test-fast : the tests that need no peer and no training, in under a minute
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
APT_PACKAGES := dcmtk orthanc dicom3tools pixelmed-apps chromium chromium-driver postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast install install-test peers lint typecheck pytest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

run: install
	$(BIN)/dicom-ai-node serve

peers:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test peers
	$(BIN)/pytest

test: peers $(VENV)/.installed-test lint typecheck pytest

# No DCMTK, Orthanc, PostgreSQL, Chromium or validators, no training: the inner loop.
test-fast: $(VENV)/.installed-test
	$(BIN)/pytest -q -m "not peers and not slow"

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
