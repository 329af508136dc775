# Each target creates .venv on first use so a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench clean

# pip's and setuptools' output (the editable-install banner among it) goes to a log,
# shown only when the install fails.
$(STAMP): pyproject.toml
	@echo "Setting up $(VENV) (first run only; its log: $(VENV)/install.log)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@{ $(BIN)/python -m pip install -qq --upgrade pip && \
	   $(BIN)/python -m pip install -qq -e '.[dev]'; } > $(VENV)/install.log 2>&1 || \
	   { cat $(VENV)/install.log; echo "pip install failed: see above"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/radmesh demo --interactive

# mypy and the tests at once: mypy is one process on one core (about 17 s on a clean clone),
# the tests' workers spend much of their time waiting on sockets and child processes.
# make's -j keeps each target's exit status: either failing fails `make test`.
test: lint
	@$(MAKE) --no-print-directory -j2 typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Workers: the tests mostly wait on sockets and child processes, so more workers than cores
# pays; `make pytest PYTEST_WORKERS=0` runs them in one process.
PYTEST_WORKERS ?= 4

# The tests start many interpreters (xdist workers, the CLI, nodes): each reuses the compiled
# bytecode the first one writes instead of compiling the sources again, even where the
# environment asks Python not to write it (an empty value is unset).
pytest: export PYTHONDONTWRITEBYTECODE :=

# On a clean clone every worker would compile the sources and rewrite the test modules'
# asserts itself, all at once (4 x ~8 s of CPU): one collection first writes that bytecode
# for all of them (~12 s, beside mypy). Its errors show again in the run itself.
pytest: $(STAMP)
ifneq ($(PYTEST_WORKERS),0)
	@$(BIN)/python -m pytest --collect-only -q -p no:cacheprovider > /dev/null 2>&1 || true
endif
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache
