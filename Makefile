# Two entry points; each bootstraps .venv from nothing but Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench-site clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned here (the CPU build on these machines); the package metadata keeps a range
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,quality]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m asymrnr_fx.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench-site: $(STAMP)
	$(PY) -m bench.site

clean:
	rm -rf $(VENV) out
