"""Labels of one split from its (relation) chunks, joined to the questions."""

import polars as pl

from eqtools.io import setup_logging, write_parquet
from eqtools.provenance import write_provenance


def merge(questions: pl.DataFrame, chunks: list[pl.DataFrame]) -> pl.DataFrame:
    labels = pl.concat(chunks)
    merged = questions.join(labels.drop("relation"), on="id", how="left", validate="1:1")
    missing = merged.filter(pl.col("category").is_null())
    if missing.height:
        raise ValueError(f"{missing.height} questions have no label, e.g. {missing['id'][0]}")
    return merged


def main(smk) -> None:
    setup_logging(smk.log[0])
    chunks = [pl.read_parquet(p) for p in smk.input.chunks]
    write_parquet(merge(pl.read_parquet(smk.input.questions), chunks), smk.output[0])
    write_provenance(smk.output[0], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
