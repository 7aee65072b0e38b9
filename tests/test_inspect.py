"""Inspecting runs: ``show`` (table, Pareto front, status, --latex), ``plot``, ``export RUN_DIR``.

One tiny search runs once per module in-process with a fake evaluation (monkeypatched as
``gp_loss.search.evolution.evaluate``, as in test_search.py): no training, but real screening,
mutations, re-evaluation with two seeds and a reference. The running-search test starts a
writer in another process that holds the run's lock and keeps inserting rows.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner

import gp_loss.search.evolution as evo
from test_search import use_fake
from gp_loss.lang import codegen
from gp_loss.cli.app import cli
from gp_loss.config import Config, apply_overrides
from gp_loss.lang.psets import load_pset
from gp_loss.runs.report import evaluated_rows, pareto_front, tree_size
from gp_loss.runs.store import RunStore
from gp_loss.lang.trees import parse

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeEvaluate:
    """Instant, deterministic stand-in for fitness.evaluate: a hash of the expression (plus a
    little per seed, so re-evaluations spread); every 7th call fails."""

    def __init__(self):
        self.calls = 0

    def __call__(self, expr, pset_name, eval_config, seed=0, sign=1, with_test=False):
        self.calls += 1
        if self.calls % 7 == 0:
            return {"status": "failed", "reason": "nan_loss", "fitness": 0.0, "steps": 3,
                    "seconds": 0.0}
        unit = int(hashlib.sha256(expr.encode()).hexdigest()[:8], 16) / 16**8
        return {"status": "ok", "reason": None, "fitness": round(0.1 + 0.8 * unit, 3)
                + 0.01 * (seed % 3), "steps": eval_config["steps"], "seconds": 0.01}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "run"
    cfg = apply_overrides(Config(), [
        "executor.kind=serial", 'search.reference=["ce"]', "surrogate.steps=100",
        "search.initial=8", "search.children=14", "search.population=4",
        "search.tournament=2", "search.reeval_seeds=2"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GP_LOSS_CACHE", "off")
        use_fake(mp, FakeEvaluate())
        store = evo.start_run(path, cfg)
        try:
            assert evo.Evolution(store, cfg).run()["stop_reason"] == "finished"
        finally:
            store.close()
    return path


@pytest.fixture
def invoke():
    runner = CliRunner()

    def call(*args):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout
    return call


def _store(run_dir):
    return RunStore.open(run_dir, readonly=True)


# ----------------------------------------------------------------------------- show

def test_show_json_keeps_keys_and_adds_spread_size_origin_pareto_status(run_dir, invoke):
    s = json.loads(invoke("show", run_dir, "--json", "--top", "5"))
    assert {"top", "counts", "seconds", "reference", "state", "config", "elimination",
            "pareto", "status"} <= set(s)
    assert s["status"] == "finished"
    with _store(run_dir) as store:
        rows = {r["id"]: r for r in store.candidates()}
        front = pareto_front(evaluated_rows(store))
    for item in s["top"]:
        assert {"id", "expr", "formula", "fitness", "sign", "size", "mutation", "found",
                "seeds", "fitness_std"} <= set(item)
        row = rows[item["id"]]
        assert item["size"] == len(parse(row["expr"], load_pset("paper")))
        if row["phase"] == "child":
            assert item["found"] == f"{row['mutation']} of #{row['parent_id']}"
        else:
            assert item["found"] == "initial" and item["mutation"] is None
    spread = [t for t in s["top"] if t["seeds"]]
    assert spread, "the tiny run re-evaluates its survivors with two seeds"
    for t in spread:
        assert len(t["seeds"]) == 2 and t["fitness"] == pytest.approx(statistics.fmean(t["seeds"]))
        assert t["fitness_std"] == pytest.approx(statistics.stdev(t["seeds"]))
    assert [(p["id"], p["size"]) for p in s["pareto"]] == [(r["id"], r["size"]) for r in front]
    text = invoke("show", run_dir, "--top", "5")
    assert "finished" in text and "Pareto front" in text and "± sd" in text
    assert f"{spread[0]['fitness_std']:.4f}" in text


def test_tree_size_counts_the_parsed_nodes(run_dir):
    pset = load_pset("paper")
    with _store(run_dir) as store:
        exprs = {r["expr"] for r in store.candidates()}
    assert len(exprs) > 20
    for expr in exprs:
        assert tree_size(expr) == len(parse(expr, pset, max_height=10**4, max_size=10**4))


def test_pareto_front_on_hand_made_rows():
    rows = [{"id": i, "size": size, "fitness": fit} for i, (size, fit) in enumerate([
        (5, 0.70), (3, 0.60), (3, 0.65), (3, 0.65), (4, 0.62), (4, 0.66), (7, 0.66),
        (9, 0.90), (8, 0.80), (6, 0.80)])]
    front = pareto_front(rows)
    # size 3: best 0.65 (first of the tie, id 2); 4: 0.66 beats it; 5: 0.70; 6: 0.80;
    # 7 (0.66) and 8 (0.80, not strictly better) are dominated; 9: 0.90.
    assert [(r["size"], r["fitness"], r["id"]) for r in front] == [
        (3, 0.65, 2), (4, 0.66, 5), (5, 0.70, 0), (6, 0.80, 9), (9, 0.90, 7)]
    assert pareto_front([]) == []


def _parse_tabular(text: str) -> list[list[str]]:
    """A small check that ``text`` is one well-formed tabular; returns its body rows' cells."""
    lines = text.strip().splitlines()
    assert lines[0].startswith(r"\begin{tabular}{") and lines[-1] == r"\end{tabular}"
    ncols = len(re.match(r"\\begin\{tabular\}\{([lrc|]+)\}", lines[0]).group(1).replace("|", ""))
    plain = text.replace(r"\{", "").replace(r"\}", "")
    depth = 0
    for ch in plain:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    assert len(re.findall(r"\\left\b", text)) == len(re.findall(r"\\right\b", text))
    rows = []
    for line in lines[1:-1]:
        if line == r"\hline":
            continue
        assert line.endswith(r"\\") and line.count("$") % 2 == 0
        cells = [c.strip() for c in line[:-2].split(" & ")]
        assert len(cells) == ncols
        rows.append(cells)
    return rows[1:]  # after the header


def test_show_latex_is_a_table_with_one_row_per_loss(run_dir, invoke):
    body = _parse_tabular(invoke("show", run_dir, "--latex", "--top", "3"))
    top = json.loads(invoke("show", run_dir, "--json", "--top", "3"))["top"]
    assert len(body) == len(top) == 3
    for i, (cells, row) in enumerate(zip(body, top), 1):
        assert cells[0] == str(i) and cells[1].startswith(f"{row['fitness']:.4f}")
        assert cells[3].startswith("$") and cells[3].endswith("$") and r"\sum_{c}" in cells[3]
    result = CliRunner().invoke(cli, ["show", str(run_dir), "--latex", "--json"])
    assert result.exit_code == 2


_WRITER = textwrap.dedent("""
    import sys, time
    from gp_loss.runs.store import RunStore
    store = RunStore.open(sys.argv[1])
    i = 0
    while True:
        with store.transaction():
            store.add_candidate("mul(y, log(p))", "evaluated", phase="child", birth=1000 + i,
                                fitness=0.5, sign=-1, key=f"writer{i}", parent_id=1,
                                mutation="node")
            store.set_state(children_done=i)
        i += 1
        if i == 1:
            print("ready", flush=True)
        time.sleep(0.05)
""")


def test_show_and_plot_while_another_process_writes(run_dir, tmp_path, invoke):
    live = tmp_path / "live"
    shutil.copytree(run_dir, live)
    with _store(live):
        pass
    with RunStore.open(live) as store:  # an unfinished run: phase evolve
        store.set_state(phase="evolve")
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(live)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        assert RunStore.writer_active(live)
        seen = set()
        for _ in range(40):  # until the writer's progress shows (a loaded machine is slow)
            s = json.loads(invoke("show", live, "--json", "--top", "3"))
            assert s["status"] == "running"
            seen.add(s["state"]["children_done"])
            assert "running" in invoke("show", live, "--top", "3").splitlines()[0]
            if len(seen) > 1:
                break
            time.sleep(0.1)
        assert len(seen) > 1, "the writer kept writing while show read"
        paths = invoke("plot", live, "--top", "1").split()  # default folder: RUN_DIR/plots
        assert len(paths) == 5 and all(p.startswith(str(live / "plots")) for p in paths)
        assert writer.poll() is None
    finally:
        writer.kill()
        writer.wait()
    assert not RunStore.writer_active(live)
    assert json.loads(invoke("show", live, "--json"))["status"] == "interrupted"
    assert "gp-loss resume" in invoke("show", live).splitlines()[0]


def test_writer_active_follows_the_lock(tmp_path):
    assert not RunStore.writer_active(tmp_path)  # no lock file: nothing to probe
    from gp_loss.runs.report import run_status

    store = RunStore.create(tmp_path / "r", {"search": {}})
    assert RunStore.writer_active(tmp_path / "r")
    with _store(tmp_path / "r") as reader:
        assert RunStore.writer_active(tmp_path / "r")  # readers take no lock
        assert run_status(reader) == "running"
    assert run_status(store) == "interrupted"  # the writer's own closing table
    store.set_state(phase="done")
    assert run_status(store) == "finished"
    store.close()
    assert not RunStore.writer_active(tmp_path / "r")
    RunStore.open(tmp_path / "r").close()  # the probe left nothing behind


def test_plot_of_a_run_without_results_is_bad_input(tmp_path):
    RunStore.create(tmp_path / "r", {"search": {}}).close()
    for args in (["plot", str(tmp_path / "r"), "-o", str(tmp_path / "p")],
                 ["plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "p")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "Traceback" not in result.output


# ----------------------------------------------------------------------------- plot

def _labelled(items):
    return [x for x in items if not x.get_label().startswith("_")]


def _check_axes(ax):
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    legend = ax.get_legend()
    assert legend is not None and legend.get_texts()


def test_plot_writes_valid_pngs(run_dir, tmp_path, invoke):
    from PIL import Image
    import matplotlib.image

    out = tmp_path / "plots"
    paths = invoke("plot", run_dir, "-o", out, "--top", "2").split()
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == sorted(["progress.png", "loss_shapes.png", "pareto.png", "lineage.png",
                            "tree_rank1.png", "tree_rank2.png"])
    for path in paths:
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) < 300_000
        with Image.open(path) as img:
            img.verify()
        assert matplotlib.image.imread(path).shape[2] in (3, 4)


def test_plot_series(run_dir):
    from gp_loss.runs import plots
    run = plots.load_run(run_dir, top=3)
    figs = plots.figures(run)
    assert len(run.refs) == 1 and len(run.top) == 3
    for fig in figs.values():
        for ax in fig.axes:
            _check_axes(ax)

    (ax,) = figs["progress.png"].axes
    failed = any(r["status"] == "failed" for r in run.search)
    assert failed, "the fake fails every 7th call"
    assert len(_labelled(ax.collections)) == 2  # evaluations, failed ones
    assert len(_labelled(ax.get_lines())) == 3  # best so far, population median, reference
    best = [line for line in ax.get_lines() if line.get_label() == "best so far"][0]
    assert max(best.get_ydata()) == max(r["fitness"] for r in run.evaluated)

    for ax in figs["loss_shapes.png"].axes:  # loss and gradient: top 3 and cross-entropy
        lines = _labelled(ax.get_lines())
        assert len(lines) == 4 and lines[-1].get_label() == "cross-entropy"
        assert len(lines[0].get_xdata()) == 1000  # the integrity sweep's rows

    (ax,) = figs["pareto.png"].axes
    (scatter,) = _labelled(ax.collections)
    assert len(scatter.get_offsets()) == len(run.evaluated)
    front = [line for line in ax.get_lines() if line.get_label() == "Pareto front"][0]
    assert list(front.get_xdata()) == [r["size"] for r in pareto_front(run.evaluated)]

    (ax,) = figs["lineage.png"].axes
    chain = plots.lineage(run, run.top[0]["id"])
    assert chain[0]["phase"] == "initial" and chain[-1]["id"] == run.top[0]["id"]
    assert all(b["parent_id"] == a["id"] for a, b in zip(chain, chain[1:]))
    assert len(_labelled(ax.get_lines())[0].get_xdata()) == len(chain)

    for i, row in enumerate(run.top, 1):
        (ax,) = figs[f"tree_rank{i}.png"].axes
        size = len(parse(row["expr"], run.pset))
        nodes = sum(len(c.get_offsets()) for c in _labelled(ax.collections))
        assert nodes == size and len(ax.texts) == size


def test_population_median_replays_insert_and_age_out():
    from gp_loss.runs.plots import population_medians

    def row(i, phase, fit, birth=None, status="evaluated"):
        return {"id": i, "phase": phase, "fitness": fit, "birth": birth, "status": status}

    rows = [row(1, "initial", 0.1), row(2, "initial", 0.5), row(3, "initial", 0.3),
            row(4, "initial", None, status="failed"),
            row(5, "child", 0.9, birth=1),     # joins; the oldest-and-worst (0.3) leaves
            row(6, "child", None, birth=2, status="failed"),
            row(7, "child", 0.2, birth=3)]     # joins; 0.5 (age 0) leaves
    assert population_medians(rows, 2) == [(4, 0.4), (5, 0.7), (6, 0.7), (7, 0.55)]


def test_progress_legend_counts_the_population_the_search_logged(tmp_path, monkeypatch):
    # 3 of 6 initial candidates fail (as with the pre-screen): the search logs "3 members"
    # and progress.png's legend says the same, not the configured population of 6
    import logging

    from gp_loss.runs import plots
    class FailSome(FakeEvaluate):
        def __call__(self, expr, *args, **kwargs):
            res = super().__call__(expr, *args, **kwargs)
            if self.calls in (1, 3, 5):
                return {**res, "status": "failed", "reason": "prescreen", "fitness": 0.0}
            return res

    cfg = apply_overrides(Config(), [
        "executor.kind=serial", "search.reference=[]", "surrogate.steps=100",
        "search.initial=6", "search.population=6", "search.tournament=2", "search.children=3"])
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("gp_loss.search")
    level = logger.level
    logger.setLevel(logging.INFO)  # (setLevel: the logger caches what is enabled)
    logger.addHandler(handler)
    use_fake(monkeypatch, FailSome())
    store = evo.start_run(tmp_path / "run", cfg)
    try:
        assert evo.Evolution(store, cfg).run()["stop_reason"] == "finished"
    finally:
        store.close()
        logger.removeHandler(handler)
        logger.setLevel(level)
    logged = [m for m in records if m.startswith("initial population:")]
    assert len(logged) == 1 and logged[0].startswith("initial population: 3 members"), records
    (ax,) = plots.progress_figure(plots.load_run(tmp_path / "run")).axes
    (label,) = [ln.get_label() for ln in ax.get_lines()
                if ln.get_label().startswith("population median")]
    assert "3 initial members" in label and "6 members" not in label, label


# ----------------------------------------------------------------------------- export

def test_export_top3_round_trips_value_and_gradient(run_dir, tmp_path, invoke):
    out = tmp_path / "best.py"
    invoke("export", run_dir, "--top", "3", "-o", out)
    text = out.read_text()
    imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(text))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    assert imported == {"torch", "math"}
    spec = importlib.util.spec_from_file_location("inspect_exported", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert list(module.LOSSES) == ["rank1", "rank2", "rank3"]
    pset = load_pset("paper")
    with _store(run_dir) as store:
        top = store.top(3)
    assert [r["fitness"] for r in top] == sorted((r["fitness"] for r in top), reverse=True)
    assert len({r["key"] for r in top}) == 3
    assert str(run_dir.resolve()) in text
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 10, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, 10, (32,), generator=gen)
    for i, row in enumerate(top, 1):
        fn = module.LOSSES[f"rank{i}"]
        assert row["expr"] in fn.__doc__
        assert f"#{row['id']}, fitness {row['fitness']:.4f}" in text
        engine = codegen.compile_loss(parse(row["expr"], pset), pset, sign=row["sign"])[0]
        values, grads = [], []
        for loss in (fn, engine):
            x = logits.clone().requires_grad_(True)
            value = loss(x, target)
            (g,) = torch.autograd.grad(value, x)
            values.append(value)
            grads.append(g)
        assert values[0].dtype == torch.float64 and torch.isfinite(values[0])
        torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0, equal_nan=True)
    data = json.loads(invoke("export", run_dir, "--top", "3", "--format", "json", "-o", "-"))
    assert data["run"]["dir"] == str(run_dir.resolve())
    assert [x["candidate_id"] for x in data["losses"]] == [r["id"] for r in top]


def test_pareto_front_breaks_fitness_ties_by_the_lower_validation_nll():
    rows = [{"id": 1, "size": 3, "fitness": 0.7, "result": {"val_nll": 0.9}},
            {"id": 2, "size": 3, "fitness": 0.7, "result": {"val_nll": 0.4}},
            {"id": 3, "size": 3, "fitness": 0.6, "result": {"val_nll": 0.1}},
            {"id": 4, "size": 5, "fitness": 0.8},  # a row of an old store: no val_nll
            {"id": 5, "size": 5, "fitness": 0.8, "result": {"val_nll": 2.0}}]
    assert [r["id"] for r in pareto_front(rows)] == [2, 5]


def test_the_readme_shows_the_current_show_headers(run_dir):
    """The README's `make search` block is real output of the current `show` format: its
    ranking header and column line are what format_summary prints for those settings."""
    from pathlib import Path

    from gp_loss.runs import render, report
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    with _store(run_dir) as store:
        s = report.summary(store, 3)
    s["config"] = {**s["config"], "dataset": "digits", "model": "tiny", "steps": 300}
    s["top"] = [{**t, "val_nll": t.get("val_nll") or 1.0} for t in s["top"]]
    lines = render.format_summary(s).splitlines()
    header = next(x for x in lines if x.startswith("Best losses, ranked by search fitness"))
    columns = lines[lines.index(header) + 1]
    assert "ties broken by validation NLL, lower wins" in header
    assert header in readme and columns in readme
