"""SliCK labels of one (split, relation) chunk with the shared generation engine.

With `models.<name>.gpus` > 1 (unless `multi_gpu: device_map`) this file runs again under
torchrun, once per GPU (`--job <job.json>`): the model is spread over the ranks, tensor parallel
(every rank runs every request on its share of the heads) or sharded with FSDP2 (each rank
labels its share of the chunk's questions in lockstep), and rank 0 writes.

The chunk is labelled in groups of `engine.questions_per_save` questions; rank 0 saves each
finished group (eqtools.partial), so that a killed job resumes after its last saved group."""

import json
import logging
import sys
import time
from pathlib import Path

import polars as pl

from eqtools import distributed
from eqtools.engine import Generator, gather_answers, share
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
from eqtools.settings import Labelling
from eqtools.slick import LABEL_SCHEMA, label_questions


def label(job: dict, ranks: distributed.Ranks, device: str) -> None:
    """Label the chunk of `job` (see `main`) on this rank; rank 0 writes it."""
    log = logging.getLogger("workflow")
    spec = Labelling.from_param(job["spec"])
    slick, model_spec = spec.slick, spec.model
    questions = pl.read_parquet(job["questions"]).filter(pl.col("relation") == job["relation"])
    exemplars = json.loads(Path(job["exemplars"]).read_text())
    model, tokenizer, device, lockstep, shares = distributed.load_model(
        job["model"], model_spec.dtype, device, ranks, job.get("multi_gpu", "auto")
    )
    generator = Generator(
        model,
        tokenizer,
        max_new_tokens=slick.max_new_tokens,
        temperature=slick.temperature,
        top_k=slick.top_k,
        # runtime settings, deliberately untracked
        max_batch_rows=distributed.rows_per_wave(job["max_batch_rows"], ranks, shares),
        backend=job["backend"],
        lockstep=lockstep,
    )
    relation_exemplars = {job["relation"]: exemplars[job["relation"]]} if questions.height else {}
    # rank 0 keeps the finished groups; every rank labels its share of every group
    saved = PartialResults(
        partial_dir(job["output"]),
        job["stamp"],
        questions["id"].to_list(),
        LABEL_SCHEMA,
    )
    done = shared_by_main(ranks, saved.resume() if ranks.main else 0)
    subject = f"{job['split']}/{job['relation']}"
    progress = start_progress("labelling", subject, questions.height, "questions", done, "labelled")
    start = time.perf_counter()
    for first, end in group_bounds(done, questions.height, job["questions_per_save"]):
        group = questions[first:end]
        labels = label_questions(
            generator,
            group[share(group.height, shares.rank, shares.world)],
            relation_exemplars,
            n_samples=slick.n_samples,
            seed=slick.seed,
            full_p_correct=slick.full_p_correct,
        )
        # every rank's rows, in the group's order (each question was labelled by one rank)
        rows = gather_answers(labels.to_dicts(), group.height, shares.world)
        if ranks.main:
            saved.save(first, pl.DataFrame(rows, schema=LABEL_SCHEMA))
        progress.advance(group.height)
    progress.finish()
    if ranks.main:
        labels = saved.complete(job["output"])
        log.info(
            "%s: %d questions (%d in this attempt) in %.1f s on %s (%s, %d process(es)); %s; "
            "engine %s",
            subject,
            questions.height,
            questions.height - done,
            time.perf_counter() - start,
            device,
            model_spec.dtype,
            ranks.world,
            dict(labels["category"].value_counts().iter_rows()),
            generator.stats,
        )


def main(smk) -> None:
    setup_logging(smk.log[0])
    job = {
        "model": smk.input.model,
        "questions": smk.input.questions,
        "exemplars": smk.input.exemplars,
        "split": smk.wildcards.split,
        "relation": smk.wildcards.relation,
        "spec": smk.params.spec,
        "output": smk.output[0],
        "stamp": job_stamp(
            smk.params.spec,
            smk.params.code,
            {
                "questions": smk.input.questions,
                "exemplars": smk.input.exemplars,
                **model_files(smk.input.model),
            },
        ),
        # scheduling settings, deliberately untracked
        "questions_per_save": smk.config["engine"]["questions_per_save"],
        "max_batch_rows": smk.config["engine"]["max_batch_rows"],
        "backend": smk.config["engine"]["backend"],
    }
    if smk.resources.attempt == 1:  # only a retry publishes what an earlier attempt finished
        forget_complete(smk.output[0])
    distributed.run_model_job(label, __file__, job, smk)
    write_provenance(smk.output[0], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
elif __name__ == "__main__":  # a rank, started by torchrun
    distributed.entry_point(distributed.rank_main)(sys.argv[1:], label)
