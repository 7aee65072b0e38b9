"""Executors (gp_loss.execution.process, gp_loss.execution.ray_backend): results, raised errors, dead workers
and their retries, Ray's absence, one real search on Ray.

The process tests share one small pool where they can (spawning costs about a second per
worker, more when torch is imported) and mostly call stdlib functions. The Ray tests (marked
``ray``; skipped only when ``import ray`` fails) share one local 2-CPU cluster started once for
the module (Ray takes several seconds to start); helpers of this module reach Ray's workers by
value, as Ray's workers cannot import the test module.
"""

import concurrent.futures as cf
import json
import math
import operator
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from gp_loss.config import ConfigError
from gp_loss.execution import RemoteTraceback, WorkerLost, make_executor, wait_first
from gp_loss.execution.base import SerialExecutor
from gp_loss.execution.process import ProcessExecutor


def _runs(path: str) -> list[int]:
    """Pids of the evaluations of ``_record_and_wait`` on ``path`` so far."""
    p = Path(path)
    return [int(x) for x in p.read_text().split()] if p.exists() else []


def _record_and_wait(path: str, finish_on_run: int, seconds: float = 120.0) -> list[int]:
    """Append this process's pid to ``path``; sleep (to be killed) unless this is run number
    ``finish_on_run``; return the pids of all runs."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    if len(_runs(path)) < finish_on_run:
        time.sleep(seconds)
    return _runs(path)


def _exit_on_first_run(path: str) -> str:
    if not os.path.exists(path):
        Path(path).touch()
        os._exit(3)
    return "second run"


def _wait_for_runs(path: str, n: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(_runs(path)) < n:
        assert time.monotonic() < deadline, f"run {n} of {path} did not start"
        time.sleep(0.05)
    return _runs(path)


def test_serial_runs_at_submit_and_carries_exceptions():
    with make_executor("serial", workers=4, threads=0) as ex:
        assert isinstance(ex, SerialExecutor) and ex.capacity == 1
        ok = ex.submit(operator.add, 2, 3)
        assert ok.done() and ok.result() == 5
        bad = ex.submit(math.sqrt, -1)
        assert isinstance(bad.exception(), ValueError)
        done, pending = wait_first([ok, bad])
        assert done == {ok, bad} and not pending
        assert ex.submit(os.getpid).result() == os.getpid()


@pytest.fixture(scope="module")
def pool():
    ex = make_executor("process", workers=2, threads=0)
    yield ex
    ex.shutdown(cancel=True)


def test_process_returns_results_in_other_processes(pool):
    assert isinstance(pool, ProcessExecutor) and pool.capacity == 2
    futures = [pool.submit(operator.mul, i, 3) for i in range(6)]
    assert [f.result(timeout=60) for f in futures] == [0, 3, 6, 9, 12, 15]
    assert pool.submit(os.getpid).result(timeout=60) != os.getpid()


def test_process_worker_exception_is_carried_with_its_traceback(pool):
    future = pool.submit(math.sqrt, -1)
    exc = future.exception(timeout=60)
    assert isinstance(exc, ValueError)
    assert isinstance(exc.__cause__, RemoteTraceback) and "math domain error" in str(exc.__cause__)


def test_dead_worker_fails_only_its_own_future_and_the_pool_recovers(pool):
    slow = pool.submit(time.sleep, 0.5)
    dead = pool.submit(os._exit, 1)
    done, _ = cf.wait([slow, dead], timeout=60)
    assert len(done) == 2
    assert isinstance(dead.exception(), WorkerLost) and "exit code 1" in str(dead.exception())
    assert slow.result() is None  # the evaluation on the healthy worker is unaffected
    after = [pool.submit(operator.add, i, 1) for i in range(4)]
    assert [f.result(timeout=60) for f in after] == [1, 2, 3, 4]
    done, pending = wait_first([pool.submit(time.sleep, 0), pool.submit(time.sleep, 30)], 60)
    assert len(done) == 1 and len(pending) == 1  # wait_first returns at the first result


def test_process_sets_torch_threads_and_cancel_abandons_running_work():
    torch = pytest.importorskip("torch")
    ex = make_executor("process", workers=1, threads=1)
    assert ex.submit(torch.get_num_threads).result(timeout=120) == 1
    running = ex.submit(time.sleep, 60)
    queued = ex.submit(time.sleep, 60)
    deadline = time.monotonic() + 60
    while not running.running() and time.monotonic() < deadline:
        time.sleep(0.01)  # dispatch is asynchronous; wait until the worker has it
    ex.shutdown(cancel=True)
    assert queued.cancelled()
    assert isinstance(running.exception(timeout=60), WorkerLost)
    with pytest.raises(RuntimeError, match="shut down"):
        ex.submit(os.getpid)


def test_process_retries_a_lost_evaluation_then_fails_it(tmp_path):
    with make_executor("process", workers=1, threads=0, retries=1) as ex:
        again = ex.submit(_exit_on_first_run, str(tmp_path / "marker"))
        assert again.result(timeout=60) == "second run"  # died once, retried on a new worker
        lost = ex.submit(os._exit, 4)
        exc = lost.exception(timeout=60)
        assert isinstance(exc, WorkerLost) and "exit code 4" in str(exc)
        assert "after 1 retries" in str(exc)
        assert ex.submit(operator.add, 1, 2).result(timeout=60) == 3


def test_process_hung_evaluation_is_killed_at_the_hard_deadline_and_not_retried():
    from gp_loss.execution import EvaluationTimeout

    # timeout_s = 0.8 -> hard deadline 1.25 * 0.8 + 5 = 6 s; time.sleep stands for a step that
    # never returns (the trainer's own between-steps check cannot see it)
    with ProcessExecutor(2, 1, retries=3, timeout_s=0.8) as ex:
        hung, quick = ex.submit(time.sleep, 120), ex.submit(operator.add, 2, 3)
        assert quick.result(timeout=60) == 5
        with pytest.raises(EvaluationTimeout, match="hung evaluation killed after"):
            hung.result(timeout=60)
        assert ex.submit(operator.mul, 6, 7).result(timeout=60) == 42  # replaced


def test_unknown_kind_and_missing_ray_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="executor.kind"):
        make_executor("threads")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'gp-loss\[ray\]'"):
        make_executor("ray")


# --------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from gp_loss.execution.ray_backend import start_local

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start_local(ray, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_completion_order_errors_and_shutdown_keeps_the_cluster(ray_cluster):
    ex = make_executor("ray", workers=2, threads=0)
    assert ex.kind == "ray" and ex.capacity == 2
    assert [f.result(timeout=60) for f in [ex.submit(operator.mul, i, 3) for i in range(4)]] \
        == [0, 3, 6, 9]
    slow = ex.submit(time.sleep, 60)
    fast = ex.submit(operator.add, 2, 3)
    done, pending = wait_first([slow, fast], timeout=60)
    assert done == {fast} and pending == {slow} and fast.result() == 5
    bad = ex.submit(math.sqrt, -1)
    exc = bad.exception(timeout=60)
    assert isinstance(exc, ValueError)
    assert isinstance(exc.__cause__, RemoteTraceback) and "math domain error" in str(exc.__cause__)
    assert ex.submit(os.getpid).result(timeout=60) != os.getpid()
    ex.shutdown(cancel=True)  # abandons the sleeping evaluation, not the cluster
    assert isinstance(slow.exception(timeout=60), WorkerLost)
    with pytest.raises(RuntimeError, match="shut down"):
        ex.submit(os.getpid)
    assert ray_cluster.is_initialized() and ray_cluster.cluster_resources()["CPU"] == 2


@pytest.mark.ray
def test_ray_killed_actor_is_replaced_and_its_evaluation_retried_or_failed(ray_cluster,
                                                                          tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with make_executor("ray", workers=2, threads=0, retries=1) as ex:
        first = ex.submit(_record_and_wait, a, 2)  # killed once, then finishes
        second = ex.submit(_record_and_wait, b, 99)  # killed twice: lost after 1 retry
        os.kill(_wait_for_runs(a, 1)[0], signal.SIGKILL)
        pids = first.result(timeout=60)
        assert len(pids) == 2 and pids[0] != pids[1]  # the retry ran in another process
        killed = _wait_for_runs(b, 1)[0]
        assert not second.done()  # the other actor's evaluation went on meanwhile
        os.kill(killed, signal.SIGKILL)
        os.kill(_wait_for_runs(b, 2)[1], signal.SIGKILL)
        exc = second.exception(timeout=60)
        assert isinstance(exc, WorkerLost) and "after 1 retries" in str(exc)
        assert "died while evaluating" in str(exc) and str(_runs(b)[1]) in str(exc)
        after = [ex.submit(operator.add, i, 1) for i in range(4)]  # the dead were replaced
        assert [f.result(timeout=60) for f in after] == [1, 2, 3, 4]
    with make_executor("ray", workers=1, threads=0) as ex:  # retries = 0: lost at once
        lost = ex.submit(_record_and_wait, str(tmp_path / "c"), 99)
        os.kill(_wait_for_runs(str(tmp_path / "c"), 1)[0], signal.SIGKILL)
        exc = lost.exception(timeout=60)
        assert isinstance(exc, WorkerLost) and "retries" not in str(exc)
        assert ex.submit(operator.add, 1, 1).result(timeout=60) == 2


@pytest.mark.ray
def test_ray_gpus_that_a_local_cluster_lacks_are_a_config_error(ray_cluster):
    with pytest.raises(ConfigError, match="gpus_per_eval"):
        make_executor("ray", workers=1, threads=0, gpus_per_eval=0.5)


@pytest.mark.ray
def test_ray_search_through_the_cli(ray_cluster, tmp_path):
    from click.testing import CliRunner

    from gp_loss.cli.app import cli

    run_dir = tmp_path / "run"
    sets = ["search.initial=4", "search.population=2", "search.tournament=2",
            "search.children=3", "search.reference=[]", "surrogate.steps=30",
            "surrogate.prescreen_steps=0",
            "executor.kind=ray", "executor.workers=2"]
    runner = CliRunner()
    res = runner.invoke(cli, ["-q", "search", "--run-dir", str(run_dir),
                              *[a for s in sets for a in ("--set", s)]],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    shown = runner.invoke(cli, ["show", str(run_dir), "--json", "--top", "2"])
    assert shown.exit_code == 0, shown.output
    s = json.loads(shown.output)
    assert s["top"] and 0 < s["top"][0]["fitness"] <= 1
    counts = s["counts"]
    assert counts["evaluated"] + counts["reused"] + counts["failed"] == 4 + 3
    # the default K: each actor trained its candidates in packs of 8
    con = sqlite3.connect(run_dir / "run.sqlite")
    ks = {k for (k,) in con.execute("SELECT json_extract(result_json, '$.pack_k') FROM "
                                    "candidates WHERE status IN ('evaluated', 'failed')")}
    con.close()
    assert ks == {8}
    assert ray_cluster.is_initialized()


# -- the shared core (execution/pool.py), driven by a scripted in-thread backend ---------------

class _Died(Exception):
    """Raised by a call in the scripted backend: its worker 'dies' while running it."""


class _ScriptedPool:
    """Build a WorkerPool whose workers start (or die at start-up) as ``starts`` says and run
    calls in the dispatcher thread; a call raising ``_Died`` kills its worker. Start-up news
    is held back until the first submission, so that work is queued when workers die."""

    @staticmethod
    def make(workers=1, retries=0, starts=()):
        import queue

        from gp_loss.execution.pool import Slot, WorkerPool

        class Pool(WorkerPool):
            def __init__(self):
                self.events, self.started, self.script = queue.SimpleQueue(), 0, list(starts)
                self.retired, self.held = 0, []
                super().__init__(workers, retries, thread_name="scripted-pool")

            def _pack(self, fn, args, kwargs):
                return fn, args, kwargs

            def _start(self):
                slot, self.started = Slot(), self.started + 1
                ok = self.script.pop(0) if self.script else True
                news = ("ready" if ok else "died", slot)
                self.held.append(news) if self.held is not None else self.events.put(news)
                return slot

            def _send(self, slot, task):
                self.events.put(("run", slot))

            def _wake(self):
                held, self.held = self.held or [], None
                for news in held:
                    self.events.put(news)
                self.events.put(("wake", None))

            def _wait(self):
                kind, slot = self.events.get()
                if slot is None or slot not in self._slots:
                    return
                if kind == "ready":
                    self._worker_ready(slot)
                elif kind == "died":
                    self._worker_lost(slot, "scripted worker died at start-up")
                else:
                    fn, args, kwargs = slot.task.payload
                    try:
                        result = fn(*args, **kwargs)
                    except _Died:
                        self._worker_lost(slot, "scripted worker died while evaluating")
                    except Exception as exc:
                        self._task_done(slot, exc=exc, traceback="remote text")
                    else:
                        self._task_done(slot, result=result)

            def _retire(self, slot):
                self.retired += 1

            def _stop_all(self, abort):
                pass

        return Pool()


def _die_first(calls: list):
    calls.append(1)
    if len(calls) == 1:
        raise _Died()
    return len(calls)


def _always_die():
    raise _Died()


def test_pool_core_retries_to_the_limit_then_fails_and_replaces_the_worker():
    pool = _ScriptedPool.make(workers=1, retries=2)
    with pool:
        assert pool.submit(_die_first, []).result(timeout=10) == 2  # died once, retried
        lost = pool.submit(_always_die)
        exc = lost.exception(timeout=10)
        assert type(exc) is WorkerLost and str(exc) == (
            "scripted worker died while evaluating (after 2 retries)")
        err = pool.submit(operator.truediv, 1, 0).exception(timeout=10)
        assert isinstance(err, ZeroDivisionError)
        assert isinstance(err.__cause__, RemoteTraceback) and str(err.__cause__) == "remote text"
        assert pool.submit(operator.add, 2, 2).result(timeout=10) == 4
    assert pool.started == 5  # the first worker and one replacement per death (1 + 3 + 0)
    assert pool.retired == 4


def test_pool_core_gives_up_when_workers_keep_dying_at_start_up():
    from gp_loss.execution.base import MAX_START_FAILURES

    pool = _ScriptedPool.make(workers=1, starts=[False] * MAX_START_FAILURES)
    queued = pool.submit(operator.add, 1, 1)
    exc = queued.exception(timeout=10)
    assert isinstance(exc, WorkerLost)
    assert str(exc) == ("workers keep dying at start-up; last: scripted worker died at "
                        "start-up")
    with pytest.raises(WorkerLost, match="keep dying at start-up"):
        pool.submit(operator.add, 1, 1)
    pool.shutdown()
    assert pool.started == MAX_START_FAILURES


def test_pool_core_start_failures_must_be_in_a_row_and_cancel_skips_queued_work():
    from gp_loss.execution.base import MAX_START_FAILURES

    fails = [False] * (MAX_START_FAILURES - 1)
    pool = _ScriptedPool.make(workers=1, starts=fails + [True] + fails + [True])
    with pool:
        assert pool.submit(operator.add, 1, 1).result(timeout=10) == 2
        pool.submit(_always_die).exception(timeout=10)  # the ready worker dies: replaced
        assert pool.submit(operator.add, 2, 1).result(timeout=10) == 3
    import threading

    ran, gate = [], threading.Event()
    with _ScriptedPool.make(workers=1) as pool:
        busy = pool.submit(gate.wait, 10)  # holds the only worker (and the scripted dispatcher)
        deadline = time.monotonic() + 10
        while not busy.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = pool.submit(ran.append, "queued")
        assert queued.cancel()  # still queued: cancellable
        gate.set()
        assert busy.result(timeout=10) is True
        assert pool.submit(ran.append, "after").result(timeout=10) is None
    assert queued.cancelled() and ran == ["after"]  # the cancelled call never ran
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(operator.add, 1, 1)
