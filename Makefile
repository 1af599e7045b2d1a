# Two commands on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup run test test-fast lint bench wheel clean

$(BIN)/sltrain: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/sltrain

setup: $(BIN)/sltrain

run: setup
	$(BIN)/sltrain pretrain

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check sltrain_cli tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_layer.py
	$(BIN)/python benchmarks/bench_methods.py
	$(BIN)/python benchmarks/bench_data.py

# dist/sltrain-*.whl, conf/ inside it (sltrain_cli/conf): `pip install dist/sltrain-*.whl` works anywhere
wheel: setup
	$(BIN)/pip wheel -q . --no-deps --no-build-isolation -w dist

clean:
	rm -rf $(VENV) outputs .pytest_cache build dist
