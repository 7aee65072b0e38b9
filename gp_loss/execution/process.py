"""The process backend: ``workers`` spawned processes, ``threads`` torch threads each, on the
shared queue/retry/give-up core (``pool.py``); built by ``execution.make_executor("process")``.

``fn`` must be a module-level function and its arguments plain picklable data. Unlike
``ProcessPoolExecutor``, which breaks for good (failing every future in flight) when one worker
dies, each worker here has its own pipe: a worker that dies (segfault, ``os._exit``, OOM kill)
is replaced, and only the evaluation it was running is affected (retried up to ``retries``
times, then failed with ``WorkerLost``); the other evaluations and later submissions work.
With ``timeout_s`` (surrogate.timeout_s) a worker still busy at a hard deadline is killed and
its future fails with ``EvaluationTimeout``.

An exception raised by ``fn`` is carried by the future (with the worker's traceback as its
``__cause__``). Workers ignore SIGINT, so Ctrl-C reaches only the driver, which decides what to
do with evaluations in flight; workers also exit on their own when the driver disappears.

This backend only starts, feeds and watches its processes: one dispatcher thread waits on every
worker's pipe and exit sentinel plus a wake-up pipe (``multiprocessing.connection.wait``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any, Callable

from .base import set_thread_env, set_torch_threads
from .pool import Slot, Task, WorkerPool


def _worker_main(conn: multiprocessing.connection.Connection, threads: int,
                 parent_pid: int) -> None:
    """Body of a spawned worker: set threads, report ready, then run tasks until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_thread_env(threads)

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
            conn.send(("error", task_id, RuntimeError(_last_line(text)), text))


def _last_line(traceback_text: str) -> str:
    """The exception line that ends a formatted traceback."""
    return traceback_text.strip().splitlines()[-1]


class _Worker(Slot):
    """One spawned process with its own pipe."""

    def __init__(self, ctx: Any, threads: int):
        super().__init__()
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, threads, os.getpid()),
                                   daemon=True, name="gp-loss-worker")
        self.process.start()
        child.close()
        self.started = 0.0  # monotonic time its task was sent


class ProcessExecutor(WorkerPool):
    """``workers`` spawned processes; a dead worker fails only its own future and is replaced."""

    kind = "process"

    def __init__(self, workers: int = 1, threads: int = 1, *, retries: int = 0,
                 timeout_s: float = 0.0):
        self._threads = threads
        # The trainer checks surrogate.timeout_s between steps; this hard deadline, a quarter
        # later (+5 s), catches an evaluation that hangs inside one step: its worker is killed.
        self._deadline = 1.25 * timeout_s + 5.0 if timeout_s > 0 else 0.0
        self._ctx = multiprocessing.get_context("spawn")
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        super().__init__(workers, retries, thread_name="gp-loss-executor")

    def _pack(self, fn: Callable, args: tuple, kwargs: dict) -> bytes:
        return pickle.dumps((fn, args, kwargs))

    def _start(self) -> _Worker:
        return _Worker(self._ctx, self._threads)

    def _send(self, worker: _Worker, task: Task) -> None:
        worker.started = time.monotonic()
        try:
            worker.conn.send((task.id, task.payload))
        except OSError:
            pass  # the worker is dying; its sentinel reports it next

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"x")
        except OSError:
            pass  # the dispatcher is gone already

    def _wait(self) -> None:
        """Wait for one pipe, process exit or wake-up (or a hard deadline) and report it."""
        workers = list(self._slots)
        timeout = None
        if self._deadline:
            now = time.monotonic()
            for w in workers:
                if w.task is not None and now - w.started > self._deadline and \
                        not w.conn.poll():
                    w.process.kill()
                    self._worker_lost(w, f"hung evaluation killed after {now - w.started:.0f} s "
                                         f"(surrogate.timeout_s)", timeout=True)
                    return
            running = [w.started + self._deadline - now for w in workers if w.task]
            timeout = max(0.05, min(running)) if running else None
        waitables = [self._wake_r]
        for w in workers:
            waitables += [w.conn, w.process.sentinel]
        for ready in multiprocessing.connection.wait(waitables, timeout):
            if ready is self._wake_r:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
                continue
            worker = next((w for w in self._slots
                           if ready is w.conn or ready == w.process.sentinel), None)
            if worker is None:  # already replaced while handling another ready object
                continue
            if ready is worker.conn:
                self._receive(worker)
            # A sentinel is a bare fd number that a replacement may reuse, hence is_alive();
            # a result sent just before dying is read first (poll) and still counts.
            elif not worker.process.is_alive() and not worker.conn.poll():
                self._worker_lost(worker, self._death(worker))

    def _receive(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._worker_lost(worker, self._death(worker))
            return
        except Exception as exc:  # a result that cannot be unpickled in the driver
            message = ("error", -1, exc, "")
        tag = message[0]
        if tag == "ready":
            self._worker_ready(worker)
        elif tag == "init_error":
            self._give_up(f"worker initialisation failed: {_last_line(message[1])}")
        elif tag == "ok":
            self._task_done(worker, result=message[2])
        else:
            self._task_done(worker, exc=message[2], traceback=message[3])

    def _death(self, worker: _Worker) -> str:
        """How a worker died: "worker process N died (exit code 1)[ while evaluating]"."""
        self._retire(worker)  # joined first, for its exit code
        code = worker.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        doing = " while evaluating" if worker.task is not None else ""
        return f"worker process {worker.process.pid} died ({how}){doing}"

    def _retire(self, worker: _Worker) -> None:
        """Make sure a worker's process is gone and its pipe closed (safe to repeat)."""
        worker.process.join(timeout=5)
        if worker.process.is_alive():  # closed its pipe but lingers: make sure it is gone
            worker.process.kill()
            worker.process.join()
        worker.conn.close()

    def _stop_all(self, abort: bool) -> None:
        for w in self._slots:
            if abort:
                w.process.terminate()
            else:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        for w in self._slots:
            w.process.join(timeout=10)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()

    def _close(self) -> None:
        self._wake_r.close()  # a late _wake() then fails quietly (BrokenPipeError)
