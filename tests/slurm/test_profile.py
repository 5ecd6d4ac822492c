"""The slurm profile, read as a file (no cluster needed; runs in `make test`): the settings the
workflow relies on, placeholders marked, every entry commented, every GPU rule covered."""

import re
from pathlib import Path

import yaml

from helpers import workflow_rules

ROOT = Path(__file__).resolve().parents[2]
PROFILE_FILE = ROOT / "profiles/slurm/config.yaml"
PROFILE = yaml.safe_load(PROFILE_FILE.read_text())


def test_slurm_symlink_points_to_the_profile():
    assert (ROOT / "slurm").is_symlink()
    assert (ROOT / "slurm").resolve() == PROFILE_FILE.parent


def test_cluster_settings():
    assert PROFILE["executor"] == "slurm"
    assert PROFILE["jobs"] >= 1 and PROFILE["latency-wait"] >= 5
    assert PROFILE["retries"] >= 1 and PROFILE["keep-going"] is True
    assert PROFILE["slurm-logdir"] == "logs/slurm" and PROFILE["slurm-keep-successful-logs"] is True
    assert PROFILE["slurm-status-command"] == "squeue"
    defaults = PROFILE["default-resources"]
    assert "attempt" in defaults["mem_mb"]  # memory grows with each retry
    assert "attempt" in defaults["runtime"]  # and the time limit
    assert defaults["slurm_partition"] == "'cpu'"
    assert not {"tasks", "mpi", "gpu", "gres"} & set(defaults)


def test_every_gpu_rule_asks_for_its_gpus_on_the_gpu_partition():
    """The GPU rules declare their own GPU count (the model entry's `gpus`, the recipe's
    processes); the profile sends them to the GPU partition without --ntasks-per-gpu and sets
    no count that would replace theirs."""
    rules = workflow_rules()
    declared = {name for name, rule in rules.items() if "gpu" in rule.resources}
    assert declared == {"prepare_model", "label_questions", "ptrue", "finetune"}
    entries = PROFILE["set-resources"]
    assert set(entries) == declared
    for rule in declared:
        assert entries[rule] == {"slurm_partition": "'gpu'", "tasks_per_gpu": 0}, rule
        # Memory grows with the attempt in the rule itself (set-resources does not set it).
        mem = rules[rule].resources["mem_mb"]
        assert callable(mem), f"{rule}: mem_mb={mem}"
        assert mem.__qualname__.startswith(("model_mem_mb.", "recipe_mem_mb", "prepare_mem_mb")), (
            rule
        )
    for rule in ("prepare_model", "label_questions", "ptrue"):
        assert rules[rule].resources["gpu"].__qualname__ == "model_gpus", rule
    for key in ("gpu", "nodes", "mpi", "tasks"):
        assert rules["finetune"].resources[key].__qualname__.startswith("recipe_"), key


def test_downloads_are_local_rules():
    local = {name for name, rule in workflow_rules().items() if rule.local}
    assert {"download_entity_questions", "fetch_model"} <= local
    assert "prepare_model" not in local  # it loads the whole model: a job


def test_placeholders_marked_and_every_entry_commented():
    lines = PROFILE_FILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert lines[i - 1].lstrip().startswith("#"), f"entry without a comment: {line!r}"
        if re.search(r"'(my_account|cpu|gpu)'", line):
            assert "PLACEHOLDER" in lines[i - 1], f"placeholder not marked: {line!r}"
    # The header says how to set them.
    assert "BEFORE THE FIRST RUN" in PROFILE_FILE.read_text()


def test_default_profile_holds_no_cluster_settings():
    default = ROOT / "profiles/default"
    for f in default.glob("*.yaml") if default.exists() else []:
        settings = yaml.safe_load(f.read_text()) or {}
        assert not {"executor", "default-resources", "set-resources"} & set(settings), f


def test_gpu_counts_follow_the_model_entry_and_the_recipe(tmp_path):
    """Labelling asks for the model entry's `gpus`. The finetune rule's resources for a recipe
    on 2 nodes x 4 GPUs, through the slurm
    plugin's own sbatch builder with the profile's set-resources: --gpus=8 --nodes=2 and one
    task per node with all its cores; an `mpi` job, so the plugin starts no srun of its own."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    extra = tmp_path / "big.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "recipes": {
                    "big": {
                        "method": "full",
                        "distributed": {"strategy": "fsdp", "nproc_per_node": 4, "nodes": 2},
                    }
                },
                "engine": {"threads": 2},
                "models": {"smollm2-135m": {"gpus": 4}},
            }
        )
    )
    rules = workflow_rules(extra)
    for rule in ("label_questions", "ptrue"):  # the model entry's GPUs
        assert rules[rule].resources["gpu"](SimpleNamespace(model="smollm2-135m")) == 4
    rule = rules["finetune"]
    wildcards = SimpleNamespace(recipe="big", model="m", seed="", mixture="natural")
    values = {
        key: (value(wildcards, 1) if key in ("mem_mb", "runtime", "attempt") else value(wildcards))
        if callable(value)
        else value
        for key, value in rule.resources.items()
        if key not in ("_cores", "_nodes", "tmpdir")
    }
    assert {k: values[k] for k in ("gpu", "nodes", "mpi", "tasks")} == {
        "gpu": 8,
        "nodes": 2,
        "mpi": "srun",
        "tasks": 2,
    }
    resources = {
        **values,
        **{
            k: eval(v) if isinstance(v, str) else v
            for k, v in PROFILE["set-resources"]["finetune"].items()
        },
    }

    class Resources(dict):
        __getattr__ = dict.__getitem__

    job = SimpleNamespace(resources=Resources(resources), threads=2 * 4)
    params = {
        "run_uuid": "x", "slurm_logfile": "l", "comment_str": "c", "account": "-A a",
        "partition": "-p gpu", "workdir": "/w",
    }  # fmt: skip
    call = get_submit_command(job, params) + set_gres_string(job)  # as the plugin builds it
    for flag in ("--nodes=2", "--gpus=8", "--ntasks=2", "--cpus-per-task=8"):
        assert f" {flag}" in call, call
    assert "--ntasks-per-gpu" not in call, call
