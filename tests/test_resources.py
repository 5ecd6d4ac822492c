"""Memory and time of the jobs that declare them (labelling, P(True), fine-tuning) and the slurm
profile's defaults: they grow with the attempt (the profile retries a failed job twice) up to the
config's `cluster:` caps, and a cap below a first request stops the run while the workflow is
parsed, naming the cap and the setting."""

from types import SimpleNamespace

import pytest
import yaml

from helpers import ROOT, workflow_rules

PROFILE = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
ATTEMPTS = (1, 2, 3)
MODEL = SimpleNamespace(model="smollm2-135m", split="train", relation="P17")
LORA = SimpleNamespace(model="smollm2-135m", recipe="lora", seed="", mixture="natural")


def requests(rules, rule, key, wildcards):
    request = rules[rule].resources[key]
    return [request(wildcards, attempt) for attempt in ATTEMPTS]


def extra_config(tmp_path, config: dict):
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_requests_grow_with_the_attempt_without_caps():
    # config/config.yaml: no caps; the embedded model's entry asks for the default 8000 MB, the
    # quickstart's lora recipe for 8000 MB and 60 minutes
    rules = workflow_rules()
    assert requests(rules, "label_questions", "mem_mb", MODEL) == [8000, 16000, 24000]
    assert requests(rules, "label_questions", "runtime", MODEL) == [240, 480, 720]
    assert requests(rules, "ptrue", "mem_mb", MODEL) == [8000, 16000, 24000]
    assert requests(rules, "ptrue", "runtime", MODEL) == [240, 480, 720]
    assert requests(rules, "finetune", "mem_mb", LORA) == [8000, 16000, 24000]
    assert requests(rules, "finetune", "runtime", LORA) == [60, 120, 180]


def test_requests_stop_at_the_caps(tmp_path):
    extra = extra_config(
        tmp_path,
        {
            "cluster": {"max_mem_mb": 20000, "max_runtime": 500},
            "models": {"smollm2-135m": {"mem_mb": 12000}},
            "recipes": {"lora": {"mem_mb": 20000, "runtime": 200}},
        },
    )
    rules = workflow_rules(extra)
    assert requests(rules, "label_questions", "mem_mb", MODEL) == [12000, 20000, 20000]
    assert requests(rules, "label_questions", "runtime", MODEL) == [240, 480, 500]
    assert requests(rules, "ptrue", "mem_mb", MODEL) == [12000, 20000, 20000]
    assert requests(rules, "ptrue", "runtime", MODEL) == [240, 480, 500]
    # a first request equal to the cap is allowed, and the retries get the same
    assert requests(rules, "finetune", "mem_mb", LORA) == [20000, 20000, 20000]
    assert requests(rules, "finetune", "runtime", LORA) == [200, 400, 500]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"cluster": {"max_mem_mb": 7000}},
            "config key 'cluster.max_mem_mb' is 7000, below the mem_mb that recipe 'lora' asks "
            "for on its first attempt (8000, recipes.lora.mem_mb)",
        ),
        (
            {"cluster": {"max_runtime": 59}},
            "config key 'cluster.max_runtime' is 59, below the runtime that recipe 'lora' asks "
            "for on its first attempt (60, recipes.lora.runtime)",
        ),
        (
            {"cluster": {"max_mem_mb": 10000}, "models": {"smollm2-135m": {"mem_mb": 12000}}},
            "config key 'cluster.max_mem_mb' is 10000, below the mem_mb that rule "
            "label_questions for model 'smollm2-135m' asks for on its first attempt (12000, "
            "models.smollm2-135m.mem_mb + (gpus - 1) x rank_mem_mb)",
        ),
        (
            {"cluster": {"max_runtime": 200}},
            "config key 'cluster.max_runtime' is 200, below the runtime that rule "
            "label_questions asks for on its first attempt (240, the runtime of rule "
            "label_questions in workflow/rules)",
        ),
    ],
    ids=["recipe-memory", "recipe-runtime", "model-memory", "rule-runtime"],
)
def test_a_cap_below_a_first_request_is_an_error_at_parse_time(tmp_path, config, message):
    with pytest.raises(Exception, match="cluster.max_") as err:
        workflow_rules(extra_config(tmp_path, config))
    assert message in str(err.value)


def test_the_memory_of_a_labelling_job_grows_with_its_processes(tmp_path):
    """One process per GPU: each further one adds its libraries (rank_mem_mb) to mem_mb."""
    extra = extra_config(
        tmp_path, {"models": {"smollm2-135m": {"gpus": 4, "mem_mb": 12000, "rank_mem_mb": 2500}}}
    )
    rules = workflow_rules(extra)
    for rule in ("label_questions", "ptrue"):
        assert requests(rules, rule, "mem_mb", MODEL) == [19500, 39000, 58500]


def test_a_model_that_does_not_run_is_not_checked_against_the_caps(tmp_path):
    """An entry left out of run_models schedules no job: its request may exceed the cap."""
    extra = extra_config(
        tmp_path,
        {
            "cluster": {"max_mem_mb": 100000},
            "models": {"big": {"path": "/nowhere", "mem_mb": 160000}},
            "run_models": ["smollm2-135m"],
        },
    )
    rules = workflow_rules(extra)
    assert requests(rules, "label_questions", "mem_mb", MODEL) == [8000, 16000, 24000]


def test_profile_defaults_grow_with_the_attempt():
    """The profile's default-resources, evaluated as Snakemake does (a Python expression with
    `attempt`), for the rules that declare neither."""
    defaults = PROFILE["default-resources"]
    assert [eval(str(defaults["mem_mb"]), {"attempt": a}) for a in ATTEMPTS] == [4000, 8000, 12000]
    assert [eval(str(defaults["runtime"]), {"attempt": a}) for a in ATTEMPTS] == [60, 120, 180]
