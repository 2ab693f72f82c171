# The README's two commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck format train-demo demo-bucket clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/segment_bucket.py

test: lint
	bash .ci/system-packages.sh
	$(PY) -m pytest -m 'slow or not slow'

# ruff with the project's settings (pyproject.toml): lint, and a format that must already hold;
# then mypy over pipeline/ (make typecheck).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test-fast: $(STAMP)
	$(PY) -m pytest

train-demo: $(STAMP)
	$(PY) jobs/train_demo.py

demo-bucket: $(STAMP)
	$(PY) -m pipeline.demo.synthetic pipeline/demo/assets/demo_bucket

clean:
	rm -rf outputs

typecheck: $(STAMP)
	$(VENV)/bin/mypy
