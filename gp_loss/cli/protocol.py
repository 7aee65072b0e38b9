"""Protocol commands of the ``gp-loss`` CLI: ``compare`` (transfer tables) and ``eliminate``.

Registered on the group of ``cli/app.py`` (which owns error handling and exit codes) through
``app.EXTENSIONS``; thin layers over ``protocol/compare.py`` and ``protocol/eliminate.py``, which documents the statistics and the
elimination rounds.
"""
from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path

import click

from .app import UserError, cli, json_option, pset_option
from .options import (config_option, data_options, data_overrides, device_option, fmt,
                      resolve_device, seed_options, set_option)

log = logging.getLogger("gp_loss")


def _p(v) -> str:
    return "-" if v is None else f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}"


def format_compare(res: dict) -> str:
    """Readable per-cell tables: mean ± std (%), Welch p and Holm p, bootstrap p, W/T/L, lr,
    gap, ECE, steps to the reference; failures with reasons."""
    lines = []
    ref = res.get("reference") or res.get("baseline")
    n_runs = len(res["seeds"]) * len(res.get("split_seeds") or [0])
    for c in res["cells"]:
        where = c.get("label") or f"{c['dataset']}/{c['model']}/{c['augment']}"
        lines.append(f"{where}  ({c['steps']} steps, {n_runs} run(s) per loss; test accuracy "
                     f"at the best-validation checkpoint; vs {ref})")
        width = min(max(8, *(len(n) for n in c["results"])), 32)
        lines.append(f"  {'loss':<{width}}  {'test acc %':>15}  {'p':>7}  {'Holm p':>7}  "
                     f"{'boot p':>7}  {'W/T/L':>7}  {'lr':>7}  {'gap %':>6}  {'ECE':>5}  "
                     f"{'steps':>6}")
        for name, e in c["results"].items():
            acc = ("n/a" if e["test_acc_mean"] is None else
                   f"{100 * e['test_acc_mean']:.2f} ± {100 * e['test_acc_std']:.2f}")
            wtl = "-" if e["wins"] is None else f"{e['wins']}/{e['ties']}/{e['losses']}"
            label = name if len(name) <= width else name[:width - 3] + "..."
            gap = "-" if e.get("train_test_gap") is None else f"{100 * e['train_test_gap']:.1f}"
            ece = "-" if e.get("ece") is None else f"{e['ece']:.3f}"
            steps = "-" if e.get("steps_to_reference") is None else f"{e['steps_to_reference']:g}"
            lines.append(f"  {label:<{width}}  {acc:>15}  {_p(e['p_value']):>7}  "
                         f"{_p(e['p_value_holm']):>7}  {_p(e.get('p_bootstrap')):>7}  "
                         f"{wtl:>7}  {e['lr']:>7g}  {gap:>6}  {ece:>5}  {steps:>6}")
            for r in e["runs"]:
                if r["status"] != "ok" or r["test_acc"] is None:
                    lines.append(f"    {name} seed {r['seed']} split {r.get('split_seed', 0)} "
                                 f"FAILED: {r['reason']}")
        lines.append("")
    failed = res["failed_in_table"]
    lines.append(f"p: Welch over the runs (training seeds{' and splits' if n_runs > len(res['seeds']) else ''}); "
                 f"boot p: bootstrap over test images. W/T/L: runs where the loss's test "
                 f"accuracy beats / equals / trails {ref}'s with the same seeds. gap: training "
                 f"minus test accuracy; steps: median first validation step reaching {ref}'s "
                 f"best.")
    if res.get("tune_seeds"):
        lines.append(f"lr: chosen per loss and cell on tuning seeds {res['tune_seeds']} "
                     f"(validation accuracy), disjoint from the test seeds {res['seeds']}.")
    elif res.get("lrs"):
        lines.append("lr: chosen per loss and cell by validation accuracy on the same seeds "
                     "(give --tune-seeds N to choose on seeds of its own).")
    lines.append(f"{failed} failed run(s) in the table, excluded from the statistics "
                 f"({res['failed_runs']} of {res['runs_total']} runs failed overall"
                 + (f"; {res['runs_from_ledger']} run(s) read from the store"
                    if res.get("runs_from_ledger") else "") + ").")
    return "\n".join(lines)


@cli.command(short_help="Transfer table: losses vs cross-entropy across cells and seeds.")
@click.option("--loss", "loss_specs", multiple=True, metavar="EXPR|ZOO_NAME",
              help="A loss to compare (repeatable): an expression, a zoo name, or a reference "
                   "loss: ce_torch, label_smoothing, label_smoothing:EPS.")
@click.option("--reference", default="ce_torch", show_default=True, metavar="EXPR|ZOO_NAME",
              help="The loss that p-values and wins/ties/losses are against (always trained); "
                   "'ce' is the paper's protected cross-entropy.")
@click.option("--from-run", "from_run", type=click.Path(file_okay=False), default=None,
              help="Also compare this run's finalists (rank1 .. rankK): the final ranking of "
                   "its elimination when one finished, else its best distinct candidates.")
@click.option("--top", type=click.IntRange(min=1), default=4, show_default=True,
              help="How many candidates --from-run adds.")
@click.option("--dataset", "datasets", multiple=True, help="Dataset (repeatable; default: config).")
@click.option("--model", "models", multiple=True, help="Model (repeatable; default: config).")
@click.option("--augment", "augments", multiple=True,
              help="Augmentation: none, flipcrop, randaugment (repeatable; default: config).")
@click.option("--cell", "cell_specs", multiple=True, metavar="KEY=VALUE[,KEY=VALUE...]",
              help="An explicit cell (repeatable) instead of the --dataset/--model/--augment "
                   "cross product: [surrogate] settings over the config, e.g. "
                   "'dataset=mnist5k,train_fraction=0.1' or 'model=resnet9v2'.")
@seed_options(default=3)
@click.option("--lr", "lrs", multiple=True, type=click.FloatRange(min=0, min_open=True),
              help="Learning rates to try (repeatable): each loss keeps, per cell, the one with "
                   "the best mean validation accuracy (on --tune-seeds when given).")
@click.option("--tune-seeds", "tune_seeds", type=click.IntRange(min=1), default=None,
              help="Choose each loss's lr on N tuning seeds of its own (the N seeds after the "
                   "test seeds), then train the test seeds at it. Needs --lr.")
@click.option("--split-seeds", "split_seeds", type=click.IntRange(min=1), default=1,
              show_default=True,
              help="Re-split train/validation N ways (the config's split_seed, +1, ..., "
                   "+N-1); the test split never changes.")
@click.option("--store", "store", default=None, metavar="FILE.sqlite",
              help="Keep every finished run in FILE (default: beside --markdown, as "
                   "FILE.sqlite); run the same command again to continue a killed compare "
                   "(delete the file to train everything again).")
@click.option("--bootstrap", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Resamples of the test images for the bootstrap p-value (0: none); its "
                   "smallest value is 2/(N+1), so with Holm over many comparisons N must be "
                   "large enough to reach significance.")
@config_option()
@set_option()
@device_option()
@data_options
@pset_option()
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs in parallel (spawned processes when > 1).")
@click.option("--markdown", "markdown", default=None, metavar="FILE",
              help="Also write the paper-style Markdown table to FILE.")
@json_option("reference, losses, seeds, split_seeds, tune_seeds, cells (per loss: lr, runs "
             "(each with split_seed), test_acc_mean/std, p_value, p_value_holm, p_bootstrap, "
             "test_acc_diff, diff_ci95, wins, ties, losses, steps_to_reference, "
             "train_test_gap, ece), definitions, failed_runs")
def compare(loss_specs, reference, from_run, top, datasets, models, augments, cell_specs,
            seeds, first_seed, lrs, tune_seeds, split_seeds, store, bootstrap,
            config, sets, device, data_root, download, pset, workers, markdown, as_json):
    """Train losses against a reference loss on datasets x models x augmentations x seeds.

    Reports per cell the test accuracy at the best-validation checkpoint (mean ± std over the
    runs: test seeds x split seeds), and per loss vs the reference (torch's cross-entropy,
    ce_torch, unless --reference says otherwise) a Welch t-test p-value over the runs (it covers
    training randomness and the train/validation split), its Holm correction over the whole
    table, a bootstrap p-value over the test images (it covers which test images were drawn),
    paired wins/ties/losses, the chosen lr, the train-test gap, the expected calibration error
    and the steps to reach the reference's best validation accuracy. Failed runs are listed and
    left out of the statistics.

    \b
    Examples:
      gp-loss compare --loss baikal --dataset digits --model tiny --seeds 3
      gp-loss compare --loss baikal --loss label_smoothing --lr 1e-3 --lr 2e-3 --lr 4e-3 \\
          --tune-seeds 2 --seeds 10 --split-seeds 2 --markdown table.md
      gp-loss compare --from-run runs/quick --top 3 --augment none --augment flipcrop --json
      gp-loss compare --loss baikal --cell model=resnet9v2 --cell dataset=digits \\
          --cell train_fraction=0.1 --seeds 10 --reference ce
    """
    from ..protocol import compare as C
    from ..protocol import eliminate as E
    from ..config import load_config
    from ..execution import make_executor
    from ..execution.packing import pack_timeout
    from ..lang.psets import load_pset

    overrides = (data_overrides(data_root, download) + list(sets)
                 + ([f"surrogate.device={device}"] if device else []))
    if from_run and config is None:
        # Re-test a run's finalists under the run's own surrogate unless told otherwise.
        from ..config import apply_overrides, config_from_dict
        from ..runs.store import RunStore

        with RunStore.open(from_run, readonly=True) as run_store:
            cfg = apply_overrides(config_from_dict(run_store.config()), overrides)
        log.info("surrogate settings from %s (give --config to use others)", from_run)
    else:
        cfg = load_config(config, overrides)
    if markdown and not Path(markdown).resolve().parent.is_dir():
        raise UserError(f"cannot write {markdown}: folder {Path(markdown).parent} does not exist")
    ps = load_pset(pset)
    reference = reference.strip()
    losses, seen = [C.make_loss(reference, ps, reference)], {reference}
    for spec in loss_specs:
        if spec.strip() not in seen:
            losses.append(C.make_loss(spec.strip(), ps))
            seen.add(spec.strip())
    if from_run:
        losses += C.run_losses(from_run, top)
    if len(losses) < 2:
        raise UserError(f"nothing to compare with {reference}: give --loss EXPR or "
                        f"--from-run DIR")
    if tune_seeds and not lrs:
        raise UserError("--tune-seeds chooses among learning rates: give an --lr grid too")
    dev = resolve_device(cfg.surrogate.device)
    cells = C.plan_cells(cfg, datasets, models, augments, dev, cell_specs=cell_specs)
    seed_list = list(range(first_seed, first_seed + seeds))
    tune_list = C.tune_seed_list(seed_list, tune_seeds or 0)
    if lrs and not tune_seeds:
        log.warning("--lr without --tune-seeds: each loss's lr is chosen on the seeds it is "
                    "reported on (give --tune-seeds N for seeds of its own)")
    from ..protocol.ledger import Ledger

    store = store or (str(Path(markdown).with_suffix(".sqlite")) if markdown else None)
    ledger = Ledger(store) if store else None
    if ledger is not None:
        log.info("runs are kept in %s (%d there already); run the same command again to "
                 "continue if it stops", store, len(ledger))

    def progress(i, n, key, res):
        phase, ci, loss, lr, split, seed = key
        what = "test" if phase == "test" else "val"
        log.info("[%d/%d] %s%s %s%s seed %d%s: %s %s (%.1fs)%s", i + 1, n,
                 "tuning " if phase == "tune" else "", cells[ci].label, loss.name,
                 f" lr {lr:g}" if lr is not None else "", seed,
                 f" split {split}" if split else "", what, fmt(res.get(f"{what}_acc")),
                 res.get("seconds") or 0.0,
                 "" if res.get("status") == "ok" else f"  FAILED: {res.get('reason')}")
    width = cfg.executor.candidates_per_worker
    executor = (make_executor("process", workers, cfg.executor.threads,
                              retries=cfg.executor.retries,
                              timeout_s=pack_timeout(cfg.surrogate.timeout_s, width))
                if workers > 1 else make_executor("serial", 1, cfg.executor.threads))
    try:
        with executor:
            res = C.compare(losses, cells, seed_list, lrs, executor, on_done=progress,
                            width=width, reference=reference, tune_seeds=tune_list,
                            split_seeds=list(range(split_seeds)), ledger=ledger,
                            bootstrap=bootstrap)
    except KeyboardInterrupt:
        if ledger is not None:
            click.echo(f"interrupted; the finished runs are in {store}: run the same command "
                       f"again to continue", err=True)
        raise SystemExit(130)
    finally:
        if ledger is not None:
            ledger.close()
    if markdown:
        Path(markdown).write_text(C.markdown_table(res), encoding="utf-8")
    click.echo(json.dumps(res, indent=2) if as_json else format_compare(res))


def _elim_settings(run_cfg: dict, config: str | None, sets) -> tuple[dict, list[str]]:
    """(the [eliminate] table, overrides for the run's config) from --config and --set."""
    table, overrides = {}, []
    if config:
        from ..config import builtin_config_names, builtin_config_path

        if not Path(config).is_file() and config.removesuffix(".toml") in \
                builtin_config_names("eliminate"):
            config = str(builtin_config_path(config))
        try:
            data = tomllib.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"--config {config}: {exc}") from None
        extra = sorted(set(data) - {"eliminate", "surrogate", "executor"})
        if extra:
            raise UserError(f"--config {config}: unexpected table [{extra[0]}]; it may hold "
                            f"[eliminate], [surrogate] and [executor]")
        table = dict(data.get("eliminate", {}))
        for sec in ("surrogate", "executor"):
            for k, v in data.get(sec, {}).items():
                overrides.append(f"{sec}.{k}={json.dumps(v)}")
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        if key.startswith("eliminate."):
            try:
                table[key[10:]] = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                table[key[10:]] = text.strip()
        elif key.startswith(("surrogate.", "executor.")):
            overrides.append(item)
        else:
            raise UserError(f"--set {key}: eliminate takes eliminate.*, surrogate.* and "
                            f"executor.* keys")
    return table, overrides


def format_rounds(res: dict) -> str:
    from ..runs.render import format_elimination

    return "\n".join(format_elimination(res["rounds"]))


@cli.command(short_help="The paper's elimination protocol: retrain the best in rounds.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--config", "config", default=None, metavar="FILE.toml",
              help="A TOML file (or a built-in name: paper_eliminate) with an [eliminate] "
                   "table (keep, steps, steps_factor, model, seeds, stages) and optionally "
                   "[surrogate]/[executor] changes for the retraining.")
@set_option()
@device_option()
@json_option("rounds (members with scores), finalists")
def eliminate(run_dir, config, sets, device, as_json):
    """Retrain a run's best candidates in rounds of rising fidelity, keeping the best each round.

    Default rounds (the paper's): keep = [25, 12, 6, 4] -- the run's best 25 distinct
    candidates are retrained, the best 12 go on, then 6, then the best 4 are ranked at the
    highest fidelity; steps_factor = [1, 2, 3, 4] x surrogate.steps. Results are stored in the
    run (phases elim1, elim2, ...): an interrupted elimination continues where it stopped when
    run again, and a finished one just prints its table.

    \b
    Examples:
      gp-loss eliminate runs/quick
      gp-loss eliminate runs/quick --set eliminate.keep=[8,4,2] --set surrogate.steps=200
      gp-loss eliminate runs/paper --config paper_eliminate   # the paper's stages (GPU)

    `gp-loss show RUN_DIR` also displays the stored rounds.
    """
    from ..protocol import compare as C
    from ..protocol import eliminate as E
    from ..config import apply_overrides, config_from_dict
    from ..execution import make_executor
    from ..execution.packing import pack_timeout
    from ..runs.store import RunStore

    store = RunStore.open(run_dir)
    try:
        table, overrides = _elim_settings(store.config(), config, sets)
        cfg = apply_overrides(config_from_dict(store.config()),
                              overrides + ([f"surrogate.device={device}"] if device else []))
        if store.get_state("phase") not in (None, "done"):
            log.warning("the search in %s has not finished (phase %s); eliminating what it has",
                        run_dir, store.get_state("phase"))
        from dataclasses import asdict
        # Ray workers resolve "auto" on their own nodes (the driver may have no GPU)
        surrogate = {**asdict(cfg.surrogate), "device": (
            cfg.surrogate.device if cfg.executor.kind == "ray"
            else resolve_device(cfg.surrogate.device))}
        rounds = E.resolve_rounds(table, surrogate)

        def progress(rnd, row, res):
            log.info("round %d: candidate %d seed %d%s: val %s (%.1fs)%s", rnd.index,
                     row["parent_id"], row["birth"],
                     f" task {row['mutation']}" if row.get("mutation") else "",
                     fmt(res.get("val_acc")),
                     res.get("seconds") or 0.0,
                     "" if res.get("status") == "ok" else f"  FAILED: {res.get('reason')}")
        e = cfg.executor
        try:
            with make_executor(e.kind, e.workers, e.threads, retries=e.retries,
                               address=e.address, gpus_per_eval=e.gpus_per_eval,
                               timeout_s=pack_timeout(cfg.surrogate.timeout_s,
                                                      e.candidates_per_worker)) as executor:
                res = E.eliminate(store, rounds, surrogate, executor, on_done=progress,
                                  width=e.candidates_per_worker)
        except KeyboardInterrupt:
            click.echo(f"interrupted; continue with: gp-loss eliminate {run_dir} (same "
                       f"--config/--set)", err=True)
            raise SystemExit(130)
    finally:
        store.close()
    click.echo(json.dumps(res, indent=2) if as_json else format_rounds(res))
