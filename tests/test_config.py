"""Config loading, overrides, validation and the dict round trip (gp_loss.config)."""

import dataclasses
import json
from pathlib import Path

import pytest

from gp_loss.config import (Config, ConfigError, SurrogateConfig, apply_overrides,
                            builtin_config_names, builtin_config_path, config_from_dict,
                            config_to_dict, load_config)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_surrogate_defaults_are_the_documented_ones():
    cfg = Config()
    assert config_from_dict({}) == cfg
    assert dataclasses.asdict(SurrogateConfig()) == {
        "dataset": "digits", "data_root": "", "model": "tiny", "steps": 400,
        "batch_size": 64, "lr": 2e-3, "warmup_fraction": 0.1, "eval_every": 0,
        "train_fraction": 1.0, "val_fraction": 0.15, "test_fraction": 0.15, "split_seed": 0,
        "seed": 0, "prescreen_steps": 100, "prescreen_min_acc": 0.35, "midrun_step": 0,
        "midrun_min_acc": 0.22, "timeout_s": 0.0, "weight_decay": 0.0, "device": "auto",
            "image_size": 0, "augment": "none", "randaugment_ops": 2,
            "randaugment_magnitude": 5.0, "prescreen_separate": False,
            "prescreen_image_size": 0, "download": False, "amp": "auto", "compile": False}
    assert cfg.executor.kind == "serial" and cfg.search.phenotype_tolerance == 0.0


def test_builtin_configs_load_and_validate():
    assert {"quick", "paper"} <= set(builtin_config_names())
    quick = load_config(None)
    assert quick == load_config(REPO / "search_runs" / "quick.toml") == load_config("quick")
    assert builtin_config_path("quick.toml") == builtin_config_path("quick")
    assert quick.surrogate.dataset == "digits" and quick.executor.kind == "process"
    paper = load_config(REPO / "search_runs" / "paper.toml")
    s = paper.search
    assert (s.initial, s.population, s.tournament, s.children) == (1000, 100, 20, 4000)
    assert (s.phenotype_tolerance, s.max_retries, s.seed_with) == (0.01, 2500, ())
    sur = paper.surrogate
    assert (sur.dataset, sur.model, sur.image_size, sur.augment, sur.steps, sur.batch_size) == \
        ("cifar10", "resnet9v2", 80, "randaugment", 8000, 64)
    assert (sur.randaugment_ops, sur.randaugment_magnitude, sur.lr, sur.warmup_fraction) == \
        (2, 5.0, 1e-3, 0.1)
    assert (sur.prescreen_separate, sur.prescreen_steps, sur.prescreen_image_size,
            sur.prescreen_min_acc, sur.midrun_step, sur.midrun_min_acc) == \
        (True, 800, 32, 0.35, 800, 0.22)
    # the paper's seeding: 1000 scored at 32 px without augmentation, the best 100 re-scored
    cheap = paper.initial_surrogate()
    assert s.initial_fitness == "cheap" and paper.rescore_count() == 100
    assert (cheap.image_size, cheap.augment, cheap.batch_size, cheap.steps, cheap.model) == \
        (32, "none", 128, 8000, "resnet9v2")
    assert (cheap.prescreen_separate, cheap.prescreen_steps, cheap.prescreen_min_acc) == \
        (False, 600, 0.35)


def test_one_name_for_the_cpu_model():
    # `tiny` everywhere; `tinycnn` (the old name) is read as `tiny`, so both configs are
    # the same config: one cache key, one label
    quick = load_config(None)
    assert quick.surrogate.model == SurrogateConfig().model == "tiny"
    old = load_config(None, ["surrogate.model=tinycnn"])
    assert old == quick and config_to_dict(old)["surrogate"]["model"] == "tiny"
    stored = config_to_dict(quick)
    stored["surrogate"]["model"] = "tinycnn"
    assert config_from_dict(stored) == quick
    cheap = load_config(None, ["search.initial_fitness=cheap",
                               "search.initial_surrogate.model=tinycnn"])
    assert cheap.initial_surrogate().model == "tiny"
    assert load_config(None, ["surrogate.model=mlp"]).surrogate.model == "mlp"
    for path in sorted((REPO / "search_runs").glob("*.toml")):
        assert "tinycnn" not in path.read_text(encoding="utf-8"), path.name


def test_initial_surrogate_overrides_are_checked_and_only_apply_when_cheap():
    cfg = load_config(None, ["search.initial_surrogate.steps=7", "search.rescore=3"])
    assert cfg.initial_surrogate() == cfg.surrogate and cfg.rescore_count() == 0
    cheap = apply_overrides(cfg, ["search.initial_fitness=cheap"])
    assert cheap.initial_surrogate().steps == 7 and cheap.rescore_count() == 3
    assert apply_overrides(cheap, ["search.rescore=0"]).rescore_count() == cheap.search.population
    assert config_from_dict(config_to_dict(cheap)) == cheap
    for bad, needle in (("search.initial_surrogate.stepz=3", "'search.initial_surrogate.steps'"),
                        ("search.initial_surrogate.steps=0", "search.initial_surrogate: "),
                        ("search.initial_surrogate=5", "expected a table"),
                        ("search.initial_fitness=cheaper", "search.initial_fitness"),
                        ("search.rescore=-1", "search.rescore")):
        with pytest.raises(ConfigError, match=None) as err:
            apply_overrides(cheap, [bad])
        assert needle in str(err.value), (bad, str(err.value))


def test_overrides_apply_in_order_and_parse_toml_literals():
    cfg = load_config(None, ["search.population=50", "surrogate.lr=1e-3",
                             "search.population=7", 'search.seed_with=["ce", "focal"]',
                             "surrogate.dataset=digits", "search.mutation.node=2",
                             "executor.kind=serial"])
    assert cfg.search.population == 7
    assert cfg.surrogate.lr == 1e-3
    assert cfg.search.seed_with == ("ce", "focal")
    assert cfg.search.mutation.node == 2.0 and isinstance(cfg.search.mutation.node, float)
    assert cfg.executor.kind == "serial"
    # A bare word or an expression is a string; a list field takes one as a one-item list.
    one = apply_overrides(cfg, ["search.seed_with=neg(mul(y, log(p)))"])
    assert one.search.seed_with == ("neg(mul(y, log(p)))",)


def test_ints_are_accepted_for_floats_and_round_trip_is_exact(tmp_path):
    cfg = load_config(None, ["search.max_minutes=3", "surrogate.train_fraction=1"])
    assert cfg.search.max_minutes == 3.0 and isinstance(cfg.search.max_minutes, float)
    data = config_to_dict(cfg)
    assert config_from_dict(data) == cfg
    assert config_from_dict(json.loads(json.dumps(data))) == cfg
    assert data["search"]["seed_with"] == [] and data["search"]["mutation"]["node"] == 0.4


@pytest.mark.parametrize("override, needle", [
    ("search.populaton=5", "'search.population'"),
    ("serach.population=5", "'search'"),
    ("surrogate.datset=x", "'surrogate.dataset'"),
    ("search.mutation.nod=1", "'search.mutation.node'"),
])
def test_unknown_keys_are_named_with_a_suggestion(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, key, expected", [
    ("search.population=true", "search.population", "integer"),
    ("search.population=2.5", "search.population", "integer"),
    ("surrogate.lr=[1]", "surrogate.lr", "number"),
    ("surrogate.lr=true", "surrogate.lr", "number"),
    ("search.seed_with=[1, 2]", "search.seed_with", "list of non-empty strings"),
    ("search.mutation=3", "search.mutation", "table"),
])
def test_wrong_types_name_the_key_and_the_expected_type(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("search.population=0", "search.population"),
    ("search.tournament=0", "search.tournament"),
    ("search.children=-1", "search.children"),
    ("executor.workers=0", "executor.workers"),
    ("executor.kind=threads", "executor.kind"),
    ("surrogate.train_fraction=0", "surrogate.train_fraction"),
    ("surrogate.train_fraction=1.5", "surrogate.train_fraction"),
    ("surrogate.steps=0", "surrogate.steps"),
    ("surrogate.device=gpu", "surrogate.device"),
    ("search.mutation.node=-1", "search.mutation.node"),
    ("search.max_minutes=-1", "search.max_minutes"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_mutation_weights_need_a_positive_sum():
    zero = [f"search.mutation.{k}=0" for k in ("subtree", "node", "insert", "shrink")]
    with pytest.raises(ConfigError, match="search.mutation"):
        load_config(None, zero)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[search\npopulation = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[search]\npopulaton = 3\n")
    with pytest.raises(ConfigError, match=r"unknown.toml: unknown key 'search.populaton'"):
        load_config(unknown)
    partial = tmp_path / "partial.toml"
    partial.write_text("[surrogate]\nsteps = 7\n")
    assert load_config(partial).surrogate.steps == 7
    for item in ("search.population", "population=3", "=3"):
        with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
            load_config(partial, [item])
    with pytest.raises(ConfigError, match="no built-in config"):
        builtin_config_path("nope")


def test_a_missing_config_lists_the_built_ins_and_suggests_the_close_one():
    with pytest.raises(ConfigError) as err:
        load_config("paperr")
    msg = str(err.value)
    assert "not found: paperr" in msg and "did you mean 'paper'?" in msg
    assert f"built-in configs: {', '.join(builtin_config_names())}" in msg
    assert "paper_eliminate" not in msg  # elimination settings are not search configs
    with pytest.raises(ConfigError, match=r"not found: quik\.toml \(did you mean 'quick'\?\)"):
        load_config("quik.toml")
    with pytest.raises(ConfigError) as err:
        load_config("zzz")
    assert "did you mean" not in str(err.value) and "built-in configs: " in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'mnist5k'"):
        builtin_config_path("mnist5")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
