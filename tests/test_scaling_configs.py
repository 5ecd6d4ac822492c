"""The shipped cluster configurations (config/paper.yaml at 8B, paper-1b.yaml, paper-70b.yaml)
dry-run against the slurm profile, and every GPU job asks for what docs/scaling.md plans: its
GPUs, nodes, memory and time. A dry run submits nothing: fake SLURM commands on the PATH
record any call, and no sbatch may come. No model needs to exist for a dry run (fetch_model, the
local rule that downloads it, is only planned)."""

import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from helpers import ROOT

PROFILE = ROOT / "profiles/slurm"
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "sacct", "scontrol", "sinfo", "scancel")
GPU_RULES = ("prepare_model", "label_questions", "ptrue", "finetune")

# The paper's study per model (docs/scaling.md, section 1): 12 + 7 relations labelled in 43
# chunks (train, dev, test of the 12 in-distribution relations, ood_test of the 7), P(True) on
# the ID test set, 14 mixtures x 1 recipe (`full`) x 1 seed.
JOBS = {"prepare_model": 1, "label_questions": 43, "ptrue": 1, "finetune": 14}

# What each GPU job asks for: gpu (sbatch --gpus, the job's total), nodes, mem_mb (per node),
# runtime (minutes, the first attempt), threads (--cpus-per-task: engine.threads, 1 in
# config.yaml, per process), and for several nodes the `mpi` launcher and one task per node.
# Labelling and P(True) runtimes are the rules' own (240 minutes: docs/scaling.md, section 3,
# puts the largest 70B labelling job at 0.62 h on an A100 "against the rule's 240-minute
# limit", and P(True) of the train split at 70B with device_map at about 2 h), their memory the
# rules' 8,000 MB but at 70B, where each of the 3 further processes adds 3,000 MB.
PLANS = {
    "8B": {
        "configs": ["config/paper.yaml"],
        "model": "llama-8b",
        # section 4, table, row "8B", column "labelling and P(True)": 1 GPU; "The rules ask
        # for 8,000 MB".
        "label_questions": {"gpu": 1, "mem_mb": 8000, "runtime": 240, "threads": 1},
        "ptrue": {"gpu": 1, "mem_mb": 8000, "runtime": 240, "threads": 1},
        # section 4, row "8B", column "full fine-tuning recipe": fsdp, nproc_per_node 4,
        # nodes 1; the 8B YAML below it: mem_mb 96000, runtime 480 (A100, float32 evaluation).
        "finetune": {"gpu": 4, "nodes": 1, "mem_mb": 96000, "runtime": 480, "threads": 4},
    },
    "1B": {
        "configs": ["config/paper.yaml", "config/paper-1b.yaml"],
        "model": "llama-1b",
        # section 4, row "1B": 1 GPU for labelling and P(True).
        "label_questions": {"gpu": 1, "mem_mb": 8000, "runtime": 240, "threads": 1},
        "ptrue": {"gpu": 1, "mem_mb": 8000, "runtime": 240, "threads": 1},
        # section 4, row "1B": strategy none, 1 GPU; the paragraph after the 70B YAML: "1B: the
        # same full recipe with ... mem_mb: 32000, runtime: 240".
        "finetune": {"gpu": 1, "nodes": 1, "mem_mb": 32000, "runtime": 240, "threads": 1},
    },
    "70B": {
        "configs": ["config/paper.yaml", "config/paper-70b.yaml"],
        "model": "llama-70b",
        # section 4, row "70B": `gpus: 4` (one node); "give label_questions and ptrue a mem_mb
        # of about 160,000" (rank 0 reads the bf16 weights on the host).
        "label_questions": {"gpu": 4, "mem_mb": 169000, "runtime": 240, "threads": 4},
        "ptrue": {"gpu": 4, "mem_mb": 169000, "runtime": 240, "threads": 4},
        # section 4, row "70B", column "full fine-tuning recipe": fsdp, nproc_per_node 8,
        # nodes 4; "70B full: ... mem_mb: 450000 ..., runtime: 720". 32 GPUs in all, one task
        # per node that starts torchrun there.
        "finetune": {
            "gpu": 32,
            "nodes": 4,
            "mem_mb": 450000,
            "runtime": 720,
            "threads": 8,
            "mpi": "srun",
            "tasks": 4,
        },
    },
}


def dry_run_jobs(output: str) -> list[dict]:
    """Each job of a dry run's output: {"rule", "wildcards": {...}, "resources": {...},
    "threads"} (Snakemake prints one block per job: `rule <name>:` and indented `key: value`
    lines; threads only when more than 1)."""
    jobs = []
    for line in output.splitlines():
        head = re.match(r"(?:local)?rule (\w+):$", line)
        if head:
            jobs.append({"rule": head.group(1), "wildcards": {}, "resources": {}, "threads": 1})
            continue
        item = re.match(r"    (wildcards|resources|threads): (.*)$", line)
        if item and jobs:
            key, value = item.groups()
            if key == "threads":
                jobs[-1]["threads"] = int(value)
            else:
                jobs[-1][key] = dict(kv.split("=", 1) for kv in value.split(", "))
    return jobs


def request(job: dict) -> dict:
    """The scheduling request of a GPU job, as the slurm plugin reads it."""
    resources = job["resources"]
    out = {k: int(resources[k]) for k in ("gpu", "mem_mb", "runtime") if k in resources}
    out["threads"] = job["threads"]
    for key in ("nodes", "tasks"):
        if key in resources:
            out[key] = int(resources[key])
    if "mpi" in resources:
        out["mpi"] = resources["mpi"]
    return out


@pytest.fixture
def fake_slurm(tmp_path):
    """SLURM commands that record being called, first on the PATH."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "slurm_calls"
    bin_dir.mkdir()
    for name in SLURM_COMMANDS:
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit 1\n')
        script.chmod(0o755)
    return bin_dir, calls


@pytest.mark.parametrize("size", list(PLANS))
def test_cluster_config_requests_what_docs_scaling_plans(tmp_path, fake_slurm, size):
    plan = PLANS[size]
    bin_dir, calls = fake_slurm
    work = tmp_path / "work"
    work.mkdir()
    configs = [str(ROOT / f) for f in ["config/config.yaml", *plan["configs"]]]
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--profile", str(PROFILE), "--workflow-profile", "none", "-n",
        # A dry run without --cores caps every job's threads at 1; a real run with the slurm
        # executor leaves them uncapped (snakemake/cli.py): so does a large --cores.
        "--cores", "1024",
        "--configfile", *configs,
    ]  # fmt: skip
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Nothing submitted. The only SLURM command a dry run calls is the plugin's read-only
    # `scontrol show config` (job_status_query.get_min_job_age: with slurm-status-command squeue
    # it checks MinJobAge, and goes on without it when the command fails or is absent).
    called = calls.read_text().splitlines() if calls.exists() else []
    assert set(called) <= {"scontrol show config"}, called
    jobs = dry_run_jobs(proc.stdout + proc.stderr)
    gpu_jobs = [job for job in jobs if job["rule"] in GPU_RULES]
    assert Counter(job["rule"] for job in gpu_jobs) == JOBS
    # run_models: only the config's model runs, not the embedded one of config.yaml (nor the
    # 8B entry of paper.yaml under the 1B and 70B files)
    assert {job["wildcards"].get("model") for job in jobs} - {None} == {plan["model"]}
    for job in gpu_jobs:
        if job["rule"] == "prepare_model":
            # loading the model once, on the labelling jobs' GPUs (its memory follows the size of
            # the weights, unknown to a dry run before the download: eqtools.models.prepare_bytes)
            labelling = plan["label_questions"]
            assert request(job)["gpu"] == labelling["gpu"] and request(job)["runtime"] == 120
            assert request(job)["mem_mb"] > 0
        else:
            assert request(job) == plan[job["rule"]], (job["rule"], job["wildcards"])
        # the profile's set-resources: the GPU partition, no --ntasks-per-gpu
        assert job["resources"]["slurm_partition"] == "gpu"
        assert job["resources"]["tasks_per_gpu"] == "0"
    # every other job stays on the CPU partition without a GPU
    for job in jobs:
        if job["rule"] not in GPU_RULES and job["resources"]:
            assert "gpu" not in job["resources"], job
