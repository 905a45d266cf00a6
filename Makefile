# Two entry points; each bootstraps .venv from nothing but Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test fixture fixture-deep fixture-deep-skip bench bench-quick bench-site clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned here (the CPU build on these machines); the package metadata keeps a range
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,quality]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m asymrnr_fx.demo

# two workers (CI's two cores); a file runs whole on one worker, so its module fixtures are built once
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# retrains the shipped fixture weights (58 minutes on 2 CPU cores; overwrites models/fixture/weights)
fixture: $(STAMP)
	$(PY) -m asymrnr_fx.models.fixture.train --out models/fixture/weights --minutes 58 --seed 0 \
		--threads 2 --lr 8e-4 --warmup 200 --sigma-mean 0.5

# the deep fixture (8 blocks of width 64: attention ~57% of the forward FLOPs), same data and prompts
fixture-deep: $(STAMP)
	$(PY) -m asymrnr_fx.models.fixture.train --out models/fixture/weights-deep --minutes 52 --seed 0 \
		--threads 2 --lr 8e-4 --warmup 200 --sigma-mean 0.5 --num-layers 8 --num-heads 2 --head-dim 32

# the deep fixture's Skip-DiT twin: long skip branches added (zero-initialised), stage 1 trains only
# them, stage 2 everything (the Skip-DiT release's two-stage recipe, scaled down; 40 minutes)
fixture-deep-skip: $(STAMP)
	$(PY) -m asymrnr_fx.models.fixture.train --init models/fixture/weights-deep --out models/fixture/weights-deep-skip \
		--minutes 10 --seed 0 --threads 2 --lr 8e-4 --warmup 100 --sigma-mean 0.5 --num-layers 8 --num-heads 2 \
		--head-dim 32 --skip-dit --train branches
	$(PY) -m asymrnr_fx.models.fixture.train --init models/fixture/weights-deep-skip --out models/fixture/weights-deep-skip \
		--minutes 30 --seed 1 --threads 2 --lr 3e-4 --warmup 100 --sigma-mean 0.5 --num-layers 8 --num-heads 2 \
		--head-dim 32 --train all

# peers for `python -m bench`; para-attn 0.3.38 names a git URL in its dev extra, which pip >= 26.3
# refuses even with --no-deps, so an older pip (kept inside .venv) installs it
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,quality,bench]'
	$(PYTHON) -m venv $(VENV)/pip261 && $(VENV)/pip261/bin/pip install -q 'pip==26.1'
	$(VENV)/pip261/bin/pip --python $(PY) install -q --no-deps 'para-attn==0.3.38' || echo "para-attn not installed: its rows say why"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench

bench-quick: $(BENCH_STAMP)
	$(PY) -m bench --quick

bench-site: $(STAMP)
	$(PY) -m bench.site

clean:
	rm -rf $(VENV) out
