# llamarouter: set up, run, test.
#   make demo   - venv + llama-server build + generated models, then run the router on ./models
#   make test   - venv + llama-server build, then both test tiers (fake server and real llama-server)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8080
MODELS ?= models

.PHONY: venv server models demo test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

venv: $(PY)
	$(PY) -m pip install -e '.[test]'

server: venv
	bin/install-llama-server

models: venv
	$(PY) -m llamarouter.devtools make-demo $(MODELS)

demo: server models
	$(VENV)/bin/llamarouter --models-dir $(MODELS) --models-max 2 --port $(PORT) -c 2048

test: server
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest tests/unit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
