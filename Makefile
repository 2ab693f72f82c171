# The README's two commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast train-demo demo-bucket clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/segment_bucket.py

test: $(STAMP)
	bash .ci/system-packages.sh
	$(PY) -m pytest -m 'slow or not slow'

test-fast: $(STAMP)
	$(PY) -m pytest

train-demo: $(STAMP)
	$(PY) jobs/train_demo.py

demo-bucket: $(STAMP)
	$(PY) -m pipeline.synthetic pipeline/assets/demo_bucket

clean:
	rm -rf outputs
