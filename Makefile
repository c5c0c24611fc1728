# Fabrica. `make run` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint gen check-gen bench clean venv

# The virtualenv with the pinned dependencies (requirements-dev.txt, which includes requirements.txt)
# and fabrica installed in it.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(VENV): $(STAMP)
venv: $(STAMP)

## run: the whole local stack (embedded Postgres and the services), printing addresses and grpcurl examples.
run: $(STAMP)
	$(VENV)/bin/fabrica run

## test: the test suite against real servers on loopback and an embedded Postgres.
test: $(STAMP) promtool
	$(PY) -m pytest

# promtool and prometheus (the observability tests) come from Debian's prometheus package.
.PHONY: promtool
promtool:
	@command -v promtool >/dev/null || { apt-get update && apt-get install -y --no-install-recommends prometheus; }

## gen: regenerate gen/ from protos/.
gen: $(STAMP)
	scripts/gen.sh gen

## lint: generated code is current, buf lint, buf breaking against main, pyflakes on our Python.
lint: $(STAMP) check-gen
	scripts/buf_check.sh
	$(PY) -m pyflakes services tests benchmarks scripts

check-gen: $(STAMP)
	@rm -rf build/gen-check && mkdir -p build/gen-check
	@scripts/gen.sh build/gen-check
	@diff -r -x __pycache__ gen build/gen-check >/dev/null || { echo "gen/ is stale: run 'make gen' and commit the result"; diff -r -q -x __pycache__ gen build/gen-check; exit 1; }
	@echo "gen/: current"

## bench: benchmarks, each printed beside a baseline measured in the same run.
bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf build .pytest_cache
