"""The config's sections: the frozen dataclasses of a run's configuration and their checks.

``Config`` holds ``SearchConfig`` (with ``MutationConfig``), ``SurrogateConfig`` and
``ExecutorConfig``; each checks itself in ``__post_init__`` (types by ``rules.coerce_fields``,
ranges and choices here), so a config built in Python is checked exactly like one read from
TOML. ``SurrogateConfig`` is the one definition and check of the surrogate settings (the
trainer takes it). The choices other modules read (``AUGMENTS``, ``EXECUTOR_KINDS``,
``MODEL_ALIASES``, ...) are defined here. Built from plain data by ``loading.py``; everything
is re-exported by the package (``gp_loss.config``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from .rules import ConfigError, check, check_fractions, coerce_fields, suggest

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


@dataclass(frozen=True)
class MutationConfig:
    """Relative weights of the mutation kinds (normalised by their sum; 0 disables a kind)."""

    SECTION: typing.ClassVar[str] = "search.mutation"
    subtree: float = 0.3  # replace a random subtree by a fresh random one
    node: float = 0.4  # swap one primitive for another of the same arity (the paper's main move)
    insert: float = 0.15  # wrap a subtree in a new primitive
    shrink: float = 0.15  # replace a primitive by one of its arguments

    def __post_init__(self) -> None:
        coerce_fields(self)
        for f in dataclasses.fields(self):
            check(getattr(self, f.name) >= 0, f"{self.SECTION}.{f.name}", "must be >= 0")
        check(sum(self.weights().values()) > 0, self.SECTION,
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
    # [[search.tasks]]: named [surrogate] overrides (name = "...", then surrogate keys). Every
    # candidate trains on each task in order (a pre-screen failure on one skips the rest). With
    # two or more, fitness = the mean over tasks of (validation accuracy - ce_torch's on that
    # task, same settings and seed): a loss must beat cross-entropy on every task, not fit one
    # architecture and learning rate. One task: its settings, today's fitness. search/tasks.py.
    tasks: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        coerce_fields(self)
        s = self.SECTION
        check(self.pset.strip() != "", f"{s}.pset", "must name a primitive set")
        check(self.population >= 1, f"{s}.population", "must be >= 1")
        check(self.tournament >= 1, f"{s}.tournament", "must be >= 1")
        check(self.children >= 0, f"{s}.children", "must be >= 0")
        check(self.initial >= 0, f"{s}.initial", "must be >= 0")
        check(self.initial + len(self.seed_with) >= 1, f"{s}.initial",
              "must be >= 1 when search.seed_with is empty (the population needs a member)")
        check(self.initial_fitness in INITIAL_FITNESS_KINDS, f"{s}.initial_fitness",
              f"must be one of {', '.join(INITIAL_FITNESS_KINDS)}")
        check(self.reeval_seeds >= 1, f"{s}.reeval_seeds", "must be >= 1 (1 = one seed)")
        check(self.reeval_after >= 0, f"{s}.reeval_after", "must be >= 0 (0 = population/2)")
        check(self.rescore >= 0, f"{s}.rescore", "must be >= 0 (0 = search.population)")
        check(self.seed >= 0, f"{s}.seed", "must be >= 0")
        check(self.max_retries >= 1, f"{s}.max_retries", "must be >= 1")
        check(self.max_minutes >= 0, f"{s}.max_minutes", "must be >= 0 (0 = unbounded)")
        check(self.phenotype_tolerance >= 0, f"{s}.phenotype_tolerance", "must be >= 0 (0 = off)")
        check(self.max_depth >= 0, f"{s}.max_depth", "must be >= 0 (0 = the set's default)")
        check(self.max_size >= 0, f"{s}.max_size", "must be >= 0 (0 = the set's default)")


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
        coerce_fields(self)
        s = self.SECTION
        check(self.image_size >= 0, f"{s}.image_size", "must be >= 0 (0 = native size)")
        check(self.augment in AUGMENTS, f"{s}.augment",
              f"must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        check(self.randaugment_ops >= 0, f"{s}.randaugment_ops", "must be >= 0")
        check(0 <= self.randaugment_magnitude <= 10, f"{s}.randaugment_magnitude",
              "must be in [0, 10] (the paper's scale)")
        check(self.prescreen_image_size >= 0, f"{s}.prescreen_image_size", "must be >= 0")
        check(self.amp in ("auto", "bf16", "off"), f"{s}.amp", "must be auto, bf16 or off")
        check(self.dataset.strip() != "", f"{s}.dataset", "must name a dataset")
        check(self.model.strip() != "", f"{s}.model", "must name a model")
        object.__setattr__(self, "model", MODEL_ALIASES.get(self.model, self.model))
        check(self.steps >= 1, f"{s}.steps", "must be >= 1")
        check(self.batch_size >= 1, f"{s}.batch_size", "must be >= 1")
        check(self.lr > 0, f"{s}.lr", "must be > 0")
        check(0 <= self.warmup_fraction <= 1, f"{s}.warmup_fraction", "must be in [0, 1]")
        check(self.eval_every >= 0, f"{s}.eval_every", "must be >= 0 (0 = once per epoch)")
        check_fractions(self.val_fraction, self.test_fraction, self.train_fraction, s)
        check(self.split_seed >= 0, f"{s}.split_seed", "must be >= 0")
        check(self.seed >= 0, f"{s}.seed", "must be >= 0")
        check(self.prescreen_steps >= 0, f"{s}.prescreen_steps", "must be >= 0 (0 = off)")
        check(0 <= self.prescreen_min_acc <= 1, f"{s}.prescreen_min_acc", "must be in [0, 1]")
        check(self.midrun_step >= 0, f"{s}.midrun_step", "must be >= 0 (0 = off)")
        check(0 <= self.midrun_min_acc <= 1, f"{s}.midrun_min_acc", "must be in [0, 1]")
        check(self.timeout_s >= 0, f"{s}.timeout_s", "must be >= 0 (0 = no limit)")
        check(self.weight_decay >= 0, f"{s}.weight_decay", "must be >= 0")
        dev = self.device
        check(dev in DEVICES or (dev.startswith("cuda:") and dev[5:].isdigit()),
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
    gpus_per_eval: float = 0.0  # ray: GPUs one pack reserves (0.5: two share a card)
    # Candidates one worker trains at once as one grouped network (surrogate/packtrain.py):
    # workers x 2K evaluations are in flight (the packer sends 2K per call, trained K at a time,
    # so a finished slot is refilled from the call's own queue). K is an evaluation
    # setting (results at K > 1 differ from K = 1 in the last bits, so the fitness cache keys
    # on it). 8: measured for the CPU default with analysis/bench_population.py (56 real
    # candidates, digits/tiny, 300 steps, 1 thread, 2-core VM; BENCHMARKS.md P14): candidates
    # per hour 1.98x K = 1 at K = 8, 1.99x at 16 (a tie, at twice the candidates in flight),
    # 1.84x at 4. On 28 px (mnist5k) K = 2 measured best (1.5x). Models the pack cannot serve
    # (the torchvision ones) train at 1.
    candidates_per_worker: int = 8

    def __post_init__(self) -> None:
        coerce_fields(self)
        s = self.SECTION
        check(self.retries >= 0, f"{s}.retries", "must be >= 0")
        check(self.gpus_per_eval >= 0, f"{s}.gpus_per_eval", "must be >= 0 (0 = no GPU)")
        check(self.kind in EXECUTOR_KINDS, f"{s}.kind",
              f"must be one of {', '.join(EXECUTOR_KINDS)}, got {self.kind!r}")
        check(self.workers >= 1, f"{s}.workers", "must be >= 1")
        check(1 <= self.candidates_per_worker <= 64, f"{s}.candidates_per_worker",
              "must be between 1 and 64 (1 = each candidate trains alone)")
        check(self.threads >= 0, f"{s}.threads", "must be >= 0 (0 = torch's default)")


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    search: SearchConfig = field(default_factory=SearchConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        self.initial_surrogate()  # names a bad key of search.initial_surrogate now, not later
        self.task_surrogates()  # and a bad [[search.tasks]] entry

    def task_surrogates(self, cheap: bool = False) -> list[tuple[str | None, SurrogateConfig]]:
        """(name, surrogate) per task of ``search.tasks``, in order: the run's surrogate with
        the task's keys; ``cheap``: then ``search.initial_surrogate`` over it (the seeding's
        cheaper scoring of each task). Without tasks: ``[(None, surrogate)]``."""
        base = self.initial_surrogate() if cheap else self.surrogate
        if not self.search.tasks:
            return [(None, base)]
        names = [f.name for f in dataclasses.fields(SurrogateConfig)]
        out: list = []
        for i, task in enumerate(self.search.tasks):
            where = f"search.tasks[{i}]"
            name = task.get("name")
            check(isinstance(name, str) and name.strip() != "", f"{where}.name",
                  "every task needs a name (a non-empty string)")
            check(name not in [n for n, _ in out], f"{where}.name",
                  f"{name!r} names two tasks; task names must differ")
            check(len(self.search.tasks) <= 16, "search.tasks", "at most 16 tasks")
            keys = {k: v for k, v in task.items() if k != "name"}
            check("seed" not in keys, f"{where}.seed",
                  "tasks share the run's seeds (surrogate.seed, and search.reeval_seeds' "
                  "offsets): a task cannot set its own")
            for key in keys:
                if key not in names:
                    raise ConfigError(f"unknown key '{where}.{key}' (task {name!r})"
                                      f"{suggest(key, names, where + '.')}; a task takes "
                                      f"[surrogate] keys")
            try:
                conf = dataclasses.replace(self.surrogate, **keys)
                if cheap and self.search.initial_fitness == "cheap" \
                        and self.search.initial_surrogate:
                    conf = dataclasses.replace(conf, **self.search.initial_surrogate)
            except ConfigError as exc:
                raise ConfigError(f"{where} (task {name!r}): {exc}") from None
            out.append((name, conf))
        return out

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
                                  f"{suggest(key, names, 'search.initial_surrogate.')}; it "
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
