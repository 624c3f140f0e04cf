# The two set-up commands of README.md. Each works on a fresh machine and installs what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: demo test test-fast setup bench lint

demo: setup  ## set up, then run the main job: train the default Fashion-MNIST FPDM, sample a grid
	rm -rf runs/demo
	fpdm train --out runs/demo
	fpdm sample runs/demo --n 100 --steps 25 --cfg-scale 3 --out runs/demo/samples

test: setup  ## set up, then run the whole test suite
	$(PYTHON) -m pytest -q

test-fast:  ## the fast lane while working (after one `make setup`): every test not marked slow, well under 2 minutes
	$(PYTHON) -m pytest -q -m "not slow"

setup:
	bash .ci/setup

LINTED := fpdm_core plugins export apps tests benchmarks examples .ci/typecheck.py

lint: setup  ## ruff check, ruff format --check, then mypy over the package (see .ci/typecheck.py)
	$(PYTHON) -m ruff check $(LINTED)
	$(PYTHON) -m ruff format --check $(LINTED)
	$(PYTHON) .ci/typecheck.py

bench: setup  ## rerun the benchmarks and refresh their README tables
	$(PYTHON) benchmarks/solvers.py --update-readme
	$(PYTHON) benchmarks/train.py --update-readme
