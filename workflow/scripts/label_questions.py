"""SliCK labels of one (split, relation) chunk with the shared generation engine."""

import json
import time

import polars as pl
import torch

from eqtools.engine import Generator
from eqtools.io import setup_logging, write_parquet
from eqtools.models import load
from eqtools.provenance import write_provenance
from eqtools.settings import Labelling
from eqtools.slick import label_questions


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    spec = Labelling.from_param(smk.params.spec)
    slick, model_spec = spec.slick, spec.model
    torch.set_num_threads(smk.threads)
    relation = smk.wildcards.relation
    questions = pl.read_parquet(smk.input.questions).filter(pl.col("relation") == relation)
    with open(smk.input.exemplars) as f:
        exemplars = json.loads(f.read())
    model, tokenizer, device = load(
        smk.input.model, dtype=model_spec.dtype, device=model_spec.device
    )
    generator = Generator(
        model,
        tokenizer,
        max_new_tokens=slick.max_new_tokens,
        temperature=slick.temperature,
        top_k=slick.top_k,
        max_batch_rows=smk.config["engine"][
            "max_batch_rows"
        ],  # runtime settings, deliberately untracked
        backend=smk.config["engine"]["backend"],
    )
    start = time.perf_counter()
    labels = label_questions(
        generator,
        questions,
        {relation: exemplars[relation]} if questions.height else {},
        n_samples=slick.n_samples,
        seed=slick.seed,
        full_p_correct=slick.full_p_correct,
    )
    seconds = time.perf_counter() - start
    log.info(
        "%s/%s: %d questions in %.1f s on %s (%s); %s; engine %s",
        smk.wildcards.split,
        relation,
        questions.height,
        seconds,
        device,
        model_spec.dtype,
        dict(labels["category"].value_counts().iter_rows()),
        generator.stats,
    )
    write_parquet(labels, smk.output[0])
    write_provenance(smk.output[0], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
