# One entry point for people and CI. `make test` on a fresh machine creates .venv, installs the
# pinned dependencies and runs the whole test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test example crds benchmark

$(STAMP): pyproject.toml requirements/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==25.3
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

example: $(STAMP)
	$(PY) examples/prepare_rotten_tomatoes.py --out examples/data
	$(VENV)/bin/kontinue run examples/data/rotten-tomatoes-minilm.local.yaml

crds: $(STAMP)
	$(VENV)/bin/kontinue crds --out crds/

benchmark: $(STAMP)
	$(PY) benchmarks/bench_text_trainer.py
