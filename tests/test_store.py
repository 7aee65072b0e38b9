"""The SQLite run store (gp_loss.runs.store): creation, refusal, error cases, transactions."""

import hashlib
import inspect
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from gp_loss.runs.schema import SCHEMA_VERSION, STATUSES
from gp_loss.runs.store import RunStore, StoreError, store_path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "results" / "mnist5k" / "run"  # a version-1 store: never written by a test

CONFIG = {"search": {"population": 3}, "surrogate": {"steps": 5}}


@pytest.fixture
def store(tmp_path):
    with RunStore.create(tmp_path / "run", CONFIG, {"device": "cpu"}) as s:
        yield s


def test_create_records_config_and_environment(store, tmp_path):
    assert store.path == store_path(tmp_path / "run") and store.path.name == "run.sqlite"
    meta = store.meta()
    assert store.config() == CONFIG and meta["device"] == "cpu"
    assert meta["application"] == "gp-loss" and meta["schema_version"] == SCHEMA_VERSION
    for key in ("python", "torch", "git_commit", "gp_loss_version", "created"):
        assert key in meta
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_store_records_the_commit_of_the_checkout_it_runs_from(store):
    import subprocess
    from pathlib import Path

    import gp_loss
    repo = Path(gp_loss.__file__).resolve().parents[1]
    try:
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True).stdout.strip()
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not running from a git checkout")
    if Path(top).resolve() != repo:
        pytest.skip("the package is not at the top of a git work tree")
    assert store.meta()["git_commit"] == head
    assert store.meta()["git_dirty"] in (True, False)


def test_create_refuses_an_existing_run(store, tmp_path):
    with pytest.raises(StoreError, match="resume"):
        RunStore.create(tmp_path / "run", CONFIG)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.sqlite").write_bytes(b"anything")
    with pytest.raises(StoreError, match="already holds a run"):
        RunStore.create(other, CONFIG)


def test_candidates_population_state_and_reports(store):
    a = store.add_candidate("ce", "evaluated", phase="initial", birth=0, key="k", fitness=0.9,
                            sign=1, seconds=2.0, engine_seconds=0.1, result={"val_acc": 0.9})
    b = store.add_candidate("mse", "evaluated", phase="initial", birth=1, key="m", fitness=0.5,
                            sign=1, seconds=1.0)
    c = store.add_candidate("neg(ce)", "reused", birth=0, key="k", fitness=0.9, parent_id=a,
                            mutation="node")
    store.add_candidate("x", "rejected", birth=1, reason="integrity", engine_seconds=0.2)
    store.add_candidate("y", "rejected", birth=1, reason="integrity")
    store.add_candidate("z", "rejected", birth=1, reason="no_y")
    d = store.add_candidate("w", "pending", birth=1, parent_id=a, mutation="subtree")
    store.replace_population([(a, 0), (b, 0)])
    store.add_member(c, 1)
    store.remove_member(b)
    assert [m["id"] for m in store.population()] == [a, c]
    assert store.population()[1]["age_order"] == 1
    assert store.candidate(a)["result"] == {"val_acc": 0.9}
    assert [r["id"] for r in store.candidates(status="pending")] == [d]
    assert [r["id"] for r in store.top(5)] == [a, b]  # one row per canonical key
    assert [r["id"] for r in store.top(5, distinct=False)] == [a, c, b]
    counts = store.counts()
    assert set(counts) == set(STATUSES)
    assert (counts["evaluated"], counts["reused"], counts["rejected"]) == (2, 1, 3)
    assert store.reason_counts() == {"integrity": 2, "no_y": 1}
    assert store.seconds() == {"surrogate": 3.0, "engine": pytest.approx(0.3), "wall": None}
    store.set_state(next_birth=2, phase="evolve")
    store.set_state({"wall_seconds": 12.5})
    assert store.state() == {"next_birth": 2, "phase": "evolve", "wall_seconds": 12.5}
    assert store.get_state("missing", 7) == 7 and store.seconds()["wall"] == 12.5
    store.update_candidate(d, status="failed", reason="nan loss")
    assert store.candidates(status="pending") == [] and store.candidates(status="failed")[0]["reason"] == "nan loss"
    with pytest.raises(sqlite3.IntegrityError):
        store.add_candidate("bad", "no-such-status")


def test_transaction_is_atomic(store, tmp_path):
    a = store.add_candidate("ce", "pending", birth=0)
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.update_candidate(a, status="evaluated", fitness=0.7)
            store.add_member(a, 3)
            store.set_state(next_birth=1)
            raise RuntimeError("killed mid-step")
    assert store.candidate(a)["status"] == "pending"
    assert store.population() == [] and store.state() == {}
    # An inner failure inside an outer transaction undoes only the inner part.
    with store.transaction():
        store.set_state(outer=1)
        with pytest.raises(KeyError):
            with store.transaction():
                store.set_state(inner=1)
                store.remove_member(a)  # not a member: KeyError
    assert store.state() == {"outer": 1}
    # Another connection sees nothing until the commit.
    with store.transaction():
        store.set_state(visible=True)
        with RunStore.open(tmp_path / "run", readonly=True) as reader:
            assert reader.get_state("visible") is None
    with RunStore.open(tmp_path / "run", readonly=True) as reader:
        assert reader.get_state("visible") is True


def test_readonly_open_cannot_write(store, tmp_path):
    store.add_candidate("ce", "evaluated", fitness=0.5)
    store.close()
    with RunStore.open(tmp_path / "run", readonly=True) as reader:
        assert len(reader.candidates()) == 1 and reader.config() == CONFIG
        with pytest.raises(StoreError, match="read-only"):
            reader.set_state(a=1)
        with pytest.raises(sqlite3.OperationalError):
            reader._conn.execute("INSERT INTO state(key, value) VALUES ('a', '1')")


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="no gp-loss run"):
        RunStore.open(tmp_path / "nothing")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "run.sqlite").write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="not a gp-loss run store"):
        RunStore.open(corrupt)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    conn = sqlite3.connect(foreign / "run.sqlite")
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a gp-loss run store"):
        RunStore.open(foreign, readonly=True)
    with pytest.raises(StoreError, match="not a gp-loss run store"):
        RunStore.open(foreign)
    # A real header followed by garbage: SQLite itself reports the damage.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    with pytest.raises(StoreError, match="run.sqlite"):
        RunStore.open(damaged)


def test_newer_schema_is_refused(store, tmp_path):
    store._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store.close()
    with pytest.raises(StoreError, match="newer"):
        RunStore.open(tmp_path / "run")
    with pytest.raises(StoreError, match="newer"):
        RunStore.open(tmp_path / "run", readonly=True)


def test_one_writer_per_run_directory(tmp_path):
    """A second writer (a second `gp-loss search`/`resume` on the same directory) is refused
    with a clear message; readers are not; the lock goes with the writer."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    writer = RunStore.create(run_dir, {"search": {}})
    with pytest.raises(StoreError, match="in use by another gp-loss process"):
        RunStore.open(run_dir)
    RunStore.open(run_dir, readonly=True).close()
    code = ("import sys; from gp_loss.runs.store import RunStore, StoreError\n"
            "try:\n    RunStore.open(sys.argv[1])\nexcept StoreError as e:\n"
            "    print(e); sys.exit(7)\n")
    other = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True,
                           text=True)
    assert other.returncode == 7 and f"(pid {os.getpid()})" in other.stdout
    writer.close()
    RunStore.open(run_dir).close()  # released on close
    # a writer killed with SIGKILL leaves no stale lock
    hold = subprocess.Popen([sys.executable, "-c", "import sys, time; from gp_loss.runs.store import "
                             "RunStore; s = RunStore.open(sys.argv[1]); print('ok', flush=True);"
                             " time.sleep(60)", str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert hold.stdout.readline().strip() == "ok"
    with pytest.raises(StoreError):
        RunStore.open(run_dir)
    hold.kill()
    hold.wait()
    RunStore.open(run_dir).close()


def test_top_breaks_fitness_ties_by_the_lower_validation_nll(store):
    """Ranking: fitness, then the lower ``val_nll`` of the result (ranking.TIE_BREAK), rows
    without one (stores written before it existed) after those with it, then the lower id."""
    from gp_loss.runs.ranking import RANK_SQL, TIE_BREAK, row_rank_key

    assert TIE_BREAK == "val_nll" and "json_extract" in RANK_SQL
    old = store.add_candidate("a", "evaluated", key="a", fitness=0.9)  # no result at all
    no_nll = store.add_candidate("b", "evaluated", key="b", fitness=0.9, result={"val_acc": 0.9})
    high = store.add_candidate("c", "evaluated", key="c", fitness=0.9, result={"val_nll": 0.4})
    low = store.add_candidate("d", "evaluated", key="d", fitness=0.9, result={"val_nll": 0.2})
    better = store.add_candidate("e", "evaluated", key="e", fitness=0.95,
                                 result={"val_nll": 9.0})
    nan = store.add_candidate("f", "evaluated", key="f", fitness=0.1,
                              result={"val_nll": float("nan")})  # not JSON SQLite reads
    dup = store.add_candidate("g", "reused", key="d", fitness=0.9, result={"val_nll": 0.1})
    want = [better, dup, high, old, no_nll, nan]  # dup is key d's best row (lower NLL than d)
    assert [r["id"] for r in store.top(10)] == want
    assert [r["id"] for r in store.top(10, distinct=False)] == [better, dup, low, high, old,
                                                                no_nll, nan]
    rows = store.candidates()
    assert [r["id"] for r in sorted(rows, key=row_rank_key)][:5] == [better, dup, low, high, old]


# ------------------------------------------------------------------ schema 1 -> 2 (issue 13)

# The version-1 schema as gp-loss wrote it (``store._SCHEMA`` at SCHEMA_VERSION 1, now ``schema.SCHEMA`` at 2), verbatim: a
# ``fitness_cache`` table nothing read and three candidate columns nothing wrote.
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- JSON values
CREATE TABLE candidates (              -- every proposal and candidate, in creation order
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    phase TEXT NOT NULL DEFAULT 'child',  -- 'initial' | 'child' | 'reference' | ...
    birth INTEGER,                     -- number within its phase (a child's birth number)
    expr TEXT NOT NULL, formula TEXT, key TEXT,  -- key: canonical key
    parent_id INTEGER REFERENCES candidates(id), mutation TEXT,
    status TEXT NOT NULL CHECK (status IN ('evaluated', 'reused', 'failed', 'rejected',
                                           'duplicate', 'near_duplicate', 'pending')),
    reason TEXT,                       -- why rejected / failed
    fitness REAL, sign INTEGER,
    seconds REAL,                      -- surrogate training seconds (in the worker)
    engine_seconds REAL,               -- driver seconds: generate, screen, dedup, store
    timings TEXT,                      -- JSON: stage -> seconds
    result_json TEXT,                  -- JSON: what the evaluation returned
    fingerprint BLOB,                  -- gradient fingerprint, so resume need not recompute
    created REAL NOT NULL              -- unix time
);
CREATE INDEX candidates_status ON candidates(status, reason);
CREATE INDEX candidates_key ON candidates(key);
CREATE INDEX candidates_birth ON candidates(phase, birth);
CREATE TABLE population (              -- lower age_order = older; equal = equally old
    candidate_id INTEGER PRIMARY KEY REFERENCES candidates(id),
    age_order INTEGER NOT NULL
);
CREATE TABLE fitness_cache (           -- canonical key -> best stored result
    key TEXT PRIMARY KEY, candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    fitness REAL, sign INTEGER, status TEXT NOT NULL
);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- the loop's; JSON values
"""
V1_DEAD_COLUMNS = {"formula", "timings", "fingerprint"}


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _schema(run_dir) -> tuple[int, set, set, str]:
    """(user_version, table names, candidates columns, meta schema_version), read without
    writing (``immutable``)."""
    uri = f"{store_path(run_dir).resolve().as_uri()}?immutable=1"
    conn = sqlite3.connect(uri, uri=True)
    try:
        return (conn.execute("PRAGMA user_version").fetchone()[0],
                {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")},
                {r[1] for r in conn.execute("PRAGMA table_info(candidates)")},
                conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    finally:
        conn.close()


def _as_version_1(src_dir, dst_dir) -> None:
    """Write the rows of the (closed) store in ``src_dir`` into a new version-1 store in
    ``dst_dir``, as a gp-loss of SCHEMA_VERSION 1 would have stored them."""
    dst_dir.mkdir(parents=True)
    conn = sqlite3.connect(store_path(dst_dir), isolation_level=None)
    try:
        conn.executescript(V1_SCHEMA)
        conn.execute("ATTACH DATABASE ? AS src", (str(store_path(src_dir)),))
        conn.execute("BEGIN")
        cols = [r[1] for r in conn.execute("PRAGMA src.table_info(candidates)")
                if r[1] not in V1_DEAD_COLUMNS]  # never written: NULL in version 1 too
        for table, names in (("meta", ["key", "value"]), ("candidates", cols),
                             ("population", ["candidate_id", "age_order"]),
                             ("state", ["key", "value"])):
            conn.execute(f"INSERT INTO main.{table}({', '.join(names)}) "
                         f"SELECT {', '.join(names)} FROM src.{table}")
        conn.execute("UPDATE main.meta SET value = '1' WHERE key = 'schema_version'")
        conn.execute("PRAGMA main.user_version = 1")
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE src")
        conn.execute("PRAGMA journal_mode = WAL")  # as every store a writer opened
    finally:
        conn.close()


def test_the_dead_weight_is_gone(store):
    """No fitness_cache table (the shared cache is search/cache.py's own file), no
    formula/timings/fingerprint columns, no cache_get/cache_put, no top(members_only=)."""
    assert SCHEMA_VERSION == 2
    assert not hasattr(RunStore, "cache_get") and not hasattr(RunStore, "cache_put")
    assert "members_only" not in inspect.signature(RunStore.top).parameters
    version, tables, columns, _ = _schema(store.run_dir)
    assert version == 2 and "fitness_cache" not in tables
    assert not V1_DEAD_COLUMNS & columns and {"expr", "key", "result_json"} <= columns
    for dead in V1_DEAD_COLUMNS:
        with pytest.raises(TypeError, match="unknown candidate field"):
            store.add_candidate("ce", "evaluated", **{dead: "x"})
    cid = store.add_candidate("ce", "evaluated", fitness=0.5)
    assert not V1_DEAD_COLUMNS & set(store.candidate(cid))


def test_a_version_1_run_is_read_as_it_is_then_migrated_with_the_same_show_and_export(
        tmp_path):
    """The shipped mnist5k run is a version-1 store. Read-only (show, export) it is read as
    it is and not written; opened for writing (a copy), it becomes version 2 in place, and
    show, show --json and export print what they print for the original."""
    from gp_loss.cli.app import cli

    before = _digest(store_path(SHIPPED))
    assert _schema(SHIPPED)[0] == 1  # the fixture this test is about
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copyfile(store_path(SHIPPED), store_path(copy))
    runner = CliRunner()

    def outputs(run_dir):
        out = []
        for args in (["show", run_dir], ["show", run_dir, "--json"],
                     ["export", run_dir, "--top", "3", "--format", "python", "-o", "-"]):
            result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            out.append(result.stdout.replace(str(Path(run_dir).resolve()), "RUN_DIR")
                       .replace(str(run_dir), "RUN_DIR"))
        return out

    want = outputs(SHIPPED)
    with RunStore.open(copy, readonly=True) as reader:  # read-only: no migration, no write
        rows = reader.candidates()
        assert len(rows) > 1000 and not V1_DEAD_COLUMNS & set(rows[0])
    assert _schema(copy)[0] == 1 and _digest(store_path(copy)) == before
    with RunStore.open(copy) as writer:  # for writing: migrated, in place
        assert writer.meta()["schema_version"] == 2
        assert [m["from"] for m in writer.meta()["migrations"]] == [1]
        assert writer.candidates() == rows
    version, tables, columns, meta_version = _schema(copy)
    assert (version, meta_version) == (2, "2") and "fitness_cache" not in tables
    assert not V1_DEAD_COLUMNS & columns
    RunStore.open(copy).close()  # a second open finds nothing to do
    assert outputs(copy) == want
    assert _digest(store_path(SHIPPED)) == before  # the shipped store was only read


def test_a_version_1_run_resumes_and_ends_as_the_uninterrupted_run(tmp_path, monkeypatch):
    """A search interrupted under schema 1 (its rows written into the version-1 DDL) is
    resumed by this gp-loss: the store is migrated, the pending evaluation re-submitted, and
    the run ends with the same candidates and population as one never interrupted."""
    import gp_loss.search.evolution as evo
    from test_search import use_fake
    from gp_loss.config import Config, apply_overrides

    class Fake:  # deterministic fitness from the expression; Ctrl-C on call ``stop``
        def __init__(self, stop=None):
            self.stop, self.calls = stop, 0

        def __call__(self, expr, pset_name, eval_config, seed=0, sign=1, with_test=False):
            self.calls += 1
            if self.calls == self.stop:
                raise KeyboardInterrupt
            u = int(hashlib.sha256(expr.encode()).hexdigest()[:8], 16) / 16**8
            return {"status": "ok", "reason": None, "fitness": round(u, 2), "steps": 10,
                    "seconds": 0.0}

    cfg = apply_overrides(Config(), ["executor.kind=serial", "search.initial=4",
                                     "search.population=3", "search.tournament=2",
                                     "search.children=6", "surrogate.steps=10",
                                     "executor.candidates_per_worker=1"])  # before packs

    def run(run_dir, fake):
        use_fake(monkeypatch, fake)
        with RunStore.open(run_dir) as s:
            return evo.Evolution(s, cfg).run()["stop_reason"]

    def table(run_dir):
        fields = ("id", "phase", "birth", "expr", "key", "status", "reason", "fitness", "sign",
                  "parent_id", "mutation")
        with RunStore.open(run_dir, readonly=True) as s:
            return ([tuple(r[k] for k in fields) for r in s.candidates()],
                    [(r["id"], r["age_order"]) for r in s.population()],
                    {k: s.get_state(k) for k in ("phase", "children_done", "next_birth")})

    evo.start_run(tmp_path / "whole", cfg).close()
    assert run(tmp_path / "whole", Fake()) == "finished"
    evo.start_run(tmp_path / "cut", cfg).close()
    assert run(tmp_path / "cut", Fake(stop=7)) == "interrupted"  # during evolution
    old = tmp_path / "old"
    _as_version_1(tmp_path / "cut", old)
    assert _schema(old)[:2] == (1, {"meta", "candidates", "population", "fitness_cache",
                                    "state", "sqlite_sequence"})
    with RunStore.open(old, readonly=True) as reader:
        pending = reader.candidates(status="pending")
        assert len(pending) == 1 and reader.get_state("phase") == "evolve"
    assert _schema(old)[0] == 1  # reading wrote nothing
    assert run(old, Fake()) == "finished"
    assert table(old) == table(tmp_path / "whole")
    version, tables, columns, _ = _schema(old)
    assert version == 2 and "fitness_cache" not in tables and not V1_DEAD_COLUMNS & columns
    with RunStore.open(old) as s:  # and it takes new rows
        cid = s.add_candidate("ce", "rejected", reason="test")
        assert s.candidate(cid)["expr"] == "ce" and cid == max(r["id"] for r in s.candidates())


def test_a_failed_migration_leaves_the_version_1_store_as_it_was(tmp_path, monkeypatch):
    """All the migration's steps are one transaction: an error half-way leaves version 1."""
    import gp_loss.runs.schema as schema_mod

    with RunStore.create(tmp_path / "new", CONFIG) as s:
        s.add_candidate("ce", "evaluated", fitness=0.5)
    _as_version_1(tmp_path / "new", tmp_path / "old")
    before = _schema(tmp_path / "old")

    def broken(conn):
        conn.execute("DROP TABLE fitness_cache")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setitem(schema_mod.MIGRATIONS, 1, broken)
    with pytest.raises(StoreError, match="cannot migrate .* from store schema 1 to 2.*"
                                         "disk I/O error.*unchanged"):
        RunStore.open(tmp_path / "old")
    assert _schema(tmp_path / "old") == before and before[0] == 1
    monkeypatch.undo()
    with RunStore.open(tmp_path / "old") as s:  # not locked out: the writer lock went too
        assert [r["expr"] for r in s.candidates()] == ["ce"]
    assert _schema(tmp_path / "old")[0] == 2
