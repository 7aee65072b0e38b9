"""Where a run came from: the versions and checkout recorded in every new run store.

``environment()`` is the dict ``RunStore.create`` writes into a store's ``meta`` (and
``gp-loss search`` passes along with its own keys); ``package_version`` is also read by the
store's migration record and by the fitness cache's settings digest (``search/cache.py``).
Nothing here imports torch.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path


def _git_info() -> dict:
    """Commit (and dirtiness) of the checkout this package runs from, if it runs from one.

    Only when the package directory sits at the top of a git work tree: an installed copy in a
    venv inside some repository must not report that repository's commit.
    """
    pkg = Path(__file__).resolve().parents[1]  # gp_loss/ (this file is gp_loss/runs/...)
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True,
                                 timeout=5, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()
    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != pkg.parent:
        return {"git_commit": None}
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if dirty is None else dirty != ""}


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions and provenance recorded in every new store (no torch import needed)."""
    return {
        "gp_loss_version": package_version("gp-loss"),
        **_git_info(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "packages": {d: package_version(d) for d in ("numpy", "sympy", "deap", "scikit-learn")},
        "platform": platform.platform(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
