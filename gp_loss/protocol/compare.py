"""Transfer tables: discovered losses against cross-entropy across datasets, models, augmentations.

``compare``: losses x cells (dataset x model x augmentation) x seeds, each run
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
``markdown_table`` renders the result paper-style.

Fed by the CLI (``cli/protocol.py``: ``gp-loss compare``), a config
(``gp_loss.config``; cells checked against ``data.py``/``models.py`` before any run), losses parsed
by ``trees`` and oriented by ``screen.integrity``, a run store (``rank1``.. via
``RunStore.best``) and ``fitness.evaluate`` via ``protocol.run_jobs``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from typing import Callable, Sequence

from ..errors import InputError
from .jobs import run_jobs

log = logging.getLogger("gp_loss")

BASELINE = "ce"
RUN_FIELDS = ("seed", "val_acc", "test_acc", "seconds", "status", "reason", "pack_k")


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
    from ..screen.integrity import integrity
    from ..lang.trees import ParseError, parse, to_text

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


def run_losses(run_dir, k: int) -> list[Loss]:
    """``rank1`` .. ``rankK``: a run's finalists -- the final ranking of its elimination when
    one finished in the run, else its best distinct search candidates."""
    from ..lang.psets import load_pset
    from ..runs.store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        ps = load_pset(store.config().get("search", {}).get("pset", "paper"))
        rows = store.best(k)
    how = "elimination" if rows and "elimination_score" in rows[0] else "search"
    if how == "elimination":
        log.info("%s: ranking by its finished elimination", run_dir)
    if not rows:
        raise InputError(f"{run_dir}: the run has no evaluated candidates yet")
    return [make_loss(r["expr"], ps, f"rank{i}", f"run:{run_dir}#{r['id']} ({how})")
            for i, r in enumerate(rows, 1)]


@dataclasses.dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    augment: str
    surrogate: dict  # the evaluation config (device resolved), lr set per job
    extra: tuple = ()  # other surrogate settings of an explicit --cell, as (key, value) pairs

    @property
    def label(self) -> str:
        more = "".join(f" {k}={v}" for k, v in self.extra)
        return f"{self.dataset}/{self.model}/{self.augment}{more}"


_CELL_AXES = ("dataset", "model", "augment")


def parse_cell(spec: str) -> list[tuple[str, str]]:
    """``"dataset=mnist5k,model=tiny,train_fraction=0.1"`` -> [(key, value), ...] (surrogate
    keys; checked when the config is built)."""
    pairs = []
    for part in (p.strip() for p in spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"--cell {spec!r}: expected KEY=VALUE[,KEY=VALUE...] with "
                             f"[surrogate] keys, e.g. dataset=mnist5k,train_fraction=0.1")
        pairs.append((key.strip(), value.strip()))
    return pairs


def plan_cells(cfg, datasets: Sequence[str], models: Sequence[str], augments: Sequence[str],
               device: str, preflight: bool = True, cell_specs: Sequence[str] = ()
               ) -> list[Cell]:
    """Every dataset x model x augmentation (empty = the config's), or the explicit cells of
    ``cell_specs`` (surrogate settings over the config each); bad names -> InputError."""
    from ..config import apply_overrides

    if cell_specs and (datasets or models or augments):
        raise InputError("give either --cell or --dataset/--model/--augment, not both")
    plans = ([parse_cell(spec) for spec in cell_specs] if cell_specs else
             [[("dataset", d), ("model", m), ("augment", a)]
              for d in datasets or [cfg.surrogate.dataset]
              for m in models or [cfg.surrogate.model]
              for a in augments or [cfg.surrogate.augment]])
    cells = []
    for pairs in plans:
        c = apply_overrides(cfg, [f"surrogate.{k}={v}" for k, v in pairs])
        sur = {**dataclasses.asdict(c.surrogate), "device": device}
        extra = tuple((k, sur[k]) for k, _ in pairs if k not in _CELL_AXES)
        cells.append(Cell(c.surrogate.dataset, c.surrogate.model, c.surrogate.augment, sur,
                          extra))
    if preflight:
        for c in cells:
            _preflight(c.surrogate)
    return cells


def _preflight(sur: dict) -> None:
    """fitness.preflight, reported as this module's InputError (exit 2 on the CLI)."""
    from ..surrogate.fitness import preflight

    try:
        preflight(sur)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def compare(losses: Sequence[Loss], cells: Sequence[Cell], seeds: Sequence[int],
            lrs: Sequence[float] = (), executor=None, evaluate_fn: Callable | None = None,
            on_done=None, width: int = 1) -> dict:
    """Train every loss in every cell for every seed (and lr); the ``compare --json`` object.
    ``width``: candidates per pack (``executor.candidates_per_worker``; ``run_jobs``)."""
    from ..execution import make_executor
    from ..surrogate.fitness import evaluate

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
                           on_done and (lambda i, r: on_done(i, len(jobs), keys[i], r)),
                           width=width)
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
                          "steps": cell.surrogate["steps"],
                          "train_fraction": cell.surrogate["train_fraction"],
                          "settings": dict(cell.extra), "label": cell.label,
                          "results": entries})
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
    head = [f"{c['dataset']} / {c['model']} / {c['augment']}"
            + "".join(f" / {k}={v}" for k, v in (c.get("settings") or {}).items())
            for c in cells]
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
