"""The ranking of candidates, everywhere the search or a reader picks a best (the tournament,
the initial population, re-scoring, the oldest-of-equals to age out, ``show``, ``export``):
higher fitness, then the tie-break ``TIE_BREAK``, then the lower id. ``RANK_SQL`` is the
ORDER BY the store's queries use; ``rank_key``/``row_rank_key`` are its Python twin.

Used by ``store`` (its queries), ``search`` (population, start, evolution) and the readers
(``report``, ``render``); imports nothing from the package.
"""
from __future__ import annotations

import math
from typing import Mapping

# The ranking of candidates, everywhere the search or a reader picks a best: higher fitness,
# then the tie-break TIE_BREAK, a key of the evaluation's result (train.py's ``val_nll``: the
# validation NLL of the surrogate at its best-accuracy checkpoint; lower wins, rows without it,
# e.g. from stores written before it existed, after those with it), then the lower id.
TIE_BREAK = "val_nll"
TIE_BREAK_TEXT = "validation NLL, lower wins"
_NLL_SQL = (f"(CASE WHEN json_valid(result_json) THEN "
            f"json_extract(result_json, '$.{TIE_BREAK}') END)")
RANK_SQL = f"fitness DESC, {_NLL_SQL} IS NULL, {_NLL_SQL}, id"


def tie_value(row: Mapping) -> float | None:
    """A stored row's tie-break value (None when its result has none, or no finite one)."""
    value = (row.get("result") or {}).get(TIE_BREAK)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def rank_key(fitness: float, tie: float | None, cid: int) -> tuple:
    """Sort key, best first: higher fitness, then lower tie-break value (None last), then
    lower id. The Python twin of ``RANK_SQL``."""
    return (-fitness, tie is None, tie if tie is not None else 0.0, cid)


def row_rank_key(row: Mapping) -> tuple:
    """``rank_key`` of a stored row with a fitness."""
    return rank_key(row["fitness"], tie_value(row), row["id"])
