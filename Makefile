# `make demo` and `make test` each create .venv (and install distill into it) when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# torch's idle OpenMP threads sleep instead of spinning: spinning threads starve the working ones on a few shared
# cores (docs/speed.md); the distill command sets the same default.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-all bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/distill quickstart --out demo-out

# `make test`: every test but the slow ones (quality floors, the end-to-end quickstart, multi-process and kill -9
# runs; pytest -m slow). `make test-all`: all of them; CI (.ci/run) runs this one.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

# Benchmarks: slow, not tests. Their outputs are committed under evals/.
bench: $(STAMP)
	$(PY) evals/baseline.py
	$(PY) evals/bench_fd.py

clean:
	rm -rf $(VENV) demo-out quickstart quickstart-fast .pytest_cache
