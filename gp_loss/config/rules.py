"""The config's rules: ``ConfigError`` and the checks every section and a few other modules use.

``check`` (one condition, one ``ConfigError`` naming the key) and ``coerce_fields`` (the type
rule of every field, run by each section's ``__post_init__``) serve ``sections.py``; ``suggest``
(a close match for a mistyped name) serves it and ``loading.py``, ``describe_value`` (a value as
a message shows it) ``loading.py``. The rules shared with other packages live here too:
``check_fractions`` (the data split, also used by ``surrogate/data.py``) and ``check_stages``
with ``STAGE_KEYS`` (elimination stages, also used by ``surrogate/train.py`` and
``protocol/eliminate.py``), so that those need not import the trainer (torch). Imports nothing
from the package.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any


class ConfigError(ValueError):
    """A config problem: unknown key, wrong type, value out of range, unreadable file."""


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("KEY: MESSAGE")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_fractions(val_fraction: float, test_fraction: float, train_fraction: float,
                    where: str = "surrogate") -> None:
    """The one rule for the data split (used by ``SurrogateConfig`` and ``data.load_splits``)."""
    check(0 < train_fraction <= 1, f"{where}.train_fraction", "must be in (0, 1]")
    check(0 < val_fraction < 1, f"{where}.val_fraction", "must be in (0, 1)")
    check(0 <= test_fraction < 1, f"{where}.test_fraction", "must be in [0, 1)")
    check(val_fraction + test_fraction < 1, f"{where}.test_fraction",
          f"{where}.val_fraction + {where}.test_fraction must be < 1")


# Training stages (eliminate's rounds): key -> (type, lowest value, exclusive upper bound or
# None, what it must be). Checked here so the protocol need not import the trainer (torch).
_STAGE_CHECKS = {"steps": (int, 1, None, "an integer >= 1"),
                 "image_size": (int, 0, None, "an integer >= 0"),
                 "randaugment_magnitude": (float, 0.0, None, "a number >= 0"),
                 "dropout": (float, 0.0, 1.0, "a number in [0, 1)")}
STAGE_KEYS = tuple(_STAGE_CHECKS)


def check_stages(stages, where: str = "surrogate.stages") -> list[dict]:
    """Checked, typed copies of stage dicts (keys ``STAGE_KEYS``, ``steps`` required)."""
    if not isinstance(stages, (list, tuple)):
        raise ConfigError(f"{where} must be a list of tables, got {stages!r}")
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or "steps" not in st or set(st) - set(STAGE_KEYS):
            raise ConfigError(f"{where}[{i}] must be a table with steps and optionally "
                              f"{', '.join(STAGE_KEYS[1:])}, got {st!r}")
        for k, v in st.items():
            typ, lo, hi, what = _STAGE_CHECKS[k]
            if (isinstance(v, bool) or not isinstance(v, (int, float) if typ is float else int)
                    or not math.isfinite(v) or v < lo or (hi is not None and v >= hi)):
                raise ConfigError(f"{where}[{i}].{k} must be {what}, got {v!r}")
    return [{k: _STAGE_CHECKS[k][0](v) for k, v in st.items()} for st in stages]


def coerce_fields(obj: Any) -> None:
    """Type-check every field of a section and normalise it (int -> float, list -> tuple).

    Done in ``__post_init__`` so that dataclasses built in Python are checked exactly like the
    ones read from TOML. ``bool`` is rejected where an int or float is expected because TOML
    ``true`` silently becoming 1 would hide a typo.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{obj.SECTION}.{f.name}"
        want = hints[f.name]
        value = getattr(obj, f.name)
        if want is float:
            check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                  f"expected a number, got {describe_value(value)}")
            value = float(value)
            check(math.isfinite(value), key, f"expected a finite number, got {value}")
        elif want is int:
            check(isinstance(value, int) and not isinstance(value, bool), key,
                  f"expected an integer, got {describe_value(value)}")
        elif want is bool:
            check(isinstance(value, bool), key,
                  f"expected true or false, got {describe_value(value)}")
        elif want is str:
            check(isinstance(value, str), key, f"expected a string, got {describe_value(value)}")
        elif typing.get_origin(want) is tuple and typing.get_args(want)[0] is not str:
            # a list of tables (search.tasks); Config checks what each table holds
            check(isinstance(value, (list, tuple)), key,
                  f"expected a list of tables, got {describe_value(value)}")
            for item in value:
                check(isinstance(item, dict), key,
                      f"expected a list of tables, got {describe_value(item)} in it")
            value = tuple(dict(item) for item in value)
        elif typing.get_origin(want) is tuple:
            check(isinstance(value, (list, tuple)), key,
                  f"expected a list of strings, got {describe_value(value)}")
            for item in value:
                check(isinstance(item, str) and item.strip() != "", key,
                      f"expected a list of non-empty strings, got {describe_value(item)} in it")
            value = tuple(value)
        elif dataclasses.is_dataclass(want):
            check(isinstance(value, want), key, f"expected a table, got {describe_value(value)}")
        elif typing.get_origin(want) is dict or want is dict:
            # a table of another section's keys; Config checks the keys and values
            check(isinstance(value, dict), key, f"expected a table, got {describe_value(value)}")
            value = dict(value)
        else:  # pragma: no cover - a new field type without a rule here is a programming error
            raise TypeError(f"no type rule for {key}: {want!r}")
        object.__setattr__(obj, f.name, value)


def describe_value(value: Any) -> str:
    """A value for an error message: its TOML kind and its repr, cut to 40 characters."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


def suggest(name: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'X'?)`` naming up to two close matches of ``name`` (each with
    ``prefix``), or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(prefix + c) for c in close)}?)" if close else ""
