# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv itself.
# `make ui-check` renders the MLflow UI of a small real run in headless Chromium (installs it if missing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test bench install clean chromium ui-check

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/histodiff demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian's chromium; where it cannot be installed the UI test skips and says why.
chromium:
	@test -x $(CHROMIUM) || (apt-get update -q && apt-get install -y -q chromium) >/dev/null || \
		echo "chromium could not be installed: tests/test_ui.py will be skipped"

ui-check: $(STAMP) chromium
	$(PY) -m pytest tests/test_ui.py -v -s $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) jobs/benchmark.py --output bench/results.json

clean:
	rm -rf $(VENV) outputs mlflow.db
