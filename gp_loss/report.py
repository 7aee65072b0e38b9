"""Reading a run for people: the summary behind ``gp-loss show`` and the end-of-search table.

Fed by a (read-only) ``store.RunStore``; formulas come from ``symbolic.formula`` with a small
time budget, computed here for the few rows shown rather than for every candidate in the loop
(the engine's time belongs to the search). The elimination rounds stored in a run (``gp-loss
eliminate``) are scored by ``eliminate.stored_rounds``, the same code that ranks them there.
Also the tqdm progress bar the search loop drives.
"""
from __future__ import annotations

from .psets import load_pset
from .trees import parse


def summary(store, top: int = 10, formulas: bool = True) -> dict:
    """The ``show --json`` object: top, counts, seconds, reference, state, config,
    elimination (the stored elimination rounds, ``eliminate.score_round``'s tables; None when
    the run has none)."""
    from . import symbolic
    from .eliminate import stored_rounds

    cfg = store.config()
    pset = load_pset(cfg.get("search", {}).get("pset", "paper"))
    rows = store.top(top) if top else []

    shown: dict = {}

    def formula(expr):
        if not formulas:
            return None
        if expr not in shown:
            try:
                shown[expr] = symbolic.formula(parse(expr, pset, max_height=10**4,
                                                     max_size=10**4), pset, budget_s=1.0)
            except Exception:  # a display nicety must never break `show`
                shown[expr] = expr
        return shown[expr]

    top_rows = [{"id": r["id"], "expr": r["expr"], "formula": formula(r["expr"]),
                 "fitness": r["fitness"], "sign": r["sign"], "status": r["status"],
                 "phase": r["phase"], "birth": r["birth"], "parent_id": r["parent_id"]}
                for r in rows]
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
    state = store.state()
    elimination = stored_rounds(store)
    for m in (m for r in elimination or [] for m in r["members"]):
        m["formula"] = m["formula"] or formula(m["expr"])
    return {
        "top": top_rows,
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
        "state": {k: state.get(k) for k in ("phase", "children_done", "next_birth")},
        "config": {"pset": pset.name, "dataset": cfg["surrogate"]["dataset"],
                   "model": cfg["surrogate"]["model"], "steps": cfg["surrogate"]["steps"],
                   "children": cfg["search"]["children"],
                   "population": cfg["search"]["population"]},
        "elimination": elimination,
    }


def _short_reasons(reasons: dict) -> dict:
    out: dict = {}
    for reason, n in reasons.items():
        short = reason.split(" at step")[0][:80]
        out[short] = out.get(short, 0) + n
    return out


def format_summary(s: dict) -> str:
    """A plain-text hall of fame with cross-entropy's fitness under the same budget."""
    lines = []
    c = s["config"]
    lines.append(f"Best losses ({c['pset']} set; {c['dataset']} / {c['model']}, "
                 f"{c['steps']} steps; fitness = best validation accuracy)")
    lines.append(f"{'rank':>4}  {'fitness':>7}  {'id':>5}  formula   [expression]")
    for i, r in enumerate(s["top"], 1):
        sign = "" if r["sign"] in (1, None) else "  (sign -1)"
        lines.append(f"{i:>4}  {r['fitness']:>7.4f}  {r['id']:>5}  {r['formula']}   "
                     f"[{r['expr']}]{sign}")
    for ref in s["reference"]:
        fit = f"{ref['fitness']:.4f}" if ref["fitness"] is not None else ref["status"]
        label = ref["expr"] if ref["name"] == ref["expr"] else f"{ref['name']}  [{ref['expr']}]"
        lines.append(f"{'ref':>4}  {fit:>7}  {'':>5}  {label} (same budget and seed)")
    k = s["counts"]
    rejected = sum(k["rejected"].values())
    lines.append(f"children {k['children']}; evaluated {k['evaluated']}, reused {k['reused']}, "
                 f"failed {k['failed']}, duplicates {k['duplicates']}, near-duplicates "
                 f"{k['near_duplicates']}, rejected {rejected}")
    if k.get("from_cache"):
        lines.append(f"  {k['from_cache']} evaluations came from the fitness cache (trained by "
                     f"an earlier run with the same settings)")
    seeding = k.get("seeding") or {}
    if sum(seeding.values()):
        lines.append(f"  seeding (cheap initial fitness): {seeding['evaluated']} scored, "
                     f"{seeding['failed']} failed, {seeding['pending']} pending; only the "
                     f"re-scored ones rank above")
    reeval = k.get("reeval") or {}
    if sum(reeval.values()):
        lines.append(f"  re-evaluations with more seeds: {reeval['evaluated']} done, "
                     f"{reeval['failed']} failed, {reeval['pending']} pending")
    if k["rejected"]:
        lines.append("  rejected by reason: " + ", ".join(f"{r} {n}" for r, n in
                                                          list(k["rejected"].items())[:8]))
    if k["failed_reasons"]:
        lines.append("  failed by reason: " + ", ".join(f"{r} {n}" for r, n in
                                                        list(k["failed_reasons"].items())[:6]))
    sec = s["seconds"]
    wall = sec.get("wall") or 0.0
    lines.append(f"seconds: wall {wall:.1f}, surrogate {sec['surrogate']:.1f} (summed over "
                 f"workers), engine {sec['engine']:.1f}")
    if s.get("elimination"):
        lines += [""] + format_elimination(s["elimination"])
    return "\n".join(lines)


def _stage(st: dict) -> str:
    parts = [f"{st['steps']} steps"]
    if st.get("image_size"):
        parts.append(f"{st['image_size']} px")
    if st.get("randaugment_magnitude") is not None:
        parts.append(f"magnitude {st['randaugment_magnitude']:g}")
    if st.get("dropout") is not None:
        parts.append(f"dropout {st['dropout']:g}")
    return ", ".join(parts)


def format_elimination(rounds: list[dict]) -> list[str]:
    """Lines for the elimination rounds: per round its settings and the entrants ranked by
    score, or, while the round runs, how many of each entrant's runs are done."""
    lines = ["Elimination rounds"]
    for r in rounds:
        seeds = ",".join(str(x) for x in r["seeds"])
        state = (f"{r['kept']} kept" if r["complete"] else
                 f"pending: {r['runs_done']} of {r['runs_total']} runs done")
        lines.append(f"round {r['round']} ({r['phase']}): {r['entrants']} candidates, "
                     f"{r['steps']} steps, {r['model']}, seed(s) {seeds} -> {state}")
        if r["stages"]:
            lines.append("  stages: " + "; ".join(f"{i}) {_stage(st)}"
                                                  for i, st in enumerate(r["stages"], 1)))
        lines.append(f"  {'rank':>4}  {'score' if r['complete'] else 'runs':>6}  {'before':>6}  "
                     f"{'id':>5}  formula   [expression]")
        for m in r["members"]:
            done = [x for x in m["runs"] if x["status"] in ("evaluated", "failed")]
            failed = sum(x["status"] == "failed" for x in done)
            if r["complete"]:
                rank, score = str(m["rank"]), f"{m['score']:.4f}"
            else:
                rank, score = "-", f"{len(done)}/{len(r['seeds'])}"
            note = ("  (out)" if r["complete"] and not m["kept"] else "") + \
                (f"  [{failed} failed]" if failed else "")
            formula = m["formula"] or m["expr"]
            expr = "" if formula == m["expr"] else f"   [{m['expr']}]"
            lines.append(f"  {rank:>4}  {score:>6}  {m['previous_score']:.4f}  {m['id']:>5}  "
                         f"{formula}{expr}{note}")
    lines.append("score = mean best validation accuracy over the round's seeds (a failed run "
                 "counts 0); before = the previous round's score (round 1: the search fitness)")
    return lines


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
