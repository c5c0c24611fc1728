# Fabrica. `make run` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint gen check-gen contract-baseline bench clean venv web-deps web

# The virtualenv with the pinned dependencies (requirements-dev.txt, which includes requirements.txt)
# and fabrica installed in it.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(VENV): $(STAMP)
venv: $(STAMP)

# web/'s npm packages, exactly as web/package-lock.json records them; again only when the lock (or
# package.json) changed since the last install, or node_modules is missing.
NPM_STAMP := web/node_modules/.installed
$(NPM_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund
	touch $(NPM_STAMP)
web-deps: $(NPM_STAMP)

# The built UI (web/dist, served by `fabrica run`'s gateway): type-checked and rebuilt only when a source, the
# config or the installed packages changed since the last build.
WEB_STAMP := web/dist/.built
WEB_SRC := $(shell find web/src web/index.html web/vite.config.ts web/tsconfig.json -type f 2>/dev/null)
$(WEB_STAMP): $(NPM_STAMP) $(WEB_SRC)
	cd web && npx tsc --noEmit && npx vite build --logLevel warn
	touch $(WEB_STAMP)
web: $(WEB_STAMP)

# The browser the UI tests drive (Debian's chromium; Playwright never downloads one).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update && apt-get install -y --no-install-recommends chromium

## run: the whole local stack (embedded Postgres and the services), printing addresses and grpcurl examples.
run: $(STAMP) $(WEB_STAMP)
	$(VENV)/bin/fabrica run

## test: the test suite against real servers on loopback and an embedded Postgres.
test: $(STAMP) $(NPM_STAMP) $(WEB_STAMP) $(CHROMIUM) promtool
	$(PY) -m pytest

# promtool and prometheus (the observability tests) come from Debian's prometheus package.
.PHONY: promtool
promtool:
	@command -v promtool >/dev/null || { apt-get update && apt-get install -y --no-install-recommends prometheus; }

## gen: regenerate gen/ (Python, descriptor image) and web/src/gen/ (TypeScript) from protos/.
gen: $(STAMP) $(NPM_STAMP)
	scripts/gen.sh gen web/src/gen

## lint: generated code is current, buf lint, buf breaking against the released contract
## (protos/baseline/fabrica.binpb; also against the git ref $BUF_AGAINST_REF when set), pyflakes on our Python.
lint: $(STAMP) check-gen
	scripts/buf_check.sh
	$(PY) -m pyflakes services tests benchmarks scripts

check-gen: $(STAMP) $(NPM_STAMP)
	@rm -rf build/gen-check && mkdir -p build/gen-check
	@scripts/gen.sh build/gen-check/gen build/gen-check/web-gen
	@diff -r -x __pycache__ gen build/gen-check/gen >/dev/null || { echo "gen/ is stale: run 'make gen' and commit the result"; diff -r -q -x __pycache__ gen build/gen-check/gen; exit 1; }
	@diff -r web/src/gen build/gen-check/web-gen >/dev/null || { echo "web/src/gen/ is stale: run 'make gen' and commit the result"; diff -r -q web/src/gen build/gen-check/web-gen; exit 1; }
	@echo "gen/, web/src/gen/: current"

## contract-baseline: after a release, on the released commit: write protos/baseline/fabrica.binpb, the
## released contract `make lint` holds protos/ to with buf breaking, and commit it.
contract-baseline: $(STAMP)
	scripts/contract_baseline.sh

## bench: benchmarks, each printed beside a baseline measured in the same run.
bench: $(STAMP) $(WEB_STAMP) $(CHROMIUM)
	$(PY) -m benchmarks

clean:
	rm -rf build .pytest_cache
