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

The queue, retries and giving up are the shared core's (``pool.py``); this backend starts,
feeds and watches actors. One dispatcher thread makes every call into Ray after start-up;
Ray's completion callbacks only post events to it, so results are handled in the order Ray
completes them.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import re
import signal
import socket
from typing import Any, Callable

from ..config import ConfigError
from .base import set_thread_env, set_torch_threads
from .pool import Slot, Task, WorkerPool
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
        set_thread_env(threads)
        set_torch_threads(threads)

    def ready(self) -> tuple[int, str]:
        return os.getpid(), socket.gethostname()

    def run(self, call: tuple) -> Any:
        fn, args, kwargs = call
        return fn(*args, **kwargs)


class _Actor(Slot):
    """One actor incarnation; a replacement is a new ``_Actor`` in the same place."""

    def __init__(self, handle: Any):
        super().__init__()
        self.handle, self.pid, self.host, self.ref = handle, None, "?", None

    def where(self) -> str:
        return f" (pid {self.pid} on {self.host})" if self.pid else ""


class RayExecutor(WorkerPool):
    """``workers`` Ray actors; a dead actor is replaced and its evaluation retried or failed."""

    kind = "ray"
    noun = "ray actors"
    failed_as = "ray executor"
    retry_log = log

    def __init__(self, workers: int = 1, threads: int = 1, *, retries: int = 0,
                 address: str = "", gpus_per_eval: float = 0.0):
        ray = import_ray()
        self._ray = ray
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            self._connect(address, workers * max(threads, 1))
        self._check_gpus(gpus_per_eval, local=not address)
        self._actor_cls = ray.remote(num_cpus=max(threads, 1), num_gpus=gpus_per_eval,
                                     max_restarts=0, max_task_retries=0)(EvalActor)
        self._threads = threads
        # Ray's completion callbacks run on Ray's threads: they only post events here.
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        super().__init__(workers, retries, thread_name="gp-loss-ray-executor")

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

    # -- the pool's backend hooks --------------------------------------------------------

    def _pack(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        return self._ray.put((fn, args, kwargs))  # serialised once: a retry reuses it

    def _start(self) -> _Actor:
        actor = _Actor(self._actor_cls.remote(self._threads))
        actor.ref = actor.handle.ready.remote()
        actor.ref.future().add_done_callback(lambda f: self._events.put(("ready", actor, f)))
        return actor

    def _send(self, actor: _Actor, task: Task) -> None:
        actor.ref = actor.handle.run.remote(task.payload)
        actor.ref.future().add_done_callback(lambda f: self._events.put(("done", actor, f)))

    def _wake(self) -> None:
        self._events.put(("wake", None, None))

    def _wait(self) -> None:
        kind, actor, fut = self._events.get()
        if actor is None or actor not in self._slots:
            return  # a wake-up, or news of an actor already replaced
        if kind == "ready":
            self._on_ready(actor, fut)
        else:
            self._on_done(actor, fut)

    def _on_ready(self, actor: _Actor, fut: cf.Future) -> None:
        exc = fut.exception()
        if exc is None:
            actor.pid, actor.host = fut.result()
            self._worker_ready(actor)
        else:
            self._worker_lost(actor, f"ray actor failed to start: {describe(exc, 300)}")

    def _on_done(self, actor: _Actor, fut: cf.Future) -> None:
        actor.ref = None
        exc = fut.exception()
        ray_exc = self._ray.exceptions
        if exc is None:
            self._task_done(actor, result=fut.result())
        elif isinstance(exc, ray_exc.RayTaskError):  # fn raised: carry its own exception
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            # Ray's "dual" exception (a subclass of both) lacks traceback_str; its text has it.
            text = getattr(exc, "traceback_str", None) or str(exc)
            self._task_done(actor, exc=cause, traceback=_ANSI.sub("", text))
        elif isinstance(exc, ray_exc.RayError):  # the actor, its worker or its node is gone
            # A stable start ("ray actor died while evaluating"), so that reports group them.
            self._worker_lost(actor, f"ray actor died while evaluating{actor.where()}: "
                                     f"{_death_reason(exc)}")
        else:
            self._task_done(actor, exc=exc)

    def _retire(self, actor: _Actor) -> None:
        try:
            self._ray.kill(actor.handle, no_restart=True)
        except Exception:  # already dead, or the cluster is gone: nothing left to stop
            pass

    def _stop_all(self, abort: bool) -> None:
        for actor in self._slots:
            self._retire(actor)

    def _close(self) -> None:
        if self._owns_connection:
            self._ray.shutdown()


def _death_reason(exc: BaseException) -> str:
    """Ray's why-it-died sentence (process or node), without its list of possible causes."""
    text, head = str(exc), "The actor is dead because "
    at = text.find(head)
    if at < 0:
        return describe(exc, 300)
    return text[at + len(head):].split(" Some common causes")[0].split("\n")[0][:300]


