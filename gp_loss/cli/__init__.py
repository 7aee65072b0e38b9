"""The ``gp-loss`` command line: a thin layer over the Python API and the packages below.

``app`` holds the click group, error handling and exit codes (DESIGN §7) and the expression
commands; ``run`` the search and run commands; ``protocol`` ``compare`` and ``eliminate``;
``options`` the options and helpers both groups share.
"""
from .app import cli, main

__all__ = ["cli", "main"]
