"""Fitness that rewards transfer: a candidate trained on several tasks (``[[search.tasks]]``).

A task is a named set of ``[surrogate]`` overrides (``Config.task_surrogates``). The driver
trains a candidate on the tasks one at a time, in the listed order, each through the same
machinery as a single evaluation (the fitness cache per task, packs, executors); a result that
fails a task (a pre-screen, a NaN) ends it, the later tasks untrained. The tasks' results are
then one result (``combine``)::

    fitness = mean over tasks t of (val_acc_t - baseline_t)      (two or more tasks)

where ``baseline_t`` is ``BASELINE`` (torch's exact cross-entropy, ``ce_torch``) trained on task
t with the same settings and seed: trained once per (task, seed) at the start of a run, for the
seed of every re-evaluation too (``Evolution._ensure_baselines``). A task's ``gain`` is its term of that mean.
One task (or none) keeps the fitness it always had, the validation accuracy: ``multi`` is False
and results are not wrapped.

While a candidate is between tasks, the tasks done so far are stored in its pending row
(``partial``), so a killed search resumes at the next task and repeats no training.
"""
from __future__ import annotations

import statistics

BASELINE = "ce_torch"  # the reference each task's gain is measured against (reference set)
BASELINE_PHASES = {"baseline": "main", "baseline_seeding": "seeding"}


def multi(tasks: list) -> bool:
    """Whether fitness is the mean gain over tasks (two or more tasks)."""
    return len(tasks) >= 2


def entry(name: str, result: dict) -> dict:
    """A task's stored result: the evaluation's dict with the task ``name`` (no expression:
    the row holds it)."""
    return {"name": name, **{k: v for k, v in result.items() if k != "expr"}}


def partial(entries: list[dict]) -> dict:
    """What a pending row holds between tasks."""
    return {"status": "pending", "partial": True, "tasks": entries}


def done_entries(row_result: dict | None) -> list[dict]:
    """The task results a pending row already holds (``partial``), else []."""
    if row_result and row_result.get("partial"):
        return list(row_result.get("tasks") or [])
    return []


def combine(entries: list[dict], baseline: list[float] | None) -> dict:
    """One result from the task results (in task order; the last may have failed).

    ``baseline``: the reference's validation accuracy per task at this seed (None while it is
    the reference itself being trained: then the gains are 0 by definition). A failure is
    the failed task's reason (``failed_task`` names it) and fitness 0.0, as a single failed
    evaluation."""
    seconds = sum(e.get("seconds") or 0.0 for e in entries)
    out = {"tasks": entries, "seconds": seconds, "steps": sum(e.get("steps") or 0 for e in entries),
           "device": entries[-1].get("device"),
           "cached": all(bool(e.get("cached")) for e in entries)}
    last = entries[-1]
    if last.get("status") != "ok":
        return {**out, "status": "failed", "reason": last.get("reason"),
                "failed_task": last["name"], "fitness": 0.0, "val_acc": None,
                "test_acc": None, "train_acc": None}
    accs = [float(e["val_acc"]) for e in entries]
    base = accs if baseline is None else baseline
    for e, b in zip(entries, base):
        e["gain"] = float(e["val_acc"]) - float(b)
    nlls = [e.get("val_nll") for e in entries]
    return {**out, "status": "ok", "reason": None,
            "fitness": statistics.fmean(e["gain"] for e in entries),
            "val_acc": statistics.fmean(accs),
            # the tie-break between equal fitnesses: the tasks' mean, None unless each has one
            "val_nll": None if None in nlls else statistics.fmean(nlls),
            "test_acc": None, "train_acc": None}


def table(row_result: dict | None, names: list[str]) -> list[dict] | None:
    """``show``'s per-task entries of a row (``name``, ``val_acc``, ``gain``, ``status``), or
    None for a run without tasks. A one-task run's row holds the plain result: its gain is
    None (there is no reference to measure it against)."""
    if not names:
        return None
    res = row_result or {}
    if "tasks" in res:
        return [{"name": e.get("name"), "val_acc": e.get("val_acc"), "gain": e.get("gain"),
                 "status": e.get("status"), "reason": e.get("reason")}
                for e in res["tasks"]]
    return [{"name": names[0], "val_acc": res.get("val_acc"), "gain": None,
             "status": res.get("status"), "reason": res.get("reason")}]
