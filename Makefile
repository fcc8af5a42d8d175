# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv if missing and install with the pinned constraints.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: demo test test-all lint install bench docs clean fuzz-serve

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cafe-ray simulate $(ARGS)

# `make test`: every test but the long end-to-end ones (`@pytest.mark.slow`, each with what makes
# it long: clusters, the autoscaler, sweeps, killed-and-resumed CLI runs, multi-run equality on
# real actors); `make test-all`: all of them, as CI runs.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# ruff on everything, mypy on cafe_ray/ (its settings: [tool.mypy] in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/cafe-ray bench all

# OpenAPI fuzzing of `cafe-ray serve` (schemathesis, in .fuzz-venv: not a dev dependency).
fuzz-serve: $(STAMP)
	CAFE_RAY=$(BIN)/cafe-ray benchmarks/serve_fuzz.sh $(ARGS)

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link,
# a missing page or a config field without a description.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache site .fuzz-venv .flower-venv
