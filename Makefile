# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Silences a flood of deprecation warnings from gloo collectives inside DeepSpeed.
export PYTHONWARNINGS := ignore::FutureWarning,ignore::DeprecationWarning
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch first and pinned: any other torch spec pulls a multi-GB CUDA build on CPU machines.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The demo starts over each time it runs (overwrite=true: the last demo's checkpoints and replay store go).
demo: $(STAMP)
	$(BIN)/forgetless compare configs/demo.yaml --strategies naive,replay --seeds 1 overwrite=true

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra --durations=15

lint: $(STAMP)
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/trainer_overhead.py --json runs/bench/trainer_overhead.json
	$(BIN)/python bench/replay_store.py --json runs/bench/replay_store.json
	$(BIN)/python bench/strategy_overhead.py --json runs/bench/strategy_overhead.json
	$(BIN)/python bench/replay_soak.py --json runs/bench/replay_soak.json

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts
