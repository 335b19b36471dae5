# `make train`: set up, then train on the embedded default model (a few minutes on 2 CPU cores).
# `make test`:  set up, check the layers (scripts/structure.py), then run the test suite (unit tests
#               on tiny models + a few real-model tests) in two worker processes (pytest-xdist), one
#               per core of CI's machine; --dist loadgroup keeps each xdist_group on one worker.
#               The workers are set here, not in pyproject's addopts, so that `python -m pytest
#               tests/test_x.py` stays one process (no worker start-up for a file, -s and --pdb work).
#               --durations=20 lists the slowest tests, to keep the suite within CI's 10 minutes.
PYTHON ?= python3

.PHONY: setup train test

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

train: setup
	$(PYTHON) -m quietstar train

test:
	PYTHON=$(PYTHON) bash scripts/setup.sh browser
	$(PYTHON) scripts/structure.py
	$(PYTHON) -m pytest -q -rs -n 2 --dist loadgroup --durations=20
