# Two commands a newcomer needs: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on a tiny Qwen2-Audio and synthetic audio questions, on CPU.
train: $(STAMP)
	$(PY) train.py --config configs/tiny.yaml

# The whole test suite, slow tests included (this is what CI runs).
test: $(STAMP)
	$(PY) -m pytest tests

# Everything but the slow tests, for a quick loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
