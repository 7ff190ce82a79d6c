# Two commands for a new user: `make demo` and `make test`. Everything installs itself into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast bench lint format demo recipe clean

setup: $(STAMP)

# torch first and pinned: on this project's machines pip finds the 2.13.0 CPU wheel locally; a
# bare `torch` pulls a multi-GB CUDA build. Elsewhere PyPI's Linux torch==2.13.0 is the CUDA
# build too: add --index-url https://download.pytorch.org/whl/cpu for the CPU one.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: setup
	$(BIN)/python -m bench.all

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: setup
	$(BIN)/python -m jobs.demo

# The CPU-hour recipe (about an hour on 2 cores): make recipe [VIDEOS=your/videos] [DAVIS=davis/root]
recipe: setup
	$(BIN)/python -m jobs.demo --plan configs/cpu_hour.yaml --root runs/cpu_hour \
		$(if $(VIDEOS),--videos $(VIDEOS)) $(if $(DAVIS),--davis $(DAVIS))

clean:
	rm -rf $(VENV) runs .pytest_cache
