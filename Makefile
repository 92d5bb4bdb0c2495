# Two commands for a newcomer: `make demo` and `make test`. Both set themselves up first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup system-deps demo test lint format bench stack-up stack-down clean

# Debian packages the offline datasets need (infra/apt-packages.txt); installed when missing.
SYSTEM_STAMP := $(VENV)/.system-deps
$(SYSTEM_STAMP): infra/apt-packages.txt
	@missing=$$(grep -v '^#' infra/apt-packages.txt | xargs -r -n1 sh -c 'dpkg -s "$$0" >/dev/null 2>&1 || echo "$$0"'); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "error: missing Debian packages; run: sudo apt-get install -y $$missing"; exit 1; fi; \
	fi
	@mkdir -p $(VENV) && touch $(SYSTEM_STAMP)

system-deps: $(SYSTEM_STAMP)

# The venv is rebuilt whenever the lock or the project metadata changes.
$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; this project needs Python 3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing pinned dependencies into $(VENV) (a few minutes on a fresh machine)..."
	@set -o pipefail; $(BIN)/pip install -q -r requirements.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
	@set -o pipefail; $(BIN)/pip install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(BIN)/python -c "import torch, open_clip, ray, mlflow, prefect, pyarrow, diki_model" || { echo "error: installation incomplete"; exit 1; }
	@touch $(STAMP)

setup: $(STAMP) $(SYSTEM_STAMP)

demo: setup
	$(BIN)/diki demo

test: setup
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check diki_model pipelines services tests benchmarks
	$(BIN)/ruff format --check diki_model pipelines services tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format diki_model pipelines services tests benchmarks
	$(BIN)/ruff check --fix diki_model pipelines services tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py

stack-up: $(STAMP)
	$(BIN)/diki stack up

stack-down: $(STAMP)
	$(BIN)/diki stack down

clean:
	rm -rf .diki runs

# Mutation testing of the core library with its fast unit tests; not part of `make test` (tens of
# minutes on 2 cores). What is mutated and which tests run: [tool.mutmut] in pyproject.toml.
# Writes benchmarks/results/mutation.{json,md}; inspect with `$(BIN)/mutmut show NAME` or `browse`.
MUTATE_JOBS ?= 2
.PHONY: mutate
mutate: $(STAMP)
	@rm -rf mutants
	@start=$$(date +%s); \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATE_JOBS); \
	$(BIN)/python benchmarks/mutation_summary.py --wall-seconds $$(( $$(date +%s) - start )) \
	  --command "make mutate (mutmut run --max-children $(MUTATE_JOBS))" --min-score 90
