# Every target creates (or reuses) its own virtual environment in .venv from project files only.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test venv lint bench fashion-mnist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench,ray]'
	touch $(STAMP)

venv: $(STAMP)

## The main job: train a small model on the embedded MNIST digits, export a task, serve it.
quickstart: $(STAMP)
	$(BIN)/hnet-serve quickstart

## The test suite (what .ci/run runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check hnet_serve training export tests benchmarks

## Fashion-MNIST (Debian package) for the benchmarks that need it.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)

bench: $(STAMP) fashion-mnist
	$(BIN)/python -m benchmarks.run_all

## Long reliability runs (issues 7 and 14; the fast cases are in `make test`): the 60 s load
## test, the 60 s hostile-client run and the 60 s reload run (issue 18).
.PHONY: reliability
reliability: $(STAMP)
	$(BIN)/python -m benchmarks.load_test
	$(BIN)/python -m benchmarks.hostile_clients
	$(BIN)/python -m benchmarks.bench_reload

clean:
	rm -rf $(VENV) build *.egg-info
