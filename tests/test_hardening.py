"""Hostile primitive-set files and search spaces too small for the budget.

A set file's terminal names would end up in generated source, so anything but y/p is refused;
a search whose set cannot supply enough distinct candidates stops with a reason (and keeps the
attempts it recorded) instead of looping forever.
"""
from __future__ import annotations

import pytest

import gp_loss.search.evolution as evo
from test_search import use_fake
from gp_loss.lang.psets import PSetError, load_pset
from tests.test_search import FakeEvaluate, make_cfg

SET = """
name = "{name}"
types = ["Elem"]
root = "Elem"
class_sum = true
constants = {constants}
[terminals]
{terminals}
[elementwise]
Elem = {ops}
"""


def _write(tmp_path, name, terminals='y = "Elem"\np = "Elem"', constants="[1, -1]",
           ops='["neg", "log", "mul"]'):
    path = tmp_path / f"{name}.toml"
    path.write_text(SET.format(name=name, terminals=terminals, constants=constants, ops=ops))
    return path


@pytest.mark.parametrize("terminals", [
    '"(__import__(\'os\').getcwd() or p)" = "Elem"\ny = "Elem"',
    'y = "Elem"\nq = "Elem"',
])
def test_terminal_names_other_than_y_and_p_are_refused(tmp_path, terminals):
    with pytest.raises(PSetError, match="terminals must be among y, p, logp, inv_c"):
        load_pset(str(_write(tmp_path, "evil", terminals=terminals)))


@pytest.mark.parametrize("constants", ["[nan]", "[inf, 1]", '["1"]', "[true]"])
def test_non_finite_or_non_numeric_constants_are_refused(tmp_path, constants):
    with pytest.raises(PSetError, match="constants must be finite numbers"):
        load_pset(str(_write(tmp_path, "badconst", constants=constants)))


def test_a_too_small_search_space_stops_with_a_reason(tmp_path, monkeypatch):
    pset = _write(tmp_path, "tiny_ops", ops='["neg", "log"]', constants="[]")
    cfg = make_cfg(f"search.pset={str(pset)!r}", "search.initial=20", "search.population=5",
                   "search.children=3", "search.max_retries=4")
    use_fake(monkeypatch, FakeEvaluate())
    store = evo.start_run(tmp_path / "run", cfg)
    result = evo.Evolution(store, cfg).run()
    assert "too small" in result["stop_reason"]
    # The rejected attempts of the unfinished proposal were kept, not lost.
    assert store.counts()["rejected"] + store.counts()["duplicate"] > 0


def test_one_first_line_helper():
    from gp_loss.errors import describe, first_line
    exc = ValueError("\n  bad value  \nTraceback lines\n")
    assert first_line(exc) == "bad value" and describe(exc) == "ValueError: bad value"
    assert first_line(KeyError()) == "KeyError" and describe(RuntimeError()) == "RuntimeError"
    assert first_line("x" * 50, 10) == "xxxxxxx..." and len(describe(ValueError("y" * 500), 300)) == 300
    assert first_line("") == ""


def test_setup_cfg_ships_every_package():
    """setup.cfg lists the packages by hand (two of them are mapped folders): a package added
    under gp_loss/ but not listed would be missing from a wheel."""
    import configparser
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {".".join(p.parent.relative_to(root).parts)
               for p in (root / "gp_loss").rglob("__init__.py") if "__pycache__" not in p.parts}
    mapped = {line.split("=")[0].strip()
              for line in cfg["options"]["package_dir"].strip().splitlines()}
    assert listed == on_disk | mapped
    assert mapped == {"gp_loss.builtin_psets", "gp_loss.builtin_configs"}


def test_a_checkout_without_install_finds_the_shipped_sets_and_configs(monkeypatch):
    """``PYTHONPATH=. python -m gp_loss`` has no gp_loss.builtin_* data packages (only an
    install maps them): the primitive sets and configs then come from the checkout's folders,
    the same folders setup.cfg maps."""
    import configparser
    from pathlib import Path

    from gp_loss import shipped
    from gp_loss.config import builtin_config_names, builtin_config_path
    from gp_loss.lang.psets import available_psets, load_pset

    root = Path(__file__).resolve().parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    mapped = dict(line.replace(" ", "").split("=")
                  for line in cfg["options"]["package_dir"].strip().splitlines())
    assert mapped == shipped.FOLDERS  # one mapping: the install's and the checkout's agree
    installed = (available_psets(), builtin_config_names())

    def not_installed(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    from types import SimpleNamespace
    monkeypatch.setattr(shipped, "resources", SimpleNamespace(files=not_installed))
    assert (available_psets(), builtin_config_names()) == installed
    assert load_pset("paper").name == "paper"
    assert builtin_config_path("quick") == root / "search_runs" / "quick.toml"
