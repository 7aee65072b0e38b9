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

The package's public API, imported as ``gp_loss.config``, is defined in three modules, imports
going down: ``loading`` (files, overrides, the dict round trip), ``sections`` (the dataclasses
and their choices), ``rules`` (``ConfigError`` and the checks, some shared with the trainer, the
data loader and the protocol).
"""

from .loading import (apply_overrides, builtin_config_names, builtin_config_path,
                      config_from_dict, config_to_dict, load_config)
from .rules import STAGE_KEYS, ConfigError, check_fractions, check_stages
from .sections import (AUGMENTS, DEVICES, EXECUTOR_KINDS, INITIAL_FITNESS_KINDS, MODEL_ALIASES,
                       Config, ExecutorConfig, MutationConfig, SearchConfig, SurrogateConfig)

__all__ = ["AUGMENTS", "DEVICES", "EXECUTOR_KINDS", "INITIAL_FITNESS_KINDS", "MODEL_ALIASES",
           "STAGE_KEYS", "Config", "ConfigError", "ExecutorConfig", "MutationConfig",
           "SearchConfig", "SurrogateConfig", "apply_overrides", "builtin_config_names",
           "builtin_config_path", "check_fractions", "check_stages", "config_from_dict",
           "config_to_dict", "load_config"]
