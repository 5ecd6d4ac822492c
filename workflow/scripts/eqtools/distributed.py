"""Data-parallel fine-tuning over several processes (docs/scaling.md): the process group, the
model wrapped for a strategy (DDP, or FSDP2 sharding), and the torchrun command that starts the
ranks.

A recipe's `distributed` block only schedules work: the global batch stays `batch_size` whatever
the process count, each rank takes its share of every batch, and the loss is normalised by the
answer tokens of the whole batch (eqtools.training.train_epoch). Runs at different process
counts therefore differ only in floating-point summation order, and in the dropout masks each
rank draws.
"""

import argparse
import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from eqtools.io import setup_logging
from eqtools.settings import Recipe, Schedule

log = logging.getLogger(__name__)

# The ranks meet in a collective after each epoch's evaluation and checkpoint writes; the
# collectives' default timeout (10 min) would end a job whose ranks finish them far apart.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=4)
RDZV_PORT = 29500


class DistributedError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank, world size, local rank (its device index)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def initialised(self) -> bool:
        return dist.is_available() and dist.is_initialized()


ONE_PROCESS = Ranks()


def start(device: str) -> tuple[Ranks, str]:
    """Join the process group that torchrun set up (its environment variables), with NCCL on
    GPUs and gloo on CPUs; one process without torchrun is rank 0 of 1. Returns the ranks and
    this rank's device."""
    if "LOCAL_RANK" not in os.environ:
        return ONE_PROCESS, device
    ranks = Ranks(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    )
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        device = f"cuda:{ranks.local_rank}"
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo", timeout=COLLECTIVE_TIMEOUT
    )
    return ranks, device


def entry_point(main):
    """A rank's entry point, wrapped so that torchrun reports the traceback of a rank that
    fails (not only its exit code)."""
    return record(main)


def stop(ranks: Ranks) -> None:
    if ranks.initialised:
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.initialised:
        dist.barrier()


def all_sum(ranks: Ranks, values: list[float], device: str) -> list[float]:
    """The sum of `values` over all ranks (float64, so that token counts stay exact)."""
    if not ranks.initialised:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def base_model(model):
    """The transformers model itself, inside a peft wrapper or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names transformers lists as never to be split
    across devices (`_no_split_modules`): the units FSDP shards one at a time."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedError(
            f"{type(base).__name__} names no decoder-layer class (_no_split_modules): FSDP has "
            "nothing to shard layer by layer; use distributed.strategy: ddp"
        )
    return layers


def gather_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype FSDP gathers the weights in for every forward, evaluation included: bf16 only
    where both training and evaluation compute in bf16; else float32, with training's bf16 from
    autocast as in one process (so a float32 evaluation sees the weights as trained)."""
    both = recipe.dtype == "bfloat16" and recipe.eval_dtype == "bfloat16"
    return torch.bfloat16 if both else torch.float32


def wrap(
    build: Callable[[str], torch.nn.Module],
    schedule: Schedule,
    recipe: Recipe,
    device: str,
    ranks: Ranks,
):
    """The model to train, `build(device)`: as it is (strategy none), in
    DistributedDataParallel, or sharded with FSDP2 as it loads (`load_sharded`: `fully_shard` per
    decoder layer, then the root), gathering the weights in `gather_dtype(recipe)` and reducing
    gradients in fp32 over fp32 master weights."""

    def prepare(model):
        if schedule.activation_checkpointing:
            base_model(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    if schedule.strategy == "fsdp":
        return load_sharded(build, device, ranks, gather_dtype(recipe), prepare)
    model = build(device)
    prepare(model)
    if schedule.strategy == "none":
        return model
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = torch.device(device).type == "cuda"
    return DistributedDataParallel(
        model, device_ids=[ranks.local_rank] if on_gpu else None, find_unused_parameters=False
    )


def load_sharded(
    build: Callable[[str], torch.nn.Module],
    device: str,
    ranks: Ranks,
    param_dtype: torch.dtype | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
):
    """The model `build(device)` makes, sharded over the ranks (`shard`) without any device ever
    holding all of it: rank 0 builds it on the host ("cpu": the weights as loaded), every rank
    builds a shape-only skeleton (`build("meta")`), prepares it (`prepare`, e.g. activation
    checkpointing), shards it and allocates its own shards on `device`; then rank 0 sends the
    weights one tensor at a time (each rank keeps its shard) and the buffers that are not
    saved (e.g. rotary frequencies, computed at build time)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = build("cpu") if ranks.main else None
    with torch.random.fork_rng():  # a skeleton draws no numbers from the training's streams
        model = build("meta")
    if prepare is not None:
        prepare(model)
    shard(model, param_dtype)
    model.to_empty(device=device)
    weights = full.state_dict() if full is not None else {}
    set_model_state_dict(
        model,
        weights,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    saved = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name not in saved:
            if full is not None:
                buffer.copy_(full.get_buffer(name))
            dist.broadcast(buffer, src=0)
    del full, weights
    return model


def shard(model, param_dtype: torch.dtype | None = None):
    """`model` sharded over the ranks with FSDP2, in place: `fully_shard` per decoder layer, then
    the root; every forward gathers the weights in `param_dtype` (None: as they are), gradients
    are reduced in fp32."""
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # the engine's reference path calls generate, not forward: the root's weights are gathered
    # around it too
    register_fsdp_forward_method(model, "generate")
    return model


def unwrapped(model):
    """The module inside a DDP wrapper (FSDP2 wraps in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def check_fits(
    key: str,
    schedule: Schedule,
    device: str,
    threads: int,
    env: dict,
    processes: str = "nproc_per_node",
) -> None:
    """Refuse, before anything starts, a setting (`key`.`processes`, e.g.
    recipes.<r>.distributed.nproc_per_node) that asks for more processes than this job has: GPUs
    (or cores given to the job) per node, and nodes in the SLURM allocation."""
    on_gpu = torch.device(device).type == "cuda"
    have = torch.cuda.device_count() if on_gpu else threads
    what = "GPUs on this node" if on_gpu else "cores given to this job (threads)"
    if schedule.nproc_per_node > have:
        raise DistributedError(
            f"{key}.{processes} is {schedule.nproc_per_node}, but the job has {have} {what}"
        )
    if schedule.nodes > 1:
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        if "SLURM_JOB_ID" not in env or nodes < schedule.nodes:
            raise DistributedError(
                f"{key}.nodes is {schedule.nodes}, but this job "
                + (f"has {nodes} node(s)" if "SLURM_JOB_ID" in env else "runs outside SLURM")
                + " (several nodes need `snakemake --profile slurm`)"
            )


def head_node(env: dict) -> str:
    """The first host of the SLURM allocation: the rendezvous point of a multi-node run."""
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return hosts[0]


def launch_command(
    schedule: Schedule, worker: Path, job: Path, env: dict, head: str | None = None
) -> list[str]:
    """The command that starts the ranks. One node: `torchrun --standalone` (c10d rendezvous on
    localhost). Several nodes under SLURM: one torchrun per node through `srun`, meeting at the
    allocation's first host."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--max-restarts=0"]
    program = [str(worker), "--job", str(job)]
    if schedule.nodes == 1:
        return [
            *torchrun,
            "--standalone",
            f"--nproc-per-node={schedule.nproc_per_node}",
            *program,
        ]
    return [
        "srun",
        f"--nodes={schedule.nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        *torchrun,
        f"--nnodes={schedule.nodes}",
        f"--nproc-per-node={schedule.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={head}:{RDZV_PORT}",
        f"--rdzv-id={env['SLURM_JOB_ID']}",
        *program,
    ]


def rank_environment(threads_per_rank: int) -> dict:
    """The environment of the ranks: their threads, and eqtools importable."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank)}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + env.get("PYTHONPATH", "").split(os.pathsep)
    ).rstrip(os.pathsep)
    return env


def launch(command: list[str], threads_per_rank: int, log_path: Path) -> None:
    """Run `command`, its output appended to the rule's log. torchrun stops every rank when one
    fails and prints that rank's traceback (the worker is wrapped in `record`)."""
    log.info("launching: %s", shlex.join(command))
    with open(log_path, "a") as out:
        result = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, env=rank_environment(threads_per_rank)
        )
    if result.returncode != 0:
        raise DistributedError(
            f"a rank failed (torchrun exit status {result.returncode}); its error is in {log_path}"
        )


def run_ranks(
    worker: Path, job: dict, schedule: Schedule, threads: int, log_path: Path, workdir: Path
) -> None:
    """Start the ranks of `schedule` on `worker --job <file>` (the file, in `workdir`, holds
    `job`) and wait for them; `threads` are the job's, shared by its ranks on a node."""
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=workdir, prefix=".job.", suffix=".json", delete=False
    ) as f:
        json.dump(job, f)
    try:
        head = head_node(os.environ) if schedule.nodes > 1 else None
        command = launch_command(schedule, worker, Path(f.name), os.environ, head)
        launch(command, max(1, threads // schedule.nproc_per_node), log_path)
    finally:
        os.unlink(f.name)


def rank_main(argv: list[str], work: Callable[[dict, Ranks, str], None]) -> None:
    """One rank, started by torchrun on a worker script (eqtools is on its PYTHONPATH): joins
    the process group and runs `work(job, ranks, device)` on the job file of `--job`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True, type=Path)
    job = json.loads(parser.parse_args(argv).job.read_text())
    ranks, device = start(job["device"])
    setup_logging(None, rank=ranks.rank)
    try:
        work(job, ranks, device)
    finally:
        stop(ranks)


def tensor_parallel_obstacle(config, world: int) -> str | None:
    """Why transformers' tensor parallelism (the architecture's `base_model_tp_plan`) cannot
    spread a model of `config` over `world` ranks, or None."""
    text = config.get_text_config()
    if not getattr(text, "base_model_tp_plan", None):
        return f"{text.model_type} has no tensor-parallel plan in transformers"
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or heads % world or kv % world:
        return f"its {heads} attention / {kv} key-value heads do not divide over {world} ranks"
    return None


def rows_per_wave(max_batch_rows: int, ranks: Ranks, shares: Ranks) -> int:
    """The rows a labelling or P(True) rank runs per wave for `engine.max_batch_rows`, which
    sizes one GPU's key-value cache: under tensor parallelism (several ranks, every one running
    every request: `shares` is one process) each GPU holds 1/world of the key-value heads, so a
    wave of world x max_batch_rows rows fills its cache as max_batch_rows rows fill one GPU's;
    otherwise max_batch_rows per process. Answers do not depend on the wave."""
    if ranks.world > 1 and shares.world == 1:
        return max_batch_rows * ranks.world
    return max_batch_rows


def load_model(model_dir: str, dtype: str, device: str, ranks: Ranks, multi_gpu: str = "auto"):
    """(model, tokenizer, device, lockstep, shares) for a labelling or P(True) rank. One process:
    as `eqtools.models.load` loads it. Several ranks (`multi_gpu`): tensor parallel ("tp";
    "auto" where the architecture has a plan whose heads divide over the ranks): each rank loads
    its share of every layer, and every rank runs every request (`shares` is one process);
    else sharded with FSDP2 as it loads ("fsdp": no GPU ever holds the whole model), each rank
    its share of the requests (`shares` are the ranks), in the lockstep its forwards need."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from eqtools.engine import Lockstep
    from eqtools.models import load, torch_dtype

    if ranks.world == 1:
        return (*load(model_dir, dtype=dtype, device=device), None, ranks)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    strategy, reason = multi_gpu, "multi_gpu: fsdp"
    if multi_gpu in ("auto", "tp"):
        reason = tensor_parallel_obstacle(AutoConfig.from_pretrained(model_dir), ranks.world)
        if reason and multi_gpu == "tp":
            raise DistributedError(f"multi_gpu is tp, but {reason}; use fsdp or auto")
        strategy = "fsdp" if reason else "tp"
    log.info(
        "%d ranks: %s",
        ranks.world,
        "tensor parallel" if strategy == "tp" else f"FSDP, in lockstep ({reason})",
    )
    if strategy == "tp":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype(dtype), tp_plan="auto"
        )
        return model.eval(), tokenizer, device, None, ONE_PROCESS
    model = load_sharded(lambda where: load(model_dir, dtype=dtype, device=where)[0], device, ranks)
    return model.eval(), tokenizer, device, Lockstep(model, device), ranks


def run_model_job(work: Callable[[dict, Ranks, str], None], worker: str, job: dict, smk) -> None:
    """A labelling or P(True) job of the rule `smk` (its {model}'s registry entry with the
    scheduling keys, threads, log and output): `work(job, ranks, device)` in this process, or
    with `gpus` > 1 (unless `multi_gpu: device_map`) once per GPU under torchrun (`worker` is
    the rule's script, which hands `work` to `rank_main`)."""
    from eqtools.models import pick_device

    model = smk.wildcards.model
    entry = smk.config["models"][model]  # its scheduling keys: deliberately untracked
    if entry["gpus"] == 1 or entry["multi_gpu"] == "device_map":
        torch.set_num_threads(smk.threads)
        work(job, ONE_PROCESS, entry["device"])
        return
    device = pick_device(entry["device"])
    schedule = Schedule(strategy="fsdp", nproc_per_node=entry["gpus"])
    check_fits(f"models.{model}", schedule, device, smk.threads, os.environ, processes="gpus")
    run_ranks(
        Path(worker).resolve(),
        job | {"device": device, "multi_gpu": entry["multi_gpu"]},
        schedule,
        smk.threads,
        Path(smk.log[0]),
        Path(smk.output[0]).parent,
    )
