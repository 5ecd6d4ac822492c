"""SliCK labels of one (split, relation) chunk with the shared generation engine.

With `models.<name>.gpus` > 1 (unless `multi_gpu: device_map`) this file runs again under
torchrun, once per GPU (`--job <job.json>`): the model is spread over the ranks, tensor parallel
(every rank runs every request on its share of the heads) or sharded with FSDP2 (each rank
labels its share of the chunk's questions in lockstep), and rank 0 writes."""

import json
import logging
import sys
import time
from pathlib import Path

import polars as pl

from eqtools import distributed
from eqtools.engine import Generator, gather_answers, share
from eqtools.io import setup_logging, write_parquet
from eqtools.provenance import write_provenance
from eqtools.settings import Labelling
from eqtools.slick import label_questions


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
        max_batch_rows=job["max_batch_rows"],  # runtime settings, deliberately untracked
        backend=job["backend"],
        lockstep=lockstep,
    )
    start = time.perf_counter()
    mine = questions[share(questions.height, shares.rank, shares.world)]
    labels = label_questions(
        generator,
        mine,
        {job["relation"]: exemplars[job["relation"]]} if questions.height else {},
        n_samples=slick.n_samples,
        seed=slick.seed,
        full_p_correct=slick.full_p_correct,
    )
    # every rank's rows, in the chunk's order (each question was labelled by one rank)
    rows = gather_answers(labels.to_dicts(), questions.height, shares.world)
    labels = pl.DataFrame(rows, schema=labels.schema)
    log.info(
        "%s/%s: %d questions in %.1f s on %s (%s, %d process(es)); %s; engine %s",
        job["split"],
        job["relation"],
        questions.height,
        time.perf_counter() - start,
        device,
        model_spec.dtype,
        ranks.world,
        dict(labels["category"].value_counts().iter_rows()),
        generator.stats,
    )
    if ranks.main:
        write_parquet(labels, job["output"])


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
        "max_batch_rows": smk.config["engine"]["max_batch_rows"],
        "backend": smk.config["engine"]["backend"],
    }
    distributed.run_model_job(label, __file__, job, smk)
    write_provenance(smk.output[0], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
elif __name__ == "__main__":  # a rank, started by torchrun
    distributed.entry_point(distributed.rank_main)(sys.argv[1:], label)
