"""The config from files and text: TOML loading, ``--set`` overrides, the exact dict round trip.

``load_config`` reads a TOML file (``search_runs/*.toml``, shipped as
``gp_loss.builtin_configs``: ``builtin_config_path``, ``builtin_config_names``; or a user's own)
and applies ``--set SECTION.KEY=VALUE`` strings in order (``apply_overrides``);
``config_from_dict``/``config_to_dict`` are the exact round trip the run store records and
``resume`` reads back. Unknown sections and keys are named, with a close match. Config text is
parsed as TOML only, never evaluated. Builds ``sections.py``'s dataclasses; used through the
package (``gp_loss.config``) by the CLI, the protocol and the search.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from .. import shipped
from .rules import ConfigError, describe_value, suggest
from .sections import Config, ExecutorConfig, SearchConfig, SurrogateConfig

_SECTIONS: dict[str, type] = {"search": SearchConfig, "surrogate": SurrogateConfig,
                              "executor": ExecutorConfig}


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict, naming unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a table, got {describe_value(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}.{key}'{suggest(key, names, prefix + '.')}")
        if dataclasses.is_dataclass(hints[key]):
            value = _build(hints[key], value, f"{prefix}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a plain dict; missing sections/keys take defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a table, got {describe_value(data)}")
    for name in data:
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section '{name}'{suggest(name, _SECTIONS)}"
                              f"; sections are {', '.join(_SECTIONS)}")
    return Config(**{name: _build(cls, data.get(name, {}), name)
                     for name, cls in _SECTIONS.items()})


def config_to_dict(cfg: Config) -> dict:
    """The config as plain data (tables, lists, str/int/float/bool); JSON- and TOML-safe."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):  # a copy: overrides must not reach into a frozen config
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(cfg)


def _parse_value(text: str) -> Any:
    """A TOML literal when the text is one (``50``, ``1e-3``, ``["ce"]``, ``true``), else the
    bare text, so ``surrogate.dataset=digits`` needs no quotes."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply ``SECTION.KEY=VALUE`` strings in order (the last one wins); returns a new Config."""
    data = config_to_dict(cfg)
    for item in overrides:
        path, sep, text = item.partition("=")
        path = path.strip()
        if not sep or not path:
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE")
        parts = path.split(".")
        if len(parts) < 2 or any(not p for p in parts):
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE "
                              f"(e.g. search.population=50)")
        if parts[0] not in _SECTIONS:
            raise ConfigError(f"unknown section '{parts[0]}'{suggest(parts[0], _SECTIONS)}"
                              f"; sections are {', '.join(_SECTIONS)}")
        value = _parse_value(text)
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})  # a new table: validation names unknown keys
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[:depth + 1])}' "
                                  f"is not a table")
            node = child
        current = node.get(parts[-1])
        if isinstance(current, list) and isinstance(value, str):
            value = [value]  # `--set search.seed_with=ce` means ["ce"]
        elif isinstance(current, str) and not isinstance(value, str):
            value = text.strip()  # a string key keeps the text as typed (`dataset=123`)
        node[parts[-1]] = value
    return config_from_dict(data)


def builtin_config_path(name: str) -> Path:
    """Path of a config shipped in ``search_runs`` ("quick" or "quick.toml")."""
    filename = name if name.endswith(".toml") else f"{name}.toml"
    entry = shipped.files("gp_loss.builtin_configs").joinpath(filename)
    if not entry.is_file():
        names = builtin_config_names() + builtin_config_names("eliminate")
        close = suggest(name.removesuffix(".toml"), names)
        raise ConfigError(f"no built-in config {name!r}{close}; built-ins are "
                          f"{', '.join(names) or 'none'}")
    return Path(str(entry))


def builtin_config_names(kind: str = "search") -> list[str]:
    """Names of the configs shipped in ``search_runs`` (without ``.toml``): search configs, or
    with ``kind="eliminate"`` the elimination settings (``*_eliminate.toml``)."""
    names = sorted(e.name[:-5] for e in shipped.files("gp_loss.builtin_configs").iterdir()
                   if e.name.endswith(".toml"))
    elim = [n for n in names if n.endswith("_eliminate")]
    return elim if kind == "eliminate" else [n for n in names if n not in elim]


def load_config(path: str | Path | None = None,
                overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (None = built-in quick.toml; a bare built-in name also works), then
    apply overrides in order."""
    if path is None:
        file = builtin_config_path("quick")
    else:
        file = Path(path)
        if not file.is_file():
            bare = str(path)
            if "/" not in bare and "\\" not in bare and bare.removesuffix(".toml") in \
                    builtin_config_names():
                file = builtin_config_path(bare)
            else:
                names = builtin_config_names()
                stem = Path(bare).name.removesuffix(".toml")
                raise ConfigError(f"config file not found: {path}{suggest(stem, names)}; "
                                  f"built-in configs: {', '.join(names) or 'none'}")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    return apply_overrides(cfg, overrides)
