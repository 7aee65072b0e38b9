"""The one way an exception becomes a short message (its first non-empty line), and
``InputError``, the bad-input error every layer may raise.

Used wherever a failure is shown or stored as one line (CLI errors, failed evaluations' reasons,
executor and data errors). No imports from the package: every layer may use it.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input that is not an expression or primitive-set problem (bad loss name, bad
    output path, unknown format...). One-line message; the CLI maps it to exit code 2.
    Exported by the package root as ``gp_loss.InputError``."""


def _cut(text: str, limit: int | None) -> str:
    return text if limit is None or len(text) <= limit else text[:max(0, limit - 3)] + "..."


def first_line(value, limit: int | None = None) -> str:
    """The first non-empty line of ``str(value)``, stripped ("" if none; an exception with no
    message gives its type name), cut to ``limit`` characters with "..." when longer."""
    line = next((ln.strip() for ln in str(value).splitlines() if ln.strip()), "")
    if not line and isinstance(value, BaseException):
        line = type(value).__name__
    return _cut(line, limit)


def describe(exc: BaseException, limit: int | None = None) -> str:
    """``Type: first line`` (just ``Type`` when the message is empty), cut to ``limit``."""
    line = first_line(str(exc))
    return _cut(f"{type(exc).__name__}: {line}" if line else type(exc).__name__, limit)
