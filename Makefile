# make run  : create .venv, install, start the node on its embedded defaults
# make test : install what the tests need (Debian peers included) and run lint, types, tests
# make test-fast : the tests that need no peer and no training, in under a minute
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
APT_PACKAGES := dcmtk orthanc orthanc-dicomweb orthanc-webviewer dicom3tools pixelmed-apps chromium \
	chromium-driver postgresql rsyslog rsyslog-gnutls
# OHIF v3 for the browser tests (tests/viewers/): npm's built app, its dist/ only (the
# package's dependencies are for building it, not for serving it). Keep in step with
# tests/support/ohif.py.
OHIF_VERSION := 3.13.2
OHIF_DIR := .viewers/ohif-$(OHIF_VERSION)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast install install-test peers ohif lint typecheck pytest clean real-data

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

$(OHIF_DIR)/dist/index.html:
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends npm >/dev/null; }
	rm -rf $(OHIF_DIR).part && mkdir -p $(OHIF_DIR).part
	cd $(OHIF_DIR).part && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && \
	  tar xzf ohif-app-$(OHIF_VERSION).tgz
	rm -rf $(OHIF_DIR) && mkdir -p $(OHIF_DIR)
	mv $(OHIF_DIR).part/package/dist $(OHIF_DIR)/dist && rm -rf $(OHIF_DIR).part

ohif: $(OHIF_DIR)/dist/index.html

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test peers ohif
	$(BIN)/pytest

test: peers $(VENV)/.installed-test lint typecheck pytest

# 16 real chest radiographs (CC BY 4.0, Kermany et al. 2018) and pydicom's real DICOM files,
# downloaded from PyPI into var/real-data (never committed); see docs/models.md.
REAL_DATA := var/real-data
real-data: install
	$(BIN)/pip download --quiet --no-deps -d $(REAL_DATA) pneumonia-model-package==0.3.0 pydicom-data
	$(BIN)/python benchmarks/real_images.py $(REAL_DATA)

# No DCMTK, Orthanc, PostgreSQL, Chromium or validators, no training: the inner loop.
test-fast: $(VENV)/.installed-test
	$(BIN)/pytest -q -m "not peers and not slow"

clean:
	rm -rf $(VENV) var .viewers .pytest_cache .mypy_cache .ruff_cache
