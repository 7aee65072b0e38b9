"""The text and LaTeX of ``gp-loss show``: a run's summary (``report.summary``) for people.

``format_summary`` is the plain-text hall of fame (led by a finished elimination's finalists,
each table saying what it is ranked by, then the references, the Pareto front, the counts and
the seconds), ``format_latex`` is ``show --latex`` (LaTeX ``tabular``s of the per-sample losses
and their per-class forms) and ``format_elimination`` the lines of the elimination rounds (also
printed by ``gp-loss eliminate``). Used by ``cli/run.py`` (``show``, the table that ends a
search) and ``cli/protocol.py``; everything shown comes from the summary dict, except the LaTeX
formulas, rendered here from each row's expression (``formula.latex``).
"""
from __future__ import annotations

from ..lang.psets import load_pset
from ..lang.trees import parse
from .ranking import TIE_BREAK, TIE_BREAK_TEXT


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
        setting = (f"{last['steps']} steps, {last['model']}" if last and not last.get("tasks")
                   else "tasks " + ", ".join(f"{t['name']} {t['steps']} steps"
                                            for t in last["tasks"]) if last else "")
        where = (f"round {last['round']}: {setting}, seed(s) "
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
    task_list = c.get("tasks") or []
    if len(task_list) >= 2:
        where = f"{len(task_list)} tasks: " + ", ".join(t["name"] for t in task_list)
        fit = ("fitness = mean over tasks of (best validation accuracy - ce_torch's, same "
               "settings and seed)")
    else:
        where = f"{c['dataset']} / {c['model']}, {c['steps']} steps"
        fit = "fitness = best validation accuracy"
    lines.append(f"{what}, ranked by search fitness ({c['pset']} set; {where}; {fit}"
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
    if len(task_list) >= 2 and s["top"]:
        lines += [""] + format_tasks(s["top"], s.get("baselines") or [], task_list)
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


def format_tasks(top: list[dict], baselines: list[dict], task_list: list[dict]) -> list[str]:
    """The top rows per task: best validation accuracy and gain over ce_torch (the first
    seed's, on the main settings), then ce_torch's own accuracy; a row that failed a task
    says why, and the tasks after it are blank (never trained)."""
    names = [t["name"] for t in task_list]
    width = max(16, *(len(n) + 2 for n in names))
    lines = ["Per task: best validation accuracy and gain over ce_torch (same settings and "
             "seed); the tasks:"]
    for t in task_list:
        lines.append(f"  {t['name']}: {t['dataset']} / {t['model']}, {t['steps']} steps, "
                     f"lr {t['lr']:g}, train_fraction {t['train_fraction']:g}")
    lines.append(f"{'rank':>4}  {'id':>5}  " + "".join(f"{n:<{width}}" for n in names))
    for i, r in enumerate(top, 1):
        cells = {e["name"]: e for e in r.get("tasks") or []}
        row = ""
        for n in names:
            e = cells.get(n)
            if e is None:
                text = ""
            elif e.get("status") != "ok" or e.get("val_acc") is None:
                text = f"failed: {(e.get('reason') or '?')[:width - 9]}"
            else:
                gain = f" {e['gain']:+.4f}" if e.get("gain") is not None else ""
                text = f"{e['val_acc']:.4f}{gain}"
            row += f"{text:<{width}}"
        lines.append(f"{r.get('rank', i):>4}  {r['id']:>5}  {row}")
    main = [b for b in baselines if b["settings"] == "main" and b["seed_offset"] == 0]
    if main and main[0].get("tasks"):
        accs = {e["name"]: e.get("val_acc") for e in main[0]["tasks"]}
        lines.append(f"{'ce_torch':>12}  " + "".join(
            f"{(f'{accs[n]:.4f}' if accs.get(n) is not None else main[0]['status']):<{width}}"
            for n in names))
    return lines


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
        where = (f"{r['steps']} steps, {r['model']}" if not r.get("tasks") else
                 "tasks " + ", ".join(f"{t['name']} {t['steps']} steps" for t in r["tasks"]))
        lines.append(f"round {r['round']} ({r['phase']}): {r['entrants']} candidates, "
                     f"{where}, seed(s) {seeds} -> {state}")
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
                rank, score = "-", f"{len(done)}/{len(r['seeds']) * len(r.get('tasks') or [0])}"
            note = ("  (out)" if r["complete"] and not m["kept"] else "") + \
                (f"  [{failed} failed]" if failed else "")
            formula = m["formula"] or m["expr"]
            expr = "" if formula == m["expr"] else f"   [{m['expr']}]"
            lines.append(f"  {rank:>4}  {score:>6}  {m['previous_score']:.4f}  {m['id']:>5}  "
                         f"{formula}{expr}{note}")
    tasks = any(r.get("tasks") for r in rounds)
    lines.append("score = mean best validation accuracy over the round's seeds"
                 + (" and tasks (ranked as the mean gain over ce_torch would be: its accuracy "
                    "is one number for every entrant)" if tasks else "")
                 + " (a failed run counts 0); before = the previous round's score (round 1: "
                   "the search fitness)")
    return lines
