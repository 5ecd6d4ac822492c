"""The slurm profile on a real SLURM cluster: jobs go through sbatch, GPU rules ask for a GPU.

Opt-in (SLURM_TEST=1) and needs the throw-away cluster of tests/slurm/cluster.sh; this module
starts nothing itself. See tests/slurm/README.md.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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

# Lines of `snakemake --verbose` with the slurm executor plugin (2.8.0).
SBATCH_CALL = re.compile(r"^sbatch call: (sbatch .*)$", re.MULTILINE)
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def run_profile(workdir, snakefile, configfile=None, extra_args=(), timeout=170):
    """Run `snakemake --profile slurm` in `workdir` and return the CompletedProcess.

    The interpreter is this one: the plugin re-runs `sys.executable -m snakemake` inside each
    SLURM job. The first status check comes after 2 s instead of 40 s, to keep the test short.
    """
    cmd = [
        sys.executable, "-m", "snakemake",
        "--profile", str(PROFILE),
        "--snakefile", str(snakefile),
        "--verbose",  # prints each sbatch call
        "--slurm-init-seconds-before-status-checks", "2",
        *extra_args,
    ]
    if configfile is not None:  # last: --configfile takes several values
        cmd += ["--configfile", str(configfile)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    (Path(workdir) / "snakemake.out").write_text(proc.stdout + proc.stderr)
    return proc


def slurm_jobs(output):
    """{rule: [(slurm job id, sbatch call), ...]} in submission order, from the verbose output."""
    calls, ids = {}, {}
    for call in SBATCH_CALL.findall(output):
        rule = re.search(r"--comment rule_(\w+)", call).group(1)
        calls.setdefault(rule, []).append(call)
    for jobid, log in SUBMITTED.findall(output):
        rule = re.search(r"/rule_(\w+)/", log).group(1)
        ids.setdefault(rule, []).append(jobid)
    assert calls.keys() == ids.keys() and all(len(calls[r]) == len(ids[r]) for r in calls), output
    return {rule: list(zip(ids[rule], calls[rule])) for rule in calls}


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
        pytest.fail(f"no idle SLURM node ({proc.stdout}{proc.stderr}): run tests/slurm/cluster.sh start")


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
    assert [scontrol_job(jobid)["JobState"] for jobid, _ in jobs["count_words"]] == ["FAILED", "COMPLETED"]
    assert "mem_mb=8000" in (workdir / "results/count.txt").read_text()
