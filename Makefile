# Two commands for a fresh machine: `make search` and `make test`. Each creates .venv when it is
# missing and installs the project into it with the extras the tests use (test, mnist, ray);
# torch/torchvision versions come from constraints.txt (ray does not pull torch).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test search bench install clean

EXTRAS := test,mnist,ray

# The stamp also depends on this file: a change of EXTRAS re-installs.
$(STAMP): setup.cfg pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $(STAMP)

install: $(STAMP)

# The import contract of setup.cfg (imports point one way), then the tests.
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

search: $(STAMP)
	$(VENV)/bin/gp-loss search search_runs/quick.toml

bench: $(STAMP)
	@for b in analysis/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info
