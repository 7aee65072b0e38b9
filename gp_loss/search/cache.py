"""The fitness cache shared across runs: (loss, evaluation settings) -> a stored result.

A search trains thousands of candidates, and later searches with the same evaluation settings
meet many of the same losses again (the same canonical key: the same function of y and p). This
SQLite file (WAL; several drivers may use it at once) maps a digest of

    canonical key + sign, the surrogate config (all keys that change training; a model's old
    name counts as its current one), the seed, the device type and compute dtype, the torch
    thread count, the pack width K (when above 1), the primitive set's source, and the
    torch / gp-loss versions

to the result the evaluation returned. Only the driver reads and writes it (workers never see
it), right before submitting and right after a result arrives. Only results that are a property
of the settings are stored: successes and deterministic failures (NaN/inf loss, pre-screen,
early stop); never timeouts, worker losses or errors, which depend on the machine's moment.

Where it lives: ``search.fitness_cache`` ("" = ``$GP_LOSS_CACHE``, else
``~/.cache/gp-loss/fitness-cache.sqlite``; "off" = no cache). A cache that cannot be opened or
written (full disk, locked, not SQLite) is logged once and switched off: it must never stop a
search. Fed by ``evolution.py``; the rows it reuses are counted by ``gp-loss show``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path

from ..config import MODEL_ALIASES

log = logging.getLogger("gp_loss.cache")

# 2: a pre-screen at the last step (prescreen_steps >= steps) no longer fails a candidate,
# so version-1 "prescreen" results of such settings must not be reused.
# 3: results carry val_nll (the search's tie-break between equal fitnesses); version-2
# results lack it, and a reused one would lose every tie.
CACHE_VERSION = 4  # 4: a split_seed other than 0 keeps split 0's test split
CACHEABLE_REASONS = ("nan_loss", "inf_loss", "prescreen", "early_stop")
# Settings that do not change what training computes.
_NOT_IN_KEY = ("device", "timeout_s", "download", "data_root")


def default_path() -> str:
    env = os.environ.get("GP_LOSS_CACHE", "").strip()
    return env or str(Path.home() / ".cache" / "gp-loss" / "fitness-cache.sqlite")


def settings_digest(surrogate: dict, seed: int, threads: int, pset_source: str,
                    pack: int = 1) -> str:
    """The part of the key shared by every candidate of a run (computed once per config).
    ``pack``: the width candidates train at (``executor.candidates_per_worker`` where the
    model can be packed); K > 1 computes in other kernels than K = 1, so it is a setting
    (K = 1 keeps the digest it had before packs existed)."""
    import torch

    from ..surrogate.data import resolve_device
    from ..runs.provenance import package_version

    dev = resolve_device(surrogate.get("device", "auto"))
    amp = surrogate.get("amp", "auto")
    dtype = ("bfloat16" if dev.startswith("cuda") and (amp == "bf16" or (
        amp == "auto" and torch.cuda.is_bf16_supported())) else "float32")
    if surrogate.get("model") in MODEL_ALIASES:  # "tinycnn" and "tiny" are one model
        surrogate = {**surrogate, "model": MODEL_ALIASES[surrogate["model"]]}
    blob = {"surrogate": {k: v for k, v in sorted(surrogate.items()) if k not in _NOT_IN_KEY},
            "seed": seed, "device_type": dev.split(":")[0], "dtype": dtype,
            "threads": threads if dev == "cpu" else None,
            "pset": _content_digest(pset_source),
            "torch": torch.__version__, "gp_loss": package_version("gp-loss"), "v": CACHE_VERSION}
    if pack > 1:
        blob["pack"] = pack
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _content_digest(source: str) -> str:
    """The primitive set's file contents (its path is where it lives, not what it means: a
    set edited in place must not meet its old results)."""
    try:
        data = Path(source).read_bytes()
    except OSError:
        data = source.encode()
    return hashlib.sha256(data).hexdigest()


def cacheable(result: dict) -> bool:
    if result.get("cached"):
        return False
    return result.get("status") == "ok" or (result.get("status") == "failed"
                                            and result.get("reason") in CACHEABLE_REASONS)


class FitnessCache:
    """``get(key, settings)`` / ``put(key, settings, result, origin)``; None-safe when off."""

    def __init__(self, path: str):
        self.path, self._conn = path, None
        if path == "off":
            return
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=10, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS results (digest TEXT PRIMARY KEY, "
                         "result TEXT NOT NULL, origin TEXT, created REAL NOT NULL)")
            self._conn = conn
        except (sqlite3.Error, OSError) as exc:
            log.warning("fitness cache %s unusable (%s); running without it", path, exc)

    @property
    def enabled(self) -> bool:
        return self._conn is not None

    @staticmethod
    def _digest(key: str, sign: int, settings: str) -> str:
        return hashlib.sha256(f"{settings}\n{sign}\n{key}".encode()).hexdigest()

    def get(self, key: str | None, sign: int, settings: str) -> dict | None:
        if self._conn is None or not key:
            return None
        try:
            row = self._conn.execute("SELECT result, origin FROM results WHERE digest = ?",
                                     (self._digest(key, sign, settings),)).fetchone()
        except sqlite3.Error as exc:
            return self._off(exc)
        if row is None:
            return None
        result = json.loads(row[0])
        return {**result, "cached": True, "cached_from": row[1], "seconds": 0.0}

    def put(self, key: str | None, sign: int, settings: str, result: dict, origin: str) -> None:
        if self._conn is None or not key or not cacheable(result):
            return
        try:
            self._conn.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?)",
                               (self._digest(key, sign, settings), json.dumps(result), origin,
                                time.time()))
        except sqlite3.Error as exc:
            self._off(exc)

    def _off(self, exc) -> None:
        log.warning("fitness cache %s failed (%s); running without it", self.path, exc)
        self.close()
        return None

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
