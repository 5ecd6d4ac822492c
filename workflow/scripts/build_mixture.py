"""One training mixture from the SliCK labels of the train pool (docs/study.md, "Training sets")."""

import polars as pl

from eqtools.io import setup_logging, write_parquet
from eqtools.mixtures import build_mixture, relation_sizes
from eqtools.provenance import write_provenance
from eqtools.settings import Mixtures


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    spec = Mixtures.from_param(smk.params.spec)
    labels = pl.read_parquet(smk.input[0])
    sizes = relation_sizes(labels, spec.relations, spec.per_relation_size)
    mixture = build_mixture(labels, smk.wildcards.mixture, sizes, spec.seed)
    log.info(
        "%s: %d examples; per relation %s; categories %s",
        smk.wildcards.mixture,
        mixture.height,
        sizes,
        dict(mixture["category"].value_counts().iter_rows()),
    )
    write_parquet(mixture, smk.output[0])
    write_provenance(smk.output[0], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
