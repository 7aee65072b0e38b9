"""Where the files shipped with the package are: the primitive sets (``primitives/``) and the
search configs (``search_runs/``).

An install maps those two repository folders to the data packages ``gp_loss.builtin_psets``
and ``gp_loss.builtin_configs`` (setup.cfg ``package_dir``), read with ``importlib.resources``
so that a wheel, a zip or an editable install all work. A source checkout used without any
install (``PYTHONPATH=. python -m gp_loss``) has no such packages: then the folders next to
``gp_loss/`` are used. Used by ``lang.psets`` and ``config.loading``; imports nothing from the
package.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

FOLDERS = {"gp_loss.builtin_psets": "primitives", "gp_loss.builtin_configs": "search_runs"}


def files(package: str):
    """The folder of ``package`` (a key of ``FOLDERS``) as an ``importlib.resources``
    Traversable: the installed data package, else the checkout's folder."""
    try:
        return resources.files(package)
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[1] / FOLDERS[package]
        if not folder.is_dir():
            raise
        return folder
