"""P(True) of the base model for every question of a labelled split (the Fig. 5 baseline).

With `models.<name>.gpus` > 1 (unless `multi_gpu: device_map`) this file runs again under
torchrun, once per GPU (`--job <job.json>`): the model is spread over the ranks, tensor parallel
(every rank runs every request on its share of the heads) or sharded with FSDP2 (each rank
scores its share of the proposals in lockstep), and rank 0 writes.

The split is scored in groups of `engine.questions_per_save` questions; rank 0 saves each
finished group (eqtools.partial), so that a killed job resumes after its last saved group."""

import logging
import sys
import time

import polars as pl

from eqtools import distributed
from eqtools.engine import gather_answers, share
from eqtools.io import setup_logging
from eqtools.jobstate import job_stamp, model_files
from eqtools.partial import (
    PartialResults,
    forget_complete,
    group_bounds,
    partial_dir,
    shared_by_main,
    start_progress,
)
from eqtools.provenance import write_provenance
from eqtools.ptrue import SCORE_SCHEMA, proposals, question_scores, score_p_true
from eqtools.settings import Ptrue


def score(job: dict, ranks: distributed.Ranks, device: str) -> None:
    """Score the split of `job` (see `main`) on this rank; rank 0 writes the scores."""
    log = logging.getLogger("workflow")
    spec = Ptrue.from_param(job["spec"])
    rows = proposals(pl.read_parquet(job["labels"]), spec.ptrue.proposals)
    model, tokenizer, device, lockstep, shares = distributed.load_model(
        job["model"], spec.model.dtype, device, ranks, job.get("multi_gpu", "auto")
    )
    batch_rows = distributed.rows_per_wave(job["max_batch_rows"], ranks, shares)
    # rank 0 keeps the finished groups of questions; every rank scores its share of every group
    ids = rows["id"].unique(maintain_order=True).to_list()
    saved = PartialResults(partial_dir(job["output"]), job["stamp"], ids, SCORE_SCHEMA)
    done = shared_by_main(ranks, saved.resume() if ranks.main else 0)
    progress = start_progress("P(True) of", job["split"], len(ids), "questions", done, "scored")
    start = time.perf_counter()
    for first, end in group_bounds(done, len(ids), job["questions_per_save"]):
        group = rows.filter(pl.col("id").is_in(ids[first:end]))
        mine = group[share(group.height, shares.rank, shares.world)]
        # rows per forward pass: the engine's runtime setting, deliberately untracked
        scores = score_p_true(model, tokenizer, mine, device, batch_rows, lockstep)
        result = question_scores(group, gather_answers(scores, group.height, shares.world))
        if ranks.main:
            saved.save(first, result)
        progress.advance(end - first)
    progress.finish()
    if ranks.main:
        result = saved.complete(job["output"])
        log.info(
            "%s: P(True) of %d questions (%d proposals; %d questions in this attempt) in %.1f s "
            "on %s (%d process(es)); mean %.3f",
            job["split"],
            result.height,
            rows.height,
            len(ids) - done,
            time.perf_counter() - start,
            device,
            ranks.world,
            result["p_true"].mean() if result.height else float("nan"),
        )


def main(smk) -> None:
    setup_logging(smk.log[0])
    job = {
        "model": smk.input.model,
        "labels": smk.input.labels,
        "split": smk.wildcards.split,
        "spec": smk.params.spec,
        "output": smk.output[0],
        "stamp": job_stamp(
            smk.params.spec,
            smk.params.code,
            {"labels": smk.input.labels, **model_files(smk.input.model)},
        ),
        # scheduling settings, deliberately untracked
        "questions_per_save": smk.config["engine"]["questions_per_save"],
        "max_batch_rows": smk.config["engine"]["max_batch_rows"],
    }
    if smk.resources.attempt == 1:  # only a retry publishes what an earlier attempt finished
        forget_complete(smk.output[0])
    distributed.run_model_job(score, __file__, job, smk)
    write_provenance(smk.output[0], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
elif __name__ == "__main__":  # a rank, started by torchrun
    distributed.entry_point(distributed.rank_main)(sys.argv[1:], score)
