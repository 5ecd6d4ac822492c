import copy

import pytest
import yaml

from eqtools.config import ConfigError, load_schema, validate_config
from helpers import ROOT, tiny_config

SCHEMA = load_schema(ROOT / "workflow/schemas/config.schema.yaml")


def quickstart():
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def test_quickstart_and_paper_configs_are_valid():
    config = validate_config(quickstart(), copy.deepcopy(SCHEMA))
    assert config["models"]["smollm2-135m"]["device"] == "auto"
    paper = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    merged = quickstart()
    merged["subsample"] = paper["subsample"]
    assert validate_config(merged, SCHEMA)["subsample"]["max_per_relation"]["train"] is None


def test_defaults_are_filled_in():
    config = tiny_config()
    del config["dataset"]
    config["dataset"] = {"source": "x.zip"}
    validate_config(config, SCHEMA)
    assert config["dataset"] == {"source": "x.zip", "sha256": None, "timeout_s": 60}
    assert config["models"]["smollm2-135m"]["dtype"] == "float32"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"datset": {"source": "x"}},
            "config key '<top level>': Additional properties are not allowed ('datset'",
        ),
        (
            {"subsample": {"seed": "one"}},
            "config key 'subsample.seed': 'one' is not of type 'integer'",
        ),
        (
            {"subsample": {"max_per_relation": {"train": 0}}},
            "config key 'subsample.max_per_relation.train': 0 is less than the minimum of 1",
        ),
        (
            {"subsample": {"max_per_relation": {"trian": 3}}},
            "config key 'subsample.max_per_relation'",
        ),
        ({"dataset": {"sha256": "abc"}}, "config key 'dataset.sha256': 'abc' does not match"),
        (
            {"relations": {"in_distribution": ["P17", "Q5"]}},
            "config key 'relations.in_distribution.1': 'Q5' does not match",
        ),
        (
            {"relations": {"in_distribution": ["P17", "P99"]}},
            "config key 'relations.in_distribution': relation P99 has no entry in 'templates'",
        ),
        ({"relations": {"out_of_distribution": ["P17"]}}, "P17 listed as both"),
        (
            {"models": {"smollm2-135m": {"dtype": "fp8"}}},
            "config key 'models.smollm2-135m.dtype': 'fp8' is not one of",
        ),
        ({"models": {"smollm2-135m": {"path": "/x"}}}, "give exactly one of 'path'"),
        (
            {"models": {"bad name": {"path": "/x"}}},
            "config key 'models': 'bad name' does not match",
        ),
        ({"templates": {"P17": "no placeholder"}}, "config key 'templates.P17'"),
        (
            {"recipes": {"lora": {"distributed": {"nproc_per_node": 2}}}},
            "config key 'recipes.lora.distributed': 2 process(es) per node on 1 node(s) need a "
            "strategy (ddp or fsdp), not none",
        ),
        (
            {"recipes": {"lora": {"distributed": {"strategy": "deepspeed"}}}},
            "config key 'recipes.lora.distributed.strategy': 'deepspeed' is not one of",
        ),
        (
            {"run_models": ["smollm2-135m", "llama-8b"]},
            "config key 'run_models': 'llama-8b' is not a key of 'models' (smollm2-135m)",
        ),
        ({"cluster": {"max_mem_mb": 0}}, "config key 'cluster.max_mem_mb': 0 is less than"),
        ({"cluster": {"max_runtme": 60}}, "config key 'cluster': Additional properties"),
        (
            {"models": {"smollm2-135m": {"mem_mb": "lots"}}},
            "config key 'models.smollm2-135m.mem_mb': 'lots' is not of type 'integer'",
        ),
        (
            {"recipes": {"lora": {"distributed": {"nodes": 0}}}},
            "config key 'recipes.lora.distributed.nodes': 0 is less than the minimum of 1",
        ),
        (
            {"finetune": {"state_dir": "/proc/version/states"}},
            "config key 'finetune.state_dir': '/proc/version/states' is not a directory",
        ),
        (
            {"recipes": {"lora": {"checkpoint_dtype": "float16"}}},
            "config key 'recipes.lora.checkpoint_dtype': 'float16' is not one of",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(tiny_config(**override), SCHEMA)
    assert message in str(err.value)


def test_run_models_and_caps_default_to_every_model_and_no_cap():
    config = tiny_config(models={"other": {"path": "/x"}})
    validate_config(config, SCHEMA)
    assert config["run_models"] == ["smollm2-135m", "other"]
    assert config["cluster"] == {"max_runtime": None, "max_mem_mb": None}
    assert config["models"]["other"]["mem_mb"] == 8000


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate_config(tiny_config(subsample={"seed": "x"}, dataset={"timeout_s": -1}), SCHEMA)
    assert "subsample.seed" in str(err.value) and "dataset.timeout_s" in str(err.value)


def command_line(text: str) -> dict:
    """A `--config key={...}` value as Snakemake hands it over: read with YAML's BaseLoader,
    every scalar a string."""
    return yaml.load(text, Loader=yaml.BaseLoader)


def test_overrides_from_the_command_line_are_read_as_in_a_file():
    config = tiny_config(
        finetune=command_line("{seeds: [1, 2], eval_every: {test: 2}, keep_weights: false}"),
        recipes={"lora": command_line("{learning_rate: 1e-4, checkpoint_dtype: null}")},
        subsample=command_line("{max_per_relation: {train: 5, dev: null}}"),
        slick=command_line("{temperature: 0.7, full_p_correct: true}"),
    )
    validate_config(config, SCHEMA)
    assert config["finetune"]["seeds"] == [1, 2]
    assert config["finetune"]["eval_every"]["test"] == 2
    assert config["finetune"]["keep_weights"] is False
    assert config["recipes"]["lora"]["learning_rate"] == 1e-4
    assert config["recipes"]["lora"]["checkpoint_dtype"] is None
    assert config["subsample"]["max_per_relation"] == {
        **config["subsample"]["max_per_relation"],
        "train": 5,
        "dev": None,
    }
    assert config["slick"]["temperature"] == 0.7 and config["slick"]["full_p_correct"] is True


def test_a_string_the_schema_accepts_stays_a_string_and_a_wrong_one_is_still_an_error():
    config = tiny_config(models={"smollm2-135m": command_line("{dtype: float32}")})
    validate_config(config, SCHEMA)
    assert config["models"]["smollm2-135m"]["dtype"] == "float32"
    with pytest.raises(ConfigError, match="'finetune.seeds.0': 'one' is not of type 'integer'"):
        validate_config(tiny_config(finetune=command_line("{seeds: [one]}")), SCHEMA)
