"""Distributed fine-tuning (eqtools.distributed, workflow/scripts/finetune.py under torchrun) on
CPU with the gloo backend: two processes train like one, a killed two-process run resumes to
the metrics of an uninterrupted one, a failed rank stops the job, and a recipe that asks for
more than the job has is refused before anything starts.

The reference is always a run in one process without torch.distributed (strategy none), not
another distributed run.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from test_training import RECIPE as training_recipe

from eqtools import distributed
from eqtools.settings import Finetune, Recipe, Schedule
from eqtools.training import best_epoch
from helpers import ROOT

SCRIPT = ROOT / "workflow/scripts/finetune.py"

# dropout 0: with dropout each rank draws its own masks, so the runs would differ by more than
# the summation order
RECIPE = dict(training_recipe, dropout=0.0, epochs=4)

# Measured (docs/scaling.md, section 6): the largest relative difference of a per-epoch train
# loss between one process and two was 9e-9 with the tiny model (fsdp and ddp, lora and full)
# and 1.5e-7 with the embedded model (fsdp), about one float32 rounding (1.2e-7): only
# the summation order differs. The bound leaves a factor of about 70 for other CPUs' kernels
# and thread counts.
LOSS_RTOL = 1e-5


def write_inputs(root: Path, n_train: int = 11) -> dict:
    """The parquet inputs of the finetune rule: a mixture and labelled dev/test/ood_test sets.
    11 examples in batches of 4: the last batch of 3 gives the two ranks unequal shares."""
    qs = [f"Who founded company number {i}?" for i in range(n_train + 8)]
    root.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "id": [str(i) for i in range(n_train)],
            "question": qs[:n_train],
            "answer": [f"Person {i}" for i in range(n_train)],
            "gold_answer": [f"Person {i}" for i in range(n_train)],
            "category": ["Unknown", "HighlyKnown"] * (n_train // 2) + ["Unknown"] * (n_train % 2),
        }
    ).write_parquet(root / "mixture.parquet")
    evals = {}
    for k, name in enumerate(("dev", "test", "ood_test")):
        sl = qs[n_train + 2 * k : n_train + 2 * k + 4]
        pl.DataFrame(
            {
                "id": [f"{name}{i}" for i in range(len(sl))],
                "relation": ["P112"] * len(sl),
                "question": sl,
                "answer": ["Person 1", "x", "Person 3", "x"][: len(sl)],
                "category": ["Unknown"] * len(sl),
            }
        ).write_parquet(root / f"{name}.parquet")
        evals[name] = str(root / f"{name}.parquet")
    return {"mixture": str(root / "mixture.parquet"), "evals": evals}


def make_job(
    model_dir: Path,
    inputs: dict,
    out: Path,
    recipe: dict,
    schedule: Schedule,
    eval_every: dict | None = None,
    backend: str = "auto",
) -> dict:
    spec = Finetune(Recipe.from_dict(recipe), eval_every or {}, "cpu")
    return {
        "model": str(model_dir),
        **inputs,
        "spec": spec.param(),
        "schedule": schedule.param(),
        "out": {
            "metrics": str(out / "metrics.jsonl"),
            "early_stop": str(out / "early_stop"),
            "convergence": str(out / "convergence"),
            "state": str(out / "state"),
            "predictions": {
                stop: {split: str(out / f"eval/{stop}/{split}.parquet") for split in ("test",)}
                for stop in ("early_stop", "convergence")
            },
        },
        "max_batch_rows": 256,
        "backend": backend,
        "save_every": 1,
        "keep_weights": True,
        "device": "cpu",
    }


def run_one_process(job: dict) -> None:
    """The reference: the same job in this process, with no torch.distributed."""
    import finetune

    torch.set_num_threads(1)
    finetune.train(job, distributed.ONE_PROCESS, "cpu")


def start_ranks(
    job: dict, nproc: int, workdir: Path, site: Path | None = None
) -> tuple[subprocess.Popen, Path, str]:
    """torchrun with `nproc` ranks on the job, as the finetune rule starts it; `site`: a
    directory put first on the ranks' PYTHONPATH (a test's sitecustomize.py)."""
    job_file = workdir / f"job{time.monotonic_ns()}.json"
    job_file.write_text(json.dumps(job))
    schedule = Schedule.from_param(job["schedule"])
    command = distributed.launch_command(schedule, SCRIPT, job_file, dict(os.environ))
    log = workdir / f"{job_file.stem}.log"
    env = distributed.rank_environment(threads_per_rank=1)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, log, job_file.stem


def run_ranks(job: dict, nproc: int, workdir: Path) -> str:
    proc, log, _ = start_ranks(job, nproc, workdir)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    return log.read_text()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, inputs, tmp_path_factory):
    """The one-process reference run of a method and test schedule, computed once each (on the
    engine's default path: the paths give equal answers)."""
    runs = {}

    def run(method: str, eval_every: dict) -> Path:
        key = (method, json.dumps(eval_every))
        if key not in runs:
            out = tmp_path_factory.mktemp(f"one-{method}")
            recipe = dict(RECIPE, method=method, learning_rate=5e-3 if method == "lora" else 1e-3)
            schedule = Schedule(micro_batch_size=1)
            run_one_process(make_job(tiny_model_dir, inputs, out, recipe, schedule, eval_every))
            runs[key] = out
        return runs[key]

    return run


# Evaluation runs on every rank: under DDP each on its own copy, under FSDP on the sharded model
# in lockstep (the levels path, or transformers' generate with synced_gpus on the reference
# path). With the test set evaluated at epochs 3 and 4 only, the early stop's predictions come
# from the checkpoint loaded back into the sharded model at the end. FSDP with LoRA on the levels
# path: the embedded model's test below, and the tiny study's distributed recipe. Activation
# checkpointing recomputes the same forward: it changes no result either.
@pytest.mark.parametrize(
    ("strategy", "method", "checkpointing", "backend", "eval_every"),
    [
        ("fsdp", "full", True, "levels", {}),
        ("ddp", "lora", False, "levels", {}),
        ("fsdp", "lora", False, "reference", {"test": 3}),
    ],
    ids=["fsdp-full-checkpointing", "ddp-lora", "fsdp-lora-reference-test-every-3"],
)
def test_two_processes_train_like_one(
    strategy, method, checkpointing, backend, eval_every, tiny_model_dir, inputs, one_process,
    tmp_path,
):  # fmt: skip
    recipe = dict(RECIPE, method=method, learning_rate=5e-3 if method == "lora" else 1e-3)
    schedule = Schedule(
        micro_batch_size=1,
        strategy=strategy,
        nproc_per_node=2,
        activation_checkpointing=checkpointing,
    )
    out = tmp_path / "two"
    job = make_job(tiny_model_dir, inputs, out, recipe, schedule, eval_every, backend)
    log = run_ranks(job, 2, tmp_path)
    assert "2 process(es)" in log and f"{backend} path" in log
    reference = one_process(method, eval_every)
    one, two = metrics(reference), metrics(out)
    assert [x["world_size"] for x in two] == [2] * RECIPE["epochs"]
    assert [x["world_size"] for x in one] == [1] * RECIPE["epochs"]
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_RTOL), a["epoch"]
        accuracies = [k for k in a if k.endswith("_accuracy")]
        assert accuracies and {k: b[k] for k in accuracies} == {k: a[k] for k in accuracies}
    assert one[0]["train_loss"] != one[-1]["train_loss"]  # it trained
    if eval_every:  # the early stop is an epoch without the test set, evaluated at the end
        assert best_epoch(two) not in (3, 4)
        assert "evaluating ['test'] at the early stop" in log
    for stop in ("early_stop", "convergence"):
        a = pl.read_parquet(reference / f"eval/{stop}/test.parquet")
        b = pl.read_parquet(out / f"eval/{stop}/test.parquet")
        assert a.equals(b), stop
    # the checkpoints hold the full weights, plain safetensors
    from safetensors.torch import load_file

    for stop in ("early_stop", "convergence"):
        a = load_file(next((reference / stop).glob("*.safetensors")))
        b = load_file(next((out / stop).glob("*.safetensors")))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    # the finished state keeps no optimizer state
    assert not (out / "state/epoch").exists() and (out / "state/finished/record.pt").exists()


def rank_pids(job_name: str) -> dict[int, int]:
    """{rank: pid} of the worker processes of a job: their command line names the job file and
    their environment holds RANK."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
        if job_name.encode() in cmdline and b"LOCAL_RANK" in env:
            found[int(env[b"RANK"])] = int(proc.name)
    return found


# Loaded by every process of the killed run (first on its PYTHONPATH): rank 1 kills itself
# (SIGKILL) as epoch 3's evaluation starts, when rank 0 is already in its first forward.
KILL_IN_EVALUATION = """
import os, signal
if os.environ.get("RANK") == "1":
    from eqtools.engine import generator

    answer = generator.Generator.generate
    calls = []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return answer(self, *args, **kwargs)

    generator.Generator.generate = generate
"""


@pytest.mark.e2e  # minutes on 2 cores: make test-e2e
def test_a_failed_rank_stops_the_job_and_the_run_resumes_to_the_same_metrics(
    tiny_model_dir, inputs, tmp_path
):
    """Rank 1 dies (SIGKILL) during epoch 3's evaluation, while rank 0 waits for it in a
    lockstep forward: torchrun stops rank 0 too, the log holds the failure, and what is on disk
    is epoch 2, complete; started again, the run resumes there and ends with the metrics and
    weights of an uninterrupted 2-process run (dropout included: every rank's RNG is part of the
    state). In bf16 mixed precision, evaluation included: FSDP gathers bf16 weights over fp32
    master weights."""
    recipe = dict(
        RECIPE, method="full", learning_rate=1e-3, dropout=0.1, epochs=5, dtype="bfloat16",
        eval_dtype="bfloat16",
    )  # fmt: skip
    schedule = Schedule(micro_batch_size=1, strategy="fsdp", nproc_per_node=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_ranks(make_job(tiny_model_dir, inputs, straight, recipe, schedule), 2, tmp_path)

    job = make_job(tiny_model_dir, inputs, killed, recipe, schedule)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILL_IN_EVALUATION)
    proc, log, name = start_ranks(job, 2, tmp_path, site)
    assert proc.wait(timeout=600) != 0
    time.sleep(1)
    assert not rank_pids(name)  # torchrun stopped rank 0 too
    text = log.read_text()
    assert "Signal 9 (SIGKILL)" in text and "local_rank: 1" in text, text[-3000:]
    # on disk: a complete earlier epoch, never a half-written state; no convergence checkpoint
    assert (killed / "state/epoch/trainer.pt").exists() and (
        killed / "state/epoch/dcp/.metadata"
    ).exists()
    assert not (killed / "convergence").exists()
    done = json.loads((killed / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    assert (
        done == 2
        and torch.load(killed / "state/epoch/trainer.pt", weights_only=False)["epoch"] == 2
    )

    resumed = run_ranks(job, 2, tmp_path)  # the same command again
    assert "resuming after epoch" in resumed
    assert (killed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    from safetensors.torch import load_file

    for stop in ("early_stop", "convergence"):
        a = load_file(next((straight / stop).glob("*.safetensors")))
        b = load_file(next((killed / stop).glob("*.safetensors")))
        assert all(torch.equal(a[k], b[k]) for k in a), stop


def test_a_recipe_asking_for_more_than_the_job_has_is_refused():
    schedule = Schedule(strategy="ddp", nproc_per_node=4)
    with pytest.raises(
        distributed.DistributedError,
        match=r"recipes\.big\.distributed\.nproc_per_node is 4, but the job has 2 cores",
    ):
        distributed.check_fits("recipes.big.distributed", schedule, "cpu", 2, {})
    two_nodes = Schedule(strategy="fsdp", nproc_per_node=1, nodes=2)
    with pytest.raises(
        distributed.DistributedError,
        match=r"recipes\.big\.distributed\.nodes is 2, but this job runs outside SLURM",
    ):
        distributed.check_fits("recipes.big.distributed", two_nodes, "cpu", 2, {})
    allocation = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1"}
    with pytest.raises(distributed.DistributedError, match=r"nodes is 2, but this job has 1 node"):
        distributed.check_fits("recipes.big.distributed", two_nodes, "cpu", 2, allocation)
    distributed.check_fits(
        "recipes.big.distributed", two_nodes, "cpu", 2, allocation | {"SLURM_JOB_NUM_NODES": "2"}
    )


def test_launch_commands():
    job, worker = Path("/w/.job.json"), Path("/r/finetune.py")
    one_node = distributed.launch_command(
        Schedule(strategy="fsdp", nproc_per_node=4), worker, job, {}
    )
    assert one_node[1:] == [
        "-m", "torch.distributed.run", "--max-restarts=0", "--standalone", "--nproc-per-node=4",
        "/r/finetune.py", "--job", "/w/.job.json",
    ]  # fmt: skip
    two_nodes = distributed.launch_command(
        Schedule(strategy="fsdp", nproc_per_node=4, nodes=2),
        worker,
        job,
        {"SLURM_JOB_ID": "42"},
        "gpu01",
    )
    assert two_nodes[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert {
        "--nnodes=2",
        "--nproc-per-node=4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu01:29500",
        "--rdzv-id=42",
    } <= set(two_nodes)
    assert "--standalone" not in two_nodes


@pytest.fixture(scope="module")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, materialised as the prepare_model rule does."""
    from conftest import embedded_gguf, prepare_model

    root = tmp_path_factory.mktemp("smollm2")
    package, gguf = embedded_gguf()
    prepare_model("smollm2-135m", {"path": package, "gguf_file": gguf}, root)
    return root / "smollm2-135m"


@pytest.mark.e2e  # minutes on 2 cores: make test-e2e
def test_two_processes_train_the_embedded_model_like_one(embedded_model_dir, tmp_path):
    """The real 135M model, LoRA on all linear layers, FSDP over 2 processes against 1."""
    inputs = write_inputs(tmp_path / "inputs", n_train=6)
    recipe = dict(
        RECIPE,
        learning_rate=1e-3,
        epochs=2,
        lora={"rank": 4, "alpha": 8, "target_modules": "all-linear"},
    )
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_process(make_job(embedded_model_dir, inputs, one, recipe, Schedule(micro_batch_size=2)))
    schedule = Schedule(micro_batch_size=2, strategy="fsdp", nproc_per_node=2)
    run_ranks(make_job(embedded_model_dir, inputs, two, recipe, schedule), 2, tmp_path)
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_RTOL), a["epoch"]
        accuracies = [k for k in a if k.endswith("_accuracy")]
        assert {k: b[k] for k in accuracies} == {k: a[k] for k in accuracies}
    for stop in ("early_stop", "convergence"):
        a = pl.read_parquet(one / f"eval/{stop}/test.parquet")
        assert a.equals(pl.read_parquet(two / f"eval/{stop}/test.parquet")), stop


def test_fsdp_resumed_after_its_last_epoch_saves_the_trained_weights(
    tiny_model_dir, world_of_one, tmp_path
):
    """A run killed after its last epoch's state but before the checkpoints resumes with no
    epoch left to train: the checkpoints written from the sharded model must hold the trained
    weights, restored from the state."""
    from safetensors.torch import load_file
    from test_training import frames

    from eqtools.training import finetune

    train, evals = frames()
    schedule = Schedule(micro_batch_size=2, strategy="fsdp")
    recipe = dict(RECIPE, method="full", learning_rate=1e-3, epochs=2)

    def outputs(root):
        return {k: root / k for k in ("early_stop", "convergence", "state")} | {
            "metrics": root / "metrics.jsonl"
        }

    torch.set_num_threads(1)
    straight, killed = outputs(tmp_path / "straight"), outputs(tmp_path / "killed")
    finetune(str(tiny_model_dir), train, evals, recipe, straight, {}, schedule, ranks=world_of_one)

    def killed_after(epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # as if killed once epoch 2's state is saved

    with pytest.raises(KeyboardInterrupt):
        finetune(
            str(tiny_model_dir), train, evals, dict(recipe, epochs=3), killed, {}, schedule,
            on_epoch=killed_after, ranks=world_of_one,
        )  # fmt: skip
    assert not killed["convergence"].exists()
    finetune(str(tiny_model_dir), train, evals, recipe, killed, {}, schedule, ranks=world_of_one)
    a = load_file(straight["convergence"] / "model.safetensors")
    b = load_file(killed["convergence"] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert killed["metrics"].read_text() == straight["metrics"].read_text()


def test_a_tensor_parallel_wave_takes_rows_for_the_gpus_share_of_the_kv_heads():
    """engine.max_batch_rows sizes one GPU's key-value cache: tensor parallel over 4 ranks (each
    rank running every request, a quarter of the heads) takes 4x the rows; FSDP ranks (each
    its own share of the requests) and one process take max_batch_rows each."""
    four = distributed.Ranks(rank=0, world=4, local_rank=0)
    assert distributed.rows_per_wave(512, four, distributed.ONE_PROCESS) == 2048
    assert distributed.rows_per_wave(512, four, four) == 512
    one = distributed.ONE_PROCESS
    assert distributed.rows_per_wave(512, one, one) == 512
