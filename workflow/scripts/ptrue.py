"""P(True) of the base model for every question of a labelled split (the Fig. 5 baseline)."""

import time

import polars as pl
import torch

from eqtools.io import setup_logging, write_parquet
from eqtools.models import load
from eqtools.provenance import write_provenance
from eqtools.ptrue import proposals, question_scores, score_p_true
from eqtools.settings import Ptrue


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    spec = Ptrue.from_param(smk.params.spec)
    model_spec = spec.model
    torch.set_num_threads(smk.threads)
    labels = pl.read_parquet(smk.input.labels)
    rows = proposals(labels, spec.ptrue.proposals)
    model, tokenizer, device = load(
        smk.input.model, dtype=model_spec.dtype, device=model_spec.device
    )
    start = time.perf_counter()
    # rows per forward pass: the engine's runtime setting, deliberately untracked
    scores = score_p_true(
        model, tokenizer, rows, device, batch_rows=smk.config["engine"]["max_batch_rows"]
    )
    result = question_scores(rows, scores)
    log.info(
        "%s: P(True) of %d questions (%d proposals) in %.1f s on %s; mean %.3f",
        smk.wildcards.split,
        result.height,
        rows.height,
        time.perf_counter() - start,
        device,
        result["p_true"].mean() if result.height else float("nan"),
    )
    write_parquet(result, smk.output[0])
    write_provenance(smk.output[0], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
