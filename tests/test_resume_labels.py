"""A labelling or P(True) job killed through snakemake (SIGKILL of the whole process group once
it has saved a group) resumes from its saved groups on `--rerun-incomplete` and writes the same
bytes as an uninterrupted run; a saved state of other settings is discarded, naming them."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import snakemake, snakemake_command, tiny_config, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.workflow]

MODEL = "tiny"
CHUNK = f"results/labels/{MODEL}/chunks/train/P17.parquet"
PTRUE = f"results/labels/{MODEL}/ptrue_train.parquet"


def config(model_dir: Path, seed: int = 7) -> dict:
    """One chunk to label (train/P17), a group saved after every question."""
    config = tiny_config(
        relations={"in_distribution": ["P17"], "out_of_distribution": ["P50"]},
        slick={"max_new_tokens": 3, "seed": seed},
        engine={"questions_per_save": 1, "max_batch_rows": 4},
    )
    config["models"] = {MODEL: {"path": str(model_dir)}}
    return config


def saved_parts(output: str | Path) -> list[Path]:
    output = Path(output)
    partial = output.with_name(f".{output.stem}.partial")
    return sorted(partial.glob("rows-*.parquet")) if partial.is_dir() else []


def run_and_kill_after_a_saved_group(work: Path, cfg: Path, target: str, rule: str) -> int:
    """Rerun the job of `target` (`--forcerun rule`) and SIGKILL snakemake and its job as soon
    as the job has saved a group; returns how many groups it had saved."""
    command = snakemake_command(target, "--forcerun", rule, configfile=cfg)
    with open(work / f"killed-{rule}.log", "w") as log:
        proc = subprocess.Popen(
            command, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        try:
            while not saved_parts(work / target):
                assert proc.poll() is None, (work / f"killed-{rule}.log").read_text()
                assert time.monotonic() < deadline, f"{rule} saved no group in 300 s"
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (work / target).exists(), "the job had finished before the kill"
    # the lock of the killed run stays behind
    snakemake(work, "--unlock", configfile=cfg)
    return len(saved_parts(work / target))


def last_attempt_log(work: Path, log: str) -> str:
    """The rule log of the job's last attempt (eqtools.io.setup_logging keeps every attempt)."""
    attempts = sorted((work / f"{log}.attempts").glob("*.log"), key=lambda p: int(p.stem))
    return attempts[-1].read_text()


def kill_and_resume(work: Path, cfg: Path, target: str, rule: str, log: str) -> str:
    """Kill the job of `target` after a saved group, rerun it; returns the rerun's rule log."""
    saved = run_and_kill_after_a_saved_group(work, cfg, target, rule)
    assert saved >= 1
    snakemake(work, target, "--rerun-incomplete", configfile=cfg)
    kept = (work / target).with_name(f".{Path(target).stem}.partial")
    assert not saved_parts(work / target) and (kept / "complete.parquet").exists()
    return last_attempt_log(work, log)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, bytes]:
    """A working directory with the chunk labelled in one uninterrupted run: (work, config file,
    the chunk's bytes). The tests below share it, in this order; each leaves the chunk as it
    found it, except the last."""
    work = tmp_path_factory.mktemp("resume")
    cfg = write_config(work, config(tiny_model_dir))
    snakemake(work, CHUNK, configfile=cfg)
    return work, cfg, (work / CHUNK).read_bytes()


def test_a_killed_labelling_job_resumes_to_the_same_bytes(labelled):
    work, cfg, uninterrupted = labelled
    log = kill_and_resume(
        work, cfg, CHUNK, "label_questions", "logs/label_questions/tiny/train/P17.log"
    )
    assert (work / CHUNK).read_bytes() == uninterrupted
    resumed = [line for line in log.splitlines() if "resuming:" in line]
    assert len(resumed) == 1 and "questions of train/P17 already labelled" in resumed[0], log
    done = int(resumed[0].split("resuming: ")[1].split()[0])
    assert done >= 1


def test_a_killed_ptrue_job_resumes_to_the_same_bytes(labelled):
    work, cfg, _ = labelled
    snakemake(work, PTRUE, configfile=cfg)
    uninterrupted = (work / PTRUE).read_bytes()
    log = kill_and_resume(work, cfg, PTRUE, "ptrue", "logs/ptrue/tiny/train.log")
    assert (work / PTRUE).read_bytes() == uninterrupted
    assert "questions of train already scored" in log, log


def test_a_saved_state_of_other_settings_is_discarded_and_labelled_afresh(labelled, tiny_model_dir):
    work, cfg, _ = labelled
    run_and_kill_after_a_saved_group(work, cfg, CHUNK, "label_questions")
    other = write_config(work, config(tiny_model_dir, seed=8), "seed8.yaml")
    snakemake(work, CHUNK, "--rerun-incomplete", configfile=other)
    log = last_attempt_log(work, "logs/label_questions/tiny/train/P17.log")
    discarded = [line for line in log.splitlines() if "discarding the partial results" in line]
    assert len(discarded) == 1 and "spec.slick.seed: 7 -> 8" in discarded[0], log
    assert "resuming:" not in log
    resumed_elsewhere = (work / CHUNK).read_bytes()
    # a fresh run with seed 8 (nothing saved) writes the same file
    snakemake(work, CHUNK, "--forcerun", "label_questions", configfile=other)
    assert (work / CHUNK).read_bytes() == resumed_elsewhere
