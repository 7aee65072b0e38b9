"""Run configuration: frozen dataclasses, TOML loading, ``--set`` overrides, validation.

Fed by a TOML file (``search_runs/*.toml`` or a user's own) and by ``--set SECTION.KEY=VALUE``
strings from the command line; feeds every other module (the evolution loop reads ``search``,
workers receive ``config_to_dict(cfg)["surrogate"]``, the executor factory reads ``executor``).
The run store records ``config_to_dict(cfg)`` and ``resume`` rebuilds the config with
``config_from_dict``; the round trip is exact. Old model names are read as the current ones
(``MODEL_ALIASES``: ``tinycnn`` is ``tiny``), so a run stored under an old name resumes as the
same config.

Layering (later wins): dataclass defaults < config file < each ``--set`` in order. Every
problem is reported as one ``ConfigError`` (a ``ValueError``) with a one-line message naming the
key; the CLI maps it to exit code 2. Config text is parsed as TOML only, never evaluated.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config problem: unknown key, wrong type, value out of range, unreadable file."""


AUGMENTS = ("none", "flipcrop", "randaugment")
EXECUTOR_KINDS = ("serial", "process", "ray")
# "surrogate": the initial candidates are scored by the surrogate itself. "cheap": the paper's
# seeding -- they are scored by the surrogate overlaid with `search.initial_surrogate` (the paper:
# 32 px, no augmentation, batch 128), and only the best `search.rescore` of them are re-scored
# by the surrogate before the population is chosen.
INITIAL_FITNESS_KINDS = ("surrogate", "cheap")
DEVICES = ("auto", "cpu", "cuda", "mps")
# Old model names -> the name models.py builds (models.ALIASES is this table). A config says
# the current name, so "tinycnn" and "tiny" are one model: one cache key, one label.
MODEL_ALIASES: dict[str, str] = {"tinycnn": "tiny"}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_fractions(val_fraction: float, test_fraction: float, train_fraction: float,
                    where: str = "surrogate") -> None:
    """The one rule for the data split (used by ``SurrogateConfig`` and ``data.load_splits``)."""
    _check(0 < train_fraction <= 1, f"{where}.train_fraction", "must be in (0, 1]")
    _check(0 < val_fraction < 1, f"{where}.val_fraction", "must be in (0, 1)")
    _check(0 <= test_fraction < 1, f"{where}.test_fraction", "must be in [0, 1)")
    _check(val_fraction + test_fraction < 1, f"{where}.test_fraction",
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


def _coerce_fields(obj: Any) -> None:
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
            _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                   f"expected a number, got {_describe(value)}")
            value = float(value)
            _check(math.isfinite(value), key, f"expected a finite number, got {value}")
        elif want is int:
            _check(isinstance(value, int) and not isinstance(value, bool), key,
                   f"expected an integer, got {_describe(value)}")
        elif want is bool:
            _check(isinstance(value, bool), key, f"expected true or false, got {_describe(value)}")
        elif want is str:
            _check(isinstance(value, str), key, f"expected a string, got {_describe(value)}")
        elif typing.get_origin(want) is tuple:
            _check(isinstance(value, (list, tuple)), key,
                   f"expected a list of strings, got {_describe(value)}")
            for item in value:
                _check(isinstance(item, str) and item.strip() != "", key,
                       f"expected a list of non-empty strings, got {_describe(item)} in it")
            value = tuple(value)
        elif dataclasses.is_dataclass(want):
            _check(isinstance(value, want), key, f"expected a table, got {_describe(value)}")
        elif typing.get_origin(want) is dict or want is dict:
            # a table of another section's keys; Config checks the keys and values
            _check(isinstance(value, dict), key, f"expected a table, got {_describe(value)}")
            value = dict(value)
        else:  # pragma: no cover - a new field type without a rule here is a programming error
            raise TypeError(f"no type rule for {key}: {want!r}")
        object.__setattr__(obj, f.name, value)


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


@dataclass(frozen=True)
class MutationConfig:
    """Relative weights of the mutation kinds (normalised by their sum; 0 disables a kind)."""

    SECTION: typing.ClassVar[str] = "search.mutation"
    subtree: float = 0.3  # replace a random subtree by a fresh random one
    node: float = 0.4  # swap one primitive for another of the same arity (the paper's main move)
    insert: float = 0.15  # wrap a subtree in a new primitive
    shrink: float = 0.15  # replace a primitive by one of its arguments

    def __post_init__(self) -> None:
        _coerce_fields(self)
        for f in dataclasses.fields(self):
            _check(getattr(self, f.name) >= 0, f"{self.SECTION}.{f.name}", "must be >= 0")
        _check(sum(self.weights().values()) > 0, self.SECTION,
               "at least one mutation weight must be positive")

    def weights(self) -> dict[str, float]:
        """Kind -> weight, in field order (the order the loop draws from)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class SearchConfig:
    """The evolution loop (DESIGN §6). Defaults are the paper's numbers except where noted."""

    SECTION: typing.ClassVar[str] = "search"
    pset: str = "paper"
    population: int = 100
    tournament: int = 20
    children: int = 4000  # evaluated or reused children; rejected proposals do not count
    initial: int = 1000  # random screened candidates evaluated to seed the population
    initial_fitness: str = "surrogate"
    # with initial_fitness = "cheap": surrogate keys overridden for the initial scoring
    initial_surrogate: dict[str, Any] = field(default_factory=dict)
    rescore: int = 0  # with "cheap": initial candidates re-scored by the surrogate; 0 = population
    seed: int = 0
    seed_with: tuple[str, ...] = ()  # expressions or zoo names added to the initial pool
    reference: tuple[str, ...] = ("ce",)  # trained once under the same budget, for the report
    max_retries: int = 2500  # rejected proposals in a row before drawing a new parent
    max_minutes: float = 0.0  # bound on the search's wall time; 0 = unbounded
    phenotype_tolerance: float = 0.0  # the paper's sweep-curve filter; 0 = off
    # noise-aware fitness: a member that survives `reeval_after` further births (0 = half the
    # population) is trained with `reeval_seeds - 1` more seeds; its fitness becomes the mean
    reeval_seeds: int = 1
    reeval_after: int = 0
    # results shared across runs (cache.py): "" = $GP_LOSS_CACHE or ~/.cache/gp-loss/..., "off"
    fitness_cache: str = ""
    max_depth: int = 0  # tree limits; 0 = the primitive set's own default
    max_size: int = 0
    mutation: MutationConfig = field(default_factory=MutationConfig)

    def __post_init__(self) -> None:
        _coerce_fields(self)
        s = self.SECTION
        _check(self.pset.strip() != "", f"{s}.pset", "must name a primitive set")
        _check(self.population >= 1, f"{s}.population", "must be >= 1")
        _check(self.tournament >= 1, f"{s}.tournament", "must be >= 1")
        _check(self.children >= 0, f"{s}.children", "must be >= 0")
        _check(self.initial >= 0, f"{s}.initial", "must be >= 0")
        _check(self.initial + len(self.seed_with) >= 1, f"{s}.initial",
               "must be >= 1 when search.seed_with is empty (the population needs a member)")
        _check(self.initial_fitness in INITIAL_FITNESS_KINDS, f"{s}.initial_fitness",
               f"must be one of {', '.join(INITIAL_FITNESS_KINDS)}")
        _check(self.reeval_seeds >= 1, f"{s}.reeval_seeds", "must be >= 1 (1 = one seed)")
        _check(self.reeval_after >= 0, f"{s}.reeval_after", "must be >= 0 (0 = population/2)")
        _check(self.rescore >= 0, f"{s}.rescore", "must be >= 0 (0 = search.population)")
        _check(self.seed >= 0, f"{s}.seed", "must be >= 0")
        _check(self.max_retries >= 1, f"{s}.max_retries", "must be >= 1")
        _check(self.max_minutes >= 0, f"{s}.max_minutes", "must be >= 0 (0 = unbounded)")
        _check(self.phenotype_tolerance >= 0, f"{s}.phenotype_tolerance", "must be >= 0 (0 = off)")
        _check(self.max_depth >= 0, f"{s}.max_depth", "must be >= 0 (0 = the set's default)")
        _check(self.max_size >= 0, f"{s}.max_size", "must be >= 0 (0 = the set's default)")


@dataclass(frozen=True)
class SurrogateConfig:
    """How one candidate is trained and scored (the evaluation config workers receive)."""

    SECTION: typing.ClassVar[str] = "surrogate"
    dataset: str = "digits"
    data_root: str = ""  # where downloadable datasets live; "" = the library's default
    model: str = "tiny"  # an old name (MODEL_ALIASES) is read as its current one
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    eval_every: int = 0  # 0 = once per epoch
    train_fraction: float = 1.0  # share of the training split used
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    seed: int = 0  # every candidate trains with this seed: same init, same batch order
    prescreen_steps: int = 100
    prescreen_min_acc: float = 0.35
    midrun_step: int = 0  # 0 = no mid-run check
    midrun_min_acc: float = 0.22
    timeout_s: float = 0.0  # 0 = no per-evaluation time limit
    weight_decay: float = 0.0
    device: str = "auto"
    # Fidelity knobs of the paper's surrogate (DESIGN §6); the CPU defaults switch them off.
    image_size: int = 0  # resize images to this many pixels; 0 = the dataset's own size
    augment: str = "none"  # none | flipcrop | randaugment (drawn per image, on the device)
    randaugment_ops: int = 2  # paper: 2 operations per image
    randaugment_magnitude: float = 5.0  # on the paper's 0-10 scale (mapping in augment docs)
    prescreen_separate: bool = False  # paper: a separate short run (no augmentation) first
    prescreen_image_size: int = 0  # image size of that separate run; 0 = image_size
    download: bool = False  # torchvision datasets: fetch when missing (needs internet)
    amp: str = "auto"  # bf16 autocast of the network on CUDA (the loss stays float32)
    compile: bool = False  # torch.compile the network once per worker process (CUDA only)

    def __post_init__(self) -> None:
        _coerce_fields(self)
        s = self.SECTION
        _check(self.image_size >= 0, f"{s}.image_size", "must be >= 0 (0 = native size)")
        _check(self.augment in AUGMENTS, f"{s}.augment",
               f"must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        _check(self.randaugment_ops >= 0, f"{s}.randaugment_ops", "must be >= 0")
        _check(0 <= self.randaugment_magnitude <= 10, f"{s}.randaugment_magnitude",
               "must be in [0, 10] (the paper's scale)")
        _check(self.prescreen_image_size >= 0, f"{s}.prescreen_image_size", "must be >= 0")
        _check(self.amp in ("auto", "bf16", "off"), f"{s}.amp", "must be auto, bf16 or off")
        _check(self.dataset.strip() != "", f"{s}.dataset", "must name a dataset")
        _check(self.model.strip() != "", f"{s}.model", "must name a model")
        object.__setattr__(self, "model", MODEL_ALIASES.get(self.model, self.model))
        _check(self.steps >= 1, f"{s}.steps", "must be >= 1")
        _check(self.batch_size >= 1, f"{s}.batch_size", "must be >= 1")
        _check(self.lr > 0, f"{s}.lr", "must be > 0")
        _check(0 <= self.warmup_fraction <= 1, f"{s}.warmup_fraction", "must be in [0, 1]")
        _check(self.eval_every >= 0, f"{s}.eval_every", "must be >= 0 (0 = once per epoch)")
        check_fractions(self.val_fraction, self.test_fraction, self.train_fraction, s)
        _check(self.split_seed >= 0, f"{s}.split_seed", "must be >= 0")
        _check(self.seed >= 0, f"{s}.seed", "must be >= 0")
        _check(self.prescreen_steps >= 0, f"{s}.prescreen_steps", "must be >= 0 (0 = off)")
        _check(0 <= self.prescreen_min_acc <= 1, f"{s}.prescreen_min_acc", "must be in [0, 1]")
        _check(self.midrun_step >= 0, f"{s}.midrun_step", "must be >= 0 (0 = off)")
        _check(0 <= self.midrun_min_acc <= 1, f"{s}.midrun_min_acc", "must be in [0, 1]")
        _check(self.timeout_s >= 0, f"{s}.timeout_s", "must be >= 0 (0 = no limit)")
        _check(self.weight_decay >= 0, f"{s}.weight_decay", "must be >= 0")
        dev = self.device
        _check(dev in DEVICES or (dev.startswith("cuda:") and dev[5:].isdigit()),
               f"{s}.device", f"must be one of {', '.join(DEVICES)} or cuda:N, got {dev!r}")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where evaluations run (see execution/)."""

    SECTION: typing.ClassVar[str] = "executor"
    kind: str = "serial"
    workers: int = 1  # evaluations in flight (ignored by serial)
    threads: int = 1  # torch threads per evaluation; 0 = torch's default
    retries: int = 0  # re-runs of an evaluation whose worker died (process, ray) before failing it
    address: str = ""  # ray: "" = start a local cluster, "auto" = the running one, or host:port
    gpus_per_eval: float = 0.0  # ray: GPUs one evaluation reserves (0.5: two share a card)

    def __post_init__(self) -> None:
        _coerce_fields(self)
        s = self.SECTION
        _check(self.retries >= 0, f"{s}.retries", "must be >= 0")
        _check(self.gpus_per_eval >= 0, f"{s}.gpus_per_eval", "must be >= 0 (0 = no GPU)")
        _check(self.kind in EXECUTOR_KINDS, f"{s}.kind",
               f"must be one of {', '.join(EXECUTOR_KINDS)}, got {self.kind!r}")
        _check(self.workers >= 1, f"{s}.workers", "must be >= 1")
        _check(self.threads >= 0, f"{s}.threads", "must be >= 0 (0 = torch's default)")


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    search: SearchConfig = field(default_factory=SearchConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        self.initial_surrogate()  # names a bad key of search.initial_surrogate now, not later

    def initial_surrogate(self) -> SurrogateConfig:
        """The surrogate that scores the initial candidates (the surrogate itself unless
        ``search.initial_fitness = "cheap"``)."""
        table = self.search.initial_surrogate
        if self.search.initial_fitness != "cheap" or not table:
            return self.surrogate
        names = [f.name for f in dataclasses.fields(SurrogateConfig)]
        for key in table:
            if key not in names:
                raise ConfigError(f"unknown key 'search.initial_surrogate.{key}'"
                                  f"{_suggest(key, names, 'search.initial_surrogate.')}; it "
                                  f"takes [surrogate] keys")
        try:
            return dataclasses.replace(self.surrogate, **table)
        except ConfigError as exc:
            raise ConfigError(f"search.initial_surrogate: {exc}") from None

    def rescore_count(self) -> int:
        """How many cheaply scored initial candidates the surrogate re-scores (0 if none)."""
        if self.search.initial_fitness != "cheap":
            return 0
        return self.search.rescore or self.search.population


_SECTIONS: dict[str, type] = {"search": SearchConfig, "surrogate": SurrogateConfig,
                              "executor": ExecutorConfig}


def _suggest(name: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(prefix + c) for c in close)}?)" if close else ""


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict, naming unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a table, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}.{key}'{_suggest(key, names, prefix + '.')}")
        if dataclasses.is_dataclass(hints[key]):
            value = _build(hints[key], value, f"{prefix}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a plain dict; missing sections/keys take defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a table, got {_describe(data)}")
    for name in data:
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section '{name}'{_suggest(name, _SECTIONS)}"
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
            raise ConfigError(f"unknown section '{parts[0]}'{_suggest(parts[0], _SECTIONS)}"
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
    entry = resources.files("gp_loss.builtin_configs").joinpath(filename)
    if not entry.is_file():
        names = builtin_config_names() + builtin_config_names("eliminate")
        close = _suggest(name.removesuffix(".toml"), names)
        raise ConfigError(f"no built-in config {name!r}{close}; built-ins are "
                          f"{', '.join(names) or 'none'}")
    return Path(str(entry))


def builtin_config_names(kind: str = "search") -> list[str]:
    """Names of the configs shipped in ``search_runs`` (without ``.toml``): search configs, or
    with ``kind="eliminate"`` the elimination settings (``*_eliminate.toml``)."""
    names = sorted(e.name[:-5] for e in resources.files("gp_loss.builtin_configs").iterdir()
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
                raise ConfigError(f"config file not found: {path}{_suggest(stem, names)}; "
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
