# The README's two commands: `make demo` runs the main job, `make test` runs lint, types and the tests.
# Each sets up what it needs itself (scripts/setup.sh: venv, packages, fedml --no-deps, mosquitto).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint typecheck unit integration bench clean docs config-reference

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/fedpeft-edge demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check fedpeft_edge device_agents server_app tests benchmarks scripts

typecheck: setup
	$(VENV)/bin/mypy fedpeft_edge device_agents server_app

# `make test` runs every test not marked slow (about 10-20 min on 2 cores); `make test-slow` runs the slow ones
# (fresh-venv installs, broker clusters, long network-lab runs). CI runs both.
test: lint typecheck
	bash scripts/run_tests.sh -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	bash scripts/run_tests.sh -m slow $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# The docs site (MkDocs + Material, offline): the config reference must match the dataclasses, and the build
# must be warning-free (broken links and pages missing from the nav fail it).
docs: setup
	$(PY) scripts/config_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# Regenerate docs/reference/config.md after adding or changing a config field.
config-reference: setup
	$(PY) scripts/config_reference.py

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
