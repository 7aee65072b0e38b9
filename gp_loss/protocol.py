"""The paper's evaluation protocol: transfer tables against cross-entropy and elimination rounds.

Fed by the CLI (``cli_protocol.py``: ``gp-loss compare`` / ``gp-loss eliminate``), by a config
(``config.py``), by a run store (``store.py``) and by ``fitness.evaluate``, which every training
here goes through (the same worker function the search runs, so an executor can run it).

Transfer tables (``compare``): losses x cells (dataset x model x augmentation) x seeds, each run
``evaluate(..., with_test=True)``; per cell and loss the test accuracy of the best-validation
checkpoint (mean, sample std), and per loss vs ``ce`` in the same cell:
- ``p_value``: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) on test accuracies;
  ``None`` when undefined (fewer than 2 successful runs on a side, or both sides constant).
- ``p_value_holm``: Holm's step-down correction over every defined p-value of the table.
- ``wins`` / ``ties`` / ``losses``: seeds paired with ce's run of the same seed (same initial
  weights and batch order); win = higher test accuracy, tie = exactly equal (accuracies are
  count ratios, so equality is exact), loss = lower. Seeds where either run failed are skipped.
With an ``lr`` list every loss trains at each learning rate and keeps, per loss and cell, the
rate with the best mean validation accuracy (ties: the rate listed first); only that rate's
runs enter the statistics. Failed runs are listed with their reason and left out of them.

Elimination (``eliminate``, the paper's protocol, PAPER-NOTES §5): the run's best distinct
candidates from the search (phases initial/child, by search fitness) are retrained in rounds of
rising fidelity. ``keep = [25, 12, 6, 4]`` means: 25 enter round 1, its best 12 enter round 2,
its best 6 round 3, its best 4 round 4, whose ranking is final. Round r trains with
``steps[r]`` (default ``steps_factor[r]`` x surrogate.steps, factors 1, 2, 3, 4 as the paper's
16k/32k/48k/64k), ``model[r]`` (default: the run's) and ``seeds[r]`` seeds (surrogate.seed,
+1, ...). Score = mean best validation accuracy over the seeds, a failed seed counting 0; ties
go to the better previous score, then the lower candidate id. Every training is a candidates row
of phase ``elimR`` (``parent_id`` = the search candidate, ``birth`` = the seed, ``key`` = its
canonical key), written ``pending`` before submission: a rerun re-submits pending rows, skips
finished ones, and is a no-op once all rounds are done.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from typing import Callable, Sequence

log = logging.getLogger("gp_loss")

BASELINE = "ce"
ELIM_DEFAULTS = {"keep": [25, 12, 6, 4], "steps": [], "steps_factor": [1, 2, 3, 4],
                 "model": [], "seeds": [1]}
SEARCH_PHASES = ("initial", "child")
RUN_FIELDS = ("seed", "val_acc", "test_acc", "seconds", "status", "reason")


class InputError(ValueError):
    """Bad input to the protocol (unknown loss/dataset/model, bad rounds); CLI exit 2."""


# ------------------------------------------------------------------------------ statistics

def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0.0 for one value, None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Welch t-test p-value; None when undefined (n < 2 or both sides constant)."""
    if len(a) < 2 or len(b) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return None
    import warnings

    from scipy import stats

    with warnings.catch_warnings():  # near-constant samples: scipy warns, the value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(list(a), list(b), equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, same order; None entries stay None and don't count."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m, out, running = len(idx), [None] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def wins_ties_losses(runs: Sequence[dict], base: Sequence[dict]) -> tuple[int, int, int]:
    """Seed-paired test-accuracy comparison of ``runs`` against ``base`` (ok runs only)."""
    ref = {r["seed"]: r["test_acc"] for r in base if _ok(r)}
    w = t = l = 0
    for r in runs:
        if _ok(r) and r["seed"] in ref:
            d = r["test_acc"] - ref[r["seed"]]
            w, t, l = w + (d > 0), t + (d == 0), l + (d < 0)
    return w, t, l


def _ok(run: dict) -> bool:
    return run.get("status") == "ok" and run.get("test_acc") is not None


def select_lr(by_lr: dict[float, list[dict]]) -> float:
    """The learning rate whose ok runs have the best mean validation accuracy (ties: the first
    listed; a rate with no ok run ranks last)."""
    def score(lr):
        vals = [r["val_acc"] for r in by_lr[lr] if r.get("status") == "ok" and r.get("val_acc")
                is not None]
        return statistics.fmean(vals) if vals else -math.inf
    best = None
    for lr in by_lr:
        if best is None or score(lr) > score(best):
            best = lr
    return best


# ------------------------------------------------------------------------------ compare

@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    expr: str  # canonical text from our printer
    pset: str  # what fitness.evaluate takes (PSet.source)
    sign: int
    source: str  # "zoo" | "expr" | "run:DIR#ID"
    pset_name: str = "paper"


def make_loss(text: str, pset, name: str | None = None, source: str | None = None) -> Loss:
    """Parse a zoo name or expression; sign from the integrity check (+1 if rejected)."""
    from .screen import integrity
    from .trees import ParseError, parse, to_text

    try:
        tree = parse(text, pset)
    except ParseError as exc:
        raise InputError(f"--loss {text!r}: {exc}") from None
    integ = integrity(tree, pset)
    if not integ.accepted:
        log.warning("the integrity check rejects %s (%s); training it with sign +1", text,
                    integ.reason)
    zoo = text in (pset.zoo or {})
    return Loss(name or text, to_text(tree, pset), pset.source, integ.sign if integ.accepted
                else 1, source or ("zoo" if zoo else "expr"), pset.name)


def search_candidates(store, k: int) -> list[dict]:
    """The run's best ``k`` distinct search candidates (phases initial/child; fitness desc, id)."""
    best: dict = {}
    for status in ("evaluated", "reused"):
        for r in store.candidates(status=status):
            if r["phase"] in SEARCH_PHASES and r["fitness"] is not None:
                key = r["key"] or f"id:{r['id']}"
                if key not in best or (r["fitness"], -r["id"]) > (best[key]["fitness"],
                                                                   -best[key]["id"]):
                    best[key] = r
    return sorted(best.values(), key=lambda r: (-r["fitness"], r["id"]))[:k]


def run_losses(run_dir, k: int) -> list[Loss]:
    """``rank1`` .. ``rankK``: the best distinct candidates of a search run."""
    from .psets import load_pset
    from .store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        ps = load_pset(store.config().get("search", {}).get("pset", "paper"))
        rows = search_candidates(store, k)
    if not rows:
        raise InputError(f"{run_dir}: the run has no evaluated candidates yet")
    return [make_loss(r["expr"], ps, f"rank{i}", f"run:{run_dir}#{r['id']}")
            for i, r in enumerate(rows, 1)]


@dataclasses.dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    augment: str
    surrogate: dict  # the evaluation config (device resolved), lr set per job

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.model}/{self.augment}"


def plan_cells(cfg, datasets: Sequence[str], models: Sequence[str], augments: Sequence[str],
               device: str, preflight: bool = True) -> list[Cell]:
    """Every dataset x model x augmentation (empty = the config's); bad names -> InputError."""
    from .config import apply_overrides

    cells = []
    for d in datasets or [cfg.surrogate.dataset]:
        for m in models or [cfg.surrogate.model]:
            for a in augments or [cfg.surrogate.augment]:
                c = apply_overrides(cfg, [f"surrogate.dataset={d}", f"surrogate.model={m}",
                                          f"surrogate.augment={a}"])
                sur = {**dataclasses.asdict(c.surrogate), "device": device}
                cells.append(Cell(d, m, a, sur))
    if preflight:
        for c in cells:
            _preflight(c.surrogate)
    return cells


def _preflight(sur: dict) -> None:
    """Load the data and build the model once in the driver, so that an unknown dataset or
    model, or a missing data root, is bad input rather than a column of failed runs."""
    from .data import load_splits
    from .models import build_model

    try:
        s = load_splits(sur["dataset"], data_root=sur["data_root"], split_seed=sur["split_seed"],
                        val_fraction=sur["val_fraction"], test_fraction=sur["test_fraction"],
                        train_fraction=sur["train_fraction"])
        build_model(sur["model"], s.in_channels, s.num_classes, sur["image_size"] or s.image_size)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(str(exc).strip().splitlines()[0] if str(exc).strip() else
                         type(exc).__name__) from None


def run_jobs(jobs: list[tuple], executor, evaluate_fn: Callable, on_done=None) -> list[dict]:
    """Run ``evaluate_fn(*job)`` for every job, ``executor.capacity`` in flight; results in job
    order. An exception carried by a future becomes a failed result."""
    from .executors import wait_first

    results: list = [None] * len(jobs)
    inflight, queue = {}, list(range(len(jobs)))
    while queue or inflight:
        while queue and len(inflight) < max(1, getattr(executor, "capacity", 1)):
            i = queue.pop(0)
            inflight[executor.submit(evaluate_fn, *jobs[i])] = i
        done, _ = wait_first(inflight)
        for fut in done:
            i = inflight.pop(fut)
            results[i] = _result(fut)
            if on_done:
                on_done(i, results[i])
    return results


def _result(fut) -> dict:
    try:
        return fut.result()
    except Exception as exc:  # a lost worker fails that run only
        return {"status": "failed", "reason": f"error: {type(exc).__name__}: {exc}"[:300],
                "fitness": 0.0, "val_acc": None, "test_acc": None, "seconds": None}


def compare(losses: Sequence[Loss], cells: Sequence[Cell], seeds: Sequence[int],
            lrs: Sequence[float] = (), executor=None, evaluate_fn: Callable | None = None,
            on_done=None) -> dict:
    """Train every loss in every cell for every seed (and lr); the ``compare --json`` object."""
    from .executors import make_executor
    from .fitness import evaluate

    evaluate_fn = evaluate_fn or evaluate
    if not any(l.name == BASELINE for l in losses):
        raise InputError("the comparison needs the baseline loss 'ce'")
    lr_list = list(lrs) or [None]
    jobs, keys = [], []
    for ci, cell in enumerate(cells):
        for loss in losses:
            for lr in lr_list:
                sur = cell.surrogate if lr is None else {**cell.surrogate, "lr": float(lr)}
                for seed in seeds:
                    jobs.append((loss.expr, loss.pset, sur, seed, loss.sign, True))
                    keys.append((ci, loss.name, lr, seed))
    t0 = time.perf_counter()
    own = executor is None
    executor = executor or make_executor("serial")
    try:
        results = run_jobs(jobs, executor, evaluate_fn,
                           on_done and (lambda i, r: on_done(i, len(jobs), keys[i], r)))
    finally:
        if own:
            executor.shutdown()
    grouped: dict = {}
    for (ci, name, lr, seed), res in zip(keys, results):
        run = {"seed": seed, **{f: res.get(f) for f in RUN_FIELDS if f != "seed"}}
        grouped.setdefault((ci, name), {}).setdefault(lr, []).append(run)
    out_cells = []
    for ci, cell in enumerate(cells):
        entries = {}
        for loss in losses:
            by_lr = grouped[(ci, loss.name)]
            lr = select_lr(by_lr) if lrs else None
            runs = by_lr[lr]
            tests = [r["test_acc"] for r in runs if _ok(r)]
            mean, std = mean_std(tests)
            entry = {"loss": loss.name, "expr": loss.expr, "sign": loss.sign,
                     "lr": lr if lrs else cell.surrogate["lr"], "runs": runs,
                     "n_ok": len(tests), "n_failed": len(runs) - len(tests),
                     "test_acc_mean": mean, "test_acc_std": std}
            if lrs:
                entry["lr_val_acc_mean"] = {
                    str(x): mean_std([r["val_acc"] for r in rs if r.get("status") == "ok"
                                      and r.get("val_acc") is not None])[0]
                    for x, rs in by_lr.items()}
            entries[loss.name] = entry
        base = entries[BASELINE]
        base_tests = [r["test_acc"] for r in base["runs"] if _ok(r)]
        for name, e in entries.items():
            if name == BASELINE:
                e.update(p_value=None, p_value_holm=None, wins=None, ties=None, losses=None)
                continue
            w, t, l = wins_ties_losses(e["runs"], base["runs"])
            e.update(p_value=welch_p([r["test_acc"] for r in e["runs"] if _ok(r)], base_tests),
                     wins=w, ties=t, losses=l)
        out_cells.append({"dataset": cell.dataset, "model": cell.model, "augment": cell.augment,
                          "steps": cell.surrogate["steps"], "results": entries})
    comparisons = [e for c in out_cells for n, e in c["results"].items() if n != BASELINE]
    for e, p in zip(comparisons, holm([e["p_value"] for e in comparisons])):
        e["p_value_holm"] = p
    n_failed = sum(e["n_failed"] for c in out_cells for e in c["results"].values())
    return {"losses": [{"name": l.name, "expr": l.expr, "sign": l.sign, "pset": l.pset_name,
                        "source": l.source} for l in losses], "baseline": BASELINE,
            "seeds": list(seeds), "lrs": [float(x) for x in lrs] or None, "cells": out_cells,
            "runs_total": len(jobs), "failed_runs": sum(1 for r in results if not _ok(r)),
            "failed_in_table": n_failed, "seconds": time.perf_counter() - t0,
            "definitions": {
                "test_acc": "test accuracy of the best-validation checkpoint",
                "p_value": "Welch t-test vs ce on test accuracy (null when undefined)",
                "p_value_holm": "Holm-corrected over all comparisons of the table",
                "wins_ties_losses": "seed-paired test accuracy vs ce (same seed); tie = equal",
                "lr": "per loss and cell, the lr with the best mean validation accuracy"}}


def markdown_table(result: dict, digits: int = 2) -> str:
    """Paper-style table: rows = losses, columns = cells, test accuracy % mean ± std, best
    mean per column in bold, † where the Holm-corrected p vs ce is below 0.05."""
    cells = result["cells"]
    names = [l["name"] for l in result["losses"]]
    head = [f"{c['dataset']} / {c['model']} / {c['augment']}" for c in cells]
    lines = ["| loss | " + " | ".join(head) + " |", "|---|" + "---:|" * len(cells)]
    best = []
    for c in cells:
        means = [e["test_acc_mean"] for e in c["results"].values() if e["test_acc_mean"] is not None]
        best.append(max(means) if means else None)
    for name in names:
        row = [f"`{name}`" if len(name) > 24 else name]
        for c, b in zip(cells, best):
            e = c["results"].get(name)
            if e is None or e["test_acc_mean"] is None:
                row.append("n/a")
                continue
            text = f"{100 * e['test_acc_mean']:.{digits}f} ± {100 * e['test_acc_std']:.{digits}f}"
            if b is not None and e["test_acc_mean"] == b:
                text = f"**{text}**"
            if e.get("p_value_holm") is not None and e["p_value_holm"] < 0.05:
                text += " †"
            if e.get("n_failed"):
                text += f" ({e['n_failed']} failed)"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    n = len(result.get("seeds", []))
    lines.append("")
    lines.append(f"Test accuracy (%) at the best-validation checkpoint, mean ± std over {n} "
                 f"seed(s); bold: best in the column; †: Holm-corrected Welch p < 0.05 vs ce.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ eliminate

@dataclasses.dataclass(frozen=True)
class Round:
    index: int  # 1-based; its rows have phase f"elim{index}"
    size: int  # candidates trained in this round
    keep: int  # how many of them enter the next round (= size in the last round)
    steps: int
    model: str
    seeds: tuple[int, ...]


def resolve_rounds(table: dict | None, surrogate: dict) -> list[Round]:
    """The rounds from an ``[eliminate]`` table (keys of ``ELIM_DEFAULTS``) over the run's
    surrogate config. Per-round lists may be empty (default) or hold one value (every round)."""
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
    seeds = per_round("seeds", _pos_int, "positive integers (seed counts)")
    s0 = int(surrogate.get("seed", 0))
    return [Round(i + 1, keep[i], keep[i + 1] if i + 1 < n else keep[i],
                  int(steps[i] or max(1, round(factors[i] * surrogate["steps"]))),
                  models[i] or surrogate["model"], tuple(range(s0, s0 + (seeds[i] or 1))))
            for i in range(n)]


def _pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def eliminate(store, rounds: Sequence[Round], surrogate: dict, executor=None,
              evaluate_fn: Callable | None = None, on_done=None) -> dict:
    """Run (or resume, or just report) the elimination rounds on a writable run store."""
    import json

    from .executors import make_executor
    from .fitness import evaluate
    from .psets import load_pset

    evaluate_fn = evaluate_fn or evaluate
    ps = load_pset(store.config().get("search", {}).get("pset", "paper"))
    # What the results depend on; the device and the executor may change between attempts.
    plan = json.loads(json.dumps({"rounds": [dataclasses.asdict(r) for r in rounds],
                                  "surrogate": {k: v for k, v in surrogate.items()
                                                if k != "device"}}, sort_keys=True))
    saved = store.meta().get("eliminate")
    if saved is None:
        entrants = [r["id"] for r in search_candidates(store, rounds[0].size)]
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
            have = {(r["parent_id"], r["birth"]) for r in store.candidates(phase=phase)}
            missing = [(c, s) for c in entrants for s in rnd.seeds if (c, s) not in have]
            with store.transaction():  # all of the round's rows exist before any training
                for cid, seed in missing:
                    src = sources[cid]
                    store.add_candidate(src["expr"], "pending", phase=phase, birth=seed,
                                        key=src["key"], parent_id=cid, sign=src["sign"],
                                        formula=src["formula"])
            todo = store.candidates(status="pending", phase=phase)
            sur = {**surrogate, "steps": rnd.steps, "model": rnd.model}
            jobs = [(r["expr"], ps.source, sur, r["birth"], r["sign"] or 1, False) for r in todo]

            def record(i, res, todo=todo, rnd=rnd):
                ok = res.get("status") == "ok" and res.get("val_acc") is not None
                store.update_candidate(todo[i]["id"], status="evaluated" if ok else "failed",
                                       fitness=res["val_acc"] if ok else None,
                                       reason=None if ok else res.get("reason"),
                                       seconds=res.get("seconds"),
                                       result={k: v for k, v in res.items() if k != "expr"})
                if on_done:
                    on_done(rnd, todo[i], res)
            run_jobs(jobs, executor, evaluate_fn, record)
            trained += len(jobs)
            rows = [r for r in store.candidates(phase=phase) if r["parent_id"] in sources]
            runs = {cid: [] for cid in entrants}
            for r in rows:
                runs[r["parent_id"]].append({"seed": r["birth"], "val_acc": r["fitness"],
                                             "status": r["status"], "reason": r["reason"],
                                             "seconds": r["seconds"], "row_id": r["id"]})
            score = {c: statistics.fmean([x["val_acc"] if x["status"] == "evaluated" else 0.0
                                          for x in runs[c]]) for c in entrants}
            ranked = sorted(entrants, key=lambda c: (-score[c], -prev[c], c))
            go_on = rounds[pos + 1].size if pos + 1 < len(rounds) else len(ranked)
            out.append({"round": rnd.index, "phase": phase, "steps": rnd.steps,
                        "model": rnd.model, "seeds": list(rnd.seeds), "entrants": len(ranked),
                        "kept": min(go_on, len(ranked)),
                        "members": [{"rank": k, "id": c, "expr": sources[c]["expr"],
                                     "formula": sources[c]["formula"], "score": score[c],
                                     "previous_score": prev[c], "kept": k <= go_on,
                                     "runs": sorted(runs[c], key=lambda x: x["seed"])}
                                    for k, c in enumerate(ranked, 1)]})
            prev, entrants = score, ranked[:go_on]
    finally:
        if own:
            executor.shutdown()
    return {"run_dir": str(store.run_dir), "rounds": out, "trained_now": trained,
            "finalists": [{k: m[k] for k in ("rank", "id", "expr", "formula", "score")}
                          for m in out[-1]["members"]] if out else []}
