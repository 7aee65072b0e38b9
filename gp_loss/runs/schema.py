"""The run store's file format: tables, columns, version, and the steps from older versions.

``store.py`` (``RunStore``) is the only user: it writes a new store with ``initialise``, checks
every file it opens with ``check``, brings an older one up to date with ``migrate`` (inside its
own transaction) and turns rows into dicts and back with ``encode``/``decode``. Nothing here
opens a file, takes a lock or raises the store's ``StoreError``: ``check`` returns what is wrong
and ``migrate`` lets SQLite's errors through, for the store to report.

The schema is ``SCHEMA`` (version ``SCHEMA_VERSION``, kept in ``PRAGMA user_version``); the
``meta`` table and its ``application`` key are never changed by later versions, so any gp-loss
can tell its stores from foreign files and newer ones. A store of an older version
(``MIGRATIONS``) is read as it is when opened read-only and brought to ``SCHEMA_VERSION`` when
opened for writing; a newer one is refused. Version 1 also had a ``fitness_cache`` table and the
candidate columns ``formula``, ``timings`` and ``fingerprint``, never written (the shown formula
is computed from ``expr``); version 2 drops them. Rows come back as dicts with the column names,
except that ``result_json`` is decoded (``result``) and a version-1 store's unused columns are
left out.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
APPLICATION = "gp-loss"
STATUSES = ("evaluated", "reused", "failed", "rejected", "duplicate", "near_duplicate",
            "pending")
SQLITE_MAGIC = b"SQLite format 3\x00"

COLUMNS = ("phase", "birth", "expr", "key", "parent_id", "mutation", "status", "reason",
           "fitness", "sign", "seconds", "engine_seconds", "result", "created")
V1_COLUMNS = ("formula", "timings", "fingerprint")  # version 1's never-written columns

SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- JSON values
CREATE TABLE candidates (              -- every proposal and candidate, in creation order
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    phase TEXT NOT NULL DEFAULT 'child',  -- 'initial' | 'child' | 'reference' | ...
    birth INTEGER,                     -- number within its phase (a child's birth number)
    expr TEXT NOT NULL, key TEXT,      -- key: canonical key
    parent_id INTEGER REFERENCES candidates(id), mutation TEXT,
    status TEXT NOT NULL CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
    reason TEXT,                       -- why rejected / failed
    fitness REAL, sign INTEGER,
    seconds REAL,                      -- surrogate training seconds (in the worker)
    engine_seconds REAL,               -- driver seconds: generate, screen, dedup, store
    result_json TEXT,                  -- JSON: what the evaluation returned
    created REAL NOT NULL              -- unix time
);
CREATE INDEX candidates_status ON candidates(status, reason);
CREATE INDEX candidates_key ON candidates(key);
CREATE INDEX candidates_birth ON candidates(phase, birth);
CREATE TABLE population (              -- lower age_order = older; equal = equally old
    candidate_id INTEGER PRIMARY KEY REFERENCES candidates(id),
    age_order INTEGER NOT NULL
);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- the loop's; JSON values
"""


def initialise(conn: sqlite3.Connection, meta: dict) -> None:
    """Write the tables of ``SCHEMA`` into a new, empty file, with the ``meta`` entries (JSON
    values) plus ``application`` and ``schema_version``, and set ``PRAGMA user_version``. The
    file must still be private to the caller (``RunStore.create`` links it into place after):
    the tables are not made atomically."""
    values = {**meta, "application": APPLICATION, "schema_version": SCHEMA_VERSION}
    conn.executescript(SCHEMA)  # a private file until linked: no atomicity needed
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                     [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()])
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("COMMIT")


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Drop version 1's dead weight: the ``fitness_cache`` table (never read; the shared cache
    is ``search/cache.py``'s own file) and the never-written candidate columns. ``DROP COLUMN``
    needs SQLite 3.35; an older SQLite leaves the (empty) columns, which nothing reads."""
    conn.execute("DROP TABLE IF EXISTS fitness_cache")
    if sqlite3.sqlite_version_info >= (3, 35, 0):
        have = {r[1] for r in conn.execute("PRAGMA table_info(candidates)")}
        for column in V1_COLUMNS:
            if column in have:
                conn.execute(f"ALTER TABLE candidates DROP COLUMN {column}")


# version -> the step that brings a store of that version to the next one
MIGRATIONS = {1: _migrate_1_to_2}


def user_version(conn: sqlite3.Connection) -> int:
    """The schema version the file records (``PRAGMA user_version``)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def check(conn: sqlite3.Connection, path: Path) -> str | None:
    """What keeps the file at ``path`` from being a gp-loss store this version reads (not ours,
    newer, or older without a migration), as one line; None when it is one."""
    version = user_version(conn)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'application'").fetchone()
    except sqlite3.OperationalError:  # no meta table: some other SQLite file
        row = None
    if row is None or row[0] != json.dumps(APPLICATION):
        return f"{path} is not a gp-loss run store"
    if version > SCHEMA_VERSION:
        return (f"{path} has store schema {version}, newer than this gp-loss "
                f"supports ({SCHEMA_VERSION}); upgrade gp-loss to read it")
    if version < SCHEMA_VERSION and any(v not in MIGRATIONS
                                        for v in range(version, SCHEMA_VERSION)):
        return (f"{path} has store schema {version}, older than this gp-loss "
                f"reads ({SCHEMA_VERSION}) and no migration exists")
    return None


def migrate(conn: sqlite3.Connection, gp_loss_version: str | None) -> None:
    """Bring a checked older store to ``SCHEMA_VERSION``, inside the caller's transaction: each
    step of ``MIGRATIONS`` in turn, then the new version in ``PRAGMA user_version`` and the meta
    key ``schema_version``; meta ``migrations`` lists the steps taken (with the time and
    ``gp_loss_version``). SQLite errors propagate, for the caller to roll back."""
    version = user_version(conn)
    row = conn.execute("SELECT value FROM meta WHERE key = 'migrations'").fetchone()
    done = json.loads(row[0]) if row else []
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    while version < SCHEMA_VERSION:
        MIGRATIONS[version](conn)
        done.append({"from": version, "to": version + 1, "time": when,
                     "gp_loss_version": gp_loss_version})
        version += 1
    conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                     [("schema_version", json.dumps(version)),
                      ("migrations", json.dumps(done, sort_keys=True))])
    conn.execute(f"PRAGMA user_version = {version}")


def encode(field: str, value: Any) -> tuple[str, Any]:
    """A candidate field and its value as stored: (column, value); ``result`` becomes JSON in
    ``result_json``. An unknown field is a TypeError."""
    if field not in COLUMNS:
        raise TypeError(f"unknown candidate field {field!r}")
    if field == "result" and value is not None:
        value = json.dumps(value, sort_keys=True)
    return ("result_json" if field == "result" else field), value


def decode(row: sqlite3.Row | None) -> dict | None:
    """A stored row as a dict (None stays None): ``result_json`` decoded as ``result``, a
    version-1 store's unused columns left out, any other column as it is."""
    if row is None:
        return None
    out = dict(row)
    for name in V1_COLUMNS:  # still there in a version-1 store read as it is
        out.pop(name, None)
    if "result_json" in out:
        out["result"] = out.pop("result_json")
        if out["result"] is not None:
            out["result"] = json.loads(out["result"])
    return out
