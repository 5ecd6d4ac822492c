"""A fine-tune killed through snakemake at the points that matter, then rerun as the README says
(`snakemake --rerun-incomplete`), ends with exactly the files of an uninterrupted run: metrics,
predictions at both stops, checkpoint bytes (make test-e2e).

The kill comes from a sitecustomize.py on the job's PYTHONPATH (test code stays out of the
package): when eqtools.training is imported, it wraps one of its steps so that the whole process
group (snakemake and its job, as a cluster's kill would) gets SIGKILL at that point. A tiny random
model answers nothing right, so its dev accuracy never moves and epoch 1 stays the best: the
situation in which a resumed run used to fail for good, its best weights having lived in a
declared output that Snakemake deletes before it runs the job again."""

import json
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from helpers import snakemake, snakemake_command, tiny_config, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.e2e]

RUN = "results/finetune/tiny/full/natural"
TARGETS = [f"{RUN}/metrics.jsonl"] + [
    f"results/eval/tiny/full/natural/{stop}/{split}.parquet"
    for stop in ("early_stop", "convergence")
    for split in ("test", "ood_test")
]
EPOCHS = 4

KILLER = textwrap.dedent(
    """
    # Kills the process group at the point named by EQ_KILL_AT ("<point>:<epoch>").
    import importlib.abc, importlib.util, os, signal, sys

    POINT, EPOCH = os.environ["EQ_KILL_AT"].split(":")
    EPOCH = int(EPOCH)


    def kill():
        os.killpg(os.getpgid(0), signal.SIGKILL)


    def patch(module):
        if POINT == "training":  # after the first optimizer step of the epoch
            train_epoch = module.train_epoch

            def wrapped(*args, **kwargs):
                if args[9] == EPOCH:
                    kwargs["progress"].advance = lambda n=1: kill()
                return train_epoch(*args, **kwargs)

            module.train_epoch = wrapped
        elif POINT == "evaluation":  # as the epoch's evaluation starts
            grade_together = module.grade_together

            def wrapped(*args, **kwargs):
                if kwargs.get("what", "").startswith(f"epoch {EPOCH}/"):
                    kill()
                return grade_together(*args, **kwargs)

            module.grade_together = wrapped
        elif POINT == "state":  # the epoch's weights written, the rest of its state not
            import torch.distributed.checkpoint as dcp

            save, calls = dcp.save, []

            def wrapped(*args, **kwargs):
                result = save(*args, **kwargs)
                calls.append(1)
                if len(calls) == EPOCH:
                    kill()
                return result

            dcp.save = wrapped
        elif POINT == "saved":  # right after the epoch's state is in place
            save_state = module.save_state

            def wrapped(*args, **kwargs):
                save_state(*args, **kwargs)
                if args[4] == EPOCH:
                    kill()

            module.save_state = wrapped
        elif POINT == "swap":  # the old state moved aside, the new one not yet in its place
            import pathlib

            rename, calls = pathlib.Path.rename, []

            def wrapped(self, target):
                if self.name == ".epoch.part":
                    calls.append(1)
                    if len(calls) == EPOCH:
                        kill()
                return rename(self, target)

            pathlib.Path.rename = wrapped
        elif POINT == "finished":  # the job's outputs written, Snakemake not yet told
            finetune = module.finetune  # (the job alone is killed, once; snakemake retries it)

            def wrapped(*args, **kwargs):
                lines = finetune(*args, **kwargs)
                once = os.environ["EQ_KILL_ONCE"]
                if not os.path.exists(once):
                    open(once, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
                return lines

            module.finetune = wrapped


    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "eqtools.training":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec


    sys.meta_path.insert(0, Hook())
    """
)


def config_for(model_dir: Path, **finetune) -> dict:
    config = tiny_config(
        relations={"in_distribution": ["P17"], "out_of_distribution": ["P50"]},
        subsample={"max_per_relation": {"train": 8, "dev": 6, "test": 3, "ood_test": 2}},
        slick={"max_new_tokens": 3},
        mixtures={"names": ["natural"], "per_relation_size": 4},
        finetune={"recipes": ["full"], **finetune},
    )
    config["recipes"]["full"] = dict(
        config["recipes"]["lora"], method="full", epochs=EPOCHS, dropout=0.1
    )
    config["models"] = {"tiny": {"path": str(model_dir)}}
    return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> Path:
    """A working directory with the labels and the mixture the fine-tune reads."""
    work = tmp_path_factory.mktemp("prepared")
    cfg = write_config(work, config_for(tiny_model_dir))
    snakemake(work, "results/mixtures/tiny/natural.parquet", *labels(), configfile=cfg)
    return work


def labels() -> list[str]:
    return [f"results/labels/tiny/{s}.parquet" for s in ("dev", "test", "ood_test")]


def copy_of(prepared: Path, where: Path) -> Path:
    shutil.copytree(prepared, where, symlinks=True)
    return where


def result_files(work: Path) -> dict[str, bytes]:
    """Every file the fine-tune wrote (not the provenance sidecars, which record times, nor its
    state: not a result)."""
    roots = [work / RUN, work / "results/eval/tiny/full/natural"]
    return {
        p.relative_to(work).as_posix(): p.read_bytes()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".prov.json") and "state" not in p.parts
    }


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory, tiny_model_dir) -> dict[str, bytes]:
    work = copy_of(prepared, tmp_path_factory.mktemp("straight") / "work")
    cfg = write_config(work, config_for(tiny_model_dir))
    snakemake(work, *TARGETS, configfile=cfg)
    files = result_files(work)
    assert any(name.endswith("early_stop/model.safetensors") for name in files)
    lines = [json.loads(x) for x in files[f"{RUN}/metrics.jsonl"].decode().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, EPOCHS + 1))
    assert {x["dev_accuracy"] for x in lines} == {0.0}  # epoch 1 stays the best
    assert lines[0]["train_loss"] != lines[-1]["train_loss"]  # but the weights move
    return files


def run_killed(work: Path, cfg: Path, point: str) -> str:
    """snakemake on the fine-tune, killed (with its job) at `point`; returns its output."""
    env = {**os.environ, "EQ_KILL_AT": point}
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILLER)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        snakemake_command(*TARGETS, configfile=cfg),
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=900,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    shutil.rmtree(site)
    return proc.stdout + proc.stderr


CASES = {
    # point, the epoch whose state is complete at the kill, scheduling settings
    "training": ("training:3", 2, {"save_every": 2}),
    "evaluation": ("evaluation:2", 1, {"state_dir": "SCRATCH"}),
    "state": ("state:3", 2, {}),
    "after_the_best": ("saved:3", 3, {}),
    "between_the_renames_of_the_state": ("swap:3", 3, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_killed_finetune_resumes_to_the_files_of_an_uninterrupted_one(
    case, prepared, straight, tmp_path, tiny_model_dir
):
    point, saved_epoch, finetune = CASES[case]
    work = copy_of(prepared, tmp_path / "work")
    if finetune.get("state_dir") == "SCRATCH":
        finetune["state_dir"] = str(tmp_path / "scratch")
    state = (
        Path(finetune["state_dir"]) / "tiny/full/natural"
        if "state_dir" in finetune
        else work / RUN / "state"
    )
    cfg = write_config(work, config_for(tiny_model_dir, **finetune))
    run_killed(work, cfg, point)
    trainer = state / "epoch/trainer.pt"
    if point.startswith("swap"):  # both copies whole, neither in place
        assert not (state / "epoch").exists() and (state / ".epoch.old/trainer.pt").exists()
        trainer = state / ".epoch.part/trainer.pt"
    if saved_epoch:
        import torch

        assert torch.load(trainer, weights_only=False)["epoch"] == saved_epoch
    assert (state / "best-epoch-1/model.safetensors").exists()
    assert not (work / RUN / "early_stop").exists()

    # as the README says: the lock of the killed run stays behind, then --rerun-incomplete
    snakemake(work, "--unlock", configfile=cfg)
    rerun = snakemake(work, "--rerun-incomplete", *TARGETS, configfile=cfg)
    log = (work / "logs/finetune/tiny/full/natural.log").read_text()
    assert f"resuming after epoch {saved_epoch} of {EPOCHS}" in log, log
    assert "attempt 2 of this job" in log  # the killed attempt's log is kept and named
    assert (work / "logs/finetune/tiny/full/natural.log.attempts/1.log").exists()
    assert result_files(work) == straight, rerun.stdout
    assert_finished(state)


def assert_finished(state: Path) -> None:
    """A complete run keeps of its state the record of its results and the weights its outputs
    link to; the optimizer state is gone."""
    assert not (state / "epoch").exists()
    assert sorted(p.name for p in state.iterdir()) == [
        "best-epoch-1",
        "finished",
        "last-epoch",
        "stamp.json",
    ]


def test_a_finetune_killed_after_it_finished_publishes_its_outputs_again(
    prepared, straight, tmp_path, tiny_model_dir
):
    """The job killed after it wrote its outputs, before Snakemake recorded it (a time limit or
    a preemption in that window): Snakemake deletes the outputs and retries the job, which
    publishes them from the finished state instead of training from the start. A new
    invocation (--forcerun) trains again."""
    work = copy_of(prepared, tmp_path / "work")
    cfg = write_config(work, config_for(tiny_model_dir))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILLER)
    env = {
        **os.environ,
        "EQ_KILL_AT": "finished:0",
        "EQ_KILL_ONCE": str(tmp_path / "killed"),
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        snakemake_command(*TARGETS, "--retries", "1", configfile=cfg),
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 and (tmp_path / "killed").exists(), proc.stdout + proc.stderr
    logs = work / "logs/finetune/tiny/full/natural.log.attempts"
    first, retry = (logs / "1.log").read_text(), (logs / "2.log").read_text()
    assert f"epoch {EPOCHS} of {EPOCHS} done" in first
    assert "the run finished in an earlier attempt" in retry, retry
    assert f"epoch 1 of {EPOCHS} done" not in retry  # no training
    assert result_files(work) == straight, proc.stdout + proc.stderr
    assert_finished(work / RUN / "state")

    forced = snakemake(work, *TARGETS, "--forcerun", "finetune", configfile=cfg)
    log = (work / "logs/finetune/tiny/full/natural.log").read_text()
    assert "the record of a run that finished before this invocation goes" in log, log
    assert f"epoch 1 of {EPOCHS} done" in log
    assert result_files(work) == straight, forced.stdout


def test_a_state_of_other_settings_is_discarded(prepared, tmp_path, tiny_model_dir):
    """After a kill, a changed tracked setting (the learning rate, as the NaN error advises)
    starts over instead of resuming the old run: one log line names what differs."""
    work = copy_of(prepared, tmp_path / "work")
    config = config_for(tiny_model_dir)
    cfg = write_config(work, config)
    run_killed(work, cfg, "saved:2")
    config["recipes"]["full"]["learning_rate"] = 5.0e-4
    cfg = write_config(work, config)
    snakemake(work, "--unlock", configfile=cfg)
    snakemake(work, "--rerun-incomplete", *TARGETS, configfile=cfg)
    log = (work / "logs/finetune/tiny/full/natural.log").read_text()
    assert "discarding the saved state" in log, log
    assert "spec.recipe.learning_rate: 0.001 -> 0.0005" in log, log
    assert "resuming after epoch" not in log
    lines = (work / RUN / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, EPOCHS + 1))
