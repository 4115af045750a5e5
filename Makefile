# make run   — install into .venv and run self-play on the embedded defaults
# make test  — install into .venv with the test extras and run the whole test suite
# make bench — run the microbenchmarks (pytest-benchmark) and print the comparison tables
# make learning ARGS="--out runs/learning ..." — held-out pass@k before/after self-play (bench/learning.py)
# make lock  — refresh locks/ from the newest releases, then smoke-test them in a fresh venv
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
JOBS ?= 2

.PHONY: run test bench learning lock clean

$(VENV)/.installed-run: pyproject.toml setup.py kernels/pyproject.toml scripts/install.sh $(wildcard locks/*.txt)
	scripts/install.sh $(VENV)
	touch $@

$(VENV)/.installed-test: pyproject.toml setup.py kernels/pyproject.toml scripts/install.sh $(wildcard locks/*.txt)
	scripts/install.sh $(VENV) test
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(PY) -m spell_core.run $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -n $(JOBS) --durations=25 tests $(ARGS)

bench: $(VENV)/.installed-test
	$(PY) -m pytest bench --benchmark-enable --benchmark-columns=min,median,mean,rounds -s $(ARGS)

learning: $(VENV)/.installed-run
	$(PY) bench/learning.py $(ARGS)

lock:
	scripts/refresh_lock.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
