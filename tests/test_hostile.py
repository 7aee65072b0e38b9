"""Hostile and malformed input, command by command: one clear line on stderr, exit 2, no
traceback, nothing written and nothing executed.

The matrix: expressions (code injection, NUL bytes, non-ASCII, 100 kB, 5,000-deep nesting,
unknown names, bad arity) on every command that takes one; TOML configs (unknown keys with a
suggestion, wrong types, out-of-range values, missing or broken files) on every command that
takes one; run stores (missing, not SQLite, truncated, a foreign SQLite file, a newer schema,
a failing write, a full disk -- the last two injected, since CI runs as root) on every command
that reads or writes one.
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

import gp_loss.search.evolution as evo
from test_search import use_fake
from gp_loss.cli.app import cli
from gp_loss.config import Config, apply_overrides, config_to_dict
from gp_loss.runs.store import RunStore, StoreError

from test_search import FakeEvaluate

CANARY = "gp_loss_hostile_canary"
INJECTIONS = [
    f"__import__('os').system('touch {CANARY}')",
    f"log(p); open('{CANARY}', 'w')",
    "exec('import os')",
    "p.__class__.__mro__",
    "log(p)\x00neg(y)",
    "log(\u03c0)",  # non-ASCII name
    "neg(mul(y, log(p\u200b)))",  # zero-width space
    "neg(" * 5000 + "p" + ")" * 5000,
    "add(" + "p, " * 50_000 + "p)",  # ~100 kB
    "lambda: 0",
    "log(p, y)",
    "nosuchop(p)",
    "mul(y, log(p)",
    "",
]


@pytest.fixture()
def cli_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        before = sorted(p.name for p in tmp_path.iterdir())
        res = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        res.created = sorted(set(p.name for p in tmp_path.iterdir()) - set(before))
        return res
    return invoke


def assert_refused(res, *needles):
    """Exit 2, exactly one line on stderr naming the problem, no traceback, nothing new."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.output and res.stdout == ""
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert not Path(CANARY).exists()
    assert res.created == [], res.created


# ----------------------------------------------------------------------------- expressions

@pytest.mark.parametrize("expr", INJECTIONS, ids=range(len(INJECTIONS)))
@pytest.mark.parametrize("command", [
    ["simplify", "{e}"], ["check", "{e}"], ["same", "{e}", "ce"], ["same", "ce", "{e}"],
    ["export", "--expr", "{e}", "-o", "out.py"], ["train", "--loss", "{e}", "--seeds", "1"],
    ["compare", "--loss", "{e}", "--seeds", "1"],
    ["search", "--set", "search.seed_with=[{j}]", "--run-dir", "run"],
])
def test_hostile_expressions(cli_run, command, expr):
    args = [a.replace("{e}", expr).replace("{j}", json.dumps(expr)) for a in command]
    assert_refused(cli_run(*args))


# ----------------------------------------------------------------------------- configs

CONFIGS = {
    "unknown key": ("[search]\npopulaton = 5\n", "did you mean 'search.population'"),
    "unknown section": ("[serach]\npopulation = 5\n", "did you mean 'search'"),
    "wrong type": ('[search]\npopulation = "many"\n', "search.population"),
    "bool for int": ("[surrogate]\nsteps = true\n", "surrogate.steps"),
    "population 0": ("[search]\npopulation = 0\n", "search.population"),
    "tournament 0": ("[search]\ntournament = 0\n", "search.tournament"),
    "negative steps": ("[surrogate]\nsteps = -5\n", "surrogate.steps"),
    "bad fraction": ("[surrogate]\nval_fraction = 1.5\n", "surrogate.val_fraction"),
    "nan": ("[surrogate]\nlr = nan\n", "surrogate.lr"),
    "not toml": ("[search\npopulation = 5\n", "invalid TOML"),
    "binary": (b"\xff\xfe\x00garbage", "cannot read"),
    "bad initial surrogate": ("[search]\ninitial_fitness = 'cheap'\n"
                              "[search.initial_surrogate]\nstepz = 3\n",
                              "search.initial_surrogate.steps"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
@pytest.mark.parametrize("command", [
    ["search", "{c}", "--run-dir", "run"], ["train", "--loss", "ce", "--config", "{c}"],
    ["compare", "--loss", "baikal", "--config", "{c}"],
])
def test_hostile_configs(cli_run, tmp_path, command, case):
    text, needle = CONFIGS[case]
    path = tmp_path.parent / f"{tmp_path.name}-config.toml"  # outside the watched folder
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_refused(cli_run(*[a.replace("{c}", str(path)) for a in command]), needle)


@pytest.mark.parametrize("command", [
    ["search", "missing.toml"], ["train", "--loss", "ce", "--config", "missing.toml"],
    ["search", "--set", "search.population"], ["search", "--set", "nosection.key=1"],
    ["search", "--set", "search.population=-1"],
])
def test_missing_config_files_and_bad_overrides(cli_run, command):
    assert_refused(cli_run(*command))


# ----------------------------------------------------------------------------- stores

def _good_store(path: Path) -> Path:
    cfg = apply_overrides(Config(), ["executor.kind=serial"])
    with RunStore.create(path, config_to_dict(cfg)) as store:
        store.add_candidate("neg(mul(y, log(p)))", "evaluated", phase="initial", birth=0,
                            fitness=0.5, sign=1, key="k")
    return path


def _not_sqlite(path: Path):
    path.mkdir()
    (path / "run.sqlite").write_bytes(b"this is not a database\n" * 200)


def _truncated(path: Path):
    _good_store(path)
    db = path / "run.sqlite"
    for extra in ("-wal", "-shm"):
        Path(str(db) + extra).unlink(missing_ok=True)
    db.write_bytes(db.read_bytes()[:1500])


def _foreign(path: Path):
    path.mkdir()
    conn = sqlite3.connect(path / "run.sqlite")
    conn.execute("CREATE TABLE things (a, b)")
    conn.commit()
    conn.close()


def _newer(path: Path):
    _good_store(path)
    conn = sqlite3.connect(path / "run.sqlite")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()


STORES = {"missing": (lambda p: None, "no gp-loss run"),
          "not sqlite": (_not_sqlite, "not a gp-loss run store"),
          "truncated": (_truncated, "run.sqlite"),
          "foreign": (_foreign, "not a gp-loss run store"),
          "newer": (_newer, "newer than this gp-loss")}


@pytest.mark.parametrize("case", sorted(STORES))
@pytest.mark.parametrize("command", [
    ["show", "{r}"], ["show", "{r}", "--json"], ["resume", "{r}"], ["eliminate", "{r}"],
    ["export", "{r}", "--top", "2", "-o", "x.py"], ["plot", "{r}", "-o", "plots"],
    ["compare", "--from-run", "{r}", "--seeds", "1"],
])
def test_hostile_stores(cli_run, tmp_path, command, case):
    make, needle = STORES[case]
    run_dir = tmp_path.parent / f"{tmp_path.name}-run"  # outside the watched folder
    make(run_dir)
    before = _files(run_dir)
    assert_refused(cli_run(*[a.replace("{r}", str(run_dir)) for a in command]), needle)
    assert _files(run_dir) == before


def _files(run_dir: Path):
    """Names and contents, leaving out SQLite's own -wal/-shm side files (a reader of a WAL
    database creates them) and the writer's lock file."""
    if not run_dir.exists():
        return None
    return {p.name: p.read_bytes() for p in run_dir.iterdir()
            if not p.name.endswith(("-wal", "-shm")) and p.name != "run.lock"}


# ----------------------------------------------------------------------------- failing writes

class FailingConnection:
    """Wraps the store's sqlite3 connection; writes fail after ``ok_writes`` of them."""

    def __init__(self, conn, ok_writes: int, message: str):
        self._conn, self.left, self.message = conn, ok_writes, message

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "REPLACE")):
            self.left -= 1
            if self.left < 0:
                raise sqlite3.OperationalError(self.message)
        return self._conn.execute(sql, *args)

    def executemany(self, sql, *args):
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


@pytest.mark.parametrize("message", ["database or disk is full", "disk I/O error"])
def test_a_failing_write_stops_the_search_cleanly_and_resume_continues(
        cli_run, tmp_path, monkeypatch, message):
    use_fake(monkeypatch, FakeEvaluate())
    sets = ["--set", "executor.kind=serial", "--set", "search.initial=4", "--set",
            "search.population=2", "--set", "search.tournament=2", "--set",
            "search.children=6", "--set", 'search.reference=[]',
            "--set", "executor.candidates_per_worker=1"]  # results land one by one
    good = tmp_path.parent / f"{tmp_path.name}-good"
    assert CliRunner().invoke(cli, ["-q", "search", "--run-dir", str(good), *sets]
                              ).exit_code == 0
    opened = RunStore.open.__func__

    def failing_open(cls, run_dir, readonly=False):
        store = opened(cls, run_dir, readonly)
        if not readonly:
            store._conn = FailingConnection(store._conn, 40, message)
        return store
    monkeypatch.setattr(RunStore, "open", classmethod(failing_open))
    run_dir = tmp_path.parent / f"{tmp_path.name}-run"
    res = cli_run("-q", "search", "--run-dir", run_dir, *sets)
    assert_refused(res, "cannot write the run store", message, "gp-loss resume")
    monkeypatch.setattr(RunStore, "open", classmethod(opened))
    with RunStore.open(run_dir, readonly=True) as store:  # intact up to the failed step
        done = [r for r in store.candidates() if r["status"] == "evaluated"]
    assert done
    res = CliRunner().invoke(cli, ["-q", "resume", str(run_dir)])
    assert res.exit_code == 0, res.output
    with RunStore.open(run_dir, readonly=True) as a, RunStore.open(good, readonly=True) as b:
        key = ("phase", "birth", "expr", "status", "fitness")
        assert [tuple(r[k] for k in key) for r in a.candidates()] == \
            [tuple(r[k] for k in key) for r in b.candidates()]


def test_store_write_errors_are_store_errors(tmp_path):
    store = RunStore.create(tmp_path / "run", {})
    store._conn = FailingConnection(store._conn, 0, "database or disk is full")
    with pytest.raises(StoreError, match="cannot write the run store .*disk is full"):
        store.add_candidate("p", "evaluated")
    store._conn = store._conn._conn
    assert store.candidates() == []
    store.close()
    assert os.path.exists(tmp_path / "run" / "run.sqlite")


@pytest.mark.parametrize("command", [["resume", "{r}"], ["eliminate", "{r}"]])
def test_a_second_writer_on_a_run_is_refused(cli_run, tmp_path, command):
    run_dir = _good_store(tmp_path.parent / f"{tmp_path.name}-run")
    with RunStore.open(run_dir):  # a search holding the run
        before = _files(run_dir)
        res = cli_run(*[a.replace("{r}", str(run_dir)) for a in command])
        assert_refused(res, "in use by another gp-loss process", f"pid {os.getpid()}")
        assert _files(run_dir) == before
