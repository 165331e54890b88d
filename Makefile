# All targets create .venv from constraints.txt when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint efficacy conformance clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,report]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/graphsurg demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-enable --benchmark-only -p no:randomly

conformance: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m tests.conformance.runner

efficacy: $(STAMP)
	$(BIN)/python -m benchmarks.efficacy --seeds 5

# ruff and mypy both run (one CI log lists every finding); either failing fails the target
lint: $(STAMP)
	$(BIN)/ruff check graphsurg kernels passes tests benchmarks; ruff=$$?; \
	$(BIN)/mypy && exit $$ruff

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
