# Every target installs what it needs; running one twice is safe and quick.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-fast bench bench-quick lint install fashion-mnist slurm-local clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[data,report,export,dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist; installed when missing and we are root.
fashion-mnist:
	@if [ -f $(FMNIST_DIR)/t10k-labels-idx1-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST runs will be skipped"; \
	else echo "note: Fashion-MNIST is not in $(FMNIST_DIR); run 'sudo apt-get install dataset-fashion-mnist' or pass --data-dir"; fi

# A single-node Slurm cluster for the Slurm tests (scripts/slurm-local.sh, idempotent; stop it with
# 'scripts/slurm-local.sh stop'). Where it cannot run (not root, no apt-get: exit status 3) the build goes on and those
# tests skip saying why; any other failure stops the build.
slurm-local:
	@scripts/slurm-local.sh start || { status=$$?; [ $$status = 3 ] && echo "note: no local Slurm cluster; the Slurm tests will be skipped"; }

demo: install fashion-mnist
	$(VENV)/bin/visionmix compare --preset demo --out runs/demo

test: install fashion-mnist lint slurm-local
	$(PY) -m pytest -n 2 -q

# The tier to run after each change: everything but the tests marked slow (under 2 minutes on 2 cores).
test-fast: install fashion-mnist lint
	$(PY) -m pytest -n 2 -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

# Every benchmark script: ratios measured in one process, median of >= 10 rounds after warm-up, 2 threads.
bench: install
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# The same scripts in their smoke mode (3 rounds), to check they run.
bench-quick: install
	@for f in benchmarks/*.py; do echo "== $$f --quick"; $(PY) $$f --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
