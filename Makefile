# prunesearch — set-up, main job, tests, benchmarks. Every target builds the venv itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv run test bench bench-quick clean

venv: $(STAMP)

# torch==2.13.0 first and alone: it is a CPU wheel on local disk; any other torch request
# (or a dependency resolved before it) would make pip fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: venv
	$(VENV)/bin/prunesearch run studies/quickstart.toml
	$(VENV)/bin/prunesearch export studies/quickstart.toml

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks

bench-quick: venv
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) studies/*.db studies/*.journal studies/cache studies/exports
