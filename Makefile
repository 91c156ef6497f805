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

DEMO_CONFIG := configs/shufflenetv2/shufflenet_v2_0.5_digits_demo.yaml
DEMO_DIR := runs/digits_demo

# the main job: train x0.5 on the embedded digits on CPU, then validate the best checkpoint
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) train.py --config $(DEMO_CONFIG) --ckpt_save_dir $(DEMO_DIR)
	$(PY) validate.py -c $(DEMO_CONFIG) --ckpt_path $(DEMO_DIR)/shufflenet_v2_x0_5_best.safetensors
	@echo "checkpoints, result.log, metrics.jsonl and curves.png are in $(DEMO_DIR)/"

# one pytest worker per core, at most 4 (each is a torch process), fed one test at a time, slow ones first
# (tests/conftest.py); `$(PY) -m pytest -n 0` runs the suite in one process
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n auto --maxprocesses 4 --maxschedchunk 1

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs
