"""Reading a run for people: the summary behind ``gp-loss show`` and the end-of-search table.

Fed by a (read-only) ``store.RunStore``; formulas come from ``formula.formula`` (a pure
function of the expression), computed here for the few rows shown rather than for every candidate in the loop
(the engine's time belongs to the search). The elimination rounds stored in a run (``gp-loss
eliminate``) are scored by ``eliminate.stored_rounds``, the same code that ranks them there;
a finished elimination's final ranking comes from ``RunStore.finalists``, the source that
``export RUN_DIR`` and ``compare --from-run`` rank by (``RunStore.best``), and leads ``show``.
Search rankings are ``RunStore.top``'s: fitness, then the tie-break ``store.TIE_BREAK``.
The hall of fame carries each row's spread over seeds, formula size and origin; the Pareto
front of fitness vs size is PySR's (``pareto_front``); ``format_latex`` is ``show --latex``.
``plots.py`` reads runs through the helpers here. Also the tqdm progress bar the search drives.
"""
from __future__ import annotations

import re
import statistics

from ..config import MODEL_ALIASES
from ..lang.psets import load_pset
from .store import (SEARCH_PHASES, TIE_BREAK, TIE_BREAK_TEXT, RunStore, row_rank_key,
                    tie_value)
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
    the best row (ties: the lower validation NLL, then the lowest id: ``store.row_rank_key``),
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

    def shown_row(r):
        seeds, std = seed_spread(r)
        return {"id": r["id"], "expr": r["expr"], "formula": formula(r["expr"]),
                "per_class": per_class(r["expr"], r["sign"]),
                "per_class_sign": r["sign"] if r["sign"] in (1, -1) else None,
                "fitness": r["fitness"], "val_nll": tie_value(r), "sign": r["sign"],
                "status": r["status"],
                "phase": r["phase"], "birth": r["birth"], "parent_id": r["parent_id"],
                "mutation": r["mutation"], "found": how_found(r, n_seeds),
                "size": tree_size(r["expr"]), "seeds": seeds, "fitness_std": std}

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
        "state": {k: state.get(k) for k in ("phase", "children_done", "next_birth")},
        "config": {"pset": pset.name, "dataset": cfg["surrogate"]["dataset"],
                   "model": MODEL_ALIASES.get(model, model),  # an old run's "tinycnn": tiny
                   "steps": cfg["surrogate"]["steps"],
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


_STATUS_TEXT = {
    "running": "running (a search or elimination is writing to it; figures are a snapshot)",
    "interrupted": "interrupted (not finished, nothing running; continue with: "
                   "gp-loss resume {run_dir})",
    "finished": "finished"}


def format_latex(s: dict) -> str:
    """``show --latex``: LaTeX ``tabular``s (rank, fitness, size, the per-sample loss in math
    mode and its per-class form T(p) | O(p), sign applied; for a class-sum set the sum over
    classes). With a finished elimination its ranking comes first (with its scores), as in
    ``show``; each table then opens with a comment line naming its ranking."""
    if not s.get("finalists"):
        return _latex_table(s, s["top"], score=False)
    return "\n".join([
        "% Finalists, ranked by elimination (the ranking export and compare --from-run use)",
        _latex_table(s, s["finalists"], score=True), "",
        "% Best losses of the search, ranked by search fitness",
        _latex_table(s, s["top"], score=False)])


def _latex_table(s: dict, rows: list, score: bool) -> str:
    from ..lang import formula as formula_mod

    cfg_pset = load_pset(s["config"]["pset"])
    head = "rank & score & fitness" if score else "rank & fitness"
    lines = [r"\begin{tabular}{%s}" % ("rrrrlll" if score else "rrrlll"), r"\hline",
             head + r" & size & per-sample loss $\ell(y, p)$ & $T(p)$ & $O(p)$ \\", r"\hline"]
    for i, r in enumerate(rows, 1):
        try:
            body = formula_mod.latex(parse(r["expr"], cfg_pset, max_height=10**4, max_size=10**4),
                                  cfg_pset)
        except Exception:  # a display nicety must never break `show`
            body = r"\texttt{%s}" % _tex_escape(r["expr"])
        if cfg_pset.class_sum:
            body = rf"\sum_{{c}} \left[ {body} \right]"
        elif r["sign"] == -1:
            body = rf"\left( {body} \right)"
        sign = "-" if r["sign"] == -1 else ""
        fit = f"{r['fitness']:.4f}"
        if r.get("fitness_std") is not None:
            fit += rf" $\pm$ {r['fitness_std']:.4f}"
        form = r.get("per_class")
        if form:
            star = r"^{*}" if form.get("constant_dropped") else ""
            t, o = f"${form['target_latex']}{star}$", f"${form['other_latex']}{star}$"
        else:
            t = o = "--"
        first = f"{i} & {r['score']:.4f} & {fit}" if score else f"{i} & {fit}"
        lines.append(rf"{first} & {r.get('size', '')} & ${sign}{body}$ & {t} & {o} \\")
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines)


def _tex_escape(text: str) -> str:
    return "".join({"_": r"\_", "{": r"\{", "}": r"\}", "\\": r"\textbackslash{}",
                    "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "^": r"\^{}",
                    "~": r"\~{}"}.get(ch, ch) for ch in text)


def _form_cell(r: dict) -> str:
    """A row's per-class form (its full formula where there is none); where the search's
    sign is unknown the form is the expression as written, and the cell says so."""
    form = r.get("per_class")
    if not form:
        return r["formula"] or r["expr"]
    text = f"T = {form['target']} | O = {form['other']}{' *' if form['constant_dropped'] else ''}"
    if r.get("per_class_sign") is None:
        text += "  (sign unknown: as written, no sign applied)"
    return text


def _table(rows: list[dict], score: bool = False) -> list[str]:
    """The hall-of-fame rows; with ``score`` an elimination's, its score first."""
    first = f"{'score':>7}  {'fitness':>7}" if score else f"{'fitness':>7}  {'± sd':>6}"
    head = "per-class form (T | O)" if any(r.get("per_class") for r in rows) else "formula"
    with_nll = any(r.get("val_nll") is not None for r in rows)  # old stores have none
    lines = [f"{'rank':>4}  {first}  " + (f"{'val NLL':>7}  " if with_nll else "")
             + f"{'size':>4}  {'sign':>4}  {'id':>5}  {'found':<20}  {head}   [expression]"]
    for i, r in enumerate(rows, 1):
        if score:
            first = f"{r['score']:>7.4f}  {r['fitness']:>7.4f}"
        else:
            std = f"{r['fitness_std']:.4f}" if r.get("fitness_std") is not None else ""
            first = f"{r['fitness']:>7.4f}  {std:>6}"
        nll = f"{r['val_nll']:.4f}" if r.get("val_nll") is not None else ""
        sign = f"{r['sign']:+d}" if r["sign"] in (1, -1) else "?"
        lines.append(f"{r.get('rank', i):>4}  {first}  " + (f"{nll:>7}  " if with_nll else "")
                     + f"{r.get('size', ''):>4}  {sign:>4}  {r['id']:>5}  "
                     f"{r.get('found', ''):<20}  {_form_cell(r)}   [{r['expr']}]")
    return lines


def format_summary(s: dict) -> str:
    """A plain-text hall of fame with cross-entropy's fitness under the same budget; led by
    a finished elimination's final ranking when the run has one (what export and compare
    --from-run use), each table saying what it is ranked by."""
    lines = []
    c = s["config"]
    if s.get("status"):
        run_dir = s.get("run_dir", "RUN_DIR")
        lines.append(f"run {run_dir}: {_STATUS_TEXT[s['status']].format(run_dir=run_dir)}")
    per_class = any(r.get("per_class") for r in s["top"] + (s.get("finalists") or []))
    if per_class:
        lines.append("Per-class form, search sign applied: per sample, T at the true class "
                     "+ O summed over the other classes (* = an additive constant dropped); "
                     "full formulas: --json")
    tie = TIE_BREAK_TEXT if s.get("tie_break") == TIE_BREAK else s.get("tie_break")
    if tie and s["top"] and all(r.get("val_nll") is None for r in s["top"]):
        tie += " (not recorded by this run's version: by lowest id)"
    if s.get("finalists"):
        last = s["elimination"][-1] if s.get("elimination") else None
        where = (f"round {last['round']}: {last['steps']} steps, {last['model']}, seed(s) "
                 f"{','.join(str(x) for x in last['seeds'])}") if last else "its last round"
        lines.append(f"Finalists, ranked by elimination (the ranking export and compare "
                     f"--from-run use; score = mean best validation accuracy in {where}; "
                     f"fitness = the search's)")
        lines += _table(s["finalists"], score=True)
        lines.append("")
    elif s.get("elimination"):
        lines.append("An elimination is stored but has not finished (rounds below): export and "
                     "compare --from-run rank by search fitness until it does.")
    what = "Best losses of the search" if s.get("finalists") else "Best losses"
    lines.append(f"{what}, ranked by search fitness ({c['pset']} set; {c['dataset']} / "
                 f"{c['model']}, {c['steps']} steps; fitness = best validation accuracy"
                 + (f", ties broken by {tie}" if tie else "") + ")")
    lines += _table(s["top"])
    for ref in s["reference"]:
        fit = f"{ref['fitness']:.4f}" if ref["fitness"] is not None else ref["status"]
        label = ref["expr"] if ref["name"] == ref["expr"] else f"{ref['name']}  [{ref['expr']}]"
        pad = f"{'':>7}  " if any(r.get("val_nll") is not None for r in s["top"]) else ""
        lines.append(f"{'ref':>4}  {fit:>7}  {'':>6}  {pad}{'':>4}  {'':>4}  {'':>5}  "
                     f"{'':<20}  {label} (same budget and seed)")
    if any(r.get("seeds") for r in s["top"]):
        lines.append("± sd: standard deviation over the seeds of a re-evaluated candidate "
                     "(fitness = their mean; val NLL too); size: nodes of the expression tree")
    if s.get("pareto"):
        lines += ["", "Pareto front: the best fitness at each formula size that beats every "
                      "smaller one", f"  {'size':>4}  {'fitness':>7}  {'id':>5}  formula"]
        lines += [f"  {r['size']:>4}  {r['fitness']:>7.4f}  {r['id']:>5}  {r['formula']}"
                  for r in s["pareto"]]
        lines.append("")
    k = s["counts"]
    rejected = sum(k["rejected"].values())
    lines.append(f"children {k['children']}; evaluated {k['evaluated']}, reused {k['reused']}, "
                 f"failed {k['failed']}, duplicates {k['duplicates']}, near-duplicates "
                 f"{k['near_duplicates']}, rejected {rejected}")
    if k.get("from_cache"):
        n = k["from_cache"]
        lines.append(f"  {n} evaluation{'s' if n != 1 else ''} came from the fitness cache "
                     f"(trained by an earlier run with the same settings)")
    for key, label, done, tail in (
            ("seeding", "seeding (cheap initial fitness)", "scored",
             "; only the re-scored ones rank above"),
            ("reeval", "re-evaluations with more seeds", "done", "")):
        c = k.get(key) or {}
        if sum(c.values()):
            lines.append(f"  {label}: {c['evaluated'] + c['reused']} {done}, {c['failed']} "
                         f"failed, {c['pending']} pending{tail}")
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
