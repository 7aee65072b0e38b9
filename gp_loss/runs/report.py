"""Reading a run for people: the summary behind ``gp-loss show`` and the end-of-search table.

Fed by a (read-only) ``store.RunStore``; ``summary`` is the ``show --json`` object, which
``render.py`` turns into text and LaTeX. Formulas come from ``formula.formula`` (a pure
function of the expression), computed here for the few rows shown rather than for every
candidate in the loop (the engine's time belongs to the search). The elimination rounds stored
in a run (``gp-loss eliminate``) are scored by ``eliminate.stored_rounds``, the same code that
ranks them there; a finished elimination's final ranking comes from ``RunStore.finalists``, the
source that ``export RUN_DIR`` and ``compare --from-run`` rank by (``RunStore.best``), and leads
``show``. Search rankings are ``RunStore.top``'s: fitness, then the tie-break
``ranking.TIE_BREAK``. The hall of fame carries each row's spread over seeds, formula size and
origin; the Pareto front of fitness vs size is PySR's (``pareto_front``). ``plots.py`` reads
runs through the helpers here. Also the tqdm progress bar the search drives.
"""
from __future__ import annotations

import re
import statistics

from ..config import MODEL_ALIASES
from ..lang.psets import load_pset
from ..search import tasks as tasks_mod
from .ranking import TIE_BREAK, row_rank_key, tie_value
from .store import SEARCH_PHASES, RunStore
from ..lang.trees import parse

_NODE = re.compile(r"[^(),\s]+")


def tree_size(expr: str) -> int:
    """Number of nodes of the tree of a stored expression. Stored text is ``trees.to_text``'s
    canonical form (zoo names expanded, every node one name or number between "(", ")" and
    ", "), so counting its tokens equals ``len(parse(expr))`` without the parser's cost (a
    test checks the two agree)."""
    return len(_NODE.findall(expr))


def evaluated_rows(store) -> list[dict]:
    """The search's rows with a fitness (phases initial/child, evaluated or reused), id order,
    each with its ``size``."""
    rows = [r for phase in SEARCH_PHASES for r in store.candidates(phase=phase)
            if r["status"] in ("evaluated", "reused") and r["fitness"] is not None]
    rows.sort(key=lambda r: r["id"])
    for r in rows:
        r["size"] = tree_size(r["expr"])
    return rows


def pareto_front(rows) -> list[dict]:
    """PySR's front of fitness (higher is better) vs size (smaller is better): for each size
    the best row (ties: the lower validation NLL, then the lowest id: ``ranking.row_rank_key``),
    kept only if it beats every smaller size. Smallest first."""
    best: dict = {}
    for r in rows:
        cur = best.get(r["size"])
        if cur is None or row_rank_key(r) < row_rank_key(cur):
            best[r["size"]] = r
    front, bar = [], None
    for size in sorted(best):
        if bar is None or best[size]["fitness"] > bar:
            front.append(best[size])
            bar = best[size]["fitness"]
    return front


def run_status(store) -> str:
    """'running' (another process holds the run's writer lock), 'finished' (phase done) or
    'interrupted'. A writable ``store`` is the writer itself (the search's closing table)."""
    if store.readonly and RunStore.writer_active(store.run_dir):
        return "running"
    return "finished" if store.get_state("phase") == "done" else "interrupted"


def seed_spread(row) -> tuple[list | None, float | None]:
    """(per-seed fitnesses, their standard deviation) of a row re-evaluated with more seeds
    (``search.reeval_seeds``), else (None, None)."""
    seeds = (row.get("result") or {}).get("seed_fitness")
    if not seeds or len(seeds) < 2:
        return None, None
    return list(seeds), statistics.stdev(seeds)


def how_found(row, n_seeds: int = 0) -> str:
    """'seed' (search.seed_with), 'initial' (random), 're-score of #N' (paper seeding) or
    'KIND of #PARENT' (a child's mutation)."""
    if row["phase"] == "initial":
        if row["parent_id"] is not None:
            return f"re-score of #{row['parent_id']}"
        return "seed" if row["birth"] is not None and row["birth"] < n_seeds else "initial"
    if row["parent_id"] is None:
        return row["phase"]
    return f"{row['mutation'] or 'copy'} of #{row['parent_id']}"


def summary(store, top: int = 10, formulas: bool = True) -> dict:
    """The ``show --json`` object: top (search-fitness order, ties by ``tie_break``; each with
    size, mutation, found, seeds, fitness_std, val_nll, per_class_sign), finalists (a finished
    elimination's final ranking, what export and compare --from-run use: each with rank and
    score; None when none finished), tie_break, pareto, status, counts, seconds, reference,
    state, config, elimination (the stored elimination rounds, ``eliminate.score_round``'s
    tables; None when the run has none)."""
    from ..lang import formula as formula_mod
    from ..protocol.eliminate import stored_rounds

    cfg = store.config()
    pset = load_pset(cfg.get("search", {}).get("pset", "paper"))
    rows = store.top(top) if top else []

    shown: dict = {}

    def formula(expr):
        if not formulas:
            return None
        if expr not in shown:
            try:
                shown[expr] = formula_mod.formula(parse(expr, pset, max_height=10**4,
                                                     max_size=10**4), pset)
            except Exception:  # a display nicety must never break `show`
                shown[expr] = expr
        return shown[expr]

    classes: dict = {}

    def per_class(expr, sign):
        """The per-class form with the search's sign applied, as written (+1) where the sign
        is unknown (``per_class_sign`` None says so); None where the set has none."""
        if not formulas:
            return None
        key = (expr, sign)
        if key not in classes:
            from ..lang import formula as _formula
            try:
                classes[key] = _formula.per_class(parse(expr, pset, max_height=10**4,
                                                        max_size=10**4), pset,
                                                  sign=sign if sign in (1, -1) else 1)
            except Exception:  # a display nicety must never break `show`
                classes[key] = None
        return classes[key]

    n_seeds = len(cfg.get("search", {}).get("seed_with", []))
    task_list = run_tasks(cfg)
    task_names = [t["name"] for t in task_list]

    def shown_row(r):
        seeds, std = seed_spread(r)
        return {"id": r["id"], "expr": r["expr"], "formula": formula(r["expr"]),
                "per_class": per_class(r["expr"], r["sign"]),
                "per_class_sign": r["sign"] if r["sign"] in (1, -1) else None,
                "fitness": r["fitness"], "val_nll": tie_value(r), "sign": r["sign"],
                "status": r["status"],
                "phase": r["phase"], "birth": r["birth"], "parent_id": r["parent_id"],
                "mutation": r["mutation"], "found": how_found(r, n_seeds),
                "size": tree_size(r["expr"]), "seeds": seeds, "fitness_std": std,
                "tasks": tasks_mod.table(r["result"], task_names)}

    top_rows = [shown_row(r) for r in rows]
    # The elimination's final ranking, from where export and compare --from-run read it.
    finalists = None
    if store.finalists(1):
        finalists = [{"rank": i, **shown_row(r), "score": r["elimination_score"]}
                     for i, r in enumerate(store.finalists(top) if top else [], 1)]
    pareto = [{"id": r["id"], "size": r["size"], "fitness": r["fitness"], "sign": r["sign"],
               "expr": r["expr"], "formula": formula(r["expr"])}
              for r in pareto_front(evaluated_rows(store))]
    initial, child = store.counts("initial"), store.counts("child")
    counts = {k: initial[k] + child[k] for k in initial}
    # A reference's name ("ce") is the config entry at its birth index: the row's reason only
    # holds it while the evaluation is pending.
    ref_names = list(cfg.get("search", {}).get("reference", []))
    refs = [{"expr": r["expr"],
             "name": (ref_names[r["birth"]] if r["birth"] is not None
                      and 0 <= r["birth"] < len(ref_names) else r["expr"]),
             "fitness": r["fitness"], "status": r["status"]}
            for r in store.candidates(phase="reference")]
    baselines = [{"seed_offset": r["birth"], "settings": tasks_mod.BASELINE_PHASES[ph],
                  "name": tasks_mod.BASELINE, "status": r["status"],
                  "tasks": tasks_mod.table(r["result"], task_names)}
                 for ph in tasks_mod.BASELINE_PHASES for r in store.candidates(phase=ph)]
    state = store.state()
    elimination = stored_rounds(store)
    for m in (m for r in elimination or [] for m in r["members"]):
        m["formula"] = m["formula"] or formula(m["expr"])
    model = cfg["surrogate"]["model"]
    return {
        "top": top_rows,
        "finalists": finalists,
        "tie_break": TIE_BREAK,
        "pareto": pareto,
        "status": run_status(store),
        "run_dir": str(store.run_dir),
        "counts": {
            "evaluated": counts["evaluated"], "reused": counts["reused"],
            "failed": counts["failed"], "pending": counts["pending"],
            "duplicates": counts["duplicate"], "near_duplicates": counts["near_duplicate"],
            "rejected": store.reason_counts("rejected"),
            "failed_reasons": _short_reasons(store.reason_counts("failed")),
            "children": state.get("children_done", 0),
            # evaluations answered by the cross-run fitness cache (any phase), and the
            # paper's seeding / re-evaluation rows (not in the counts above)
            "from_cache": store.cache_hits(),
            "seeding": {k: v for k, v in store.counts("seeding").items()
                        if k in ("evaluated", "reused", "failed", "pending")},
            "reeval": {k: v for k, v in store.counts("reeval").items()
                       if k in ("evaluated", "reused", "failed", "pending")},
        },
        "seconds": store.seconds(),
        "reference": refs,
        # [[search.tasks]]: ce_torch per task and seed offset, what each gain is measured
        # against ([] without two or more tasks)
        "baselines": baselines,
        "state": {k: state.get(k) for k in ("phase", "children_done", "next_birth")},
        "config": {"pset": pset.name, "dataset": cfg["surrogate"]["dataset"],
                   "model": MODEL_ALIASES.get(model, model),  # an old run's "tinycnn": tiny
                   "steps": cfg["surrogate"]["steps"],
                   "children": cfg["search"]["children"],
                   "population": cfg["search"]["population"],
                   # [[search.tasks]] (name and settings each); [] = the surrogate alone
                   "tasks": task_list,
                   "fitness": ("mean gain over tasks" if len(task_list) >= 2
                               else "validation accuracy")},
        "elimination": elimination,
    }


_TASK_KEYS = ("dataset", "model", "steps", "lr", "train_fraction")


def run_tasks(cfg: dict) -> list[dict]:
    """A stored config's ``search.tasks``, each with the settings that describe it (the
    run's surrogate with the task's keys): ``name``, dataset, model, steps, lr,
    train_fraction and the task's other own keys."""
    sur = cfg.get("surrogate", {})
    out = []
    for t in cfg.get("search", {}).get("tasks") or []:
        own = {k: v for k, v in t.items() if k != "name"}
        merged = {**{k: sur.get(k) for k in _TASK_KEYS}, **own}
        merged["model"] = MODEL_ALIASES.get(merged["model"], merged["model"])
        out.append({"name": t["name"], **merged})
    return out


def _short_reasons(reasons: dict) -> dict:
    out: dict = {}
    for reason, n in reasons.items():
        short = reason.split(" at step")[0][:80]
        out[short] = out.get(short, 0) + n
    return out


class Progress:
    """tqdm bar for the search loop: candidates done, best fitness and its expression."""

    def __init__(self, total: int, done: int, disable: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="cand", disable=disable,
                        dynamic_ncols=True, desc="search")

    def advance(self):
        self.bar.update(1)

    def best(self, fitness: float, expr: str):
        self.bar.set_postfix_str(f"best {fitness:.4f} {expr[:70]}", refresh=False)

    def close(self):
        self.bar.close()
