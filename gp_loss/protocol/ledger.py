"""The compare ledger: every finished training run of a ``compare``, stored as it finishes.

A big transfer table is hours of CPU; a killed ``compare`` run again with the same ledger
trains only what is missing. A run is keyed by exactly what its result is a function of --
the ``fitness.evaluate`` arguments ``(expr, pset name, surrogate settings, seed, sign,
with_test)`` as canonical JSON, hashed -- so a ledger can be shared by several tables (the same
run is never trained twice) and a changed setting never reuses a stale result.

SQLite, one writer (the driver), WAL; schema versioned in ``meta``. The torch and gp-loss
versions are part of every key, so another version trains its runs afresh.

Used by ``compare.py``; imports nothing of the package above ``errors`` and ``version``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
from pathlib import Path

from ..errors import InputError
from ..version import __version__


SCHEMA_VERSION = 1


# Settings that cannot change a finished run's numbers (as in search/cache.py's key).
_NOT_IN_KEY = ("timeout_s", "download")


@functools.lru_cache(maxsize=16)
def _pset_digest(pset: str) -> str:
    """The set file's content hash (read once per file; a plain name hashes as itself)."""
    try:
        text = Path(pset).read_text(encoding="utf-8")
    except OSError:
        text = pset
    return hashlib.sha256(text.encode()).hexdigest()


def job_key(expr: str, pset: str, surrogate: dict, seed: int, sign: int, with_test: bool,
            width: int = 1) -> str:
    """The identity of one training run: a hash of everything its result depends on -- the
    expression, the primitive set's file content, the surrogate settings, seed, sign,
    with_test, the pack width it trains at (results depend on K), and the torch and gp-loss
    versions."""
    import torch

    sur = {k: v for k, v in surrogate.items() if k not in _NOT_IN_KEY}
    payload = json.dumps([expr, _pset_digest(str(pset)), sur, int(seed),
                          int(sign), bool(with_test), int(width), torch.__version__,
                          __version__], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# Failures that are a function of the loss (as the fitness cache keeps them); any other
# (a lost worker, a timeout, out of memory, an error of the pack) depends on the machine.
LASTING_REASONS = ("nan_loss", "inf_loss", "prescreen", "early_stop")


def lasting(result: dict) -> bool:
    """Whether ``result`` is a function of its job's inputs and so worth keeping: a success,
    or a failure of the loss itself (``LASTING_REASONS``)."""
    if result.get("lost"):
        return False
    return result.get("status") == "ok" or result.get("reason") in LASTING_REASONS


class Ledger:
    """``get(key)`` a stored result or None; ``put(key, job, result)`` commits one at once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise InputError(f"--store {path}: not a file")
        if not self.path.parent.is_dir():
            raise InputError(f"--store {path}: folder {self.path.parent} does not exist")
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None)
            self.conn.execute("PRAGMA busy_timeout = 10000")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS runs (key TEXT PRIMARY KEY, "
                              "job TEXT NOT NULL, result TEXT NOT NULL)")
            row = self.conn.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"--store {path}: not a compare ledger ({exc})") from None
        if row is None:
            self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                  [("schema", str(SCHEMA_VERSION)), ("version", __version__)])
        elif int(row[0]) != SCHEMA_VERSION:
            raise InputError(f"--store {path}: ledger schema {row[0]}, this gp-loss reads "
                             f"{SCHEMA_VERSION}")

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def get(self, key: str) -> dict | None:
        row = self.conn.execute("SELECT result FROM runs WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, job: list, result: dict) -> None:
        self.conn.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?)",
                          (key, json.dumps(job, default=str), json.dumps(result, default=str)))

    def backup(self, target: str | os.PathLike) -> None:
        """A consistent single-file copy (no WAL file): what a results folder commits."""
        Path(target).unlink(missing_ok=True)
        self.conn.execute("VACUUM INTO ?", (str(target),))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
