# `make demo` and `make test` each create .venv on first use (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU-only machines ask for torch 2.13.0: the CPU build where the package index has one
# (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), else PyPI's CUDA build, GBs larger.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
DEMO   := runs/demo

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dali,dev,bench,tensorboard,onnx]"
	touch $@

# The main job, end to end: sample photos -> pack -> train -> validate -> report (a few
# minutes on 2 CPU cores).
demo: venv
	$(BIN)/srtrain demo --out $(DEMO) --overwrite

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
