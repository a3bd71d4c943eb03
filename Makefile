# The two set-up commands (see README): `make demo` runs the main job, `make test` the tests.
# Each creates .venv on first use and installs the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,train]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m train.pretrain

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

# the slow tier: end-to-end runs (CLI training, long fuzz sweeps) whose code paths the default
# run already covers with smaller cases; run before a release or when touching those paths
test-slow: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow tests

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
