"""Where evaluations run: the executor interface and the serial executor (``base``), the
queue/retry/give-up core the worker backends share (``pool``), the process pool (``process``)
and Ray (``ray_backend``); ``make_executor`` builds the one ``config.ExecutorConfig`` names."""
from __future__ import annotations

from ..config import EXECUTOR_KINDS, ConfigError
from .base import EvaluationTimeout, Executor, RemoteTraceback, WorkerLost, wait_first


def make_executor(kind: str = "serial", workers: int = 1, threads: int = 1, *, retries: int = 0,
                  address: str = "", gpus_per_eval: float = 0.0,
                  timeout_s: float = 0.0) -> Executor:
    """Build the executor a config asks for (the fields of ``config.ExecutorConfig``);
    ``retries`` applies to process and ray, ``address``/``gpus_per_eval`` to ray only;
    ``timeout_s`` (surrogate.timeout_s) gives process workers a hard deadline."""
    if kind == "serial":
        from .base import SerialExecutor

        return SerialExecutor(threads)
    if kind == "process":
        from .process import ProcessExecutor

        return ProcessExecutor(workers, threads, retries=retries, timeout_s=timeout_s)
    if kind == "ray":
        from .ray_backend import RayExecutor  # imports ray, or says how to install it

        return RayExecutor(workers, threads, retries=retries, address=address,
                           gpus_per_eval=gpus_per_eval)
    raise ConfigError(f"executor.kind: must be one of {', '.join(EXECUTOR_KINDS)}, got {kind!r}")


__all__ = ["make_executor", "wait_first", "Executor", "WorkerLost", "EvaluationTimeout",
           "RemoteTraceback", "EXECUTOR_KINDS"]
