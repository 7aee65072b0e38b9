"""The process backend, and where evaluations run in general: one interface over
``concurrent.futures.Future`` (``base.py``).

Fed by ``config.ExecutorConfig`` (kind, workers, threads, retries, address, gpus_per_eval);
used by the evolution loop and the protocol commands, which submit ``fitness.evaluate`` with
plain data and handle results in completion order (``wait_first``). Kinds:

- ``serial``: runs the call inside ``submit`` and returns a finished Future (deterministic).
- ``process``: ``workers`` spawned processes, ``threads`` torch threads each. ``fn`` must be a
  module-level function and its arguments plain picklable data. Unlike
  ``ProcessPoolExecutor``, which breaks for good (failing every future in flight) when one
  worker dies, each worker here has its own pipe: a worker that dies (segfault, ``os._exit``,
  OOM kill) is replaced, and only the evaluation it was running is affected: it goes back to
  the head of the queue up to ``retries`` times, then its future fails with ``WorkerLost``;
  the other evaluations are unaffected and later submissions work.
- ``ray``: long-lived Ray actors, one per worker slot (``ray_backend.py``; needs the optional
  extra, ``pip install 'gp-loss[ray]'``), with the same failure rules.

An exception raised by ``fn`` is carried by the future (with the worker's traceback as its
``__cause__``). Workers ignore SIGINT, so Ctrl-C reaches only the driver, which decides what to
do with evaluations in flight; workers also exit on their own when the driver disappears.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any, Callable

from .base import (MAX_START_FAILURES, THREAD_ENV, EvaluationTimeout, Executor,
                   RemoteTraceback, WorkerLost, set_torch_threads)

def _worker_main(conn: multiprocessing.connection.Connection, threads: int,
                 parent_pid: int) -> None:
    """Body of a spawned worker: set threads, report ready, then run tasks until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads > 0:
        for var in THREAD_ENV:
            os.environ[var] = str(threads)

    def watch_parent() -> None:
        # An orphaned worker would keep a core busy after the driver was killed.
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(0)
    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        set_torch_threads(threads)
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, payload = message
        try:
            fn, args, kwargs = pickle.loads(payload)
            reply = ("ok", task_id, fn(*args, **kwargs))
        except BaseException as exc:
            reply = ("error", task_id, exc, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:  # an unpicklable result or exception: report it as text
            text = reply[3] if reply[0] == "error" else f"result is not picklable: {reply[2]!r}"
            conn.send(("error", task_id, RuntimeError(text.strip().splitlines()[-1]), text))


class _Worker:
    def __init__(self, ctx: Any, threads: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, threads, os.getpid()),
                                   daemon=True, name="gp-loss-worker")
        self.process.start()
        child.close()
        self.ready = False
        self.task: list | None = None  # the queue entry it runs: [id, future, payload, attempt]
        self.started = 0.0  # monotonic time the task was sent


class ProcessExecutor(Executor):
    """``workers`` spawned processes; a dead worker fails only its own future and is replaced."""

    kind = "process"

    def __init__(self, workers: int = 1, threads: int = 1, *, retries: int = 0,
                 timeout_s: float = 0.0):
        self.capacity = workers
        self._threads = threads
        self._retries = retries
        # The trainer checks surrogate.timeout_s between steps; this hard deadline, a quarter
        # later (+5 s), catches an evaluation that hangs inside one step: its worker is killed.
        self._deadline = 1.25 * timeout_s + 5.0 if timeout_s > 0 else 0.0
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._ids = itertools.count()
        self._closing = False
        self._abort = False
        self._broken: str | None = None
        self._start_failures = 0
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._workers = [_Worker(self._ctx, threads) for _ in range(workers)]
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="gp-loss-executor")
        self._thread.start()

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> cf.Future:
        # Pickle here so that an unpicklable call fails in the caller, not in a worker.
        payload = pickle.dumps((fn, args, kwargs))
        future: cf.Future = cf.Future()
        with self._lock:
            if self._closing:
                raise RuntimeError("executor is shut down")
            if self._broken:
                raise WorkerLost(self._broken)
            self._queue.append([next(self._ids), future, payload, 0])
        self._wake()
        return future

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        with self._lock:
            self._closing = True
            if cancel:
                self._abort = True
                while self._queue:
                    _drop(self._queue.popleft(), "executor shut down")
        self._wake()
        if wait or cancel:
            self._thread.join()

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"x")
        except OSError:
            pass  # the dispatcher is gone already

    # -- dispatcher thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            self._stop_workers()
            self._wake_r.close()  # a late _wake() then fails quietly (BrokenPipeError)

    def _step(self) -> bool:
        """Dispatch queued work, wait for one event, handle it; False when done."""
        with self._lock:
            if self._abort:
                return False
            self._dispatch()
            busy = any(w.task for w in self._workers)
            if self._closing and not busy and not self._queue:
                return False
        waitables = [self._wake_r]
        for w in self._workers:
            waitables += [w.conn, w.process.sentinel]
        timeout = None
        if self._deadline:
            now = time.monotonic()
            for w in self._workers:
                if w.task is not None and now - w.started > self._deadline and \
                        not w.conn.poll():
                    w.process.kill()
                    self._lost(w, f"hung evaluation killed after {now - w.started:.0f} s "
                                  f"(surrogate.timeout_s)", timeout=True)
                    return True
            running = [w.started + self._deadline - now for w in self._workers if w.task]
            timeout = max(0.05, min(running)) if running else None
        for ready in multiprocessing.connection.wait(waitables, timeout):
            if ready is self._wake_r:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
                continue
            worker = next((w for w in self._workers
                           if ready is w.conn or ready == w.process.sentinel), None)
            if worker is None:  # already replaced while handling another ready object
                continue
            if ready is worker.conn:
                self._receive(worker)
            # A sentinel is a bare fd number that a replacement may reuse, hence is_alive();
            # a result sent just before dying is read first (poll) and still counts.
            elif not worker.process.is_alive() and not worker.conn.poll():
                self._lost(worker, None)
        return True

    def _dispatch(self) -> None:
        for worker in self._workers:
            while worker.ready and worker.task is None and self._queue:
                entry = self._queue.popleft()
                task_id, future, payload, attempt = entry
                if attempt == 0 and not future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                worker.task = entry
                worker.started = time.monotonic()
                try:
                    worker.conn.send((task_id, payload))
                except OSError:
                    pass  # the worker is dying; its sentinel reports it next

    def _receive(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._lost(worker, None)
            return
        except Exception as exc:  # a result that cannot be unpickled in the driver
            message = ("error", worker.task[0] if worker.task else -1, exc, "")
        tag = message[0]
        if tag == "ready":
            worker.ready = True
            self._start_failures = 0
        elif tag == "init_error":
            self._give_up(f"worker initialisation failed: {message[1].strip().splitlines()[-1]}")
        else:
            future = worker.task[1]
            worker.task = None
            if tag == "ok":
                future.set_result(message[2])
            else:
                exc = message[2]
                if message[3]:
                    exc.__cause__ = RemoteTraceback(message[3])
                future.set_exception(exc)

    def _lost(self, worker: _Worker, reason: str | None, timeout: bool = False) -> None:
        """A worker died: fail its task, start a replacement (unless workers keep dying)."""
        worker.process.join(timeout=5)
        if worker.process.is_alive():  # closed its pipe but lingers: make sure it is gone
            worker.process.kill()
            worker.process.join()
        code = worker.process.exitcode
        worker.conn.close()
        if reason is None:
            how = (f"killed by signal {-code}" if code is not None and code < 0
                   else f"exit code {code}")
            reason = f"worker process {worker.process.pid} died ({how})"
        entry, worker.task = worker.task, None
        if entry is not None and timeout:
            entry[1].set_exception(EvaluationTimeout(reason))
        elif entry is not None and entry[3] < self._retries:
            entry[3] += 1  # a retry: to the head of the queue, for the replacement or another
            with self._lock:
                self._queue.appendleft(entry)
        elif entry is not None:
            tries = f" (after {entry[3]} retries)" if entry[3] else ""
            entry[1].set_exception(WorkerLost(f"{reason} while evaluating{tries}"))
        index = self._workers.index(worker)
        if not worker.ready:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                self._workers.pop(index)
                self._give_up(f"workers keep dying at start-up; last: {reason}")
                return
        with self._lock:
            replace = not self._closing or self._queue or any(w.task for w in self._workers)
        if replace:
            self._workers[index] = _Worker(self._ctx, self._threads)
        else:
            self._workers.pop(index)

    def _give_up(self, reason: str) -> None:
        with self._lock:
            self._broken = reason
            queued = list(self._queue)
            self._queue.clear()
        for _, future, _, attempt in queued:
            if attempt or future.set_running_or_notify_cancel():
                future.set_exception(WorkerLost(reason))
        self._abort = True

    def _stop_workers(self) -> None:
        why = self._broken or "executor shut down during the evaluation"
        for w in self._workers:
            if w.task is not None:
                w.task[1].set_exception(WorkerLost(why))
                w.task = None
            if self._abort:
                w.process.terminate()
            else:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        for w in self._workers:
            w.process.join(timeout=10)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        self._workers = []
        with self._lock:
            while self._queue:
                _drop(self._queue.popleft(), why)


def _drop(entry: list, reason: str) -> None:
    """A queued entry that will not run: cancel it, or fail it if it ran on a worker that died."""
    if entry[3] == 0:
        entry[1].cancel()
    elif not entry[1].done():
        entry[1].set_exception(WorkerLost(reason))
