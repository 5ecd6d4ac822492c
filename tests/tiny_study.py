"""The tiny study every workflow test reads: built once per test session.

One run of the whole workflow with a tiny random model, in a temporary copy of the workflow
(Snakefile, workflow/, envs/, plus README.md and a test file, so that tests/test_reruns.py can
edit code without touching the repository):

1. The labelling stage runs and is killed on purpose (SIGKILL of the snakemake process group
   while labelling jobs run), then completed with `--rerun-incomplete`.
2. A random model knows nothing, so every question is Unknown and no mixture with Known examples
   could be drawn: every other train question of each relation is relabelled HighlyKnown (the
   mechanics of mixtures, tables, figures and provenance are under test here, not SliCK).
3. Everything else runs: two recipes x six mixtures, P(True), every table and figure.

Tests read its outputs and may run dry runs with other configs; a test that edits a file puts
its bytes and mtime back (tests/test_reruns.py, `edited`).
"""

import base64
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from helpers import ROOT, snakemake, snakemake_command, tiny_config, write_config

MODEL = "tiny"
LABEL_TARGETS = [
    f"results/labels/{MODEL}/{s}.parquet" for s in ("train", "dev", "test", "ood_test")
] + [f"results/labels/{MODEL}/category_summary.csv"]
# A module added to the copy of the workflow, imported by its eqtools.mixtures only: no rule
# lists it anywhere, so only the code hashes derived from the imports know who depends on it.
ADDED_MODULE = "added_dependency"


def study_config(model_dir: Path) -> dict:
    """Two recipes (so that "only this one" means something), one relation of each kind, and
    mixtures that give every table and figure its inputs."""
    config = tiny_config(
        relations={"in_distribution": ["P17"], "out_of_distribution": ["P50"]},
        subsample={"max_per_relation": {"train": 6, "test": 3, "ood_test": 2}},
        slick={"max_new_tokens": 3},
        mixtures={
            "names": ["unknown", "natural", "unknown_0", "unknown_50", "known_only_50", "idk_50"],
            "per_relation_size": 2,
        },
        finetune={"recipes": ["lora", "lora_b"]},
    )
    config["recipes"]["lora_b"] = dict(config["recipes"]["lora"], learning_rate=5.0e-4)
    config["models"] = {MODEL: {"path": str(model_dir)}}
    return config


@dataclass
class Study:
    work: Path  # the working directory and the copy of the workflow
    config: dict
    cfg: Path  # the config file the study ran with
    killed: dict  # {"incomplete": outputs marked incomplete at the kill, "times": mtimes}
    resumed: str  # the output of the --rerun-incomplete run
    resumed_times: dict  # mtimes right after it (the study then rewrites the train labels)
    relabelled: int  # train questions relabelled HighlyKnown

    def run(self, *args: str, config: dict | None = None, check: bool = True):
        """snakemake in the study's directory with its copy of the workflow (and `config`)."""
        cfg = self.cfg if config is None else write_config(self.work, config, "config.other.yaml")
        return snakemake(
            self.work, *args, configfile=cfg, snakefile=self.work / "Snakefile", check=check
        )


def copy_workflow(work: Path) -> None:
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


def run_and_kill_while_labelling(work: Path, cfg: Path) -> dict:
    """Run the labelling stage until some labelling jobs have finished while others are still
    running, then kill snakemake and its jobs at once."""
    command = snakemake_command(*LABEL_TARGETS, configfile=cfg, snakefile=work / "Snakefile")
    with open(work / "interrupted.log", "w") as log:
        proc = subprocess.Popen(
            command, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        chunks = work / f"results/labels/{MODEL}/chunks"
        deadline = time.monotonic() + 600
        try:
            while True:
                assert proc.poll() is None, (work / "interrupted.log").read_text()
                assert time.monotonic() < deadline, "no labelling job finished in 600 s"
                done = (
                    # chunks/{split}/{relation}.parquet, not the parts of a chunk's partial state
                    {p.relative_to(work).as_posix() for p in chunks.glob("*/*.parquet")}
                    if chunks.exists()
                    else set()
                )
                if len(done - incomplete_outputs(work)) >= 2 and incomplete_outputs(work):
                    break
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"incomplete": incomplete_outputs(work), "times": file_times(work)}


def give_the_model_some_knowledge(path: Path) -> int:
    """Relabel every other train question of each relation HighlyKnown; returns how many."""
    labels = pl.read_parquet(path)
    rank = pl.int_range(pl.len()).over("relation")
    category = (
        pl.when(rank % 2 == 0)
        .then(pl.lit("HighlyKnown"))
        .otherwise(pl.col("category").cast(pl.String))
        .cast(labels.schema["category"])
    )
    labels.with_columns(category.alias("category")).write_parquet(path)
    return int(labels.select((rank % 2 == 0).sum()).item())


def build(work: Path, model_dir: Path) -> Study:
    copy_workflow(work)
    config = study_config(model_dir)
    cfg = write_config(work, config)
    killed = run_and_kill_while_labelling(work, cfg)
    # The lock of the killed run stays behind: --unlock, then --rerun-incomplete.
    snakemake(work, "--unlock", configfile=cfg, snakefile=work / "Snakefile")
    resumed = snakemake(
        work, "--rerun-incomplete", *LABEL_TARGETS, configfile=cfg, snakefile=work / "Snakefile"
    )
    resumed_times = file_times(work)
    relabelled = give_the_model_some_knowledge(work / f"results/labels/{MODEL}/train.parquet")
    snakemake(work, configfile=cfg, snakefile=work / "Snakefile")
    return Study(
        work, config, cfg, killed, resumed.stdout + resumed.stderr, resumed_times, relabelled
    )
