"""Executors (gp_loss.executors): results, raised errors, dead workers, ray's absence.

The process tests share one small pool (spawning costs about a second per worker, more when
torch is imported) and call stdlib functions so that workers need no test module.
"""

import concurrent.futures as cf
import importlib.util
import math
import operator
import os
import time

import pytest

from gp_loss.config import ConfigError
from gp_loss.executors import (ProcessExecutor, RemoteTraceback, SerialExecutor, WorkerLost,
                               make_executor, wait_first)


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


def test_unknown_kind_and_missing_ray_are_config_errors():
    with pytest.raises(ConfigError, match="executor.kind"):
        make_executor("threads")
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(ConfigError, match="pip install ray"):
            make_executor("ray")
