"""P(True) of the base model for every question of a labelled split (the Fig. 5 baseline).

With `models.<name>.gpus` > 1 (unless `multi_gpu: device_map`) this file runs again under
torchrun, once per GPU (`--job <job.json>`): the model is spread over the ranks, tensor parallel
(every rank runs every request on its share of the heads) or sharded with FSDP2 (each rank
scores its share of the proposals in lockstep), and rank 0 writes."""

import logging
import sys
import time

import polars as pl

from eqtools import distributed
from eqtools.engine import gather_answers, share
from eqtools.io import setup_logging, write_parquet
from eqtools.provenance import write_provenance
from eqtools.ptrue import proposals, question_scores, score_p_true
from eqtools.settings import Ptrue


def score(job: dict, ranks: distributed.Ranks, device: str) -> None:
    """Score the split of `job` (see `main`) on this rank; rank 0 writes the scores."""
    log = logging.getLogger("workflow")
    spec = Ptrue.from_param(job["spec"])
    rows = proposals(pl.read_parquet(job["labels"]), spec.ptrue.proposals)
    model, tokenizer, device, lockstep, shares = distributed.load_model(
        job["model"], spec.model.dtype, device, ranks, job.get("multi_gpu", "auto")
    )
    start = time.perf_counter()
    mine = rows[share(rows.height, shares.rank, shares.world)]
    # rows per forward pass: the engine's runtime setting, deliberately untracked
    scores = score_p_true(model, tokenizer, mine, device, job["max_batch_rows"], lockstep)
    result = question_scores(rows, gather_answers(scores, rows.height, shares.world))
    log.info(
        "%s: P(True) of %d questions (%d proposals) in %.1f s on %s (%d process(es)); mean %.3f",
        job["split"],
        result.height,
        rows.height,
        time.perf_counter() - start,
        device,
        ranks.world,
        result["p_true"].mean() if result.height else float("nan"),
    )
    if ranks.main:
        write_parquet(result, job["output"])


def main(smk) -> None:
    setup_logging(smk.log[0])
    job = {
        "model": smk.input.model,
        "labels": smk.input.labels,
        "split": smk.wildcards.split,
        "spec": smk.params.spec,
        "output": smk.output[0],
        "max_batch_rows": smk.config["engine"]["max_batch_rows"],
    }
    distributed.run_model_job(score, __file__, job, smk)
    write_provenance(smk.output[0], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
elif __name__ == "__main__":  # a rank, started by torchrun
    distributed.entry_point(distributed.rank_main)(sys.argv[1:], score)
