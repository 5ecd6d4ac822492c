"""Fine-tune a model on a mixture with per-epoch evaluation (dev, the training set, ID/OOD test)
and the per-question test predictions at both stops; resumes from its state directory after a
kill.

A recipe with a `distributed` strategy runs this file again under torchrun, once per rank
(`finetune.py --job <job.json>`); the job file holds everything a rank needs."""

import os
import sys
from pathlib import Path

import polars as pl
import torch

from eqtools import distributed
from eqtools.io import setup_logging
from eqtools.jobstate import claim_state, job_stamp, model_files
from eqtools.models import pick_device
from eqtools.provenance import write_provenance
from eqtools.settings import Finetune, Schedule
from eqtools.study import STOPS, TEST_SPLITS
from eqtools.training import TrainingError, finetune, forget_finished


def eval_frame(labels_path: str) -> pl.DataFrame:
    return pl.read_parquet(labels_path).select(
        "id", "relation", "question", pl.col("answer").alias("gold"), "category"
    )


def train(job: dict, ranks: distributed.Ranks, device: str) -> None:
    """The fine-tune of `job` (see `main`), on this rank."""
    spec = Finetune.from_param(job["spec"])
    train = pl.read_parquet(job["mixture"]).select(
        "id", "question", "answer", pl.col("gold_answer").alias("gold"), "category"
    )
    evals = {name: eval_frame(path) for name, path in job["evals"].items()}
    finetune(
        job["model"],
        train,
        evals,
        spec.recipe,
        job["out"],
        eval_every=spec.eval_every,
        schedule=Schedule.from_param(job["schedule"]),
        device=device,
        max_batch_rows=job["max_batch_rows"],
        backend=job["backend"],
        ranks=ranks,
        save_every=job["save_every"],
        keep_weights=job["keep_weights"],
    )


def state_root(smk) -> Path:
    """The run's resumable state: `finetune.state_dir` (scheduling only) or next to its metrics."""
    where = smk.config["finetune"]["state_dir"]
    if where is None:
        return Path(smk.output.metrics).parent / "state"
    w = smk.wildcards
    return Path(where) / w.model / f"{w.recipe}{w.seed}" / w.mixture


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    spec = Finetune.from_param(smk.params.spec)
    recipe_config = smk.config["recipes"][smk.wildcards.recipe]
    schedule = Schedule.from_recipe(recipe_config)  # scheduling: deliberately untracked
    device = pick_device(spec.device)
    log.info(
        "%s on %s: %s, %s, device %s",
        smk.wildcards.recipe,
        smk.wildcards.mixture,
        spec.recipe,
        schedule,
        device,
    )
    state = state_root(smk)
    stamp = job_stamp(
        smk.params.spec,
        smk.params.code,
        {name: smk.input[name] for name in ("mixture", "dev", "test", "ood_test")}
        | model_files(smk.input.model),
    )
    try:
        w = smk.wildcards
        resumes = claim_state(state, stamp, f"finetune {w.model}/{w.recipe}{w.seed}/{w.mixture}")
    except OSError as e:
        raise TrainingError(f"finetune.state_dir: {e}") from e
    if smk.resources.attempt == 1 and forget_finished(state):
        log.info("%s: the record of a run that finished before this invocation goes", state)
    log.info("state directory %s (%s)", state, "resuming" if resumes else "a new run")
    job = {
        "model": smk.input.model,
        "mixture": smk.input.mixture,
        "evals": {name: smk.input[name] for name in ("dev", "test", "ood_test")},
        "spec": smk.params.spec,
        "schedule": schedule.param(),
        "out": {
            "metrics": smk.output.metrics,
            "early_stop": smk.output.early_stop,
            "convergence": smk.output.convergence,
            "state": str(state),
            "predictions": {
                stop: {split: smk.output[f"{stop}_{split}"] for split in TEST_SPLITS}
                for stop in STOPS
            },
        },
        # runtime settings, deliberately untracked
        "max_batch_rows": smk.config["engine"]["max_batch_rows"],
        "backend": smk.config["engine"]["backend"],
        "save_every": smk.config["finetune"]["save_every"],
        "keep_weights": smk.config["finetune"]["keep_weights"],
    }
    if schedule.strategy == "none":
        torch.set_num_threads(smk.threads)
        train(job, distributed.ONE_PROCESS, device)
    else:
        key = f"recipes.{smk.wildcards.recipe}.distributed"
        distributed.check_fits(key, schedule, device, smk.threads, os.environ)
        distributed.run_ranks(
            Path(__file__).resolve(),
            job | {"device": device},
            schedule,
            smk.threads,
            Path(smk.log[0]),
            Path(smk.output.metrics).parent,
        )
    write_provenance([smk.output.metrics, smk.output.early_stop, smk.output.convergence], smk)
    for stop in STOPS:
        for split in TEST_SPLITS:
            out = smk.output[f"{stop}_{split}"]
            write_provenance(
                out,
                smk,
                inputs=[smk.input.model, smk.input.mixture, smk.input.dev, smk.input[split]],
            )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
elif __name__ == "__main__":  # a rank, started by torchrun
    distributed.entry_point(distributed.rank_main)(sys.argv[1:], train)
