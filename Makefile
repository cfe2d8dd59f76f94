# Two commands a newcomer needs: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock

.PHONY: install check-install lock train test test-fast test-oldest test-newest gpu-check clean

# Exactly the versions in the lock (direct and transitive), then the project itself without
# resolving anything again, then a check that torch and transformers (and torchaudio, which
# only the tests use) load together.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$$(grep -E '^pip==' $(LOCK))"
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(MAKE) --no-print-directory check-install
	touch $(STAMP)

install: $(STAMP)

check-install:
	@$(PY) scripts/check_install.py $(LOCK)

# Refresh the lock on purpose: resolve pyproject.toml's ranges in a fresh venv, freeze it.
# Then run `make clean test` on the new lock; commit it only if the tests pass.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q ".[test]"
	.venv-lock/bin/python scripts/check_install.py
	{ sed -n '1,/^# Python/p' $(LOCK); \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -vE '^(audio-grpo|wheel)'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
	@echo "$(LOCK) refreshed: now run 'make clean test' and commit the lock only if it passes"

# The whole pipeline on a tiny Qwen2-Audio and synthetic audio questions, on CPU.
# --resume auto run.overwrite=true: a stopped run (Ctrl-C) continues where it stopped; a finished
# one is moved aside (runs/tiny.replaced-<time>) and a fresh run starts.
# One thread unless OMP_NUM_THREADS says otherwise: the fastest setting for this model, idle or on
# a busy machine (benchmarks/RESULTS.md, "Threads for the CPU demo").
train: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) train.py --config configs/tiny.yaml --resume auto run.overwrite=true

# The whole test suite, slow tests included (this is what CI runs); one thread per process unless
# OMP_NUM_THREADS says otherwise, as for `make train`.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest tests

# Everything but the slow tests, for a quick loop while editing.
test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest tests -m "not slow"

# The same suite on the oldest releases pyproject.toml allows: torch 2.11 (the lock's) and
# transformers 5.17 (the GPU image's), whose packages from requirements-oldest.lock are laid
# over the locked venv, nothing else changed.
OLDEST := $(VENV)/oldest
$(OLDEST)/.installed: requirements-oldest.lock $(STAMP)
	rm -rf $(OLDEST)
	$(PY) -m pip install -q --no-deps --target $(OLDEST) -r requirements-oldest.lock
	PYTHONPATH=$(OLDEST) $(PY) -c "import transformers; assert transformers.__version__ == '5.17.0', transformers.__version__"
	touch $@

test-oldest: $(OLDEST)/.installed
	PYTHONPATH=$(OLDEST) $(PY) -m pytest tests

# The suite on the newest releases pyproject.toml's ranges allow, resolved afresh in a scratch venv
# (as `make lock` resolves them): one command shows whether a new release breaks the project.
# PIP_CONSTRAINT=/dev/null: a constraint file in the machine's pip config (one capping torch,
# say) must not hold the resolution back; the config's index settings still apply.
NEWEST := .venv-newest
test-newest:
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q --upgrade pip
	PIP_CONSTRAINT=/dev/null $(NEWEST)/bin/python -m pip install -q ".[test]"
	$(NEWEST)/bin/python scripts/check_install.py
	$(NEWEST)/bin/python -m pytest tests

# On a machine with one NVIDIA GPU (under 10 minutes): the 7B's LoRA and full recipes' steps,
# per phase, against the memory plan; decoding against the memory-bandwidth floor; the
# sampler/trainer gap. Writes benchmarks/results/gpu_check_<gpu>.{json,md}; how to read it:
# benchmarks/RESULTS.md, "One command for a GPU". Without a GPU it says so and fails.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .venv-newest runs artifacts .pytest_cache .hypothesis
