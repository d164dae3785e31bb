# Two entry points, both starting from nothing but Python: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install install-dev demo test test-fast

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/chronos-video generate --pipeline pipelines/nano-sora-shapes \
		--prompt "a large blue square moving left to right quickly" --steps 20 --output outputs/demo.mp4 --score

test: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"
