"""The fixed SliCK exemplar sets of every relation, drawn from dev (seeded)."""

import json

import polars as pl

from eqtools.io import setup_logging, write_text
from eqtools.provenance import write_provenance
from eqtools.settings import Exemplars
from eqtools.slick import draw_exemplars


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    spec = Exemplars.from_param(smk.params.spec)
    dev = pl.concat([pl.read_parquet(p) for p in smk.input])
    exemplars = draw_exemplars(dev, spec.n_exemplar_sets, spec.k_shot, spec.seed)
    write_text(
        json.dumps(exemplars, indent=1, ensure_ascii=False, sort_keys=True) + "\n", smk.output[0]
    )
    log.info("%d relations, %d sets of %d each", len(exemplars), spec.n_exemplar_sets, spec.k_shot)
    write_provenance(smk.output[0], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
