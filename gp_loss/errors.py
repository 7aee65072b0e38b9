"""The one way an exception becomes a short message: its first non-empty line.

Used wherever a failure is shown or stored as one line (CLI errors, failed evaluations' reasons,
executor and data errors). No imports from the package: every layer may use it.
"""
from __future__ import annotations


def first_line(value, limit: int | None = None) -> str:
    """The first non-empty line of ``str(value)``, stripped ("" if none; an exception with no
    message gives its type name), cut to ``limit`` characters with "..." when longer."""
    lines = [ln.strip() for ln in str(value).splitlines() if ln.strip()]
    text = lines[0] if lines else (type(value).__name__ if isinstance(value, BaseException) else "")
    if limit is not None and len(text) > limit:
        text = text[:max(0, limit - 3)] + "..."
    return text


def describe(exc: BaseException, limit: int | None = None) -> str:
    """``Type: first line`` (just ``Type`` when the message is empty), cut to ``limit``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if limit is not None and len(text) > limit:
        text = text[:max(0, limit - 3)] + "..."
    return text
