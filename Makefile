# Two entry points for a fresh machine with Python >= 3.11:
#   make run   - install into .venv and run the main job on the embedded defaults
#   make test  - install into .venv (with test tools) and run the test suite, on TensorFlow
#                and (its backend-neutral part) on JAX
#   make ui    - TensorBoard and the MLflow UI on what `make run` wrote
#   make server - a team's MLflow tracking server (PostgreSQL store, served artifacts) on
#                 127.0.0.1, data under ./optiscope-server; Ctrl-C stops it
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: run test ui server lint benchmarks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/optiscope run rosenbrock

ui: $(VENV)/.installed
	$(BIN)/optiscope ui

# The backend-neutral tests again on JAX; its float64 statistics state needs JAX_ENABLE_X64.
JAX_TESTS = tests/test_update_rules.py tests/test_statistics.py tests/test_builtins.py \
	tests/test_measures.py tests/test_callbacks.py tests/test_guard.py tests/test_resume.py \
	tests/test_keras_features.py

# Test files run in parallel, each whole on one worker (its module-scoped servers start once):
# most tests spend much of their time waiting for servers and subprocesses.
TEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test: $(VENV)/.installed
	$(PYTEST)
	KERAS_BACKEND=jax JAX_ENABLE_X64=1 $(PYTEST) $(JAX_TESTS)

server: $(VENV)/.installed
	$(BIN)/optiscope server

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

benchmarks: $(VENV)/.installed
	$(BIN)/python benchmarks/update_rules.py
	$(BIN)/python benchmarks/instrumentation_overhead.py

clean:
	rm -rf $(VENV) build dist *.egg-info
