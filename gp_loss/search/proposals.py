"""What the driver does with a proposed tree before anything is evaluated.

``vet`` judges one tree against the run so far and returns a ``Verdict``, one shape for every
outcome: ``rejected`` (the screen's reason), ``duplicate`` (the same loss as a member or an
evaluation in flight), ``near_duplicate`` (phenotype within ``search.phenotype_tolerance`` of
a member), ``reuse`` (the same loss as a candidate evaluated earlier: ``past_id``), or ``new``.
``Attempts`` collects the rejected trees of one proposal as store rows (they are part of the
run's record) and the driver time they cost.

Used by ``evolution`` (children) and ``start`` (initial candidates); reads ``screen`` (the
checks, fingerprints, phenotypes) and ``lang.symbolic`` (canonical keys); writes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..lang import symbolic
from ..lang.trees import to_text
from ..screen import integrity, novelty

ACCEPTED = ("new", "reuse")


@dataclass(frozen=True)
class Verdict:
    """The outcome of ``vet``: ``status``, why (``reason``, for the row of a rejected tree),
    and what was computed on the way (the screen result, the canonical key and phenotype when
    they were needed, the earlier candidate a ``reuse`` repeats)."""

    status: str
    reason: str | None = None
    screened: object = None
    key: str | None = None
    phenotype: object = None
    past_id: int | None = None

    @property
    def accepted(self) -> bool:
        return self.status in ACCEPTED

    @property
    def sign(self) -> int:
        return self.screened.sign


def vet(tree, pset, *, pool, past, phenotypes, tolerance: float) -> Verdict:
    """Judge ``tree``: ``pool`` indexes the members and evaluations in flight, ``past`` the
    candidates evaluated earlier, ``phenotypes`` the members' phenotypes."""
    scr = integrity.screen(tree, pset)
    if not scr.accepted:
        return Verdict("rejected", scr.reason, scr)
    # Fingerprint first: most duplicates are caught there, and the SymPy key (the driver's
    # dearest step) is then never computed for them.
    key, hit = None, pool.find(None, scr.fingerprint)
    if hit is None:
        key = symbolic.canonical_key(tree, pset, scr.sign)
        hit = pool.find(key, None)
    if hit is not None:
        return Verdict("duplicate", f"same as #{hit}", scr, key)
    phen = novelty.phenotype(scr.curve, scr.sign)
    if tolerance > 0 and phen is not None:
        if novelty.near_duplicate(phen, [p for p in phenotypes if p is not None], tolerance):
            return Verdict("near_duplicate", "phenotype within tolerance", scr, key)
    found = past.find(key, scr.fingerprint)
    return Verdict("reuse" if found is not None else "new", None, scr, key, phen, found)


def forced(tree, pset, verdict: Verdict) -> Verdict:
    """A seed (``search.seed_with``) is evaluated whatever the screen, novelty or an earlier
    result say; only a duplicate of a member or of a run in flight is skipped."""
    if verdict.status not in ("rejected", "near_duplicate", "reuse"):
        return verdict
    scr = verdict.screened
    return Verdict("new", None, scr, symbolic.canonical_key(tree, pset, scr.sign))


@dataclass
class Attempts:
    """The rejected trees of one proposal (``phase``, ``birth``), as store rows, and its clock."""

    pset: object
    phase: str
    birth: int
    rows: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def reject(self, tree, status: str, reason, *, parent: int | None = None,
               mutation: str | None = None, seconds: float = 0.0) -> None:
        self.rows.append(dict(expr=to_text(tree, self.pset), status=status, reason=str(reason),
                              phase=self.phase, birth=self.birth, parent_id=parent,
                              mutation=mutation, engine_seconds=seconds))

    def own_seconds(self) -> float:
        """Driver seconds since the start not already recorded on the rejected rows."""
        return time.perf_counter() - self.t0 - sum(r["engine_seconds"] for r in self.rows)
