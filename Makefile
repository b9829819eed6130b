# `make demo` and `make test` each create .venv (and install distill into it) when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# Python's bytecode cache stays on for what make runs, even where the environment sets PYTHONDONTWRITEBYTECODE:
# the quickstart's lanes and many tests start Python processes of their own, and without the cache each one
# compiles torch's and diffusers' sources again (14 s, against 6 s, to import the trainer and start a job;
# docs/speed.md). The cache goes into .venv and into the ignored __pycache__ folders of this checkout.
unexport PYTHONDONTWRITEBYTECODE
# The tests start several processes at once (CPU ranks, subprocess runs): there torch's idle OpenMP threads must
# sleep, not spin, or they starve each other on a few cores (docs/speed.md). `make demo` is one process alone and
# keeps GNU OpenMP's default, which is faster there.
test test-all: export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo demo-text test test-all bench bench-text venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/distill quickstart --out demo-out

# The same on the SD-shaped text-to-image teacher (colored digits): five students, one of them LoRA.
demo-text: $(STAMP)
	$(VENV)/bin/distill quickstart --benchmark text-digits --out demo-text-out

# `make test`: every test but the slow ones (quality floors, the end-to-end quickstart, multi-process and kill -9
# runs; pytest -m slow), in one pytest-xdist worker per core (TEST_WORKERS=0: all in pytest's own process).
# `make test-all`: those, then the slow ones one at a time (they start processes of their own); CI (.ci/run) runs
# this one.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"
	$(PY) -m pytest -q -m slow

# Benchmarks: slow, not tests. Their outputs are committed under evals/ (each script's docstring says what it
# measures and writes). bench-text adds the text-to-image teachers' training-free baselines (an hour or more on
# 2 CPU cores).
bench: $(STAMP)
	$(PY) evals/baseline.py
	$(PY) evals/baselines.py --teacher digits
	$(PY) evals/bench_fd.py
	$(PY) evals/bench_fd_text.py
	$(PY) evals/bench_eval.py
	$(PY) evals/bench_sampling.py
	$(PY) evals/bench_trainer.py
	$(PY) evals/bench_step.py --omp
	$(PY) evals/bench_precision.py

bench-text: $(STAMP)
	$(PY) evals/baselines.py --teacher text-digits-sd
	$(PY) evals/baselines.py --teacher text-digits-sd3

clean:
	rm -rf $(VENV) demo-out demo-text-out quickstart quickstart-fast quickstart-text-digits \
		quickstart-text-digits-fast .pytest_cache
