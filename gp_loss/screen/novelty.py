"""Novelty: the search's index of candidates seen, and the paper's phenotype filter.

* ``NoveltyIndex`` -- "is this child one we have?" over the population and history: the same
  canonical key, or a fingerprint that matches by ``screen``'s per-row test (RTOL, ZERO_TOL;
  see ``fingerprint.py``'s docstring). ``find`` looks the key up in a dict, then tests the
  fingerprint against every entry at once through a sound low-dimensional pre-filter (a fixed
  orthonormal projection) followed by the exact per-row test, vectorised.
* ``phenotype`` / ``near_duplicate`` -- the paper's optional filter: the min-max-normalised,
  oriented integrity sweep curve, and an L2-distance test against the members' phenotypes.

Fed by ``fingerprint.py`` (fingerprints, the probe layout and the row test), ``integrity.py`` (curves) and keys from
``symbolic.canonical_key``. Used by the search loop
(``evolution``) and ``analysis/bench_screen.py``.
"""
from __future__ import annotations

import numpy as np

from .fingerprint import (PROBE_SEED, RTOL, SWEEP_ROWS, ZERO_TOL, is_constant, probe,
                          rows_match_many, split)


class NoveltyIndex:
    """Candidates seen so far (population and history), for "is this child one we have?".

    ``find`` looks the key up in a dict, then tests the fingerprint against all entries at once:
    a per-row match implies ||a - b|| <= RTOL sqrt(||a||^2 + ||b||^2) + ZERO_TOL (||s_a|| +
    ||s_b||) on the gradient parts, and a fixed orthonormal projection P (||P^T d|| <= ||d||)
    keeps that bound, so one (N, K) matrix-vector product is a sound pre-filter; the survivors
    get the exact per-row test, vectorised. An entry whose fingerprint is None or not finite
    (not from an accepted screen) is found by its key only.
    """

    K = 32

    def __init__(self):
        self._by_key: dict = {}      # key -> [cid, ...]
        self._row: dict = {}         # cid -> row of ``_fp``/``_aux`` (None: indexed by key only)
        self._cids, self._keys = [], []  # by row
        self._keyless: dict = {}     # cid -> key of entries without a usable fingerprint
        self._fp = self._aux = None  # rows: fingerprints; [P^T g, ||g||^2, ||P^T g||^2, ||s||]
        self._P = None

    def __len__(self):
        return len(self._row)

    def __contains__(self, cid):
        return cid in self._row

    def _summary(self, fp):
        g, s = split(fp)
        if self._P is None:
            rng = np.random.default_rng(PROBE_SEED + 1)
            self._P = np.linalg.qr(rng.standard_normal((g.shape[0], self.K)))[0]
        q = g @ self._P
        return np.concatenate([q, [g @ g, q @ q, np.sqrt(s @ s)]])

    def add(self, cid, key, fp) -> None:
        """Index candidate ``cid`` (replacing an entry with that id) under ``key`` (None: none)."""
        self.remove(cid)
        if key is not None:
            self._by_key.setdefault(key, []).append(cid)
        fp = None if fp is None else np.asarray(fp, dtype=np.float64).ravel()
        if fp is None or not np.all(np.isfinite(fp)):
            self._row[cid] = None
            self._keyless[cid] = key
            return
        aux, n = self._summary(fp), len(self._cids)
        if self._fp is None:
            self._fp, self._aux = np.zeros((64, fp.size)), np.zeros((64, aux.size))
        elif fp.size != self._fp.shape[1]:
            raise ValueError(f"fingerprint of size {fp.size}, the index holds {self._fp.shape[1]}")
        elif n == self._fp.shape[0]:
            self._fp, self._aux = (np.concatenate([a, 0 * a]) for a in (self._fp, self._aux))
        self._fp[n], self._aux[n] = fp, aux
        self._row[cid] = n
        self._cids.append(cid)
        self._keys.append(key)

    def remove(self, cid) -> bool:
        """Forget ``cid``; False when it was not there."""
        if cid not in self._row:
            return False
        row = self._row.pop(cid)
        key = self._keys[row] if row is not None else self._keyless.pop(cid)
        if key is not None:
            self._by_key[key].remove(cid)
            if not self._by_key[key]:
                del self._by_key[key]
        if row is None:
            return True
        last = len(self._cids) - 1
        if row != last:  # move the last entry into the hole
            self._fp[row], self._aux[row] = self._fp[last], self._aux[last]
            self._cids[row], self._keys[row] = self._cids[last], self._keys[last]
            self._row[self._cids[row]] = row
        self._cids.pop()
        self._keys.pop()
        return True

    def find(self, key, fp):
        """The lowest id of the indexed candidates that are the same (key or fingerprint), else
        None. The lowest, not the first found: a resumed run rebuilds the index in id order,
        and the answer must not depend on insertion order."""
        hits = list(self._by_key.get(key, ())) if key is not None else []
        n, width = len(self._cids), probe().size + probe().rows
        if n == 0 or fp is None:
            return min(hits) if hits else None
        fp = np.asarray(fp, dtype=np.float64).ravel()
        if fp.size != width or not np.all(np.isfinite(fp)):
            return min(hits) if hits else None
        mine, aux = self._summary(fp), self._aux[:n]
        q, (gg, qq, ss) = mine[:-3], mine[-3:]
        gg_i, qq_i, ss_i = aux[:, -3], aux[:, -2], aux[:, -1]
        d2 = qq_i + qq - 2.0 * (aux[:, :-3] @ q)
        bound = RTOL * np.sqrt(gg_i + gg) + ZERO_TOL * (ss_i + ss)
        rows = np.flatnonzero(d2 <= bound * bound * 1.0001 + 1e-12 * (qq_i + qq))
        if rows.size:
            stack = self._fp[rows]
            nonzero = np.any(split(stack)[0], axis=1)
            # A constant matches constants only, whatever the tolerances say.
            ok = ~nonzero if is_constant(fp) else nonzero & rows_match_many(stack, fp)
            rows = rows[ok]
        hits.extend(self._cids[r] for r in rows)
        return min(hits) if hits else None


# ----------------------------------------------------------------------------- phenotype filter

def phenotype(curve, sign: int = 1):
    """The paper's phenotype: min-max-normalised sign x sweep curve; None if its range < 1e-4."""
    v = sign * np.asarray(curve, dtype=np.float64)
    span = v.max() - v.min() if np.all(np.isfinite(v)) else 0.0
    return (v - v.min()) / span if span >= 1e-4 else None


def near_duplicate(phen, members, tol: float) -> bool:
    """True when ``phen`` is within L2 distance ``tol`` of a member's phenotype (Nones skipped)."""
    if not (isinstance(members, np.ndarray) and members.ndim == 2):
        members = [m for m in members if m is not None]
        members = np.stack(members) if members else np.zeros((0, SWEEP_ROWS))
    if phen is None or tol <= 0 or members.shape[0] == 0:
        return False
    return bool(np.any(np.linalg.norm(members - phen, axis=1) <= tol))
