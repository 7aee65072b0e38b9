"""The queue/retry/give-up machine both worker backends share (``process.py``, ``ray_backend.py``).

A ``WorkerPool`` keeps one queue of ``Task`` records and a list of ``Slot``s (one per worker
incarnation) and runs a dispatcher thread. The rules live here, once:

- ``submit`` serialises the call in the caller (an unpicklable call fails there) and queues it;
  after ``shutdown`` it raises ``RuntimeError``, after the pool gave up ``WorkerLost``.
- A queued task goes to the first ready, idle slot; a task cancelled while queued is skipped.
- A worker that dies (``_worker_lost``) fails only its own task: a hung one (``timeout``) with
  ``EvaluationTimeout``, never retried; otherwise the task goes back to the head of the queue
  up to ``retries`` times, then fails with ``WorkerLost``. The dead slot is replaced while work
  remains or the pool is open.
- Workers that die before they are ready, ``MAX_START_FAILURES`` times in a row, make the pool
  give up: every queued task fails with ``WorkerLost`` and later submissions raise it.
- ``shutdown(cancel=True)`` drops queued work and abandons running work (its futures fail with
  ``WorkerLost``); ``shutdown(wait=True)`` lets submitted work finish first.

A backend only starts, feeds and watches its workers: ``_pack`` (serialise a call), ``_start``
(a new slot), ``_send`` (give a slot its task), ``_wait`` (block for one event and report it
through ``_worker_ready``, ``_task_done``, ``_worker_lost`` or ``_give_up``), ``_retire`` (stop
a dead or surplus worker), ``_stop_all`` and ``_close``. These underscore names (and
``_slots``) are the protected interface between the core and its subclasses, not for other
callers. The backend is called on the dispatcher thread, except ``_pack`` and ``_wake`` (on
the submitting thread) and the first ``_start`` calls (in ``__init__``, on the caller's).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .base import MAX_START_FAILURES, EvaluationTimeout, Executor, RemoteTraceback, WorkerLost


@dataclass(eq=False)
class Task:
    """One submitted call: its future, the serialised call, and how often it was retried."""

    id: int
    future: cf.Future
    payload: Any
    attempt: int = 0

    def drop(self, reason: str) -> None:
        """Will not run: cancel it, or fail it when it already ran on a worker that died."""
        if self.attempt == 0:
            self.future.cancel()
        elif not self.future.done():
            self.future.set_exception(WorkerLost(reason))

    def fail(self, reason: str) -> None:
        """Fail it with ``WorkerLost`` (a queued task that was cancelled stays cancelled)."""
        if self.attempt == 0 and not self.future.set_running_or_notify_cancel():
            return  # it was cancelled while queued
        if not self.future.done():
            self.future.set_exception(WorkerLost(reason))


@dataclass(eq=False)
class Slot:
    """One worker incarnation; a replacement is a new slot in the same place."""

    ready: bool = False
    task: Task | None = field(default=None, repr=False)


class WorkerPool(Executor):
    """The shared core; subclasses implement the worker hooks named in the module docstring."""

    noun = "workers"  # in the give-up message: "<noun> keep dying at start-up"
    failed_as = "executor"  # in the message a dispatcher bug leaves: "<failed_as> failed: ..."
    retry_log: logging.Logger | None = None  # where each retry is logged (None: not logged)

    def __init__(self, workers: int, retries: int, thread_name: str):
        self.capacity = workers
        self._retries = retries
        self._lock = threading.Lock()
        self._queue: collections.deque[Task] = collections.deque()
        self._ids = itertools.count()
        self._closing = self._abort = False
        self._broken: str | None = None
        self._start_failures = 0
        self._slots: list[Slot] = [self._start() for _ in range(workers)]
        self._thread = threading.Thread(target=self._run, daemon=True, name=thread_name)
        self._thread.start()

    # -- backend hooks -------------------------------------------------------------------

    def _pack(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _start(self) -> Slot:
        raise NotImplementedError

    def _send(self, slot: Slot, task: Task) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        raise NotImplementedError

    def _wait(self) -> None:
        raise NotImplementedError

    def _retire(self, slot: Slot) -> None:
        raise NotImplementedError

    def _stop_all(self, abort: bool) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """Release what the pool holds beyond its workers (after they stopped)."""

    # -- caller side ---------------------------------------------------------------------

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> cf.Future:
        with self._lock:
            self._check_open()
        payload = self._pack(fn, args, kwargs)  # here: an unpicklable call fails the caller
        task = Task(next(self._ids), cf.Future(), payload)
        with self._lock:
            self._check_open()  # again: a shutdown may have come in the meantime
            self._queue.append(task)
        self._wake()
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
        self._wake()
        if (wait or cancel) and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- dispatcher thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as exc:  # a bug here must fail the futures, not leave them hanging
            self._broken = f"{self.failed_as} failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._stop()

    def _step(self) -> bool:
        """Dispatch queued work, wait for one event and handle it; False when done."""
        with self._lock:
            if self._abort:
                return False
            self._dispatch()
            if self._closing and not self._queue and not self._busy():
                return False
        self._wait()
        return True

    def _busy(self) -> bool:
        return any(slot.task is not None for slot in self._slots)

    def _dispatch(self) -> None:
        for slot in self._slots:
            while slot.ready and slot.task is None and self._queue:
                task = self._queue.popleft()
                if task.attempt == 0 and not task.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                slot.task = task
                self._send(slot, task)

    # -- events the backend reports ------------------------------------------------------

    def _worker_ready(self, slot: Slot) -> None:
        slot.ready, self._start_failures = True, 0

    def _task_done(self, slot: Slot, result: Any = None, exc: BaseException | None = None,
                   traceback: str = "") -> None:
        """The slot's task finished: its result, or the exception ``fn`` raised (with the
        worker's formatted traceback as its cause)."""
        task, slot.task = slot.task, None
        if task is None:
            return
        if exc is None:
            task.future.set_result(result)
            return
        if traceback:
            exc.__cause__ = RemoteTraceback(traceback)
        task.future.set_exception(exc)

    def _worker_lost(self, slot: Slot, reason: str, timeout: bool = False) -> None:
        """The slot's worker died (``reason`` says how): settle its task, then replace it,
        or give up when workers keep dying before they are ready."""
        self._retire(slot)
        task, slot.task = slot.task, None
        if task is not None and timeout:
            task.future.set_exception(EvaluationTimeout(reason))
        elif task is not None and task.attempt < self._retries:
            task.attempt += 1  # to the head of the queue, for the replacement or another
            if self.retry_log is not None:
                self.retry_log.warning("%s; retry %d of %d", reason, task.attempt, self._retries)
            with self._lock:
                self._queue.appendleft(task)
        elif task is not None:
            tries = f" (after {task.attempt} retries)" if task.attempt else ""
            task.future.set_exception(WorkerLost(reason + tries))
        index = self._slots.index(slot)
        if not slot.ready:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                self._slots.pop(index)
                self._give_up(f"{self.noun} keep dying at start-up; last: {reason}")
                return
        with self._lock:
            needed = not self._closing or bool(self._queue) or self._busy()
        if needed:
            self._slots[index] = self._start()
        else:
            self._slots.pop(index)

    def _give_up(self, reason: str) -> None:
        """Stop for good: queued tasks fail with ``WorkerLost(reason)``, as do submissions."""
        with self._lock:
            self._broken, self._abort = reason, True
            tasks = list(self._queue)
            self._queue.clear()
        for task in tasks:
            task.fail(reason)

    def _stop(self) -> None:
        why = self._broken or "executor shut down during the evaluation"
        for slot in self._slots:
            if slot.task is not None and not slot.task.future.done():
                slot.task.future.set_exception(WorkerLost(why))
            slot.task = None
        self._stop_all(self._abort)
        self._slots = []
        with self._lock:
            while self._queue:
                self._queue.popleft().drop(why)
        self._close()
