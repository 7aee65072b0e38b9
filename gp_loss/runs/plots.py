"""Pictures of a run for ``gp-loss plot``: PNG files drawn with matplotlib (Agg, no display).

Fed by a read-only run store (``store.RunStore``) through ``report`` (the search's evaluated
rows with their sizes, the Pareto front, how each row was found), the search's own rule for
its initial population (``search.start.initial_population``: the progress plot's replay and
legend count what the search logged), ``screen``'s integrity sweep and
``codegen.compile_loss`` (the curves are of the printer's compiled per-sample loss, i.e. of
what trained), and DEAP's ``gp.graph`` for the trees, drawn with networkx on a hierarchical
layout computed here (no graphviz). Each ``*_figure`` function returns its matplotlib
``Figure`` so that tests can count the series; ``write_all`` writes them all and returns the
paths. matplotlib is imported on first use, so the CLI stays light; figures are made with
``matplotlib.figure.Figure`` (no pyplot state), and Agg is selected only when pyplot is not
loaded yet (a notebook keeps its backend).
"""
from __future__ import annotations

import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..search.start import initial_population
from ..lang.psets import load_pset
from .report import evaluated_rows, how_found, pareto_front
from .store import SEARCH_PHASES, RunStore
from ..lang.trees import display_name, parse, var_name

DONE = ("evaluated", "reused", "failed")
FITNESS_LABEL = "fitness (best validation accuracy)"
TASKS_LABEL = "fitness (mean over tasks of val. accuracy - ce_torch's)"  # [[search.tasks]]


@dataclass
class Run:
    """What the plots read from a store, loaded once (the store is closed afterwards)."""

    run_dir: Path
    pset: object
    population: int
    n_seeds: int
    rows: dict                   # id -> row, every row of the store
    search: list                 # finished search rows (initial/child), id order
    evaluated: list              # search rows with a fitness, id order, with "size"
    top: list                    # store.top(k)
    refs: list = field(default_factory=list)  # (name, fitness) of the reference losses
    fitness_label: str = FITNESS_LABEL  # what the fitness axis measures


def load_run(run_dir, top: int = 3) -> Run:
    """Read a run (read-only, while it runs too)."""
    with RunStore.open(run_dir, readonly=True) as store:
        cfg = store.config().get("search", {})
        rows = {r["id"]: r for r in store.candidates()}
        names = list(cfg.get("reference", []))
        refs = [(names[r["birth"]] if r["birth"] is not None and 0 <= r["birth"] < len(names)
                 else r["expr"], r["fitness"])
                for r in rows.values() if r["phase"] == "reference" and r["fitness"] is not None]
        run = Run(Path(run_dir), load_pset(cfg.get("pset", "paper")),
                  int(cfg.get("population", 1)), len(cfg.get("seed_with", [])), rows,
                  [r for r in rows.values() if r["phase"] in SEARCH_PHASES
                   and r["status"] in DONE], evaluated_rows(store), store.best(top), refs,
                  TASKS_LABEL if len(cfg.get("tasks") or []) >= 2 else FITNESS_LABEL)
    if not run.evaluated:
        raise InputError(f"{run_dir}: the run has no evaluated candidates yet")
    return run


def _figure(w: float, h: float, ncols: int = 1):
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _references(ax, run: Run) -> None:
    for i, (name, fit) in enumerate(run.refs):
        ax.axhline(fit, color="grey", linestyle=("--", ":", "-.")[i % 3], linewidth=1,
                   label=f"{name} (reference, same budget)")


def _label(row) -> str:
    return f"#{row['id']} ({row['fitness']:.3f})"


# ----------------------------------------------------------------------------- (1) progress

def population_medians(search_rows, population: int) -> list[tuple[int, float]]:
    """Replay the population over the search rows in id order: once the initial rows are
    done, the search's initial population (``search.start.initial_population``: the best
    ``population`` successes, equally old); then every successful child joins and the oldest
    leaves (ties: lowest fitness, then lowest id), as ``evolution`` does.
    Returns (evaluation number, population median) from that point on. Id order is the
    order results arrived for a serial run; with several workers it approximates it."""
    out = []
    children_from = next((i for i, r in enumerate(search_rows) if r["phase"] == "child"),
                         len(search_rows))
    members = [(0, r["fitness"], r["id"])
               for r in initial_population(search_rows[:children_from], population)]
    if members:
        out.append((children_from, statistics.median(m[1] for m in members)))
    for i, r in enumerate(search_rows[children_from:], children_from + 1):
        if r["status"] != "failed" and r["fitness"] is not None:
            members.append((r["birth"] or 0, r["fitness"], r["id"]))
            if len(members) > population:
                members.remove(min(members))
        if members:
            out.append((i, statistics.median(m[1] for m in members)))
    return out


def progress_figure(run: Run):
    """Fitness of every finished search evaluation in order, the best so far and the
    replayed population median (failed evaluations at 0)."""
    fig, (ax,) = _figure(8, 4.5)
    ok = [(i, r["fitness"]) for i, r in enumerate(run.search, 1)
          if r["status"] != "failed" and r["fitness"] is not None]
    bad = [i for i, r in enumerate(run.search, 1) if r["status"] == "failed"]
    ax.scatter([i for i, _ in ok], [f for _, f in ok], s=12, alpha=0.6, color="tab:blue",
               label="evaluation (initial and children)")
    if bad:
        ax.scatter(bad, [0.0] * len(bad), s=14, marker="x", color="tab:red",
                   label="failed evaluation (shown at 0)")
    best, xs, ys = None, [], []
    for i, f in ok:
        best = f if best is None else max(best, f)
        xs.append(i)
        ys.append(best)
    if xs and xs[-1] < len(run.search):
        xs.append(len(run.search))
        ys.append(best)
    ax.step(xs, ys, where="post", color="black", linewidth=1.5, label="best so far")
    med = population_medians(run.search, run.population)
    n0 = len(initial_population(run.search, run.population))  # = the search's log line
    size = (f"{n0} members" if n0 == run.population else
            f"{n0} initial member{'' if n0 == 1 else 's'}, at most {run.population}")
    ax.plot([x for x, _ in med], [m for _, m in med], color="tab:orange", linewidth=1.5,
            label=f"population median (replayed, {size})")
    _references(ax, run)
    n_init = sum(r["phase"] == "initial" for r in run.search)
    if n_init and n_init < len(run.search):
        ax.axvline(n_init + 0.5, color="grey", linewidth=0.8, alpha=0.6)
    ax.set_title(f"Search progress: {len(run.search)} evaluations "
                 f"({n_init} initial, then children)")
    ax.set_xlabel("evaluation number (store order)")
    ax.set_ylabel(run.fitness_label)
    ax.legend(loc="center right", fontsize=8, framealpha=0.9)
    return fig


# ----------------------------------------------------------------------------- (2) loss shapes

def shape_curves(expr: str, pset, sign: int):
    """(p_true, signed loss, d loss / d p_true) on the integrity check's two-class sweep
    (``screen``'s rows: p = (q, 1 - q), target class 1), through the compiled per-sample
    loss in float64. Moving along the sweep changes both probabilities, so the derivative is
    the one along p_true with p_other = 1 - p_true."""
    import torch

    from ..lang.codegen import compile_loss
    from ..screen.fingerprint import probe as fixed_probe

    probe = fixed_probe()
    per_sample = compile_loss(parse(expr, pset, max_height=10**4, max_size=10**4), pset)[1]
    t = torch.from_numpy(probe.sweep_p[:, 1].copy()).requires_grad_(True)
    p = torch.stack([1.0 - t, t], dim=1)
    loss = sign * per_sample(probe.t_sweep_y, p)
    (grad,) = torch.autograd.grad(loss.sum(), t, allow_unused=True)
    grad = torch.zeros_like(t) if grad is None else grad
    return t.detach().numpy(), loss.detach().numpy(), grad.numpy()


def shapes_figure(run: Run):
    """Loss and gradient of the top losses and of cross-entropy against the true class's
    probability: two panels, symlog y axes (losses like 1/p span many decades)."""
    import numpy as np

    fig, (ax_l, ax_g) = _figure(11, 4.5, ncols=2)
    # Thinner lines for lower ranks, drawn later: a curve that coincides with a better one
    # stays visible on top of it.
    curves = [(f"rank{i} {_label(r)}", r["expr"], run.pset, r["sign"] if r["sign"] in (1, -1)
               else 1, "-", max(0.8, 3.2 - 0.6 * i)) for i, r in enumerate(run.top, 1)]
    curves.append(("cross-entropy", "ce", load_pset("paper"), 1, "--", 1.5))
    for label, expr, pset, sign, style, width in curves:
        x, loss, grad = shape_curves(expr, pset, sign)
        finite = loss[np.isfinite(loss)]
        if finite.size:  # an offset never changes training: align the minima for comparison
            loss = loss - finite.min()
        color = "black" if expr == "ce" else None
        ax_l.plot(x, loss, style, color=color, linewidth=width, label=label)
        ax_g.plot(x, grad, style, color=color, linewidth=width, label=label)
    for ax, what in ((ax_l, "per-sample loss minus its minimum (sign applied)"),
                     (ax_g, "d loss / d p_true")):
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("predicted probability of the true class p_true (two classes)")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    ax_l.set_title("Loss shape: the integrity check's sweep")
    ax_g.set_title("Its gradient along the sweep")
    return fig


# ----------------------------------------------------------------------------- (3) pareto

def pareto_figure(run: Run):
    """Fitness vs formula size of every evaluated search candidate, and the Pareto front."""
    fig, (ax,) = _figure(7, 4.5)
    ax.scatter([r["size"] for r in run.evaluated], [r["fitness"] for r in run.evaluated],
               s=14, alpha=0.4, color="tab:blue", label="evaluated candidate")
    front = pareto_front(run.evaluated)
    ax.step([r["size"] for r in front], [r["fitness"] for r in front], where="post",
            marker="o", color="tab:red", linewidth=1.5, label="Pareto front")
    for r in front:
        ax.annotate(f"#{r['id']}", (r["size"], r["fitness"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7)
    _references(ax, run)
    ax.set_title("Fitness vs formula size")
    ax.set_xlabel("formula size (nodes of the expression tree)")
    ax.set_ylabel(run.fitness_label)
    ax.legend(loc="lower right", fontsize=8)
    return fig


# ----------------------------------------------------------------------------- (4) lineage

def lineage(run: Run, candidate_id: int) -> list[dict]:
    """The chain of search rows from the initial population down to ``candidate_id``
    (following ``parent_id``; a re-scored initial row's seeding parent is not part of it)."""
    chain, seen, row = [], set(), run.rows.get(candidate_id)
    while row is not None and row["id"] not in seen and row["phase"] in SEARCH_PHASES:
        chain.append(row)
        seen.add(row["id"])
        row = run.rows.get(row["parent_id"]) if row["parent_id"] is not None else None
    return chain[::-1]


def lineage_figure(run: Run):
    """Fitness along the ancestry of the best candidate, each step labelled by how it was
    made (initial / seed / re-score, then the mutation kinds)."""
    fig, (ax,) = _figure(8, 4.5)
    chain = lineage(run, run.top[0]["id"])
    xs = list(range(len(chain)))
    ys = [r["fitness"] if r["fitness"] is not None else float("nan") for r in chain]
    ax.plot(xs, ys, marker="o", color="tab:green", linewidth=1.5,
            label=f"ancestors of the best candidate #{chain[-1]['id']}")
    for x, y, r in zip(xs, ys, chain):
        how = how_found(r, run.n_seeds).split(" of #")[0]
        ax.annotate(how, (x, y), textcoords="offset points", xytext=(0, 8), ha="center",
                    fontsize=8)
    _references(ax, run)
    ax.set_xticks(xs, [f"#{r['id']}" for r in chain], rotation=45 if len(xs) > 8 else 0,
                  fontsize=8)
    ax.set_title(f"Lineage of the best candidate ({len(chain) - 1} mutation"
                 f"{'' if len(chain) == 2 else 's'} from the initial population)")
    ax.set_xlabel("ancestor (candidate id), oldest first; label: how it was made")
    ax.set_ylabel(run.fitness_label)
    ax.legend(loc="lower right", fontsize=8)
    return fig


# ----------------------------------------------------------------------------- (5) trees

def tree_layout(nodes, edges) -> dict:
    """Hierarchical positions for DEAP's ``gp.graph`` (nodes are prefix-order indices): leaves
    one unit apart left to right, a parent above the middle of its children, y = -depth."""
    children: dict = {n: [] for n in nodes}
    depth = {nodes[0]: 0} if nodes else {}
    for a, b in edges:
        children[a].append(b)
    for n in nodes:  # prefix order: a parent comes before its children
        for c in children[n]:
            depth[c] = depth[n] + 1
    x: dict = {}
    leaves = [n for n in nodes if not children[n]]
    for i, n in enumerate(leaves):
        x[n] = float(i)
    for n in reversed(nodes):
        if children[n]:
            x[n] = sum(x[c] for c in children[n]) / len(children[n])
    return {n: (x[n], -depth[n]) for n in nodes}


def tree_figure(expr: str, pset, title: str):
    """One expression tree drawn from DEAP's graph: operators, inputs and constants in three
    colours, labels as in the expression text."""
    import networkx as nx
    from deap import gp

    tree = parse(expr, pset, max_height=10**4, max_size=10**4)
    nodes, edges, _ = gp.graph(tree)  # DEAP's labels show raw terminal objects: ours instead
    labels = {i: display_name(pset, tree[i]) for i in nodes}
    pos = tree_layout(nodes, edges)
    width = max(p[0] for p in pos.values()) + 1
    height = -min(p[1] for p in pos.values()) + 1
    fig, (ax,) = _figure(min(16, max(4.5, 1.0 * width + 1)), min(12, max(3.0, 0.9 * height + 1)))
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    nx.draw_networkx_edges(graph, pos, ax=ax, arrows=False, edge_color="grey")
    kinds = (("operator", "#9ecae1", lambda n: isinstance(n, gp.Primitive)),
             ("input (y, p)", "#a1d99b", lambda n: var_name(n, pset) is not None),
             ("constant", "#fdd0a2", lambda n: not isinstance(n, gp.Primitive)
              and var_name(n, pset) is None))
    for name, color, test in kinds:
        members = [i for i in nodes if test(tree[i])]
        if members:
            nx.draw_networkx_nodes(graph, pos, nodelist=members, ax=ax, node_color=color,
                                   node_size=[300 + 90 * len(labels[i]) for i in members],
                                   edgecolors="black", linewidths=0.5, label=name)
    nx.draw_networkx_labels(graph, pos, labels, ax=ax, font_size=9)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("leaves left to right (argument order)")
    ax.set_ylabel("depth below the root")
    ax.margins(0.12)
    ax.legend(loc="upper right", fontsize=7, markerscale=0.5)
    return fig


# ----------------------------------------------------------------------------- all

def figures(run: Run) -> dict:
    """file name -> Figure, for every plot of the run."""
    out = {"progress.png": progress_figure(run), "loss_shapes.png": shapes_figure(run),
           "pareto.png": pareto_figure(run), "lineage.png": lineage_figure(run)}
    for i, r in enumerate(run.top, 1):
        sign = "" if r["sign"] in (1, None) else ", sign -1"
        expr = textwrap.fill(r["expr"], 110, break_on_hyphens=False)
        out[f"tree_rank{i}.png"] = tree_figure(
            r["expr"], run.pset, f"rank{i}: #{r['id']}, fitness {r['fitness']:.4f}{sign}\n{expr}")
    return out


def write_all(run_dir, out_dir, top: int = 3, dpi: int = 90) -> list[Path]:
    """Write every plot of ``run_dir`` as PNG files under ``out_dir`` (made if missing);
    returns the paths written."""
    run = load_run(run_dir, top)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    paths = []
    for name, fig in figures(run).items():
        path = out_dir / name
        try:
            fig.savefig(path, dpi=dpi)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        paths.append(path)
    return paths
