"""The executor interface and what every backend shares: ``Executor`` (``submit`` returns a
``concurrent.futures.Future``), the failures a future can carry (``WorkerLost``,
``EvaluationTimeout``, ``RemoteTraceback`` as the worker's traceback), ``wait_first``, the
torch thread limit each worker applies, and the in-process ``SerialExecutor``.

Backends: ``process.py`` (spawned worker processes) and ``ray_backend.py`` (Ray actors), both
on the queue/retry/give-up core of ``pool.py``; ``make_executor`` (the package's ``__init__``)
builds the one a config asks for.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
from typing import Any, Callable, Iterable

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MAX_START_FAILURES = 3  # workers dying before they are ready, in a row, before giving up


class WorkerLost(RuntimeError):
    """The process running an evaluation died, or the executor was shut down under it."""


class EvaluationTimeout(WorkerLost):
    """A hung evaluation: its worker was killed at the hard deadline (never retried)."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker (set as ``__cause__``)."""

    def __str__(self) -> str:
        return self.args[0]


def wait_first(futures: Iterable[cf.Future], timeout: float | None = None
               ) -> tuple[set[cf.Future], set[cf.Future]]:
    """(done, not_done) as soon as at least one future is done (or ``timeout`` passes)."""
    done, not_done = cf.wait(list(futures), timeout=timeout, return_when=cf.FIRST_COMPLETED)
    return done, not_done


def set_thread_env(threads: int) -> None:
    """In a worker, before torch loads its BLAS/OpenMP: ``threads`` threads for each (the
    variables of ``THREAD_ENV``); 0 leaves them alone."""
    if threads > 0:
        for var in THREAD_ENV:
            os.environ[var] = str(threads)


def set_torch_threads(threads: int) -> None:
    """Limit torch (and the BLAS/OpenMP below it) to ``threads`` threads; 0 leaves defaults."""
    if threads <= 0:
        return
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


class Executor:
    """Base class: ``submit`` returns a Future; use as a context manager or call ``shutdown``."""

    kind = "base"
    capacity = 1  # how many evaluations the loop should keep in flight

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> cf.Future:
        """Schedule ``fn(*args, **kwargs)``; the Future carries its result or exception."""
        raise NotImplementedError

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop; ``wait`` lets submitted work finish, ``cancel`` drops queued work and
        abandons running work (its futures fail with WorkerLost)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # Leaving by an exception (Ctrl-C included) must not wait for evaluations in flight.
        self.shutdown(wait=exc_type is None, cancel=exc_type is not None)


class SerialExecutor(Executor):
    """Runs each call in the calling thread at submit time."""

    kind = "serial"

    def __init__(self, threads: int = 1):
        set_torch_threads(threads)
        self._closed = False

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> cf.Future:
        if self._closed:
            raise RuntimeError("executor is shut down")
        future: cf.Future = cf.Future()
        future.set_running_or_notify_cancel()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # KeyboardInterrupt/SystemExit propagate to the driver
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        self._closed = True
