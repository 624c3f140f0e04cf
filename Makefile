# The two set-up commands of README.md. Each works on a fresh machine and installs what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: demo test setup bench

demo: setup  ## set up, then run the main job: train the default Fashion-MNIST FPDM, sample a grid
	rm -rf runs/demo
	fpdm train --out runs/demo
	fpdm sample runs/demo --n 100 --steps 25 --cfg-scale 3 --out runs/demo/samples

test: setup  ## set up, then run the whole test suite
	$(PYTHON) -m pytest -q

setup:
	bash .ci/setup

bench: setup  ## rerun the benchmarks and refresh their README tables
	$(PYTHON) benchmarks/solvers.py --update-readme
	$(PYTHON) benchmarks/train.py --update-readme
