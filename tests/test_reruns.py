"""Incremental reruns: after one change, exactly the affected jobs rerun.

They run on the session's tiny study (tests/tiny_study.py): its labelling stage was killed on
purpose and completed with `--rerun-incomplete`, and the finished state it leaves is the start
of every test here. Each change is checked with a dry run (`--summary`: one line per output file
with "update pending" or "no update") and undone before the next test.

The expected set of a change is computed, not listed by hand: the outputs of the jobs the
change touches directly, plus everything downstream of them, following the input files each
output was made from (`--detailed-summary`, from .snakemake/metadata). Tables and figures
rules added later are covered without editing this file.
"""

import copy
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
from tiny_study import ADDED_MODULE, file_times

from eqtools.codehash import code_modules
from helpers import ROOT, snakemake, workflow_rules, write_config

pytestmark = pytest.mark.workflow

UPSTREAM_OF_LABELS = {
    "download_entity_questions",
    "prepare_splits",
    "fetch_model",
    "prepare_model",
    "select_exemplars",
}


# ---------------------------------------------------------------------------------------------
# Reading snakemake's plan


def summary(work: Path, config: dict, *extra: str, detailed: bool = False) -> list[dict]:
    """`snakemake --summary` (or --detailed-summary) rows as dicts, for `config`."""
    cfg = write_config(work, config, "config.dry.yaml")
    flag = "--detailed-summary" if detailed else "--summary"
    out = snakemake(work, flag, *extra, configfile=cfg, snakefile=work / "Snakefile").stdout
    lines = [x for x in out.splitlines() if "\t" in x]
    header = lines[0].split("\t")
    assert header[0] == "output_file" and header[-1] == "plan", out
    return [dict(zip(header, x.split("\t"), strict=True)) for x in lines[1:]]


def pending(work: Path, config: dict, cross_check: bool = False) -> dict[str, str]:
    """{output file: rule} of the jobs a run with `config` would (re)run. `cross_check`: also
    ask `snakemake -n` and check that it runs the same rules (a second snakemake process, about
    5 s: done for one change of each kind)."""
    rows = summary(work, config)
    plan = {r["output_file"]: r["rule"] for r in rows if r["plan"] == "update pending"}
    assert {r["plan"] for r in rows} <= {"update pending", "no update"}
    if not cross_check:
        return plan
    cfg = write_config(work, config, "config.dry.yaml")
    dry = snakemake(work, "-n", "--quiet", "rules", configfile=cfg, snakefile=work / "Snakefile")
    assert set(plan.values()) == set(job_stats(dry.stdout + dry.stderr)) - {"all"}, dry.stdout
    return plan


def job_stats(output: str) -> dict[str, int]:
    """{rule: count} of the first "Job stats" table in snakemake's output ({} when none)."""
    match = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal\s+\d+", output, re.S)
    if match is None:
        assert "Nothing to be done" in output, output
        return {}
    return {rule: int(n) for rule, n in (line.split() for line in match.group(1).splitlines())}


def downstream(graph: dict[str, set[str]], seeds: set[str]) -> set[str]:
    """`seeds` and every output made (directly or not) from one of them."""
    users: dict[str, set[str]] = {}
    for output, inputs in graph.items():
        for i in inputs:
            users.setdefault(i, set()).add(output)
    seen, todo = set(), list(seeds)
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += users.get(f, ())
    return seen


def outputs_of(state, rule: str, where=lambda path: True) -> set[str]:
    found = {f for f, r in state["rules"].items() if r == rule and where(f)}
    assert found, f"no outputs of {rule}"
    return found


# ---------------------------------------------------------------------------------------------
# Which rules a module's code hash reaches (derived from the imports, as common.smk does)


def rules_hashing(module: str, root: Path = ROOT) -> set[str]:
    package = root / "workflow/scripts/eqtools"
    return {
        rule.name
        for rule in workflow_rules().values()
        if rule.script
        and module in code_modules(root / "workflow/scripts" / rule.script.name, package)
    }


# ---------------------------------------------------------------------------------------------
# The finished state: the tiny study


@pytest.fixture(scope="module")
def state(tiny_study):
    rows = summary(tiny_study.work, tiny_study.config, detailed=True)
    assert {r["plan"] for r in rows} == {"no update"}, rows
    return {
        "work": tiny_study.work,
        "config": tiny_study.config,
        "cfg": tiny_study.cfg,
        "graph": {r["output_file"]: set(r["input-file(s)"].split(",")) - {"-"} for r in rows},
        "rules": {r["output_file"]: r["rule"] for r in rows},
        "killed": tiny_study.killed,
        "resumed": tiny_study.resumed,
        "resumed_times": tiny_study.resumed_times,
    }


def changed(state) -> dict:
    """A copy of the study's config to change."""
    return copy.deepcopy(state["config"])


def expect(state, seeds: set[str]) -> dict[str, str]:
    return {f: state["rules"][f] for f in downstream(state["graph"], seeds)}


@contextmanager
def edited(path: Path, append: str):
    """Append to a file, then restore its bytes and its mtime (Snakemake compares a rule
    script's mtime with its outputs')."""
    text, st = path.read_bytes(), path.stat()
    path.write_bytes(text + append.encode())
    try:
        yield
    finally:
        path.write_bytes(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------------------------------------
# The tests


def test_interrupted_run_resumes_without_losing_finished_jobs(state):
    work, killed, resumed = state["work"], state["killed"], state["resumed"]
    incomplete = killed["incomplete"]
    finished = {
        f: t for f, t in killed["times"].items() if f not in incomplete and f in state["rules"]
    }
    assert incomplete, "the kill came after every started job had finished"
    assert sum("/chunks/" in f for f in finished) >= 2
    # Right after the resumed run (the study then rewrites the train labels on purpose, which
    # would count as a change where train's merge had finished before the kill)
    now = state["resumed_times"]
    # Every output that was complete at the kill is untouched; every incomplete one was remade.
    assert {f for f, t in finished.items() if now.get(f) != t} == set()
    for f in incomplete:
        assert (work / f).exists() and (f not in now or now[f] != killed["times"].get(f)), f
    # The resumed run ran only what was missing: none of the finished labelling jobs, and
    # nothing upstream of them.
    stats = job_stats(resumed)
    n_chunks = sum(r == "label_questions" for r in state["rules"].values())
    n_done = sum("/chunks/" in f for f in finished)
    assert stats["label_questions"] == n_chunks - n_done
    assert not set(stats) & UPSTREAM_OF_LABELS
    assert "incomplete" in resumed.lower()


def test_second_run_with_nothing_changed_does_nothing(state):
    work = state["work"]
    before = file_times(work)
    proc = snakemake(work, configfile=state["cfg"], snakefile=work / "Snakefile")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert file_times(work) == before
    assert pending(work, state["config"], cross_check=True) == {}


@pytest.mark.parametrize(
    ("key", "value"),
    [("learning_rate", 2.0e-3), ("eval_dtype", "bfloat16")],  # eval_dtype changes answers
)
def test_a_recipe_setting_reruns_that_recipes_finetunes_and_downstream(state, key, value):
    config = changed(state)
    config["recipes"]["lora"][key] = value
    plan = pending(state["work"], config, cross_check=True)
    lora = outputs_of(state, "finetune", lambda f: "/tiny/lora/" in f)
    assert plan == expect(state, lora)
    assert "finetune" in set(plan.values())
    assert not [f for f in plan if "/lora_b/" in f]  # the other recipe
    assert not {"build_mixture", "label_questions", "merge_labels", "ptrue"} & set(plan.values())


def test_mixture_definition_reruns_only_that_mixtures_jobs_and_downstream(state):
    # A mixture is defined by its name: replacing `unknown` (D_Unknown) by `highly_known`
    # builds and fine-tunes the new mixture and redoes what aggregates both.
    config = changed(state)
    names = config["mixtures"]["names"]
    config["mixtures"]["names"] = [("highly_known" if m == "unknown" else m) for m in names]
    plan = pending(state["work"], config, cross_check=True)
    new = {f: r for f, r in plan.items() if f not in state["rules"]}
    redone = {f: r for f, r in plan.items() if f in state["rules"]}
    for path in (
        "results/mixtures/tiny/highly_known.parquet",
        "results/finetune/tiny/lora/highly_known/metrics.jsonl",
        "results/finetune/tiny/lora_b/highly_known/metrics.jsonl",
        "results/eval/tiny/lora/highly_known/early_stop/test.parquet",
        "results/eval/tiny/lora_b/highly_known/convergence/ood_test.parquet",
    ):
        assert path in new
    per_mixture = {"build_mixture", "finetune"}
    for f, rule in new.items():
        assert "highly_known" in f or rule not in per_mixture, f
    # Existing outputs redone: only aggregates over mixtures that read the replaced one.
    replaced = outputs_of(state, "build_mixture", lambda f: f.endswith("/unknown.parquet"))
    assert set(redone) <= downstream(state["graph"], replaced)
    assert not per_mixture & set(redone.values())
    assert not [f for f in plan if "/natural/" in f or f.endswith("/natural.parquet")]
    assert not {"label_questions", "merge_labels", "ptrue", "prepare_splits"} & set(plan.values())


def test_labelling_parameter_reruns_labels_and_downstream_nothing_upstream(state):
    config = changed(state)
    config["slick"]["n_samples"] = 2
    plan = pending(state["work"], config, cross_check=True)
    assert plan == expect(state, outputs_of(state, "label_questions"))
    assert {"label_questions", "merge_labels", "build_mixture", "finetune", "ptrue"} <= set(
        plan.values()
    )
    assert not UPSTREAM_OF_LABELS & set(plan.values())


@pytest.mark.parametrize("module", ["mixtures", "em", ADDED_MODULE])
def test_editing_a_shared_module_reruns_the_rules_that_import_it(state, module):
    """The rules whose scripts reach the module, directly or through other eqtools modules,
    rerun, with everything downstream. For ADDED_MODULE, imported only by the copy's
    eqtools.mixtures, those are the rules that reach mixtures: adding an import is enough."""
    users = rules_hashing(module, state["work"])
    if module == ADDED_MODULE:
        assert users == rules_hashing("mixtures") and "build_mixture" in users
    assert users
    with edited(state["work"] / f"workflow/scripts/eqtools/{module}.py", "\n# edited\n"):
        plan = pending(state["work"], state["config"], cross_check=module == "mixtures")
    seeds = set().union(*(outputs_of(state, r) for r in users if r in state["rules"].values()))
    assert plan == expect(state, seeds)
    if module == "mixtures":  # build_mixture and the tables (eqtools.analysis imports it)
        assert "build_mixture" in users
        assert not {"label_questions", "merge_labels", "ptrue"} & set(plan.values())
    assert not {"download_entity_questions", "prepare_splits", "prepare_model"} & set(plan.values())


def test_editing_a_rule_script_reruns_that_rule_and_downstream(state):
    with edited(state["work"] / "workflow/scripts/merge_labels.py", "\n# edited\n"):
        plan = pending(state["work"], state["config"])
    assert plan == expect(state, outputs_of(state, "merge_labels"))
    assert not ({"label_questions"} | UPSTREAM_OF_LABELS) & set(plan.values())


@pytest.mark.parametrize(
    "path",
    [
        "README.md",
        "tests/test_mixtures.py",
        "workflow/scripts/eqtools/provenance.py",
        "workflow/scripts/eqtools/io.py",
        "workflow/scripts/eqtools/unused_module.py",  # a module no script reaches
    ],
)
def test_editing_docs_tests_or_bookkeeping_reruns_nothing(state, path):
    (state["work"] / path).touch()
    with edited(state["work"] / path, "\n# edited\n"):
        assert pending(state["work"], state["config"]) == {}


@pytest.mark.parametrize(
    ("section", "setting"),
    [
        ("recipes.lora", {"mem_mb": 64000, "runtime": 999}),  # after an OOM kill or a time-out
        ("recipes.lora", {"micro_batch_size": 1}),
        ("recipes.lora", {"distributed": {"strategy": "fsdp", "nproc_per_node": 4, "nodes": 2}}),
        (
            "recipes.lora",
            {
                "distributed": {
                    "strategy": "ddp",
                    "nproc_per_node": 2,
                    "activation_checkpointing": True,
                }
            },
        ),
        ("models.tiny", {"gpus": 4}),
        ("models.tiny", {"gpus": 2, "multi_gpu": "device_map"}),
        ("models.tiny", {"mem_mb": 160000}),
        ("cluster", {"max_mem_mb": 64000, "max_runtime": 1000}),
        # disk: the resumable states on scratch, saved less often, the weights dropped
        ("finetune", {"state_dir": "scratch/states", "save_every": 5, "keep_weights": False}),
        ("models.tiny", {"device": "cpu"}),  # where the model runs, not what it computes
        ("models.tiny", {"device": "cuda"}),
    ],
    ids=[
        "memory-runtime",
        "micro-batch",
        "fsdp-2-nodes",
        "ddp-checkpointing",
        "model-gpus",
        "model-gpus-device-map",
        "model-memory",
        "cluster-caps",
        "finetune-disk",
        "model-device-cpu",
        "model-device-cuda",
    ],
)
def test_scheduling_settings_rerun_nothing(state, section, setting):
    """After a time-out or an out-of-memory kill a user raises runtime or mem_mb, or spreads a
    fine-tune over more processes and nodes, or a model over more GPUs: nothing that finished
    reruns. The engine's settings only schedule work too."""
    config = changed(state)
    target = config
    for key in section.split("."):
        target = target.setdefault(key, {})
    target.update(setting)
    config["engine"] = {"threads": 2, "max_batch_rows": 3, "backend": "reference"}
    assert pending(state["work"], config) == {}


def test_selecting_models_reruns_nothing_for_the_models_kept(state):
    """A second registry entry joins the study's model (as config.yaml's embedded model stays
    beside a user's own, the files merging key by key); run_models keeps the study's model
    only: nothing reruns. Without the selection only the other model's study (and the
    comparison of the two) would be new."""
    config = changed(state)
    config["models"]["other"] = dict(config["models"]["tiny"])
    config["run_models"] = ["tiny"]
    assert pending(state["work"], config, cross_check=True) == {}
    del config["run_models"]
    plan = pending(state["work"], config)
    new = [
        f for f in plan if {"other", "comparison"} & {part.split(".")[0] for part in f.split("/")}
    ]
    assert "resources/models/other" in new and "results/labels/other/train.parquet" in new
    assert set(plan) == set(new), plan


# ---------------------------------------------------------------------------------------------
# A model is identified by its files' content, not by their directory


def model_path(state) -> Path:
    return Path(state["config"]["models"]["tiny"]["path"])


@contextmanager
def moved_model(state):
    """The tiny model's directory moved elsewhere (as `mv` does: names, sizes, mtimes kept) and
    the config pointing there; afterwards moved back and staged again, as the study had it."""
    old = model_path(state)
    new = old.rename(old.with_name(old.name + "-moved"))
    config = changed(state)
    config["models"]["tiny"]["path"] = str(new)
    try:
        yield config
    finally:
        new.rename(old)
        snakemake(state["work"], configfile=state["cfg"], snakefile=state["work"] / "Snakefile")


@pytest.mark.e2e  # make test-e2e: keeps make test within its time
def test_moving_the_model_directory_reruns_only_its_staging(state):
    work = state["work"]
    with moved_model(state) as config:
        assert set(pending(work, config, cross_check=True).values()) == {"fetch_model"}
        # the links into the moved directory dangle: not listed
        before = {
            f: t
            for f, t in file_times(work).items()
            if not f.startswith("resources/models/tiny.source")
        }
        cfg = write_config(work, config, "config.moved.yaml")
        run = snakemake(work, configfile=cfg, snakefile=work / "Snakefile")
        assert set(job_stats(run.stdout + run.stderr)) - {"all"} == {"fetch_model"}
        after = file_times(work)
        assert {f: after.get(f) for f in before} == before  # every result, identity.json too
        assert "resources/models/tiny.identity.json" in before
        # the model loads from the new place: its links, through the staged ones, lead there
        assert (work / "resources/models/tiny/model.safetensors").resolve().parent == Path(
            config["models"]["tiny"]["path"]
        ).resolve()
        assert pending(work, config) == {}
        # the sidecar of the staged directory records where the weights are now
        prov = json.loads((work / "resources/models/tiny.source.prov.json").read_text())
        assert prov["config"]["source"] == config["models"]["tiny"]["path"]
    assert pending(work, state["config"]) == {}


@pytest.mark.e2e  # make test-e2e: keeps make test within its time
def test_preparing_the_same_weights_again_reruns_nothing(state):
    """identity.json is rewritten with the same bytes: Snakemake's input checksum of it is
    unchanged, and the model directory itself is an ancient input."""
    work = state["work"]
    identity = work / "resources/models/tiny.identity.json"
    before = identity.stat().st_mtime_ns
    run = snakemake(  # the target first: --forcerun takes several values
        work,
        str(identity.relative_to(work)),
        "--forcerun",
        "prepare_model",
        configfile=state["cfg"],
        snakefile=work / "Snakefile",
    )
    assert set(job_stats(run.stdout + run.stderr)) == {"prepare_model"}
    assert identity.stat().st_mtime_ns != before
    assert pending(work, state["config"], cross_check=True) == {}


def test_other_weights_rerun_the_model_and_everything_downstream(state):
    weights = model_path(state) / "model.safetensors"
    data, st = weights.read_bytes(), weights.stat()
    changed_weights = bytearray(data)
    changed_weights[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(changed_weights))
    try:
        plan = pending(state["work"], state["config"], cross_check=True)
    finally:
        weights.write_bytes(data)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert plan == expect(state, outputs_of(state, "prepare_model"))
    assert {"prepare_model", "label_questions", "merge_labels", "finetune", "ptrue"} <= set(
        plan.values()
    )
    assert "fetch_model" not in plan.values()
    assert pending(state["work"], state["config"]) == {}
