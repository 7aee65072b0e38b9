"""The Ray executor: evaluations on long-lived Ray actors, one per worker slot.

Built by ``execution.make_executor("ray", ...)`` from ``config.ExecutorConfig`` (workers,
threads, retries, address, gpus_per_eval); used like the other executors by the evolution loop
and the protocol commands (``submit`` returns a ``concurrent.futures.Future``; results are
handled in completion order).

- Cluster: ``address`` "" starts a local cluster sized for the executor (``workers * threads``
  CPUs, the GPUs Ray detects, no dashboard, a small object store, worker output kept in Ray's
  log files); "auto" or host:port connects to a running one. A driver that is already connected
  (``ray.init`` called by the caller) is used as it is. ``shutdown`` kills only this executor's
  actors and disconnects only a connection it opened itself, so a cluster it did not start
  keeps running.
- Slots: ``workers`` actors, each reserving ``threads`` CPUs (at least 1) and
  ``gpus_per_eval`` GPUs (fractional: several actors share a card; asking a local cluster for
  more GPUs than it has is a ``ConfigError``). An actor is one long-lived process, so what a
  worker caches per process (the datasets of ``data.py``, on its device) stays loaded from one
  evaluation to the next. Each actor runs one evaluation at a time; submissions wait in a
  queue for an idle actor.
- Failures: an exception raised by ``fn`` is carried by the future (the worker's traceback as
  its ``__cause__``, as in the process executor). An actor whose process dies, or whose node
  disappears, is replaced; the evaluation it was running goes back to the head of the queue up
  to ``retries`` times, then its future fails with ``WorkerLost`` saying why. Other actors are
  unaffected. (Ray reports the death of an idle actor only when it is next given work, so
  that evaluation counts as the one lost.)

One dispatcher thread makes every call into Ray after start-up; Ray's completion callbacks
only post events to it, so results are handled in the order Ray completes them.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import queue
import re
import signal
import socket
import threading
from typing import Any, Callable

from ..config import ConfigError
from .base import (MAX_START_FAILURES, THREAD_ENV, Executor, RemoteTraceback, WorkerLost,
                   set_torch_threads)
from ..errors import describe, first_line

log = logging.getLogger(__name__)

_OBJECT_STORE_BYTES = 100 * 2**20  # evaluations pass a few kB each way; Ray's floor is 75 MiB
_INSTALL_HINT = "pip install 'gp-loss[ray]'"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the worker's name in tracebacks


def import_ray():
    """The ``ray`` module, or a ``ConfigError`` (CLI exit 2) saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor.kind = 'ray' needs Ray, which is not installed: "
                          f"{_INSTALL_HINT}") from None
    return ray


def start_local(ray, num_cpus: int, num_gpus: int | None = None) -> None:
    """Start a local single-machine cluster, quietly (used by the executor and by tests)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network, no prompt
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             object_store_memory=_OBJECT_STORE_BYTES, log_to_driver=False,
             logging_level=logging.WARNING)


class EvalActor:
    """Body of one worker slot (wrapped by ``ray.remote`` when the executor starts)."""

    def __init__(self, threads: int):
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
        except ValueError:  # not the main thread of this worker: nothing to do
            pass
        if threads > 0:
            for var in THREAD_ENV:
                os.environ[var] = str(threads)
        set_torch_threads(threads)

    def ready(self) -> tuple[int, str]:
        return os.getpid(), socket.gethostname()

    def run(self, call: tuple) -> Any:
        fn, args, kwargs = call
        return fn(*args, **kwargs)


class _Task:
    __slots__ = ("future", "payload", "attempt")

    def __init__(self, future: cf.Future, payload: Any):
        self.future, self.payload, self.attempt = future, payload, 0

    def drop(self, reason: str) -> None:
        """Not run: cancel it, or fail it when it already ran on a worker that died."""
        if self.attempt == 0:
            self.future.cancel()
        elif not self.future.done():
            self.future.set_exception(WorkerLost(reason))


class _Slot:
    """One actor incarnation; a replacement is a new ``_Slot`` in the same place."""

    __slots__ = ("handle", "pid", "host", "ready", "task", "ref")

    def __init__(self, handle: Any):
        self.handle, self.pid, self.host = handle, None, "?"
        self.ready, self.task, self.ref = False, None, None

    def where(self) -> str:
        return f" (pid {self.pid} on {self.host})" if self.pid else ""


class RayExecutor(Executor):
    """``workers`` Ray actors; a dead actor is replaced and its evaluation retried or failed."""

    kind = "ray"

    def __init__(self, workers: int = 1, threads: int = 1, *, retries: int = 0,
                 address: str = "", gpus_per_eval: float = 0.0):
        ray = import_ray()
        self._ray = ray
        self.capacity = workers
        self._retries = retries
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            self._connect(address, workers * max(threads, 1))
        self._check_gpus(gpus_per_eval, local=not address)
        self._actor_cls = ray.remote(num_cpus=max(threads, 1), num_gpus=gpus_per_eval,
                                     max_restarts=0, max_task_retries=0)(EvalActor)
        self._threads = threads
        self._lock = threading.Lock()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._queue: collections.deque[_Task] = collections.deque()
        self._closing = self._abort = False
        self._broken: str | None = None
        self._start_failures = 0
        self._slots = [self._new_slot() for _ in range(workers)]
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="gp-loss-ray-executor")
        self._thread.start()

    def _connect(self, address: str, num_cpus: int) -> None:
        if not address:
            start_local(self._ray, num_cpus)
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            self._ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"executor.address = {address!r}: cannot connect to a Ray "
                              f"cluster: {first_line(exc)}") from None

    def _check_gpus(self, gpus_per_eval: float, local: bool) -> None:
        if gpus_per_eval <= 0:
            return
        have = self._ray.cluster_resources().get("GPU", 0)
        if have >= gpus_per_eval:
            return
        text = (f"executor.gpus_per_eval = {gpus_per_eval:g} but the Ray cluster has "
                f"{have:g} GPUs")
        if local:  # no autoscaler will add one: every actor would wait forever
            raise ConfigError(text)
        log.warning("%s; the workers wait until the cluster has them", text)

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> cf.Future:
        with self._lock:
            self._check_open()
        # Serialized here, once: an unpicklable call fails in the caller, and a retry reuses it.
        task = _Task(cf.Future(), self._ray.put((fn, args, kwargs)))
        with self._lock:
            self._check_open()  # again: a shutdown may have come in the meantime
            self._queue.append(task)
        self._events.put(("wake", None, None))
        return task.future

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError("executor is shut down")
        if self._broken:
            raise WorkerLost(self._broken)

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        with self._lock:
            self._closing = True
            if cancel:
                self._abort = True
                while self._queue:
                    self._queue.popleft().drop("executor shut down")
        self._events.put(("wake", None, None))
        if (wait or cancel) and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- dispatcher thread ---------------------------------------------------------------

    def _new_slot(self) -> _Slot:
        slot = _Slot(self._actor_cls.remote(self._threads))
        slot.ref = slot.handle.ready.remote()
        slot.ref.future().add_done_callback(lambda f: self._events.put(("ready", slot, f)))
        return slot

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as exc:  # a bug here must fail the futures, not leave them hanging
            self._broken = f"ray executor failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._stop()

    def _step(self) -> bool:
        with self._lock:
            if self._abort:
                return False
            self._dispatch()
            if self._closing and not self._queue and not any(s.task for s in self._slots):
                return False
        kind, slot, fut = self._events.get()
        if slot is None or slot not in self._slots:
            return True  # a wake-up, or news of an actor already replaced
        if kind == "ready":
            self._on_ready(slot, fut)
        else:
            self._on_done(slot, fut)
        return True

    def _dispatch(self) -> None:
        for slot in self._slots:
            while slot.ready and slot.task is None and self._queue:
                task = self._queue.popleft()
                if task.attempt == 0 and not task.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                slot.task, slot.ref = task, slot.handle.run.remote(task.payload)
                slot.ref.future().add_done_callback(
                    lambda f, s=slot: self._events.put(("done", s, f)))

    def _on_ready(self, slot: _Slot, fut: cf.Future) -> None:
        exc = fut.exception()
        if exc is None:
            slot.pid, slot.host = fut.result()
            slot.ready, self._start_failures = True, 0
            return
        self._start_failures += 1
        reason = f"ray actor failed to start: {describe(exc, 300)}"
        if self._start_failures >= MAX_START_FAILURES:
            self._give_up(f"ray actors keep dying at start-up; last: {reason}")
        else:
            self._replace(slot)

    def _on_done(self, slot: _Slot, fut: cf.Future) -> None:
        task, slot.task, slot.ref = slot.task, None, None
        exc = fut.exception()
        ray_exc = self._ray.exceptions
        if exc is None:
            task.future.set_result(fut.result())
        elif isinstance(exc, ray_exc.RayTaskError):  # fn raised: carry its own exception
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            # Ray's "dual" exception (a subclass of both) lacks traceback_str; its text has it.
            text = getattr(exc, "traceback_str", None) or str(exc)
            cause.__cause__ = RemoteTraceback(_ANSI.sub("", text))
            task.future.set_exception(cause)
        elif isinstance(exc, ray_exc.RayError):  # the actor, its worker or its node is gone
            # A stable start ("ray actor died while evaluating"), so that reports group them.
            reason = f"ray actor died while evaluating{slot.where()}: {_death_reason(exc)}"
            if task.attempt < self._retries:  # queued first: _replace then keeps the slot
                task.attempt += 1
                log.warning("%s; retry %d of %d", reason, task.attempt, self._retries)
                with self._lock:
                    self._queue.appendleft(task)
            else:
                tries = f" (after {task.attempt} retries)" if task.attempt else ""
                task.future.set_exception(WorkerLost(reason + tries))
            self._replace(slot)
        else:
            task.future.set_exception(exc)

    def _replace(self, slot: _Slot) -> None:
        self._kill(slot)
        index = self._slots.index(slot)
        with self._lock:
            needed = not self._closing or self._queue or any(s.task for s in self._slots)
        if needed:
            self._slots[index] = self._new_slot()
        else:
            self._slots.pop(index)

    def _kill(self, slot: _Slot) -> None:
        try:
            self._ray.kill(slot.handle, no_restart=True)
        except Exception:  # already dead, or the cluster is gone: nothing left to stop
            pass

    def _give_up(self, reason: str) -> None:
        with self._lock:
            self._broken, self._abort = reason, True
            tasks = list(self._queue)
            self._queue.clear()
        for task in tasks:
            if task.attempt == 0 and not task.future.set_running_or_notify_cancel():
                continue
            task.future.set_exception(WorkerLost(reason))

    def _stop(self) -> None:
        why = self._broken or "executor shut down during the evaluation"
        for slot in self._slots:
            if slot.task is not None and not slot.task.future.done():
                slot.task.future.set_exception(WorkerLost(why))
            slot.task = None
            self._kill(slot)
        self._slots = []
        with self._lock:
            while self._queue:
                self._queue.popleft().drop(why)
        if self._owns_connection:
            self._ray.shutdown()


def _death_reason(exc: BaseException) -> str:
    """Ray's why-it-died sentence (process or node), without its list of possible causes."""
    text, head = str(exc), "The actor is dead because "
    at = text.find(head)
    if at < 0:
        return describe(exc, 300)
    return text[at + len(head):].split(" Some common causes")[0].split("\n")[0][:300]


