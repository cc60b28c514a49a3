# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Silences a flood of deprecation warnings from gloo collectives inside DeepSpeed.
export PYTHONWARNINGS := ignore::FutureWarning,ignore::DeprecationWarning
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test check lint bench clean browser

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

test: $(STAMP) lint browser
	$(BIN)/python -m pytest -q -ra --durations=15

# The quick tests only (no end-to-end runs, no Ray cluster, no GPU): feedback while editing, in a
# few minutes. `make test` is the whole suite, and what CI runs.
check: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra -m "not slow and not cluster and not gpu" --durations=10

# The MLflow UI test drives Debian's chromium through chromedriver (no browser download). Installed
# here when missing and this is root with apt; elsewhere that one test is skipped, saying why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver for the MLflow UI test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null) || echo "could not install chromium: the MLflow UI test will be skipped"; \
	else echo "no chromium (and no root apt to install it): the MLflow UI test will be skipped"; fi

lint: $(STAMP)
	$(BIN)/lint-imports

# The speed targets and the comparisons with other tools (~1.5 h on 2 cores, model_scale ~25 min of
# it, writing up to 12 GB of checkpoints to /tmp). bench/peers.py builds RLlib's, Avalanche's and
# Reverb's environments under ~/.cache/forgetless/bench-envs on first use (~8.4 GB of disk, a few
# minutes).
bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python bench/trainer_overhead.py --json runs/bench/trainer_overhead.json
	$(BIN)/python bench/trainer_vs_hf.py --json runs/bench/trainer_vs_hf.json
	$(BIN)/python bench/stream_cost.py --json runs/bench/stream_cost.json --plot runs/bench/stream_cost.png
	$(BIN)/python bench/bootstrap.py --json runs/bench/bootstrap.json
	$(BIN)/python bench/workers.py --json runs/bench/workers.json --plot runs/bench/workers.png
	$(BIN)/python bench/peers.py --json runs/bench/peers.json
	$(BIN)/python bench/replay_store.py --json runs/bench/replay_store.json
	$(BIN)/python bench/replay_latency.py --json runs/bench/replay_latency.json
	$(BIN)/python bench/replay_scale.py --json runs/bench/replay_scale.json
	$(BIN)/python bench/strategy_overhead.py --json runs/bench/strategy_overhead.json
	$(BIN)/python bench/replay_soak.py --json runs/bench/replay_soak.json
	$(BIN)/python bench/compare_startup.py --json runs/bench/compare_startup.json
	$(BIN)/python bench/model_scale.py --json runs/bench/model_scale.json --plot runs/bench/model_scale.png

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts
