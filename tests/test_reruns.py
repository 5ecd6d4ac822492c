"""Incremental reruns: after one change, exactly the affected jobs rerun.

The tiny workflow runs once per module, in a temporary copy of the workflow (Snakefile,
workflow/, envs/, plus README.md and a test file to edit), so code edits never touch the
repository. That run is interrupted on purpose (SIGKILL of the snakemake process group while
jobs are running) and completed with `--rerun-incomplete`; the finished state it leaves is the
start of every other test. Each change is checked with a dry run (`--summary`: one line per
output file with "update pending" or "no update") and undone before the next test.

The expected set of a change is computed, not listed by hand: the outputs of the jobs the
change touches directly, plus everything downstream of them, following the input files each
output was made from (`--detailed-summary`, from .snakemake/metadata). Tables and figures
rules added later are covered without editing this file.
"""

import base64
import os
import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from eqtools.codehash import code_modules
from helpers import ROOT, snakemake, snakemake_command, tiny_config, workflow_rules, write_config

pytestmark = pytest.mark.workflow

UPSTREAM_OF_LABELS = {
    "download_entity_questions",
    "prepare_splits",
    "prepare_model",
    "select_exemplars",
}


def rerun_config(model_dir: Path) -> dict:
    """Two recipes and two mixtures (so that "only this one" means something), three relations."""
    config = tiny_config(
        relations={"in_distribution": ["P17", "P36"], "out_of_distribution": ["P50"]},
        subsample={"max_per_relation": {"train": 6, "test": 3, "ood_test": 2}},
        slick={"max_new_tokens": 3},
        mixtures={"names": ["natural", "unknown"]},
        finetune={"recipes": ["lora", "lora_b"]},
    )
    config["recipes"]["lora_b"] = dict(config["recipes"]["lora"], learning_rate=5.0e-4)
    config["models"] = {"tiny": {"path": str(model_dir)}}
    return config


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
    return [dict(zip(header, x.split("\t"))) for x in lines[1:]]


def pending(work: Path, config: dict) -> dict[str, str]:
    """{output file: rule} of the jobs a run with `config` would (re)run; cross-checked against
    the rules of `snakemake -n`."""
    rows = summary(work, config)
    plan = {r["output_file"]: r["rule"] for r in rows if r["plan"] == "update pending"}
    assert {r["plan"] for r in rows} <= {"update pending", "no update"}
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


# A module the `state` fixture adds to its copy of the workflow, imported by eqtools.mixtures
# only: no rule lists it anywhere, so only the derived code hashes can know who depends on it.
ADDED_MODULE = "added_dependency"


# ---------------------------------------------------------------------------------------------
# The finished state: one interrupted and resumed run


def incomplete_outputs(work: Path) -> set[str]:
    """The outputs snakemake has marked incomplete (.snakemake/incomplete/<urlsafe b64 path>,
    long names split into directories whose names start with '@')."""
    base = work / ".snakemake/incomplete"
    found = set()
    for path in base.rglob("*"):
        if path.is_file() and path.name != "migration_underway":
            parts = [p.removeprefix("@") for p in path.relative_to(base).parts]
            found.add(base64.urlsafe_b64decode("".join(parts)).decode())
    return found


def file_times(work: Path) -> dict[str, int]:
    return {
        p.relative_to(work).as_posix(): p.stat().st_mtime_ns
        for top in ("results", "resources")
        if (work / top).exists()
        for p in (work / top).rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def state(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("reruns")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copy2(ROOT / "Snakefile", work / "Snakefile")
    for d in ("workflow", "envs"):
        shutil.copytree(ROOT / d, work / d, ignore=ignore)
    shutil.copy2(ROOT / "README.md", work / "README.md")
    (work / "tests").mkdir()
    shutil.copy2(ROOT / "tests/test_mixtures.py", work / "tests/test_mixtures.py")
    eqtools = work / "workflow/scripts/eqtools"
    (eqtools / f"{ADDED_MODULE}.py").write_text("VALUE = 1\n")
    mixtures = eqtools / "mixtures.py"
    mixtures.write_text(
        mixtures.read_text() + f"\nfrom eqtools import {ADDED_MODULE}  # noqa: E402, F401\n"
    )
    config = rerun_config(tiny_model_dir)
    cfg = write_config(work, config)

    # Run until some labelling jobs have finished while others are still running, then kill
    # snakemake and its jobs at once.
    with open(work / "interrupted.log", "w") as log:
        proc = subprocess.Popen(
            snakemake_command(configfile=cfg, snakefile=work / "Snakefile"),
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        chunks = work / "results/labels/tiny/chunks"
        deadline = time.monotonic() + 600
        try:
            while True:
                assert proc.poll() is None, (work / "interrupted.log").read_text()
                assert time.monotonic() < deadline, "no labelling job finished in 600 s"
                done = (
                    {p.relative_to(work).as_posix() for p in chunks.rglob("*.parquet")}
                    if chunks.exists()
                    else set()
                )
                if len(done - incomplete_outputs(work)) >= 2 and incomplete_outputs(work):
                    break
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed = {"incomplete": incomplete_outputs(work), "times": file_times(work)}

    # The lock of the killed run stays behind: --unlock, then --rerun-incomplete.
    snakemake(work, "--unlock", configfile=cfg, snakefile=work / "Snakefile")
    resumed = snakemake(work, "--rerun-incomplete", configfile=cfg, snakefile=work / "Snakefile")

    rows = summary(work, config, detailed=True)
    graph = {r["output_file"]: set(r["input-file(s)"].split(",")) - {"-"} for r in rows}
    rules = {r["output_file"]: r["rule"] for r in rows}
    assert {r["plan"] for r in rows} == {"no update"}, rows
    return {
        "work": work,
        "config": config,
        "cfg": cfg,
        "graph": graph,
        "rules": rules,
        "killed": killed,
        "resumed": resumed.stdout + resumed.stderr,
    }


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
    now = file_times(work)
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
    assert pending(work, state["config"]) == {}


def test_recipe_learning_rate_reruns_that_recipes_finetunes_and_downstream(state):
    config = rerun_config(Path(state["config"]["models"]["tiny"]["path"]))
    config["recipes"]["lora"]["learning_rate"] = 2.0e-3
    plan = pending(state["work"], config)
    lora = outputs_of(state, "finetune", lambda f: "/tiny/lora/" in f)
    assert plan == expect(state, lora)
    assert "finetune" in set(plan.values())
    assert not [f for f in plan if "/lora_b/" in f]  # the other recipe
    assert not {"build_mixture", "label_questions", "merge_labels", "ptrue"} & set(plan.values())


def test_mixture_definition_reruns_only_that_mixtures_jobs_and_downstream(state):
    # A mixture is defined by its name (unknown_X: X% Unknown): replacing `unknown` by
    # `unknown_50` builds and fine-tunes the new mixture and redoes what aggregates mixtures.
    config = rerun_config(Path(state["config"]["models"]["tiny"]["path"]))
    config["mixtures"]["names"] = ["natural", "unknown_50"]
    plan = pending(state["work"], config)
    new = {f: r for f, r in plan.items() if f not in state["rules"]}
    redone = {f: r for f, r in plan.items() if f in state["rules"]}
    for path in (
        "results/mixtures/tiny/unknown_50.parquet",
        "results/finetune/tiny/lora/unknown_50/metrics.jsonl",
        "results/finetune/tiny/lora_b/unknown_50/metrics.jsonl",
        "results/eval/tiny/lora/unknown_50/early_stop/test.parquet",
        "results/eval/tiny/lora_b/unknown_50/convergence/ood_test.parquet",
    ):
        assert path in new
    per_mixture = {"build_mixture", "finetune"}
    for f, rule in new.items():
        assert "unknown_50" in f or rule not in per_mixture, f
    # Existing outputs redone: only aggregates over mixtures that read the replaced one.
    replaced = outputs_of(state, "build_mixture", lambda f: f.endswith("/unknown.parquet"))
    assert set(redone) <= downstream(state["graph"], replaced)
    assert not per_mixture & set(redone.values())
    assert not [f for f in plan if "/natural/" in f or f.endswith("/natural.parquet")]
    assert not {"label_questions", "merge_labels", "ptrue", "prepare_splits"} & set(plan.values())


def test_labelling_parameter_reruns_labels_and_downstream_nothing_upstream(state):
    config = rerun_config(Path(state["config"]["models"]["tiny"]["path"]))
    config["slick"]["n_samples"] = 2
    plan = pending(state["work"], config)
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
        plan = pending(state["work"], state["config"])
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
