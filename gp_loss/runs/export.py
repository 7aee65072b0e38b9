"""Export of a run's best: the ``top`` best distinct candidates of a run store as export entries
(``gp-loss export RUN_DIR``), written by ``lang/export.py``'s one writer.

Ranked as the other readers rank (the store's ``best``: a finished elimination first, then
search fitness with the stored tie-break); read-only, the expressions re-parsed with our parser.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..lang.export import make_entry
from ..lang.psets import load_pset
from .store import RunStore


def run_entries(run_dir, top: int = 5) -> list:
    """The ``top`` best distinct candidates of a run store, as entries ``rank1`` ... ``rankK``
    (with ``fitness``). Read-only; the expressions are re-parsed with our parser."""
    if top < 1:
        raise InputError("--top must be at least 1")
    with RunStore.open(run_dir, readonly=True) as store:
        cfg = store.config()
        pset_name = (cfg.get("search") or {}).get("pset", "paper")
        rows = store.best(top)
        sur = cfg.get("surrogate") or {}
        run = {"dir": str(Path(run_dir).resolve()), "created": store.meta().get("created"),
               "surrogate": f"{sur.get('dataset')} / {sur.get('model')}, "
                            f"{sur.get('steps')} steps"}
    if not rows:
        raise InputError(f"{run_dir}: the run has no evaluated candidates yet")
    pset = load_pset(pset_name)
    return [make_entry(row["expr"], pset, name=f"rank{i}",
                       sign=row["sign"] if row.get("sign") in (1, -1) else 1,
                       fitness=row.get("fitness"), candidate_id=row.get("id"), run=run,
                       seeds=len((row.get("result") or {}).get("seed_fitness") or []) or 1,
                       elimination_score=row.get("elimination_score"))
            for i, row in enumerate(rows, 1)]
