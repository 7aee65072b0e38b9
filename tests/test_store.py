"""The SQLite run store (gp_loss.runs.store): creation, refusal, error cases, transactions."""

import os
import sqlite3

import pytest

from gp_loss.runs.store import SCHEMA_VERSION, STATUSES, RunStore, StoreError, store_path

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


def test_create_refuses_an_existing_run(store, tmp_path):
    with pytest.raises(StoreError, match="resume"):
        RunStore.create(tmp_path / "run", CONFIG)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.sqlite").write_bytes(b"anything")
    with pytest.raises(StoreError, match="already holds a run"):
        RunStore.create(other, CONFIG)


def test_candidates_population_cache_state_and_reports(store):
    a = store.add_candidate("ce", "evaluated", phase="initial", birth=0, key="k", fitness=0.9,
                            sign=1, seconds=2.0, engine_seconds=0.1, result={"val_acc": 0.9},
                            timings={"screen": 0.01})
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
    assert store.candidate(a)["timings"] == {"screen": 0.01}
    assert [r["id"] for r in store.pending()] == [d]
    assert [r["id"] for r in store.top(5)] == [a, b]  # one row per canonical key
    assert [r["id"] for r in store.top(5, distinct=False)] == [a, c, b]
    assert [r["id"] for r in store.top(5, members_only=True)] == [a]
    counts = store.counts()
    assert set(counts) == set(STATUSES)
    assert (counts["evaluated"], counts["reused"], counts["rejected"]) == (2, 1, 3)
    assert store.reason_counts() == {"integrity": 2, "no_y": 1}
    assert store.seconds() == {"surrogate": 3.0, "engine": pytest.approx(0.3), "wall": None}
    store.cache_put("k", a, 0.9, 1, "evaluated")
    store.cache_put("k", c, 0.8, 1, "evaluated")  # worse: ignored
    assert store.cache_get("k")["candidate_id"] == a
    store.cache_put("n", d, None, None, "failed")
    store.cache_put("n", b, 0.1, 1, "evaluated")  # a fitness beats a failure
    assert store.cache_get("n")["candidate_id"] == b and store.cache_get("q") is None
    store.set_state(next_birth=2, phase="evolve")
    store.set_state({"wall_seconds": 12.5})
    assert store.state() == {"next_birth": 2, "phase": "evolve", "wall_seconds": 12.5}
    assert store.get_state("missing", 7) == 7 and store.seconds()["wall"] == 12.5
    store.update_candidate(d, status="failed", reason="nan loss")
    assert store.pending() == [] and store.candidates(status="failed")[0]["reason"] == "nan loss"
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
    """Ranking: fitness, then the lower ``val_nll`` of the result (store.TIE_BREAK), rows
    without one (stores written before it existed) after those with it, then the lower id."""
    from gp_loss.runs.store import RANK_SQL, TIE_BREAK, row_rank_key

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
