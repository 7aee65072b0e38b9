"""One writer per run: the exclusive ``flock`` on ``RUN_DIR/run.lock``.

``RunStore.open`` takes it (``acquire``) whenever it opens a store for writing and drops it
(``release``) on close; ``RunStore.writer_active`` (``show``'s ``running`` status) probes it
with ``held``. The kernel drops the lock when the process dies, even by SIGKILL, so a killed
search never leaves a stale lock behind. Readers take no lock. On a platform without ``flock``
there is no lock: single-writer is then the user's care. The store reports a ``LockError`` as
its own ``StoreError``.
"""

from __future__ import annotations

import os
from pathlib import Path

LOCK_NAME = "run.lock"


class LockError(RuntimeError):
    """The lock file cannot be opened, or another process holds the lock (one line)."""


def acquire(run_dir: Path) -> int | None:
    """Take the writer lock of ``run_dir`` (without waiting) and write our pid into the file;
    returns the descriptor that holds it (None where there is no ``flock``)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: single-writer is then the user's care
        return None
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LockError(f"cannot open the lock file in {run_dir}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LockError(f"{run_dir} is in use by another gp-loss process (pid {holder}); wait "
                        f"for it or stop it (`gp-loss show {run_dir}` reads it meanwhile)"
                        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def release(fd: int | None) -> None:
    """Drop a lock ``acquire`` took (None: nothing to drop)."""
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def held(run_dir: str | os.PathLike) -> bool:
    """True while a process holds the writer lock of ``run_dir``. Probes with a non-blocking
    shared ``flock`` released at once; creates nothing. The probe holds the lock for
    microseconds, so a writer starting at that very instant could be refused as busy."""
    try:
        import fcntl
    except ImportError:  # no flock here: writers take no lock either (see acquire)
        return False
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file: never opened for writing by this gp-loss
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the probe's lock when it was taken
    return False
