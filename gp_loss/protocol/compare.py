"""Transfer tables: losses against a reference loss across datasets, models, augmentations.

``compare``: losses x cells (dataset x model x augmentation, or explicit ``--cell`` settings)
x test seeds x split seeds, each run ``evaluate(..., with_test=True)``; per cell and loss the
test accuracy of the best-validation checkpoint (mean, sample std), and per loss vs the
reference (``ce_torch`` unless told otherwise; ``reference`` in the result) in the same cell:

- ``p_value``: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) on the runs' test
  accuracies -- what it covers: training randomness (seeds: initial weights, batch order) and,
  with ``split_seeds``, the train/validation split; ``None`` when undefined (fewer than 2
  successful runs on a side, or both sides constant). ``p_value_holm``: Holm's step-down
  correction over every defined p-value of the table.
- ``p_bootstrap``: resampling the test images (the trained runs held fixed) -- what it covers:
  which test images happened to be drawn. The test split is never re-split: every split seed
  redraws train/validation only (``data.load_splits``), so all runs of a cell share one test
  set and the per-image results (``test_correct``) can be paired. ``test_acc_diff`` and its
  ``diff_ci95`` come with it; ``p_bootstrap_holm`` over the table.
- ``wins`` / ``ties`` / ``losses``: runs paired with the reference's run of the same seed and
  split seed (same initial weights and batch order); win = higher test accuracy, tie = exactly
  equal (count ratios, so equality is exact), loss = lower. Pairs with a failed run are skipped.
- ``steps_to_reference`` (convergence), ``train_test_gap`` (overfitting) and ``ece``
  (calibration) of the best-validation checkpoint: see ``definitions``.

Learning rates: with an ``lrs`` grid and ``tune_seeds`` every loss (references included) is
trained at every rate on the tuning seeds (disjoint from the test seeds) and keeps, per cell,
the rate with the best mean validation accuracy (ties: the rate listed first); only then do the
test seeds train, at that rate. With ``lrs`` alone (the older protocol) the test seeds train at
every rate and also pick it. Failed runs are listed with their reason and left out of the
statistics. A ``ledger.Ledger`` keeps every finished run, so a killed compare continues.
``markdown_table`` renders the result paper-style.

Fed by the CLI (``cli/protocol.py``: ``gp-loss compare``), a config
(``gp_loss.config``; cells checked against ``data.py``/``models.py`` before any run), losses parsed
by ``trees`` (reference names through ``psets.loss_pset``) and oriented by ``screen.integrity``,
a run store (``rank1``.. via ``RunStore.best``) and ``fitness.evaluate`` via
``protocol.run_jobs``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
import zlib
from typing import Callable, Sequence

from ..errors import InputError
from .jobs import run_jobs
from .ledger import job_key, lasting

log = logging.getLogger("gp_loss")

REFERENCE = "ce_torch"  # torch's exact cross-entropy (the ``reference`` set); --reference
BASELINE = REFERENCE     # the old name
RUN_FIELDS = ("seed", "split_seed", "val_acc", "test_acc", "seconds", "status", "reason",
              "pack_k", "checkpoint_train_acc", "ece", "n_test", "test_correct", "val_curve")
BOOTSTRAP = 2000         # resamples of the test images per comparison
BOOTSTRAP_SEED = 20240313


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
    """Test-accuracy comparison of ``runs`` against ``base``, paired by (seed, split seed)
    (ok runs only)."""
    pair = lambda r: (r["seed"], r.get("split_seed", 0))  # noqa: E731
    ref = {pair(r): r["test_acc"] for r in base if _ok(r)}
    w = t = l = 0
    for r in runs:
        if _ok(r) and pair(r) in ref:
            d = r["test_acc"] - ref[pair(r)]
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
    from ..lang.psets import loss_pset
    from ..screen.integrity import integrity
    from ..lang.trees import ParseError, parse, to_text

    try:
        pset = loss_pset(text, pset)  # ce_torch, label_smoothing[:EPS]: the reference set
        tree = parse(text, pset)
    except ParseError as exc:
        raise InputError(f"--loss {text!r}: {exc}") from None
    integ = integrity(tree, pset)
    if not integ.accepted:
        log.warning("the integrity check rejects %s (%s); training it with sign +1", text,
                    integ.reason)
    zoo = text in (pset.zoo or {}) or text.split(":", 1)[0] in pset.templates
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


def tune_seed_list(seeds: Sequence[int], n: int) -> list[int]:
    """The ``n`` tuning seeds: the ``n`` integers right after the largest test seed, so never a
    test seed."""
    top = max(seeds) if seeds else -1
    return list(range(top + 1, top + 1 + n))


def compare(losses: Sequence[Loss], cells: Sequence[Cell], seeds: Sequence[int],
            lrs: Sequence[float] = (), executor=None, evaluate_fn: Callable | None = None,
            on_done=None, width: int = 1, *, reference: str = REFERENCE,
            tune_seeds: Sequence[int] = (), split_seeds: Sequence[int] = (0,), ledger=None,
            bootstrap: int = BOOTSTRAP) -> dict:
    """Train every loss in every cell for every seed and split seed; the ``compare --json``
    object. ``width``: candidates per pack (``executor.candidates_per_worker``; ``run_jobs``).

    With ``lrs`` and ``tune_seeds``, each loss's rate per cell is chosen first by its mean
    validation accuracy over the tuning seeds (x split seeds), then the test seeds train at
    it; with ``lrs`` alone every rate trains on the test seeds and the best mean validation
    accuracy picks (the test seeds then also select). ``ledger`` (``ledger.Ledger``): runs
    found there are not trained again, and each new one is stored as it finishes."""
    from ..execution import make_executor
    from ..surrogate.fitness import evaluate
    from ..surrogate.packtrain import effective_width

    evaluate_fn = evaluate_fn or evaluate
    if not any(l.name == reference for l in losses):
        raise InputError(f"the comparison needs its reference loss {reference!r} among the "
                         f"losses")
    if tune_seeds and not lrs:
        raise InputError("--tune-seeds chooses among learning rates: give an --lr grid")
    if set(tune_seeds) & set(seeds):
        raise InputError("the tuning seeds must differ from the test seeds")
    offsets = list(split_seeds) or [0]  # relative to each cell's own split_seed
    if len(offsets) > 1:
        from ..surrogate.data import split_varies

        for cell in cells:
            sur = cell.surrogate
            if not split_varies(sur["dataset"], sur["val_fraction"], sur["test_fraction"]):
                raise InputError(f"{cell.label}: this dataset's split with these fractions "
                                 f"(the paper's fixed CIFAR split) does not depend on the "
                                 f"split seed; --split-seeds would repeat identical runs")
    cell_splits = [[c.surrogate["split_seed"] + o for o in offsets] for c in cells]
    splits = cell_splits[0] if len(cells) == 1 else offsets
    t0 = time.perf_counter()
    own = executor is None
    executor = executor or make_executor("serial")
    counts = {"trained": 0, "from_ledger": 0}
    plan = []  # (phase, ci, loss, lr, split, seed) in the order jobs are listed

    def execute(keys: list, with_test: bool) -> list:
        jobs = []
        for _, ci, loss, lr, split, seed in keys:
            sur = {**cells[ci].surrogate, "split_seed": int(split)}  # split: absolute
            if lr is not None:
                sur["lr"] = float(lr)
            jobs.append((loss.expr, loss.pset, sur, seed, loss.sign, with_test))
        results: list = [None] * len(jobs)
        todo = []
        for i, (expr, _, sur, seed, sign, wt) in enumerate(jobs):
            key = job_key(expr, keys[i][2].pset, sur, seed, sign, wt,
                          effective_width(sur["model"], width) if evaluate_fn is evaluate else 1)
            hit = ledger.get(key) if ledger is not None else None
            if hit is not None:
                results[i] = hit
                counts["from_ledger"] += 1
            else:
                todo.append((i, key))

        def finished(n, res):
            i, key = todo[n]
            if ledger is not None and lasting(res):
                ledger.put(key, [jobs[i][0], keys[i][2].pset_name, jobs[i][2], jobs[i][3],
                                 jobs[i][4], with_test], res)
            if on_done:
                on_done(len(plan) - len(keys) + i, total(), keys[i], res)
        fresh = run_jobs([jobs[i] for i, _ in todo], executor, evaluate_fn, finished,
                         width=width)
        counts["trained"] += len(todo)
        for (i, _), res in zip(todo, fresh):
            results[i] = res
        return results

    n_losses = len(losses)
    n_test_lrs = len(lrs) if (lrs and not tune_seeds) else 1
    n_tune = len(cells) * n_losses * len(lrs) * len(offsets) * len(tune_seeds)
    n_test = len(cells) * n_losses * n_test_lrs * len(offsets) * len(seeds)
    total = lambda: n_tune + n_test  # noqa: E731
    try:
        chosen: dict = {}
        tuned: dict = {}
        if tune_seeds:
            keys = [("tune", ci, loss, lr, split, seed) for ci in range(len(cells))
                    for loss in losses for lr in lrs for split in cell_splits[ci]
                    for seed in tune_seeds]
            plan.extend(keys)
            for key, res in zip(keys, execute(keys, False)):
                _, ci, loss, lr, split, seed = key
                tuned.setdefault((ci, loss.name), {}).setdefault(lr, []).append(
                    {"seed": seed, "split_seed": split, **{f: res.get(f) for f in
                                                            ("val_acc", "status", "reason")}})
            chosen = {k: select_lr(by_lr) for k, by_lr in tuned.items()}
        keys = []
        for ci in range(len(cells)):
            for loss in losses:
                grid = ([chosen[(ci, loss.name)]] if tune_seeds else list(lrs) or [None])
                keys += [("test", ci, loss, lr, split, seed) for lr in grid
                         for split in cell_splits[ci] for seed in seeds]
        plan.extend(keys)
        results = execute(keys, True)
    finally:
        if own:
            executor.shutdown()
    grouped: dict = {}
    for (_, ci, loss, lr, split, seed), res in zip(keys, results):
        run = {"seed": seed, "split_seed": split,
               **{f: res.get(f) for f in RUN_FIELDS if f not in ("seed", "split_seed")}}
        if run.get("checkpoint_train_acc") is not None and run.get("test_acc") is not None:
            run["train_test_gap"] = run["checkpoint_train_acc"] - run["test_acc"]
        else:
            run["train_test_gap"] = None
        grouped.setdefault((ci, loss.name), {}).setdefault(lr, []).append(run)
    out_cells = []
    for ci, cell in enumerate(cells):
        entries = {}
        for loss in losses:
            by_lr = grouped[(ci, loss.name)]
            if tune_seeds:
                lr = chosen[(ci, loss.name)]
            else:
                lr = select_lr(by_lr) if lrs else None
            runs = by_lr[lr]
            tests = [r["test_acc"] for r in runs if _ok(r)]
            mean, std = mean_std(tests)
            entry = {"loss": loss.name, "expr": loss.expr, "sign": loss.sign,
                     "pset": loss.pset_name,
                     "lr": lr if lrs else cell.surrogate["lr"], "runs": runs,
                     "n_ok": len(tests), "n_failed": len(runs) - len(tests),
                     "test_acc_mean": mean, "test_acc_std": std,
                     "train_test_gap": _mean_of(runs, "train_test_gap"),
                     "ece": _mean_of(runs, "ece")}
            if lrs:
                source = tuned[(ci, loss.name)] if tune_seeds else by_lr
                entry["lr_val_acc_mean"] = {
                    str(x): mean_std([r["val_acc"] for r in rs if r.get("status") == "ok"
                                      and r.get("val_acc") is not None])[0]
                    for x, rs in source.items()}
            entries[loss.name] = entry
        ref = entries[reference]
        ref_best = {(r["seed"], r["split_seed"]): r["val_acc"] for r in ref["runs"] if _ok(r)}
        ref_tests = [r["test_acc"] for r in ref["runs"] if _ok(r)]
        for name, e in entries.items():
            for r in e["runs"]:
                r["steps_to_reference"] = steps_to(r, ref_best.get((r["seed"], r["split_seed"])))
            e["steps_to_reference"], e["reached_reference"] = median_steps(e["runs"])
            if name == reference:
                e.update(p_value=None, p_value_holm=None, wins=None, ties=None, losses=None,
                         test_acc_diff=None, diff_ci95=None, p_bootstrap=None,
                         p_bootstrap_holm=None)
                continue
            w, t, l = wins_ties_losses(e["runs"], ref["runs"])
            diff, ci95, p_boot = bootstrap_diff(e["runs"], ref["runs"], bootstrap,
                                                seed=zlib.crc32(cell.label.encode()))
            e.update(p_value=welch_p([r["test_acc"] for r in e["runs"] if _ok(r)], ref_tests),
                     wins=w, ties=t, losses=l, test_acc_diff=diff, diff_ci95=ci95,
                     p_bootstrap=p_boot)
        out_cells.append({"dataset": cell.dataset, "model": cell.model, "augment": cell.augment,
                          "steps": cell.surrogate["steps"],
                          "train_fraction": cell.surrogate["train_fraction"],
                          "settings": dict(cell.extra), "label": cell.label,
                          "results": entries})
    comparisons = [e for c in out_cells for n, e in c["results"].items() if n != reference]
    for e, p in zip(comparisons, holm([e["p_value"] for e in comparisons])):
        e["p_value_holm"] = p
    for e, p in zip(comparisons, holm([e["p_bootstrap"] for e in comparisons])):
        e["p_bootstrap_holm"] = p
    n_failed = sum(e["n_failed"] for c in out_cells for e in c["results"].values())
    return {"losses": [{"name": l.name, "expr": l.expr, "sign": l.sign, "pset": l.pset_name,
                        "source": l.source} for l in losses],
            "reference": reference, "baseline": reference,
            "seeds": list(seeds), "split_seeds": splits, "split_seed_offsets": offsets, "tune_seeds": list(tune_seeds),
            "lrs": [float(x) for x in lrs] or None, "bootstrap": bootstrap, "cells": out_cells,
            "runs_total": len(plan), "runs_trained": counts["trained"],
            "runs_from_ledger": counts["from_ledger"],
            "failed_runs": sum(1 for r in results if not _ok(r)),
            "failed_in_table": n_failed, "seconds": time.perf_counter() - t0,
            "definitions": definitions(reference, bool(tune_seeds))}


def definitions(reference: str, tuned: bool) -> dict:
    """What each reported figure means (``compare --json``'s ``definitions``)."""
    from ..surrogate.train import ECE_BINS

    return {
        "test_acc": "test accuracy of the best-validation checkpoint",
        "p_value": f"Welch t-test vs {reference} on test accuracy over the runs (test seeds x "
                   f"split seeds): covers training randomness and the train/validation split; "
                   f"null when undefined",
        "p_value_holm": "Holm-corrected over all comparisons of the table",
        "p_bootstrap": f"two-sided bootstrap over test images of the mean test-accuracy "
                       f"difference vs {reference} (the trained runs held fixed): covers "
                       f"test-set sampling",
        "p_bootstrap_holm": "Holm-corrected over all bootstrap p-values of the table",
        "test_acc_diff": f"mean test accuracy minus {reference}'s",
        "diff_ci95": "95 % bootstrap interval of test_acc_diff over test images",
        "wins_ties_losses": f"paired with {reference}'s run of the same seed and split seed; "
                            f"tie = equal test accuracy",
        "lr": ("per loss and cell, the lr with the best mean validation accuracy on the tuning "
               "seeds (disjoint from the test seeds)") if tuned else
              "per loss and cell, the lr with the best mean validation accuracy (on the same "
              "seeds it reports, without --tune-seeds)",
        "steps_to_reference": f"per run: the first validation step at which its validation "
                              f"accuracy reaches the best of {reference}'s run with the same "
                              f"seeds (null: never); per loss: the median over runs (null "
                              f"if the median run never does)",
        "train_test_gap": "training minus test accuracy of the best-validation checkpoint "
                          "(un-augmented training images), mean over runs",
        "ece": f"expected calibration error on test ({ECE_BINS} equal-width bins of the top "
               f"softmax probability) at the checkpoint, mean over runs"}


def _mean_of(runs: Sequence[dict], field: str):
    vals = [r[field] for r in runs if _ok(r) and r.get(field) is not None]
    return statistics.fmean(vals) if vals else None


def steps_to(run: dict, target) -> int | None:
    """The first validation step of ``run`` whose accuracy reaches ``target`` (None: never,
    or no target / curve)."""
    if target is None or not _ok(run):
        return None
    for step, val in run.get("val_curve") or ():
        if val >= target:
            return int(step)
    return None


def median_steps(runs: Sequence[dict]) -> tuple[float | None, int]:
    """(median steps_to_reference over the ok runs, counting "never" as infinite -- None when
    the median is never; how many reached)."""
    vals = sorted(math.inf if r.get("steps_to_reference") is None else r["steps_to_reference"]
                  for r in runs if _ok(r))
    if not vals:
        return None, 0
    med = statistics.median(vals)
    return (None if math.isinf(med) else float(med)), sum(1 for v in vals if v != math.inf)


def correct_matrix(runs: Sequence[dict]):
    """Per ok run with a ``test_correct`` mask, the booleans per test image (runs x images);
    None when no run has one."""
    import numpy as np

    rows = [(int(r["test_correct"], 16), int(r["n_test"])) for r in runs
            if _ok(r) and r.get("test_correct") is not None and r.get("n_test")]
    if not rows:
        return None
    n = rows[0][1]
    if any(m != n for _, m in rows):
        raise ValueError("runs of one cell were tested on different test sets")
    out = np.zeros((len(rows), n), dtype=bool)
    for i, (bits, _) in enumerate(rows):
        raw = np.frombuffer(bits.to_bytes((n + 7) // 8, "little"), dtype=np.uint8)
        out[i] = np.unpackbits(raw, bitorder="little")[:n].astype(bool)
    return out


def bootstrap_diff(runs: Sequence[dict], ref: Sequence[dict], n_boot: int, seed: int = 0):
    """(mean test-accuracy difference, its 95 % interval, two-sided p) by resampling test
    images with replacement ``n_boot`` times, the runs held fixed; (None, None, None) without
    per-image results. p = 2 min(P*(diff <= 0), P*(diff >= 0)) with the +1 correction."""
    import numpy as np

    a, b = correct_matrix(runs), correct_matrix(ref)
    if a is None or b is None or n_boot < 1:
        return None, None, None
    if a.shape[1] != b.shape[1]:
        raise ValueError("a loss and its reference were tested on different test sets")
    d = a.mean(0) - b.mean(0)  # per image: fraction of the loss's runs right minus the ref's
    rng = np.random.default_rng(BOOTSTRAP_SEED + seed)
    stats = np.empty(n_boot)
    for i in range(0, n_boot, 256):  # chunks: n_boot x images indices at once would be large
        idx = rng.integers(0, d.size, size=(min(256, n_boot - i), d.size))
        stats[i:i + idx.shape[0]] = d[idx].mean(1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    p = min(1.0, 2 * min((np.sum(stats <= 0) + 1) / (n_boot + 1),
                         (np.sum(stats >= 0) + 1) / (n_boot + 1)))
    return float(d.mean()), [float(lo), float(hi)], float(p)


def markdown_table(result: dict, digits: int = 2) -> str:
    """Paper-style table: rows = losses, columns = cells, test accuracy % mean ± std, best
    mean per column in bold, † where the Holm-corrected Welch p vs the reference is below 0.05;
    then per cell the details (lr, difference with its bootstrap interval and p, gap, ECE,
    steps to the reference)."""
    cells = result["cells"]
    ref = result.get("reference") or result.get("baseline") or "ce"
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
        row = [_md_name(name)]
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
    splits = len(result.get("split_seeds") or [0])
    runs = f"{n} seed(s)" + (f" x {splits} train/validation splits" if splits > 1 else "")
    lines.append("")
    lines.append(f"Test accuracy (%) at the best-validation checkpoint, mean ± std over {runs}; "
                 f"bold: best in the column; †: Holm-corrected Welch p < 0.05 vs {ref}.")
    if not any("train_test_gap" in e for c in cells for e in c["results"].values()):
        return "\n".join(lines) + "\n"  # a result from before these figures existed
    lines += ["", f"Per cell: lr (chosen on validation), test-accuracy difference vs {ref} with "
              f"its 95 % bootstrap interval over test images and bootstrap p (Holm), "
              f"training−test gap, ECE, median steps to {ref}'s best validation accuracy "
              f"(reached/runs)."]
    for c, h in zip(cells, head):
        lines += ["", f"**{h}**", "",
                  "| loss | lr | Δ test (pts) [95 % CI] | boot p (Holm) | gap (pts) | ECE | "
                  "steps |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            e = c["results"].get(name)
            if e is None:
                continue
            if e.get("test_acc_diff") is None:
                diff = "—" if name == ref else "n/a"
            else:
                lo, hi = e["diff_ci95"]
                diff = f"{100 * e['test_acc_diff']:+.{digits}f} [{100 * lo:+.{digits}f}, " \
                       f"{100 * hi:+.{digits}f}]"
            pb = "—" if e.get("p_bootstrap") is None else \
                f"{_fmt_p(e['p_bootstrap'])} ({_fmt_p(e['p_bootstrap_holm'])})"
            gap = "n/a" if e.get("train_test_gap") is None else \
                f"{100 * e['train_test_gap']:.{digits}f}"
            ece = "n/a" if e.get("ece") is None else f"{e['ece']:.3f}"
            steps = "never" if e.get("steps_to_reference") is None else \
                f"{e['steps_to_reference']:g}"
            lines.append(f"| {_md_name(name)} | {e['lr']:g} | {diff} | {pb} | {gap} | {ece} | "
                         f"{steps} ({e.get('reached_reference', 0)}/{e['n_ok']}) |")
    return "\n".join(lines) + "\n"


def _md_name(name: str) -> str:
    return f"`{name}`" if len(name) > 24 else name


def _fmt_p(p) -> str:
    return "—" if p is None else f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"
