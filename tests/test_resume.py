"""Interrupted searches resume exactly (DESIGN §6, issue 3).

- in-process: a serial search with a fake evaluation, interrupted many times (Ctrl-C during
  an evaluation) and resumed each time, ends with the same candidates table and population as
  the uninterrupted run;
- subprocess: a real (tiny) serial search killed with SIGKILL during the initial phase and
  again during evolution, then resumed, equals the uninterrupted run field by field;
- subprocess: a process-executor search (2 workers) killed with SIGKILL and resumed accounts
  for every candidate: nothing completed is lost or repeated.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import gp_loss.search.evolution as evo
from test_search import use_fake
from gp_loss.cli.app import cli
from gp_loss.config import Config, apply_overrides
from gp_loss.runs.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("phase", "birth", "expr", "status", "reason", "fitness", "sign", "parent_id")
NOT_PROPOSALS = ("rejected", "duplicate", "near_duplicate")
DONE = ("evaluated", "reused", "failed")


def table(run_dir):
    with RunStore.open(run_dir, readonly=True) as store:
        rows = [tuple(r[k] for k in ("id",) + FIELDS) for r in store.candidates()]
        members = [(r["id"], r["age_order"]) for r in store.population()]
        state = {k: store.get_state(k) for k in ("phase", "children_done", "next_birth")}
    return rows, members, state


# --------------------------------------------------------------------------- in-process

class InterruptingEvaluate:
    """A fake evaluation that simulates Ctrl-C on the calls numbered in ``stops``."""

    def __init__(self, stops=()):
        self.stops, self.calls = set(stops), 0

    def __call__(self, expr, pset_name, eval_config, seed=0, sign=1, with_test=False):
        self.calls += 1
        if self.calls in self.stops:
            raise KeyboardInterrupt
        u = int(hashlib.sha256(expr.encode()).hexdigest()[:8], 16) / 16**8
        if u < 0.2:
            return {"status": "failed", "reason": "nan_loss", "fitness": 0.0, "steps": 2,
                    "seconds": 0.0}
        return {"status": "ok", "reason": None, "fitness": round(u, 2), "steps": 10,
                "seconds": 0.0}


# One evaluation at a time (K = 1): each interrupt leaves exactly one pending. The pack
# variants (K > 1) are below.
FAKE_CFG = ["executor.kind=serial", "search.initial=5", "search.population=3",
            "search.tournament=2", "search.children=16", "surrogate.steps=10",
            "executor.candidates_per_worker=1"]


def run_interrupted(run_dir, stops, monkeypatch, extra=()):
    cfg = apply_overrides(Config(), FAKE_CFG + list(extra))
    fake = InterruptingEvaluate(stops)
    use_fake(monkeypatch, fake)
    evo.start_run(run_dir, cfg).close()
    cut_in = []  # the phase of the evaluation each interrupt hit
    for attempt in range(len(stops) + 1):
        with RunStore.open(run_dir) as store:
            result = evo.Evolution(store, cfg).run()
        if result["stop_reason"] == "finished":
            return attempt, cut_in
        assert result["stop_reason"] == "interrupted"
        with RunStore.open(run_dir, readonly=True) as store:
            pending = store.candidates(status="pending")
            # the evaluation that was running (+ re-scores not yet submitted, all stored
            # when the seeding phase ended)
            if cfg.executor.candidates_per_worker == 1:
                assert len(pending) == 1 or {r["phase"] for r in pending} <= {"initial",
                                                                             "reeval"}
            else:  # the pack in flight, and what was proposed for the next before the cut
                assert 1 <= len(pending) <= 2 * cfg.executor.candidates_per_worker + 4
            cut_in.append(pending[0]["phase"])
    raise AssertionError("the run did not finish")


# The paper's seeding: 8 cheaply scored initial candidates (calls 2-9 after the reference),
# the best 4 re-scored by the surrogate (calls 10-13), then evolution.
CHEAP = ["search.initial_fitness=cheap", "search.initial=8", "search.rescore=4",
         "search.initial_surrogate.steps=3"]


def test_interrupted_reeval_run_resumes_exactly(tmp_path, monkeypatch):
    reeval = ["search.reeval_seeds=3", "search.reeval_after=2"]
    baseline = tmp_path / "base"
    assert run_interrupted(baseline, (), monkeypatch, reeval)[0] == 0
    expected = table(baseline)
    assert any(r[1] == "reeval" for r in expected[0])
    stops = (7, 11, 14, 17, 20, 26)
    run_dir = tmp_path / "interrupted"
    attempts, cut_in = run_interrupted(run_dir, stops, monkeypatch, reeval)
    assert attempts == len(stops) and "reeval" in cut_in, cut_in
    assert table(run_dir) == expected


def test_interrupted_cheap_seeding_resumes_exactly(tmp_path, monkeypatch):
    baseline = tmp_path / "base"
    assert run_interrupted(baseline, (), monkeypatch, CHEAP)[0] == 0
    expected = table(baseline)
    phases = [r[1] for r in expected[0]]
    assert phases.count("seeding") >= 8 and "initial" in phases
    # interrupts in the seeding phase, around the switch to re-scoring, during re-scoring
    # (twice in a row once) and in evolution; call numbers count re-submissions too
    stops = (3, 10, 11, 13, 15, 16, 20, 24)
    run_dir = tmp_path / "interrupted"
    attempts, cut_in = run_interrupted(run_dir, stops, monkeypatch, CHEAP)
    assert attempts == len(stops) and {"seeding", "initial", "child"} <= set(cut_in), cut_in
    assert table(run_dir) == expected


def test_an_old_run_whose_config_says_tinycnn_resumes_as_tiny(tmp_path, monkeypatch):
    # Runs stored before `tiny` became the one name say "tinycnn" (models.ALIASES): `resume`
    # reads the model as "tiny" and finishes the run exactly as an uninterrupted one.
    baseline = tmp_path / "base"
    assert run_interrupted(baseline, (), monkeypatch)[0] == 0
    expected = table(baseline)
    run_dir = tmp_path / "old"
    run_interrupted(run_dir, (), monkeypatch, ["search.children=0"])
    with RunStore.open(run_dir) as store:
        old = store.config()
        assert old["surrogate"]["model"] == "tiny"
        old["surrogate"]["model"] = "tinycnn"
        store.set_meta("config", old)
        from gp_loss.runs import report
        assert report.summary(store, 0, formulas=False)["config"]["model"] == "tiny"  # show
    use_fake(monkeypatch, InterruptingEvaluate())
    res = CliRunner().invoke(cli, ["-q", "resume", str(run_dir), "--set", "search.children=16"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    with RunStore.open(run_dir, readonly=True) as store:
        assert store.config()["surrogate"]["model"] == "tiny"
    assert table(run_dir) == expected


def test_interrupted_serial_runs_resume_exactly(tmp_path, monkeypatch):
    baseline = tmp_path / "base"
    assert run_interrupted(baseline, (), monkeypatch)[0] == 0
    expected = table(baseline)
    assert expected[2]["phase"] == "done" and expected[2]["children_done"] == 16
    # Interrupts spread over the reference (call 1), the initial phase and evolution, twice
    # in a row once (8, 9: the re-submitted evaluation is interrupted again); the calls
    # counted include the re-submitted ones.
    stops = (1, 3, 6, 8, 9, 12, 15, 19, 24)
    run_dir = tmp_path / "interrupted"
    attempts, cut_in = run_interrupted(run_dir, stops, monkeypatch)
    assert attempts == len(stops) and {"reference", "initial", "child"} <= set(cut_in)
    got = table(run_dir)
    assert got[0] == expected[0]  # every row, field by field, in id order
    assert got[1:] == expected[1:]  # population with its ages, counters


@pytest.mark.parametrize("k", [3, 8])
def test_interrupted_serial_pack_runs_resume_exactly(tmp_path, monkeypatch, k):
    # K candidates per pack (2K per call): an interrupt cuts a pack in the middle; the
    # resumed run re-runs the pack whole and ends as the uninterrupted one, row for row,
    # re-evaluations included.
    extra = [f"executor.candidates_per_worker={k}", "search.reeval_seeds=2",
             "search.reeval_after=2"]
    baseline = tmp_path / "base"
    assert run_interrupted(baseline, (), monkeypatch, extra)[0] == 0
    expected = table(baseline)
    assert expected[2]["phase"] == "done" and expected[2]["children_done"] == 16
    stops = (2, 5, 9, 10, 16, 23, 31)
    run_dir = tmp_path / "interrupted"
    attempts, cut_in = run_interrupted(run_dir, stops, monkeypatch, extra)
    assert attempts == len(stops) and "child" in cut_in, cut_in
    assert table(run_dir) == expected


# --------------------------------------------------------------------------- subprocesses

TINY = ["--set", "search.initial=5", "--set", "search.population=3", "--set",
        "search.tournament=2", "--set", "search.children=5", "--set", "surrogate.steps=40",
        "--set", "surrogate.prescreen_steps=20", "--set", "search.seed=3",
        "--set", "executor.candidates_per_worker=1"]


def spawn(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "gp_loss", "-q", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def progress(db: Path) -> dict | None:
    """What a running search has committed so far (None before the store exists)."""
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            done, pending = con.execute(
                "SELECT COALESCE(sum(status IN ('evaluated', 'reused', 'failed')), 0), "
                "COALESCE(sum(status = 'pending'), 0) FROM candidates").fetchone()
            state = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM state")}
        finally:
            con.close()
    except sqlite3.Error:  # e.g. the schema is being created
        return None
    return {"done": done, "pending": pending, **state}


def kill_when(proc, run_dir, condition, timeout=180):
    """SIGKILL ``proc`` as soon as ``condition(progress)`` holds; fail if it ends first."""
    db = Path(run_dir) / "run.sqlite"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the search ended (rc {proc.returncode}) before the kill point: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        p = progress(db)
        if p is not None and condition(p):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            return p
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the kill point was not reached in time")


def cli_ok(*args):
    res = CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_sigkilled_serial_search_resumes_to_the_uninterrupted_run(tmp_path):
    serial = ["--set", "executor.kind=serial"]
    base = tmp_path / "base"
    cli_ok("search", "--run-dir", str(base), *TINY, *serial)

    run_dir = tmp_path / "killed"
    proc = spawn("search", "--run-dir", str(run_dir), *TINY, *serial)
    p = kill_when(proc, run_dir, lambda p: p["done"] >= 3)        # reference + 2 initial
    assert p.get("phase") == "initial"
    proc = spawn("resume", str(run_dir))
    p = kill_when(proc, run_dir, lambda p: p.get("phase") == "evolve"
                  and p.get("children_done", 0) >= 2)
    cli_ok("resume", str(run_dir))

    expected, got = table(base), table(run_dir)
    assert len(got[0]) == len(expected[0])
    for mine, theirs in zip(got[0], expected[0]):
        assert mine == theirs
    assert got[1:] == expected[1:]
    assert got[2]["phase"] == "done"


@pytest.mark.parametrize("k", [1, 4])
def test_serial_search_sigkilled_at_random_moments_resumes_to_the_same_run(tmp_path, k):
    """Kills at arbitrary moments (mid-transaction, mid-training, during start-up), several
    in a row; the resumed run equals the uninterrupted one row for row, with candidates
    trained alone (K = 1) and in packs (K = 4: a pack killed mid-run is re-run whole)."""
    import random

    serial = ["--set", "executor.kind=serial", "--set", "search.children=8",
              "--set", f"executor.candidates_per_worker={k}"]
    base = tmp_path / "base"
    cli_ok("search", "--run-dir", str(base), *TINY, *serial)
    run_dir, rng, kills = tmp_path / "killed", random.Random(2026), []
    proc = spawn("search", "--run-dir", str(run_dir), *TINY, *serial)
    for attempt in range(4):
        deadline = time.monotonic() + 60
        while progress(run_dir / "run.sqlite") is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the store exists: the run has started
        time.sleep(rng.uniform(0.2, 2.5))
        if proc.poll() is not None:
            break  # it finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills.append(progress(run_dir / "run.sqlite"))
        proc = spawn("resume", str(run_dir))
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    assert len(kills) >= 2, kills  # the run was really cut, more than once
    assert table(run_dir) == table(base)


def test_sigkilled_serial_pack_search_resumes_to_the_uninterrupted_run(tmp_path):
    # Real training in packs of 4: killed while a pack trains (evaluations pending in the
    # evolution phase), resumed, it ends as the run that was never killed.
    packs = ["--set", "executor.kind=serial", "--set", "executor.candidates_per_worker=4",
             "--set", "search.children=10"]
    base = tmp_path / "base"
    cli_ok("search", "--run-dir", str(base), *TINY, *packs)
    run_dir = tmp_path / "killed"
    proc = spawn("search", "--run-dir", str(run_dir), *TINY, *packs)
    p = kill_when(proc, run_dir, lambda p: p.get("phase") == "evolve" and p["pending"] >= 2)
    assert p["pending"] >= 2  # a pack was cut mid-run
    cli_ok("resume", str(run_dir))
    expected, got = table(base), table(run_dir)
    assert got == expected and got[2]["phase"] == "done"
    with RunStore.open(run_dir, readonly=True) as store:
        ks = {r["result"].get("pack_k") for r in store.candidates() if r.get("result")}
    assert ks == {4}


def test_sigkilled_process_search_accounts_for_every_candidate(tmp_path):
    run_dir = tmp_path / "proc"
    proc = spawn("search", "--run-dir", str(run_dir), *TINY, "--set", "executor.kind=process",
                 "--set", "executor.workers=2", "--set", "executor.threads=1",
                 "--set", "search.children=6")
    kill_when(proc, run_dir, lambda p: p.get("phase") == "evolve"
              and p.get("children_done", 0) >= 2 and p["pending"] >= 1)
    with RunStore.open(run_dir, readonly=True) as store:
        in_flight = len(store.candidates(status="pending"))
        done_before = {r["id"]: (r["status"], r["fitness"]) for r in store.candidates()
                       if r["status"] in DONE}
    assert in_flight >= 1  # the kill caught evaluations in flight
    cli_ok("resume", str(run_dir))

    with RunStore.open(run_dir, readonly=True) as store:
        rows = store.candidates()
        assert not store.candidates(status="pending")
        assert store.get_state("phase") == "done" and store.get_state("children_done") == 6
        # What had completed before the kill is unchanged (not redone, not lost) ...
        now = {r["id"]: (r["status"], r["fitness"]) for r in rows}
        assert all(now[i] == v for i, v in done_before.items())
        # ... and every proposal was evaluated exactly once: one row per birth and phase.
        for phase, births in (("reference", [0]), ("initial", list(range(5))),
                              ("child", list(range(1, 7)))):
            got = sorted(r["birth"] for r in rows
                         if r["phase"] == phase and r["status"] not in NOT_PROPOSALS)
            assert got == births, phase
        assert all(r["status"] in DONE for r in rows if r["status"] not in NOT_PROPOSALS)
        assert len([r for r in rows if r["phase"] == "child" and r["status"] in DONE]) == 6
        assert 1 <= len(store.population()) <= 3
