"""Packs of evaluations: what a caller submits one by one, a worker runs K at a time.

A ``Packer`` sits in front of any ``Executor``. ``submit(shared, item)`` returns a Future for
one evaluation at once, and collects the item with the others that share ``shared`` (the
arguments every member of a pack has in common: primitive set, evaluation config, whether to
score the test split); a group that reaches ``per_call`` items, or any group at ``flush()``,
goes to the executor as one call ``pack_fn(items, *shared, width=width)``, which trains them
``width`` at a time and returns one result per item. A caller must ``flush()`` before it waits
on its futures (the search driver does so each time it has proposed what it can).

``per_call`` defaults to 2 x ``width``: a pack refills a finished slot (a pre-screen failure
ends a third of the way through the default run) from the K candidates behind it, instead of
idling until its longest candidate ends. ``capacity`` is the executor's times ``per_call``:
that many evaluations are in flight. A pack whose worker hung past the hard deadline (``EvaluationTimeout``) is retried one
candidate per call (``width`` 1: the results say ``pack_k`` 1) -- a hang cannot be pinned on
one slot; any other failure of the call fails each of its futures with that exception.

Used by the search driver and ``protocol.run_jobs``; knows nothing of what ``pack_fn`` trains.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import threading
from typing import Any, Callable

from .base import EvaluationTimeout, Executor


def pack_timeout(timeout_s: float, width: int) -> float:
    """What a worker's hard deadline is scaled from (``surrogate.timeout_s`` per candidate):
    a call of 2K candidates at width K has one deadline of 2K x timeout_s for all its pack
    work, then its unfinished candidates get timeout_s each alone (``surrogate/packtrain.py``):
    4K x in all."""
    return timeout_s * (4 * width if width > 1 else 1)


class Packer(Executor):
    """Evaluations in packs of ``width`` on ``executor`` through ``pack_fn``."""

    def __init__(self, executor: Executor, width: int, pack_fn: Callable,
                 per_call: int | None = None):
        if width < 1:
            raise ValueError("a pack's width must be >= 1")
        self.executor, self.width, self.pack_fn = executor, width, pack_fn
        self.per_call = per_call or 2 * width
        self.kind = executor.kind
        self.capacity = max(1, getattr(executor, "capacity", 1)) * self.per_call
        self._groups: dict[str, tuple[tuple, list]] = {}
        self._lock = threading.Lock()

    def submit(self, shared: tuple, item: Any) -> cf.Future:  # type: ignore[override]
        """A Future for one evaluation of ``item`` (run when its pack is full or flushed)."""
        future: cf.Future = cf.Future()
        key = json.dumps(shared, sort_keys=True, default=str)
        with self._lock:
            group = self._groups.setdefault(key, (shared, []))
            group[1].append((future, item))
            full = len(group[1]) >= self.per_call
            if full:
                del self._groups[key]
        if full:
            self._send(group[0], group[1], self.width)
        return future

    def flush(self) -> None:
        """Send every group collected so far, full or not (a pack of fewer than ``width``
        still runs at ``width``: its empty slots idle)."""
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
        for shared, entries in groups:
            self._send(shared, entries, self.width)

    def _send(self, shared: tuple, entries: list, width: int) -> None:
        items = [item for _, item in entries]
        try:
            inner = self.executor.submit(self.pack_fn, items, *shared, width=width)
        except Exception as exc:  # a closed or failed executor: each evaluation fails
            for fut, _ in entries:
                _settle(fut, exc=exc)
            return
        inner.add_done_callback(lambda f: self._done(f, shared, entries, width))

    def _done(self, inner: cf.Future, shared: tuple, entries: list, width: int) -> None:
        if inner.cancelled():
            for fut, _ in entries:
                fut.cancel()
            return
        exc = inner.exception()
        if exc is None:
            for (fut, _), res in zip(entries, inner.result()):
                _settle(fut, result=res)
        elif isinstance(exc, EvaluationTimeout) and len(entries) > 1:
            for entry in entries:  # a hung pack: each candidate again, alone
                self._send(shared, [entry], 1)
        else:
            for fut, _ in entries:
                _settle(fut, exc=exc)

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        if cancel:
            with self._lock:
                groups, self._groups = list(self._groups.values()), {}
            for _, entries in groups:
                for fut, _ in entries:
                    fut.cancel()
        self.executor.shutdown(wait=wait, cancel=cancel)


def _settle(fut: cf.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done() or not fut.set_running_or_notify_cancel():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
