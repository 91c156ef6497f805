# Every target sets itself up: a fresh clone needs only python3 (>= 3.10) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	@echo "installing shufflenetv2 and its dependencies into $(VENV) (first run only)..."
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m shufflenetv2.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs
