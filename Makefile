# `make demo` and `make test` each create .venv on first use (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU-only machines get torch's CPU build when it is at hand: the CUDA build is GBs larger.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
DEMO   := demo-data

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dali,dev,bench]"
	touch $@

demo: venv
	$(BIN)/srdata make-samples $(DEMO)/images --count 64
	$(BIN)/python tools/pack_lmdb.py $(DEMO)/images $(DEMO)/db --overwrite
	$(BIN)/srdata verify $(DEMO)/db
	$(BIN)/srdata inspect $(DEMO)/db

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
