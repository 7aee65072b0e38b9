# Two commands for a fresh machine: `make search` and `make test`. Each creates .venv when it is
# missing and installs the project into it; torch/torchvision versions come from constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test search bench install clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,mnist]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

search: $(STAMP)
	$(VENV)/bin/gp-loss search search_runs/quick.toml

bench: $(STAMP)
	@for b in analysis/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info
