# Every target sets itself up: a fresh machine needs only Python 3.10+ and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyTorch's CPU build when no NVIDIA driver is present; a plain `torch` would pull CUDA wheels.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q torch; \
	else \
		$(BIN)/pip install -q $(TORCH_PIN) || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q -e '.[test]'

setup: $(BIN)/activate

demo: setup
	$(BIN)/vitmoe demo

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
