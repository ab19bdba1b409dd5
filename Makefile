# ddr: `make demo` runs every stage on the embedded model; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch: where no CUDA GPU is visible a CPU build is installed first (TORCH_CPU_INDEX may point pip at
# PyTorch's CPU wheel index); with a GPU, pip's normal (CUDA) build. TORCH=cpu|cuda forces the choice.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?=
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install demo test lint benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		if [ "$(TORCH)" = "cpu" ]; then \
			echo "installing the CPU build of torch (no CUDA GPU visible)"; \
			$(BIN)/python -m pip install -q "torch==$(TORCH_CPU_VERSION)" $(if $(TORCH_CPU_INDEX),--index-url $(TORCH_CPU_INDEX)); \
		else \
			echo "installing torch with CUDA"; \
			$(BIN)/python -m pip install -q torch; \
		fi; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/ddr demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check ddr flows tests benchmarks
	$(BIN)/ruff format --check ddr flows tests benchmarks

clean:
	rm -rf $(VENV) ddr-data .pytest_cache
