"""Run commands of the ``gp-loss`` CLI: search, resume, show, plot, train.

Registered on the group of ``cli/app.py`` (which owns error handling and exit codes). Thin layers
over ``evolution`` (search/resume), ``report`` (show), ``plots`` (plot) and ``fitness`` (train).
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import click

from .app import UserError, cli, json_option, pset_option
from .options import (config_option, data_options, data_overrides, device_option, fmt,
                      resolve_device, seed_options, set_option)

log = logging.getLogger("gp_loss")

# Settings a resumed run may change: how it runs, not what it computes.
RESUMABLE_KEYS = ("search.children", "search.max_minutes", "executor.", "surrogate.device")
# ... except these, which change the numbers (a pack's width is an evaluation setting).
NOT_RESUMABLE = ("executor.candidates_per_worker",)


def _set_threads(threads: int) -> None:
    """Torch threads for in-process training (executor.threads; 0 = torch's default): small
    surrogates run several times faster on one thread than on two contending ones."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def config_warnings(cfg) -> list[str]:
    """Valid settings that quietly change what a search does, one message each (the search
    command logs them once, before the run starts)."""
    out = []
    sur, s = cfg.surrogate, cfg.search
    if sur.prescreen_steps >= sur.steps and not sur.prescreen_separate:
        out.append(f"surrogate.prescreen_steps ({sur.prescreen_steps}) >= surrogate.steps "
                   f"({sur.steps}): the pre-screen never applies in this search (longer runs, "
                   f"e.g. eliminate rounds, will apply it)")
    if s.tournament > s.population:
        wins = 1.0 - (1.0 - 1.0 / s.population) ** s.tournament  # P(best is drawn at least once)
        out.append(f"search.tournament ({s.tournament}) > search.population ({s.population}): "
                   f"valid (members are drawn with replacement), but the best member then wins "
                   f"{wins:.0%} of the tournaments: selection is nearly greedy")
    return out


def _run_search(store, cfg, run_dir: Path, top: int, quiet: bool) -> dict:
    from ..runs import render, report
    from ..search.evolution import Evolution

    s = cfg.search
    total = len(s.reference) + len(s.seed_with) + s.initial + cfg.rescore_count() + s.children
    done = sum(v for k, v in store.counts().items() if k in ("evaluated", "failed", "reused"))
    progress = report.Progress(total, min(done, total), disable=quiet)
    try:
        result = Evolution(store, cfg, progress=progress).run()
    finally:
        progress.close()
    summary = report.summary(store, top)
    click.echo(render.format_summary(summary))
    reason = result["stop_reason"]
    if reason == "interrupted":
        click.echo(f"interrupted; continue with: gp-loss resume {run_dir}", err=True)
        raise SystemExit(130)
    if reason not in ("finished", "max_minutes"):
        click.echo(f"search stopped: {reason}", err=True)
    elif reason == "max_minutes":
        click.echo(f"stopped at search.max_minutes; continue with: gp-loss resume {run_dir}",
                   err=True)
    click.echo(f"run store: {run_dir / 'run.sqlite'}")
    return summary


@cli.command()
@click.argument("config", required=False, metavar="[CONFIG.toml]")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Where the run store goes (default: runs/<timestamp>). Must not hold a run.")
@set_option()
@device_option()
@data_options
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="Rows of the final table.")
@click.pass_context
def search(ctx, config, run_dir, sets, device, data_root, download, top):
    """Run a loss-function search (regularized evolution) from a TOML config.

    Without CONFIG the built-in quick config runs (sklearn digits, a tiny CNN, 6-9 minutes on
    2 CPU cores). CONFIG may also name a built-in config (quick, paper, mnist5k). Progress is
    stored in RUN_DIR/run.sqlite after every step: Ctrl-C (or a kill) loses nothing and
    `gp-loss resume RUN_DIR` continues.

    \b
    Examples:
      gp-loss search
      gp-loss search search_runs/quick.toml --set search.children=50 --run-dir runs/try
    """
    from ..config import load_config
    from ..runs.provenance import environment
    from ..runs.store import RunStore

    cfg = load_config(config, data_overrides(data_root, download) + list(sets)
                      + ([f"surrogate.device={device}"] if device else []))
    from ..lang.psets import load_pset

    ps = load_pset(cfg.search.pset)  # a bad set name is bad input before anything is created
    if not ps.searchable:
        raise UserError(f"search.pset = {cfg.search.pset!r}: the {ps.name!r} set holds reference "
                        f"losses for train/compare/export, not a search space")
    from ..lang.trees import parse

    for key, exprs in (("search.seed_with", cfg.search.seed_with),
                       ("search.reference", cfg.search.reference)):
        for expr in exprs:  # likewise a bad expression (ParseError names the problem)
            try:
                parse(expr, ps)
            except ValueError as exc:
                raise UserError(f"{key}: {exc}") from None
    run_dir = Path(run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if RunStore.exists(run_dir):
        raise UserError(f"{run_dir} already holds a run; continue it with: gp-loss resume {run_dir}")
    dev = resolve_device(cfg.surrogate.device)
    from ..config import config_to_dict
    from ..surrogate.fitness import preflight

    for _, conf in cfg.task_surrogates():  # bad data/model: exit 2 before a run is created
        preflight(asdict(conf))
    for text in config_warnings(cfg):
        log.warning("%s", text)

    meta = {**environment(), "device": dev, "command": "search"}
    store = RunStore.create(run_dir, config_to_dict(cfg), meta)
    log.info("run %s: %s set, %s/%s, %d initial + %d children, executor %s x%d, device %s",
             run_dir, cfg.search.pset, cfg.surrogate.dataset, cfg.surrogate.model,
             cfg.search.initial, cfg.search.children, cfg.executor.kind,
             1 if cfg.executor.kind == "serial" else cfg.executor.workers, dev)
    quiet = log.getEffectiveLevel() > logging.INFO
    try:
        _run_search(store, cfg, run_dir, top, quiet)
    finally:
        store.close()


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@set_option()
@device_option()
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
def resume(run_dir, sets, device, top):
    """Continue an interrupted (or finished) search with its stored config.

    Evaluations that were in flight are run again; nothing completed is lost or repeated.
    Only how the run executes may change: --set search.children=N (to extend it),
    search.max_minutes, executor.* (not executor.candidates_per_worker: the pack width
    changes the numbers) and surrogate.device.

    \b
    Examples:
      gp-loss resume runs/quick
      gp-loss resume runs/quick --set search.children=1200 --set executor.workers=4
    """
    from ..config import apply_overrides, config_from_dict, config_to_dict
    from ..runs.store import RunStore

    run_dir = Path(run_dir)
    store = RunStore.open(run_dir)
    try:
        cfg = config_from_dict(store.config())
        overrides = list(sets) + ([f"surrogate.device={device}"] if device else [])
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            if key in NOT_RESUMABLE or not any(
                    key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
                raise UserError(f"--set {key}: a resumed run keeps its config; only "
                                f"{', '.join(RESUMABLE_KEYS)} may change (not "
                                f"{', '.join(NOT_RESUMABLE)}: it changes the results)")
        if overrides:
            cfg = apply_overrides(cfg, overrides)
            with store.transaction():
                store.set_meta("config", config_to_dict(cfg))
                history = store.meta().get("resumes", [])
                store.set_meta("resumes", history + [{"time": time.time(), "set": overrides}])
        resolve_device(cfg.surrogate.device)
        quiet = log.getEffectiveLevel() > logging.INFO
        _run_search(store, cfg, run_dir, top, quiet)
    finally:
        store.close()


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True)
@json_option("top (search-fitness order; each with size, found, mutation, seeds, fitness_std, "
             "val_nll), finalists (a finished elimination's ranking, with score; null if "
             "none), tie_break, pareto, status, counts, seconds, reference, state, config, "
             "elimination")
@click.option("--latex", "as_latex", is_flag=True, default=False,
              help="Print the top losses as a LaTeX tabular (rank, fitness, size, formula).")
def show(run_dir, top, as_json, as_latex):
    """Show a run: its status (running, interrupted, finished), the best losses (fitness ± sd
    over seeds when re-evaluated, formula, size, sign, how each was found), the Pareto front
    of fitness vs formula size, what the search did (rejections and duplicates by reason, time
    split) and the elimination rounds stored in the run, if any.

    A finished elimination's final ranking leads (the one export RUN_DIR and compare
    --from-run use); the search's table follows, ranked by fitness, ties broken by the lower
    validation NLL (val_nll: the surrogate's validation cross-entropy at its best-accuracy
    checkpoint).

    Works while the search is running (it only reads the run).

    \b
    Examples:
      gp-loss show runs/quick --top 5
      gp-loss show runs/quick --latex > table.tex
    """
    from ..runs import render, report
    from ..runs.store import RunStore

    if as_json and as_latex:
        raise click.UsageError("choose one of --json and --latex")
    store = RunStore.open(run_dir, readonly=True)
    try:
        s = report.summary(store, top)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(s, indent=2))
    elif as_latex:
        click.echo(render.format_latex(s))
    else:
        click.echo(render.format_summary(s))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", "out_dir", default=None, type=click.Path(file_okay=False),
              metavar="DIR", help="Folder for the PNG files, made if missing [default: "
                                  "RUN_DIR/plots].")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the best losses get a loss-shape curve and a tree drawing.")
@click.option("--dpi", type=click.IntRange(min=30, max=600), default=90, show_default=True,
              help="Resolution of the PNG files (dots per inch).")
def plot(run_dir, out_dir, top, dpi):
    """Draw a run as PNG files (matplotlib, no display needed).

    \b
    progress.png     fitness of every evaluation in order, best so far, population median
    loss_shapes.png  loss and its gradient vs the true class's probability, top K and CE
    pareto.png       fitness vs formula size with the Pareto front
    lineage.png      the best candidate's ancestry back to the initial population
    tree_rankN.png   each of the top K expression trees

    Works while the search is running (read-only). Prints the paths written.

    \b
    Example:
      gp-loss plot runs/quick --top 5 -o figures/quick
    """
    from ..runs import plots

    out_dir = out_dir if out_dir is not None else Path(run_dir) / "plots"
    for path in plots.write_all(run_dir, out_dir, top=top, dpi=dpi):
        click.echo(str(path))


def _train_line(runs: list, seed: int, res: dict, as_json: bool) -> None:
    runs.append({"seed": seed, "val_acc": res.get("val_acc"), "test_acc": res.get("test_acc"),
                 "seconds": res.get("seconds"), "status": res.get("status"),
                 "reason": res.get("reason"), "pack_k": res.get("pack_k", 1)})
    if not as_json:
        click.echo(f"seed {seed}: val_acc {fmt(res.get('val_acc'))}  test_acc "
                   f"{fmt(res.get('test_acc'))}  ({res.get('seconds', 0):.1f}s)"
                   + (f"  FAILED: {res.get('reason')}" if res.get("status") != "ok" else ""))


@cli.command()
@click.option("--loss", "loss", required=True, metavar="EXPR|ZOO_NAME",
              help="The loss to train with, e.g. ce or 'sub(div(y, p), log(p))'.")
@click.option("--dataset", default=None, help="Dataset (default: the config's; digits).")
@click.option("--model", default=None, help="Model (default: the config's; tiny).")
@seed_options(default=1)
@config_option()
@set_option()
@device_option()
@data_options
@pset_option()
@json_option("runs (seed, val_acc, test_acc, seconds, pack_k), test_acc_mean, test_acc_std")
def train(loss, dataset, model, seeds, first_seed, config, sets, device, data_root, download,
          pset, as_json):
    """Train the surrogate with one loss over several seeds; report test accuracy.

    The text output names the loss, the dataset, model, steps and device first, then one line
    per seed and the mean test accuracy.

    Test accuracy is measured at the checkpoint with the best validation accuracy (the test
    split is never used to choose). The sign comes from the integrity check (+1 if rejected).

    \b
    Example:
      gp-loss train --loss ce --seeds 3 --json
    """
    from ..config import load_config
    from ..surrogate.fitness import evaluate, evaluate_pack
    from ..surrogate.packtrain import effective_width
    from ..lang.psets import loss_pset
    from ..screen.integrity import integrity
    from ..lang.trees import parse, to_text

    extra = [f"surrogate.{k}={v}" for k, v in (("dataset", dataset), ("model", model),
                                               ("device", device)) if v]
    cfg = load_config(config, data_overrides(data_root, download) + list(sets) + extra)
    ps = loss_pset(loss, pset)  # ce_torch / label_smoothing[:EPS] come from the reference set
    tree = parse(loss, ps)
    integ = integrity(tree, ps)
    sign = integ.sign if integ.accepted else 1
    if not integ.accepted:
        log.warning("the integrity check rejects this loss (%s); training it with sign +1",
                    integ.reason)
    from ..surrogate.fitness import preflight

    surrogate = asdict(cfg.surrogate)
    surrogate["device"] = resolve_device(cfg.surrogate.device)
    preflight(surrogate)
    _set_threads(cfg.executor.threads)
    text = to_text(tree, ps)
    # The seeds train in packs of executor.candidates_per_worker, as the search trains its
    # candidates: a seed's numbers are then the ones the search (same K) got.
    width = effective_width(cfg.surrogate.model, cfg.executor.candidates_per_worker)
    if not as_json:
        click.echo(f"training {text} (sign {sign:+d}) on {cfg.surrogate.dataset} / "
                   f"{cfg.surrogate.model}, {cfg.surrogate.steps} steps, device "
                   f"{surrogate['device']}" + (f", in packs of {width}" if width > 1 else ""))
    runs = []
    all_seeds = list(range(first_seed, first_seed + seeds))
    for start in range(0, len(all_seeds), width):
        chunk = all_seeds[start:start + width]
        if width > 1:
            results = evaluate_pack([(text, s, sign) for s in chunk], ps.source, surrogate,
                                    True, width=width)
        else:
            results = [evaluate(text, ps.source, surrogate, seed=s, sign=sign, with_test=True)
                       for s in chunk]
        for seed, res in zip(chunk, results):
            _train_line(runs, seed, res, as_json)
    tests = [r["test_acc"] for r in runs if r["test_acc"] is not None]
    mean = statistics.fmean(tests) if tests else None
    std = statistics.stdev(tests) if len(tests) > 1 else (0.0 if tests else None)
    out = {"loss": text, "sign": sign, "dataset": cfg.surrogate.dataset,
           "model": cfg.surrogate.model, "steps": cfg.surrogate.steps, "runs": runs,
           "test_acc_mean": mean, "test_acc_std": std}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"test_acc {fmt(mean)} ± {fmt(std)} over {len(tests)} seed(s)")
