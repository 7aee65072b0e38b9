"""The SQLite run store, ``RUN_DIR/run.sqlite`` (stdlib sqlite3, WAL).

Fed by the driver process (the only writer: the evolution loop or ``eliminate``, never a worker);
read by ``show`` / ``plot`` / ``export`` through read-only connections. It holds the resolved
config and the environment (``meta``), every proposal and candidate (``candidates``), the
population membership (``population``) and the loop's resumable counters (``state``). Results
shared between runs live elsewhere, in the fitness cache file (``search/cache.py``). A new
store's ``meta`` starts with ``provenance.environment()``; opening one for writing takes the
run's writer lock (``lock.py``: one writer per run).

Atomicity: group the writes of one step in ``with store.transaction():`` — e.g. "child N
evaluated + population updated + counters advanced" — and a SIGKILL at any moment leaves either
the state before or the state after. Evaluations in flight are rows with status ``pending``;
resume re-submits exactly those.

The file format (tables, columns, ``SCHEMA_VERSION``, the steps from older versions) is
``schema.py``'s. A store of an older version is read as it is when opened read-only (nothing is
written) and brought to ``SCHEMA_VERSION`` in place, in one transaction, when opened for
writing; a newer one is refused. Rows come back as dicts with the column names
(``schema.decode``: ``result_json`` decoded as ``result``); population rows carry ``age_order``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from . import lock, schema
from .provenance import environment, package_version
from .ranking import RANK_SQL
from .schema import SCHEMA_VERSION, SQLITE_MAGIC, STATUSES

STORE_NAME = "run.sqlite"
SEARCH_PHASES = ("initial", "child")  # rows the search itself proposed (vs reference, elimN)

class StoreError(RuntimeError):
    """The run store is missing, not ours, corrupt, too new, already there, or read-only."""


def store_path(run_dir: str | os.PathLike) -> Path:
    """Where the store of ``run_dir`` lives."""
    return Path(run_dir) / STORE_NAME


class RunStore:
    """One run store; use ``RunStore.create`` or ``RunStore.open``, close it (or use ``with``)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool, lock_fd=None):
        self._conn = conn
        self.path = path
        self.run_dir = path.parent
        self.readonly = readonly
        self._depth = 0
        self._lock = lock_fd  # the writer's lock file descriptor (None: read-only)

    # -- opening -------------------------------------------------------------------------

    @staticmethod
    def exists(run_dir: str | os.PathLike) -> bool:
        """True when ``run_dir`` already holds a store file (ours or not)."""
        return store_path(run_dir).exists()

    @staticmethod
    def writer_active(run_dir: str | os.PathLike) -> bool:
        """True while a process holds the run's writer lock (a search, resume or eliminate is
        running on it): ``lock.held``; ``show`` calls it once per invocation."""
        return lock.held(run_dir)

    @classmethod
    def create(cls, run_dir: str | os.PathLike, config: Mapping, meta: Mapping | None = None
               ) -> "RunStore":
        """Create a new store in ``run_dir`` (made if needed); refuses if one is already there."""
        path = store_path(run_dir)
        if path.exists():
            raise StoreError(f"{run_dir} already holds a run; continue it with "
                             f"`gp-loss resume {run_dir}` or choose another --run-dir")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create run directory {run_dir}: {exc}") from None
        # Build the file aside and link it into place, so a crash never leaves a half-made
        # store under the real name and two concurrent creators cannot both succeed.
        tmp = path.with_name(f".{STORE_NAME}.creating-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            schema.initialise(conn, {**environment(), **(meta or {}), "config": dict(config)})
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise StoreError(f"{run_dir} already holds a run; continue it with "
                             f"`gp-loss resume {run_dir}`") from None
        except OSError:  # no hard links on this filesystem: a plain rename will do
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return cls.open(run_dir)

    @classmethod
    def open(cls, run_dir: str | os.PathLike, readonly: bool = False) -> "RunStore":
        """Open an existing store; a missing, foreign, corrupt or newer store is a StoreError."""
        path = store_path(run_dir)
        if not path.is_file():
            raise StoreError(f"no gp-loss run in {run_dir} ({STORE_NAME} not found)")
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        if head != SQLITE_MAGIC:
            raise StoreError(f"{path} is not a gp-loss run store (not an SQLite database, "
                             f"or corrupt)")
        try:
            lock_fd = None if readonly else lock.acquire(path.parent)
        except lock.LockError as exc:
            raise StoreError(str(exc)) from None
        target = f"{path.resolve().as_uri()}?mode={'ro' if readonly else 'rw'}"
        conn = sqlite3.connect(target, uri=True, isolation_level=None)
        try:
            cls._check(conn, path)
            if readonly:
                conn.execute("PRAGMA query_only = 1")
            else:
                # WAL: readers never block the driver. synchronous=NORMAL survives a killed
                # process (only a power cut can drop the last commits, never corrupt).
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
                cls._migrate(conn, path)
            conn.execute("SELECT count(*) FROM candidates").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            lock.release(lock_fd)
            raise StoreError(f"{path} is corrupt or unreadable: {exc}") from None
        except StoreError:
            conn.close()
            lock.release(lock_fd)
            raise
        return cls(conn, path, readonly, lock_fd)

    @staticmethod
    def _check(conn: sqlite3.Connection, path: Path) -> None:
        """Raise StoreError unless the file is a gp-loss store of a version we read."""
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        problem = schema.check(conn, path)
        if problem is not None:
            raise StoreError(problem)

    @staticmethod
    def _migrate(conn: sqlite3.Connection, path: Path) -> None:
        """Bring an older store (checked by ``_check``) to ``SCHEMA_VERSION`` in place, all
        steps (``schema.migrate``) in one transaction: a failure or a kill leaves it as it was."""
        start = schema.user_version(conn)
        if start >= SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            schema.migrate(conn, package_version("gp-loss"))  # reads the version again, locked
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot migrate {path} from store schema {start} to "
                                 f"{SCHEMA_VERSION}: {exc}; the store is unchanged") from None
            raise

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        lock.release(self._lock)
        self._lock = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transactions --------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator["RunStore"]:
        """All writes inside commit together or not at all; nests (inner = savepoint)."""
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")
        outer, name = self._depth == 0, f"sp{self._depth}"
        try:
            self._conn.execute("BEGIN IMMEDIATE" if outer else f"SAVEPOINT {name}")
        except sqlite3.Error as exc:
            raise self._write_error(exc) from None
        self._depth += 1
        try:
            yield self
            self._conn.execute("COMMIT" if outer else f"RELEASE {name}")
        except BaseException as exc:
            try:
                if not outer:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                elif self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back already (e.g. a full disk): nothing was written
            if outer and isinstance(exc, sqlite3.Error) and not isinstance(
                    exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError,
                          sqlite3.InterfaceError)):  # those are bugs, not the disk
                raise self._write_error(exc) from None
            raise
        finally:
            self._depth -= 1

    def _write_error(self, exc: sqlite3.Error) -> StoreError:
        """A failed write (full disk, I/O error, locked): one line; the step is not stored, the
        steps before it are, so ``resume`` continues once the cause is fixed."""
        return StoreError(f"cannot write the run store {self.path}: {exc}; this step was not "
                          f"stored, the ones before are -- fix the cause, then "
                          f"`gp-loss resume {self.run_dir}`")

    def _write(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        with self.transaction():
            return self._conn.execute(sql, params)

    # -- meta and state ------------------------------------------------------------------

    def meta(self) -> dict:
        """Every meta entry (config, versions, device, created, ...), JSON-decoded."""
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}

    def config(self) -> dict:
        """The resolved config recorded at creation (feed it to config.config_from_dict). A
        run stored before packs existed trained every candidate alone: its config reads
        ``executor.candidates_per_worker = 1``, so it resumes and re-tests as it ran."""
        cfg = self.meta()["config"]
        executor = cfg.get("executor")
        if isinstance(executor, dict) and "candidates_per_worker" not in executor:
            cfg = {**cfg, "executor": {**executor, "candidates_per_worker": 1}}
        return cfg

    def set_meta(self, key: str, value: Any) -> None:
        """Set one meta entry (JSON-encodable value)."""
        self._write("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    (key, json.dumps(value, sort_keys=True)))

    def get_state(self, key: str, default: Any = None) -> Any:
        """One value of the loop's resumable state, or ``default``."""
        row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def state(self) -> dict:
        """The whole resumable state as a dict."""
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM state")}

    def set_state(self, values: Mapping[str, Any] | None = None, **kw: Any) -> None:
        """Set state entries (JSON-encodable values) in one transaction."""
        items = {**(values or {}), **kw}
        with self.transaction():
            self._conn.executemany("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                                   [(k, json.dumps(v)) for k, v in items.items()])

    # -- candidates ----------------------------------------------------------------------

    def add_candidate(self, expr: str, status: str, **fields: Any) -> int:
        """Insert a proposal/candidate row; returns its id (fields: see the schema)."""
        fields.setdefault("created", time.time())
        cols, vals = ["expr", "status"], [expr, status]
        for name, value in fields.items():
            col, val = schema.encode(name, value)
            cols.append(col)
            vals.append(val)
        cur = self._write(f"INSERT INTO candidates({', '.join(cols)}) "
                          f"VALUES ({', '.join('?' * len(cols))})", vals)
        return cur.lastrowid

    def update_candidate(self, candidate_id: int, **fields: Any) -> None:
        """Change fields of a row (e.g. pending -> evaluated with fitness and result)."""
        if not fields:
            return
        pairs = [schema.encode(name, value) for name, value in fields.items()]
        cur = self._write(f"UPDATE candidates SET {', '.join(f'{c} = ?' for c, _ in pairs)} "
                          f"WHERE id = ?", [v for _, v in pairs] + [candidate_id])
        if cur.rowcount != 1:
            raise KeyError(f"no candidate {candidate_id}")

    def candidate(self, candidate_id: int) -> dict | None:
        """One row by id, or None."""
        return schema.decode(self._conn.execute("SELECT * FROM candidates WHERE id = ?",
                                       (candidate_id,)).fetchone())

    def candidates(self, status: str | None = None, phase: str | None = None) -> list[dict]:
        """Rows in id order, optionally filtered by status and/or phase."""
        sql = ("SELECT * FROM candidates WHERE (?1 IS NULL OR status = ?1) "
               "AND (?2 IS NULL OR phase = ?2) ORDER BY id")
        return [schema.decode(r) for r in self._conn.execute(sql, (status, phase))]

    # -- population ----------------------------------------------------------------------

    def add_member(self, candidate_id: int, age_order: int) -> None:
        """Put a candidate in the population (lower age_order = older)."""
        self._write("INSERT INTO population(candidate_id, age_order) VALUES (?, ?)",
                    (candidate_id, age_order))

    def remove_member(self, candidate_id: int) -> None:
        """Take a candidate out of the population."""
        cur = self._write("DELETE FROM population WHERE candidate_id = ?", (candidate_id,))
        if cur.rowcount != 1:
            raise KeyError(f"candidate {candidate_id} is not a population member")

    def replace_population(self, members: list[tuple[int, int]]) -> None:
        """Set the whole population at once: (candidate_id, age_order) pairs."""
        with self.transaction():
            self._conn.execute("DELETE FROM population")
            self._conn.executemany(
                "INSERT INTO population(candidate_id, age_order) VALUES (?, ?)", members)

    def population(self) -> list[dict]:
        """Member rows (with ``age_order``), oldest first, ties by id."""
        sql = ("SELECT c.*, p.age_order FROM population p JOIN candidates c "
               "ON c.id = p.candidate_id ORDER BY p.age_order, c.id")
        return [schema.decode(r) for r in self._conn.execute(sql)]

    # -- reading for show / plot / export ------------------------------------------------

    def top(self, k: int = 10, distinct: bool = True, phases: tuple = SEARCH_PHASES
            ) -> list[dict]:
        """Best candidates with a fitness, best first (``RANK_SQL``: ties by the lower
        validation NLL, then the earliest id); ``distinct`` keeps one row per canonical key;
        ``phases``: which rows compete (the search's own by default, not references or
        elimination re-runs)."""
        source = "SELECT * FROM candidates c"
        source += " WHERE c.fitness IS NOT NULL AND c.status IN ('evaluated', 'reused')"
        source += f" AND c.phase IN ({', '.join(repr(p) for p in phases)})"
        if distinct:
            sql = (f"SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY "
                   f"COALESCE(key, 'id:' || id) ORDER BY {RANK_SQL}) AS rank_in_key "
                   f"FROM ({source})) WHERE rank_in_key = 1 ORDER BY {RANK_SQL} LIMIT ?")
        else:
            sql = f"SELECT * FROM ({source}) ORDER BY {RANK_SQL} LIMIT ?"
        rows = [schema.decode(r) for r in self._conn.execute(sql, (k,))]
        for r in rows:
            r.pop("rank_in_key", None)
        return rows

    def best(self, k: int = 10) -> list[dict]:
        """The run's best ``k``: its elimination's finalists when one finished (rows carry
        ``elimination_score``), else its best distinct search candidates (``top``)."""
        return self.finalists(k) or self.top(k)

    def finalists(self, k: int = 10) -> list[dict]:
        """The final ranking of the run's finished elimination (``eliminate`` stores it), best
        first, as candidate rows with ``elimination_score``; [] when there is none."""
        rows = []
        for entry in (self.meta().get("finalists") or [])[:k]:
            row = self.candidate(entry["id"])
            if row is not None:
                rows.append({**row, "elimination_score": entry["score"]})
        return rows

    def counts(self, phase: str | None = None) -> dict[str, int]:
        """Number of rows per status (every status present, zeros included)."""
        sql = "SELECT status, count(*) FROM candidates WHERE ?1 IS NULL OR phase = ?1 GROUP BY 1"
        return {**dict.fromkeys(STATUSES, 0), **dict(self._conn.execute(sql, (phase,)))}

    def cache_hits(self) -> int:
        """Rows whose result came from the cross-run fitness cache (``result.cached``)."""
        return self._conn.execute("SELECT count(*) FROM candidates WHERE result_json LIKE "
                                  "'%\"cached\": true%'").fetchone()[0]

    def reason_counts(self, status: str = "rejected") -> dict[str, int]:
        """Number of rows per reason for one status, most frequent first."""
        return dict(self._conn.execute(
            "SELECT COALESCE(reason, ''), count(*) AS n FROM candidates WHERE status = ? "
            "GROUP BY 1 ORDER BY n DESC, 1", (status,)))

    def seconds(self) -> dict[str, float | None]:
        """Summed ``surrogate`` (training) and ``engine`` (driver) seconds, and ``wall`` from
        the state key ``wall_seconds`` when the loop keeps it."""
        surrogate, engine = self._conn.execute(
            "SELECT COALESCE(sum(seconds), 0), COALESCE(sum(engine_seconds), 0) "
            "FROM candidates").fetchone()
        return {"surrogate": float(surrogate), "engine": float(engine),
                "wall": self.get_state("wall_seconds")}
