"""The slurm profile on a real SLURM cluster: jobs go through sbatch, GPU rules ask for a GPU.

Opt-in (SLURM_TEST=1) and needs the throw-away cluster of tests/slurm/cluster.sh; this module
starts nothing itself (`make test-slurm` does it all). See tests/slurm/README.md.
Two workflows: a small demo (retries with more memory) and the real one on the tiny config.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from slurm_output import pair_submissions

from helpers import tiny_config, write_config

ROOT = Path(__file__).resolve().parents[2]
# The committed symlink ./slurm -> profiles/slurm: the directory `--profile slurm` finds from ROOT.
PROFILE = ROOT / "slurm"
DEMO = Path(__file__).resolve().parent / "demo" / "Snakefile"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        os.environ.get("SLURM_TEST") != "1",
        reason="needs a SLURM cluster: bash tests/slurm/cluster.sh start, then SLURM_TEST=1",
    ),
]


def run_profile(workdir, snakefile, configfile=None, extra_args=(), timeout=170):
    """Run `snakemake --profile slurm` in `workdir` and return the CompletedProcess.

    The interpreter is this one: the plugin re-runs `sys.executable -m snakemake` inside each
    SLURM job. The first status check comes after 2 s instead of 40 s, to keep the test short.
    """
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        str(PROFILE),
        "--snakefile",
        str(snakefile),
        "--verbose",  # prints each sbatch call
        "--slurm-init-seconds-before-status-checks",
        "2",
        *extra_args,
    ]
    if configfile is not None:  # last: --configfile takes several values
        cmd += ["--configfile", str(configfile)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    (Path(workdir) / "snakemake.out").write_text(proc.stdout + proc.stderr)
    return proc


def slurm_jobs(output):
    """{rule: [(slurm job id, sbatch call), ...]} in submission order, from the verbose output:
    each sbatch call paired with its job id by the SLURM log path both lines name
    (slurm_output.py); a line that cannot be paired fails the test, with the output."""
    try:
        return pair_submissions(output)
    except ValueError as err:
        pytest.fail(f"{err}\n\n{output[-20000:]}")


def scontrol_job(jobid):
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge=3600 s)."""
    text = subprocess.run(
        ["scontrol", "--oneliner", "show", "job", jobid], capture_output=True, text=True, check=True
    ).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sinfo") is None:
        pytest.fail("no SLURM client commands: run `bash tests/slurm/cluster.sh start` first")
    proc = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True)
    if proc.returncode != 0 or not re.search(r"\b(idle|mix)\b", proc.stdout):
        pytest.fail(
            f"no idle SLURM node ({proc.stdout}{proc.stderr}): run tests/slurm/cluster.sh start"
        )


@pytest.fixture(scope="module")
def demo_run(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm-demo")
    proc = run_profile(workdir, DEMO)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return workdir, output, slurm_jobs(output)


def test_profile_resolves_from_repo_root():
    code = "from snakemake.cli import get_profile_dir; print(get_profile_dir('slurm')[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    found = ROOT / proc.stdout.strip()
    assert found == PROFILE / "config.yaml"
    assert found.resolve() == ROOT / "profiles" / "slurm" / "config.yaml"


def test_jobs_run_through_slurm(demo_run):
    workdir, output, jobs = demo_run
    # The local rule stays on the submitting host; the others are SLURM jobs.
    assert "localrule make_input:" in output
    assert "make_input" not in jobs
    assert (workdir / "results/input.txt").read_text().strip() == "slurm_job=none"
    assert set(jobs) == {"count_words", "label_questions"}
    for rule, submissions in jobs.items():
        for jobid, _ in submissions:
            assert (workdir / f"logs/slurm/rule_{rule}/{jobid}.log").is_file()  # kept on success
            assert scontrol_job(jobid)["JobName"] in output  # the run's SLURM job name
        last_id = submissions[-1][0]
        out = "labels" if rule == "label_questions" else "count"
        assert f"slurm_job={last_id}" in (workdir / f"results/{out}.txt").read_text()
    # Job states came from squeue, not sacct (there is no slurmdbd).
    assert "command=squeue" in output
    assert "Falling back to 'sacct'" not in output


def test_gpu_rule_requests_one_gpu(demo_run):
    workdir, output, jobs = demo_run
    [(jobid, call)] = jobs["label_questions"]
    print(call.split(" --wrap=")[0])
    assert " -p gpu " in call
    assert "--gpus=1" in call
    assert "--ntasks-per-gpu" not in call  # tasks_per_gpu: 0
    job = scontrol_job(jobid)
    print({k: job.get(k) for k in ("JobId", "Partition", "TresPerJob", "JobState")})
    assert job["Partition"] == "gpu"
    assert job["TresPerJob"] == "gres:gpu:1"
    assert job["JobState"] == "COMPLETED"
    # SLURM handed the (fake) GPU to the job.
    assert "gpus=0" in (workdir / "results/labels.txt").read_text()


def test_cpu_rule_requests_no_gpu(demo_run):
    _, _, jobs = demo_run
    for jobid, call in jobs["count_words"]:
        assert " -p cpu " in call
        assert "--gpus" not in call and "--gres" not in call
        job = scontrol_job(jobid)
        assert job["Partition"] == "cpu"
        assert "gpu" not in job.get("TresPerJob", "") + job.get("TRES", "")


def test_retry_doubles_memory(demo_run):
    # count_words fails below 8000 MB: attempt 1 gets mem_mb = 4000 * 1, the retry 4000 * 2.
    workdir, _, jobs = demo_run
    mems = [re.search(r"--mem (\d+)", call).group(1) for _, call in jobs["count_words"]]
    assert mems == ["4000", "8000"]
    assert [scontrol_job(jobid)["JobState"] for jobid, _ in jobs["count_words"]] == [
        "FAILED",
        "COMPLETED",
    ]
    assert "mem_mb=8000" in (workdir / "results/count.txt").read_text()


# ---------------------------------------------------------------------------------------------
# The real workflow (Snakefile at the repository root) on the tiny config with the tiny random
# model: every non-local job goes through SLURM.

LOCAL_RULES = {"download_entity_questions", "fetch_model"}
# The rules on the profile's GPU partition: their GPU counts come from the model entry and the
# recipe (1 each here, but for the distributed recipe).
GPU_RULES = set(yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"])
# A recipe spread over 2 processes (DDP; gloo, since the fake GPUs are no CUDA devices).
DISTRIBUTED = "lora_ddp"


@pytest.fixture(scope="module")
def workflow_run(cluster, tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("slurm-workflow")
    config = tiny_config(
        relations={"in_distribution": ["P17", "P36"], "out_of_distribution": ["P50"]},
        subsample={"max_per_relation": {"train": 6, "test": 3, "ood_test": 2}},
        slick={"max_new_tokens": 3},
        mixtures={"names": ["natural"]},
        finetune={"recipes": ["lora", DISTRIBUTED]},
    )
    config["recipes"][DISTRIBUTED] = dict(
        config["recipes"]["lora"], distributed={"strategy": "ddp", "nproc_per_node": 2}
    )
    config["models"] = {"tiny": {"path": str(tiny_model_dir)}}
    cfg = write_config(workdir, config)
    proc = run_profile(workdir, ROOT / "Snakefile", cfg, timeout=1500)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-20000:]
    assert re.search(r"(\d+) of \1 steps \(100%\) done", output), output[-5000:]
    return workdir, output, slurm_jobs(output)


def slurm_ids_in_sidecars(workdir):
    """{sidecar: device.slurm_job_id} of the .prov.json sidecars: each job records the
    SLURM_JOB_ID of its environment (None on the submitting host)."""
    return {
        side.relative_to(workdir).as_posix(): json.loads(side.read_text())["device"]["slurm_job_id"]
        for side in (workdir / "results").rglob("*.prov.json")
    }


def test_workflow_jobs_run_through_slurm(workflow_run):
    workdir, output, jobs = workflow_run
    print(f"\nSLURM jobs of the tiny workflow ({sum(map(len, jobs.values()))}):")
    for rule in sorted(jobs):
        print(f"  {rule:34s} {' '.join(j for j, _ in jobs[rule])}")
    # Downloads and model materialisation stay on the submitting host.
    for rule in LOCAL_RULES:
        assert f"localrule {rule}:" in output
        assert rule not in jobs
    assert {
        "prepare_splits",
        "select_exemplars",
        "label_questions",
        "merge_labels",
        "build_mixture",
        "finetune",
        "ptrue",
    } <= set(jobs)
    assert "localrule all:" in output or "rule all:" in output
    for rule, submissions in jobs.items():
        for jobid, _ in submissions:
            # The SLURM log of every job is kept under logs/slurm/rule_<rule>/<wildcards>/<id>.log.
            logs = list((workdir / "logs/slurm" / f"rule_{rule}").rglob(f"{jobid}.log"))
            assert len(logs) == 1, (rule, jobid)
            assert scontrol_job(jobid)["JobState"] == "COMPLETED", (rule, jobid)
    # Each job wrote its SLURM job id into its outputs' provenance (read from the environment).
    all_ids = {j for subs in jobs.values() for j, _ in subs}
    sidecars = slurm_ids_in_sidecars(workdir)
    chunk = "results/labels/tiny/chunks/train/P17.parquet.prov.json"
    assert sidecars[chunk] in {j for j, _ in jobs["label_questions"]}
    assert set(sidecars.values()) <= all_ids, sidecars  # no result made outside SLURM
    assert "command=squeue" in output and "Falling back to 'sacct'" not in output


def test_workflow_gpu_rules_request_their_gpus(workflow_run):
    _, _, jobs = workflow_run
    assert {"prepare_model", "label_questions", "finetune", "ptrue"} == GPU_RULES
    for rule in GPU_RULES & set(jobs):
        for jobid, call in jobs[rule]:
            gpus = 2 if f"/{DISTRIBUTED}/" in call or f"{DISTRIBUTED}_" in call else 1
            assert " -p gpu " in call and f"--gpus={gpus}" in call, call
            assert "--ntasks-per-gpu" not in call and "--gres" not in call, call
            job = scontrol_job(jobid)
            assert job["Partition"] == "gpu" and job["TresPerJob"] == f"gres:gpu:{gpus}", job
    assert set(jobs) >= GPU_RULES
    assert len(jobs["finetune"]) == 2
    print(
        f"\nGPU rules ({', '.join(sorted(GPU_RULES))}): every job -p gpu --gpus=1, "
        f"TresPerJob=gres:gpu:1; the {DISTRIBUTED} fine-tune --gpus=2, TresPerJob=gres:gpu:2"
    )


def test_workflow_distributed_recipe_starts_its_ranks(workflow_run):
    """Inside the SLURM job, the finetune rule started torchrun with 2 ranks (gloo: the fake
    GPUs are no CUDA devices), and every metrics line says so."""
    workdir, _, jobs = workflow_run
    [call] = [call for _, call in jobs["finetune"] if DISTRIBUTED in call]
    assert "--cpus-per-task=2" in call, call  # engine.threads (1) per process
    log = (workdir / f"logs/finetune/tiny/{DISTRIBUTED}/natural.log").read_text()
    assert "--nproc-per-node=2" in log and "2 process(es) (ddp)" in log, log[-3000:]
    metrics = workdir / f"results/finetune/tiny/{DISTRIBUTED}/natural/metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert lines and {x["world_size"] for x in lines} == {2}
    print(f"\n{DISTRIBUTED}: torchrun with 2 ranks in SLURM job, world_size 2 in every epoch")


def test_workflow_cpu_rules_request_no_gpu(workflow_run):
    _, _, jobs = workflow_run
    cpu_rules = set(jobs) - GPU_RULES
    assert {"prepare_splits", "merge_labels", "build_mixture"} <= cpu_rules
    for rule in cpu_rules:
        for jobid, call in jobs[rule]:
            assert " -p cpu " in call, call
            assert "--gpus" not in call and "--gres" not in call, call
            job = scontrol_job(jobid)
            assert job["Partition"] == "cpu", job
            assert "gpu" not in job.get("TresPerJob", "") + job.get("TRES", ""), job
    print(f"\nCPU rules ({', '.join(sorted(cpu_rules))}): every job -p cpu, no GPU")


def test_workflow_memory_is_the_rules_first_attempt(workflow_run):
    _, _, jobs = workflow_run
    mem = {
        rule: {re.search(r"--mem (\d+)", call).group(1) for _, call in subs}
        for rule, subs in jobs.items()
    }
    assert mem["label_questions"] == {"8000"}  # models.<name>.mem_mb (default), attempt 1
    assert mem["finetune"] == {"2000"}  # the tiny recipe's mem_mb
    assert mem["prepare_splits"] == {"4000"}  # the profile's default, attempt 1


# ---------------------------------------------------------------------------------------------
# A fine-tune longer than its runtime: SLURM's time limit kills it, the profile retries it with
# more time (runtime x attempt), and it resumes from its saved state to the files of a run that
# was never interrupted.

SLOW = "slow"
# seconds of training the slow fine-tune is given: past the first attempt's minute (SLURM checks
# time limits every 30 s or so), within the second attempt's two
SLOW_SECONDS = 150
CALIBRATION_EPOCHS = 20


def slow_config(workdir_config: dict, name: str, epochs: int) -> dict:
    config = dict(workdir_config, finetune={"recipes": [name]})
    config["recipes"] = dict(
        config["recipes"],
        **{
            name: dict(
                config["recipes"]["lora"],
                method="full",
                epochs=epochs,
                dropout=0.1,
                runtime=1,  # minutes: SLURM kills the first attempt after 60-90 s
                mem_mb=2000,
            )
        },
    )
    return config


def seconds_per_epoch(log: Path, epochs: int) -> float:
    """From a fine-tune's log: the time between its first and last epoch's lines, per epoch."""
    stamps = [
        datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        for line in log.read_text().splitlines()
        if re.search(rf"epoch \d+ of {epochs} done", line)
    ]
    return (stamps[-1] - stamps[0]).total_seconds() / (len(stamps) - 1)


SLOW_TARGETS = [f"results/finetune/tiny/{SLOW}/natural/metrics.jsonl"] + [
    f"results/eval/tiny/{SLOW}/natural/{stop}/{split}.parquet"
    for stop in ("early_stop", "convergence")
    for split in ("test", "ood_test")
]


def finetune_files(workdir: Path) -> dict[str, bytes]:
    roots = [workdir / f"results/finetune/tiny/{SLOW}", workdir / f"results/eval/tiny/{SLOW}"]
    return {
        p.relative_to(workdir).as_posix(): p.read_bytes()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".prov.json") and "state" not in p.parts
    }


def test_a_finetune_past_its_time_limit_is_retried_with_more_time_and_resumes(
    workflow_run, tmp_path
):
    from helpers import snakemake

    workdir, _, _ = workflow_run
    base = yaml.safe_load((workdir / "config.yaml").read_text())
    straight = tmp_path / "straight"
    shutil.copytree(workdir, straight, symlinks=True, ignore=shutil.ignore_patterns("logs"))
    # this machine's speed: epochs enough for SLOW_SECONDS of training
    calibration = slow_config(base, "calibration", CALIBRATION_EPOCHS)
    snakemake(
        straight,
        *[t.replace(f"/{SLOW}/", "/calibration/") for t in SLOW_TARGETS],
        configfile=write_config(straight, calibration, "calibration.yaml"),
    )
    per_epoch = seconds_per_epoch(
        straight / "logs/finetune/tiny/calibration/natural.log", CALIBRATION_EPOCHS
    )
    config = slow_config(base, SLOW, max(CALIBRATION_EPOCHS, round(SLOW_SECONDS / per_epoch)))
    # the reference: the same fine-tune, never interrupted, in a copy (no SLURM, same threads)
    snakemake(straight, *SLOW_TARGETS, configfile=write_config(straight, config, "slow.yaml"))

    cfg = write_config(workdir, config, "slow.yaml")
    proc = run_profile(workdir, ROOT / "Snakefile", cfg, extra_args=SLOW_TARGETS, timeout=1500)
    output = proc.stdout + proc.stderr
    # on failure Snakemake's own lines (the failed job's log, which it prints, would hide them)
    own = "\n".join(x for x in output.splitlines() if " INFO " not in x)
    assert proc.returncode == 0, own[-20000:]
    attempts = [(j, call) for j, call in slurm_jobs(output).get("finetune", []) if SLOW in call]
    states = [scontrol_job(j)["JobState"] for j, _ in attempts]
    times = [re.search(r" -t (\d+)", call).group(1) for _, call in attempts]
    epochs = config["recipes"][SLOW]["epochs"]
    print(f"\n{SLOW}: {epochs} epochs, attempts {states}, time limits {times} min")
    assert states[0] == "TIMEOUT" and states[-1] == "COMPLETED", states
    assert times == [str(n) for n in range(1, len(attempts) + 1)]  # runtime x attempt
    log = (workdir / f"logs/finetune/tiny/{SLOW}/natural.log").read_text()
    # the last attempt resumed, or (killed after its outputs were written, before Snakemake
    # recorded them) published them again from the finished record
    assert f"attempt {len(attempts)} of this job" in log
    assert "resuming after epoch" in log or "the run finished in an earlier attempt" in log, log
    assert finetune_files(workdir) == finetune_files(straight)
