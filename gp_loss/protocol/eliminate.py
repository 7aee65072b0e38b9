"""Elimination (the paper's protocol, PAPER-NOTES §5): retrain a run's best in rounds.

``eliminate``: the run's best distinct candidates from the search (phases initial/child, by
search fitness) are retrained in rounds of rising fidelity. ``keep = [25, 12, 6, 4]`` means: 25
enter round 1, its best 12 enter round 2, its best 6 round 3, its best 4 round 4, whose ranking
is final. Round r trains with ``steps[r]`` (default ``steps_factor[r]`` x surrogate.steps,
factors 1, 2, 3, 4 as the paper's 16k/32k/48k/64k), ``model[r]`` (default: the run's) and
``seeds[r]`` seeds (surrogate.seed, +1, ...). With ``stages`` (the paper's progressive learning,
a list of tables with steps and optionally image_size, randaugment_magnitude, dropout; see
``train.py``) round r instead trains stages 1..r from scratch, for the sum of their steps under
one learning-rate schedule. Score = mean best validation accuracy over the seeds, a failed
seed counting 0; ties go to the better previous score, then the lower candidate id
(``score_round``). Every training is a candidates row of phase ``elimR`` (``parent_id`` = the
search candidate, ``birth`` = the seed, ``key`` = its canonical key), written ``pending``
before submission: a rerun re-submits pending rows, skips finished ones, and is a no-op once
all rounds are done. The plan (rounds, surrogate, entrants) is the store's meta
``eliminate``; ``stored_rounds`` rebuilds the tables from it for ``show`` (``report.py``).
``resolve_rounds`` turns an ``[eliminate]`` table into the rounds.

A run searched on ``[[search.tasks]]`` is eliminated on the same tasks: each entrant trains on
every task for every seed (one row per task, its name in ``mutation``; every task trains, a
failed one counting 0), and round r scales each task's own steps by the round's factor
(``round steps / surrogate.steps``: x1, x2, x3, x4 by default), each task keeping its own model,
learning rate and data. Score = the mean over seeds and tasks; its ranking is the ranking by
mean gain over ce_torch, since ce_torch's accuracy under a round's settings is the same number
for every entrant. Stages and ``eliminate.model`` are refused there (a task sets its model).

Fed by the CLI (``cli_protocol.py``: ``gp-loss eliminate``, through ``protocol``), a writable
run store (``store.py``; the driver is its only writer), ``RunStore.top`` for the
entrants and ``fitness.evaluate`` via ``protocol.run_jobs``.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
from typing import Callable, Sequence

from ..config import MODEL_ALIASES, check_stages
from ..errors import InputError
from .jobs import run_jobs

log = logging.getLogger("gp_loss")

ELIM_DEFAULTS = {"keep": [25, 12, 6, 4], "steps": [], "steps_factor": [1, 2, 3, 4],
                 "model": [], "seeds": [1], "stages": []}


@dataclasses.dataclass(frozen=True)
class Round:
    index: int  # 1-based; its rows have phase f"elim{index}"
    size: int  # candidates trained in this round
    keep: int  # how many of them enter the next round (= size in the last round)
    steps: int
    model: str
    seeds: tuple[int, ...]
    stages: tuple[dict, ...] = ()  # progressive-learning stages 1..index; () = one plain run


def resolve_rounds(table: dict | None, surrogate: dict) -> list[Round]:
    """The rounds from an ``[eliminate]`` table (keys of ``ELIM_DEFAULTS``) over the run's
    surrogate config. Per-round lists may be empty (default) or hold one value (every round);
    ``stages`` needs one stage per round at least and replaces steps/steps_factor."""
    table = dict(table or {})
    unknown = sorted(set(table) - set(ELIM_DEFAULTS))
    if unknown:
        raise InputError(f"unknown key eliminate.{unknown[0]}; keys: {', '.join(ELIM_DEFAULTS)}")
    keep = table.get("keep", ELIM_DEFAULTS["keep"])
    keep = keep if isinstance(keep, list) else [keep]
    if not keep or any(not _pos_int(k) for k in keep) or any(b > a for a, b in zip(keep, keep[1:])):
        raise InputError(f"eliminate.keep must be a non-increasing list of positive integers, "
                         f"got {keep!r}")
    n = len(keep)
    stages = _stages(table, n)
    if "steps_factor" not in table and n != len(ELIM_DEFAULTS["steps_factor"]):
        table["steps_factor"] = list(range(1, n + 1))

    def per_round(name, check, what):
        v = table.get(name, ELIM_DEFAULTS[name])
        v = v if isinstance(v, list) else [v]
        if len(v) not in (0, 1, n) or not all(check(x) for x in v):
            raise InputError(f"eliminate.{name} must be {what}: empty, one value or {n} values "
                             f"(one per round), got {v!r}")
        return [None] * n if not v else v * n if len(v) == 1 else v
    steps = per_round("steps", _pos_int, "positive integers")
    factors = per_round("steps_factor", lambda x: isinstance(x, (int, float)) and x > 0,
                        "positive numbers")
    models = per_round("model", lambda x: isinstance(x, str) and x.strip(), "model names")
    models = [MODEL_ALIASES.get(m, m)  # an old name ("tinycnn") is the current one
              for m in (m or surrogate["model"] for m in models)]
    seeds = per_round("seeds", _pos_int, "positive integers (seed counts)")
    s0 = int(surrogate.get("seed", 0))
    return [Round(i + 1, keep[i], keep[i + 1] if i + 1 < n else keep[i],
                  sum(st["steps"] for st in stages[:i + 1]) if stages else
                  int(steps[i] or max(1, round(factors[i] * surrogate["steps"]))),
                  models[i], tuple(range(s0, s0 + (seeds[i] or 1))),
                  tuple(stages[:i + 1]))
            for i in range(n)]


def _stages(table: dict, n: int) -> list[dict]:
    """The checked ``eliminate.stages`` (empty when not given)."""
    stages = table.get("stages") or []
    if not stages:
        return []
    if any(table.get(k) not in (None, []) for k in ("steps", "steps_factor")):
        raise InputError("eliminate.stages sets each round's steps (the sum of its stages): "
                         "give eliminate.steps or eliminate.steps_factor only without it")

    try:
        stages = check_stages(stages, "eliminate.stages")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if len(stages) < n:
        raise InputError(f"eliminate.stages has {len(stages)} stage(s) for {n} rounds "
                         f"(eliminate.keep): round r trains stages 1..r")
    return stages


def _pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def eliminate(store, rounds: Sequence[Round], surrogate: dict, executor=None,
              evaluate_fn: Callable | None = None, on_done=None, width: int = 1) -> dict:
    """Run (or resume, or just report) the elimination rounds on a writable run store.
    ``width``: candidates per pack (``executor.candidates_per_worker``; ``run_jobs``)."""
    import json

    from ..execution import make_executor
    from ..surrogate.fitness import evaluate
    from ..lang.psets import load_pset

    evaluate_fn = evaluate_fn or evaluate
    ps = load_pset(store.config().get("search", {}).get("pset", "paper"))
    task_list = [dict(t) for t in store.config().get("search", {}).get("tasks") or []]
    if task_list:
        model = MODEL_ALIASES.get(surrogate["model"], surrogate["model"])
        if any(r.stages for r in rounds) or any(r.model != model for r in rounds):
            raise InputError("this run searched on search.tasks: each round trains every task "
                             "with the task's own model and steps scaled by the round; "
                             "eliminate.stages and eliminate.model are not supported there")
    # What the results depend on; the device and the executor may change between attempts.
    plan = json.loads(json.dumps({"rounds": [_plain(r) for r in rounds],
                                  "surrogate": {k: v for k, v in surrogate.items()
                                                if k != "device"},
                                  **({"tasks": task_list} if task_list else {}),
                                  **({"pack": width} if width > 1 else {})}, sort_keys=True))
    saved = store.meta().get("eliminate")
    if saved is None:
        entrants = [r["id"] for r in store.top(rounds[0].size)]
        if not entrants:
            raise InputError(f"{store.run_dir}: the run has no evaluated candidates to eliminate")
        if len(entrants) < rounds[0].size:
            log.warning("the run has only %d distinct evaluated candidates (round 1 asks for %d)",
                        len(entrants), rounds[0].size)
        store.set_meta("eliminate", {**plan, "entrants": entrants})
    else:
        if {k: saved.get(k) for k in plan} != plan:
            raise InputError(f"{store.run_dir}: an elimination with other settings was started "
                             f"here (rounds/surrogate differ); rerun it with the same --config "
                             f"and --set, or use a copy of the run")
        entrants = saved["entrants"]
    sources = {cid: store.candidate(cid) for cid in entrants}
    prev = {cid: sources[cid]["fitness"] or 0.0 for cid in entrants}
    own = executor is None
    executor = executor or make_executor("serial")
    trained, out = 0, []
    try:
        for pos, rnd in enumerate(rounds):
            phase = f"elim{rnd.index}"
            confs = round_surrogates(rnd, surrogate, task_list)
            have = {(r["parent_id"], r["birth"], r["mutation"])
                    for r in store.candidates(phase=phase)}
            missing = [(c, s, t) for c in entrants for s in rnd.seeds for t in confs
                       if (c, s, t) not in have]
            with store.transaction():  # all of the round's rows exist before any training
                for cid, seed, task in missing:
                    src = sources[cid]
                    store.add_candidate(src["expr"], "pending", phase=phase, birth=seed,
                                        key=src["key"], parent_id=cid, sign=src["sign"],
                                        mutation=task)
            todo = store.candidates(status="pending", phase=phase)
            jobs = [(r["expr"], ps.source, confs[r["mutation"]], r["birth"], r["sign"] or 1,
                     False) for r in todo]

            def record(i, res, todo=todo, rnd=rnd):
                ok = res.get("status") == "ok" and res.get("val_acc") is not None
                store.update_candidate(todo[i]["id"], status="evaluated" if ok else "failed",
                                       fitness=res["val_acc"] if ok else None,
                                       reason=None if ok else res.get("reason"),
                                       seconds=res.get("seconds"),
                                       result={k: v for k, v in res.items() if k != "expr"})
                if on_done:
                    on_done(rnd, todo[i], res)
            run_jobs(jobs, executor, evaluate_fn, record, width=width)
            trained += len(jobs)
            go_on = rounds[pos + 1].size if pos + 1 < len(rounds) else len(entrants)
            table = score_round(store, rnd, entrants, sources, prev, go_on,
                                _task_steps(confs))
            out.append(table)
            prev = {m["id"]: m["score"] for m in table["members"]}
            entrants = [m["id"] for m in table["members"] if m["kept"]]
    finally:
        if own:
            executor.shutdown()
    finalists = [{k: m[k] for k in ("rank", "id", "expr", "formula", "score")}
                 for m in out[-1]["members"]] if out else []
    if finalists and len(out) == len(rounds):
        # the final ranking, where export/plot/compare --from-run find it (store.finalists)
        store.set_meta("finalists", [{"id": m["id"], "score": m["score"]} for m in finalists])
    return {"run_dir": str(store.run_dir), "rounds": out, "trained_now": trained,
            "finalists": finalists}


def round_surrogates(rnd: Round, surrogate: dict, task_list: list[dict]) -> dict:
    """Task name -> the surrogate a round trains with (one entry, ``None``, without tasks):
    the round's steps, model and stages; with tasks, each task's own settings with its steps
    scaled by the round's factor (``rnd.steps / surrogate.steps``)."""
    if not task_list:
        return {None: {**surrogate, "steps": rnd.steps, "model": rnd.model,
                       **({"stages": [dict(st) for st in rnd.stages]} if rnd.stages else {})}}
    factor = rnd.steps / surrogate["steps"]
    out = {}
    for t in task_list:
        own = {k: v for k, v in t.items() if k != "name"}
        steps = own.get("steps", surrogate["steps"])
        out[t["name"]] = {**surrogate, **own, "steps": max(1, round(steps * factor))}
    return out


def _task_steps(confs: dict) -> dict | None:
    """Task name -> its steps in a round (None without tasks)."""
    return None if None in confs else {n: c["steps"] for n, c in confs.items()}


def _plain(rnd: Round) -> dict:
    # Without stages the saved plan stays as it was before stages existed, so an elimination
    # started by an older version still resumes.
    d = dataclasses.asdict(rnd)
    if not d["stages"]:
        del d["stages"]
    return d


def score_round(store, rnd: Round, entrants: Sequence[int], sources: dict, prev: dict,
                go_on: int, tasks: dict | None = None) -> dict:
    """One round's table from its stored rows (phase ``elim{index}``).

    ``sources``: search candidate rows by id; ``prev``: the previous round's score by id (round
    1: the search fitness); ``go_on``: how many enter the next round; ``tasks``: the run's
    search.tasks (name -> the round's steps for it), None without. Score = mean best validation accuracy over the
    round's seeds (and tasks), a failed run counting 0; ranked by score, then
    the better previous score, then the lower id. ``complete`` is False while runs are pending
    or missing; the ranking is then provisional (pending runs count 0 too).
    """
    runs: dict = {cid: [] for cid in entrants}
    for r in store.candidates(phase=f"elim{rnd.index}"):
        if r["parent_id"] in runs and r["birth"] in rnd.seeds:
            runs[r["parent_id"]].append({"seed": r["birth"], "task": r["mutation"],
                                         "val_acc": r["fitness"],
                                         "status": r["status"], "reason": r["reason"],
                                         "seconds": r["seconds"], "row_id": r["id"]})
    score = {c: statistics.fmean([x["val_acc"] if x["status"] == "evaluated" else 0.0
                                  for x in runs[c]] or [0.0]) for c in entrants}
    ranked = sorted(entrants, key=lambda c: (-score[c], -prev.get(c, 0.0), c))
    done = sum(x["status"] in ("evaluated", "failed") for c in entrants for x in runs[c])
    total = len(entrants) * len(rnd.seeds) * len(tasks or [None])
    return {"round": rnd.index, "phase": f"elim{rnd.index}", "steps": rnd.steps,
            "model": rnd.model, "seeds": list(rnd.seeds),
            "stages": [dict(st) for st in rnd.stages], "entrants": len(ranked),
            "tasks": [{"name": n, "steps": st} for n, st in tasks.items()] if tasks else None,
            "kept": min(go_on, len(ranked)), "runs_done": done, "runs_total": total,
            "complete": done == total,
            "members": [{"rank": k, "id": c, "expr": sources[c]["expr"],
                         "formula": None,  # a reader computes it from expr
                         "score": score[c],
                         "previous_score": prev.get(c, 0.0), "kept": k <= go_on,
                         "runs": sorted(runs[c], key=lambda x: (x["seed"], x["row_id"]))}
                        for k, c in enumerate(ranked, 1)]}


def stored_rounds(store) -> list[dict] | None:
    """The tables of the elimination stored in a run (None if it has none), read-only: the
    rounds done and the first unfinished one; later rounds, whose entrants are not known yet,
    are left out."""
    saved = store.meta().get("eliminate")
    if not saved:
        return None
    rounds = [Round(**{**r, "seeds": tuple(r["seeds"]), "stages": tuple(r.get("stages", ()))})
              for r in saved["rounds"]]
    entrants = list(saved["entrants"])
    sources = {cid: store.candidate(cid) for cid in entrants}
    prev = {cid: sources[cid]["fitness"] or 0.0 for cid in entrants}
    out = []
    for pos, rnd in enumerate(rounds):
        go_on = rounds[pos + 1].size if pos + 1 < len(rounds) else len(entrants)
        table = score_round(store, rnd, entrants, sources, prev, go_on, _task_steps(
            round_surrogates(rnd, saved["surrogate"], saved.get("tasks") or [])))
        out.append(table)
        if not table["complete"]:
            break
        prev = {m["id"]: m["score"] for m in table["members"]}
        entrants = [m["id"] for m in table["members"] if m["kept"]]
    return out
