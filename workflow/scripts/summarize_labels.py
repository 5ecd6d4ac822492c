"""The category summary of all labelled splits: counts and shares per split and relation."""

import polars as pl

from eqtools.io import setup_logging, write_csv, write_text
from eqtools.provenance import write_provenance
from eqtools.settings import Summary
from eqtools.study import CATEGORIES, input_name


def summarize(labels: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Questions per (split, relation, category), with each category's share of the relation;
    relation 'all' sums the split."""
    frames = []
    for split, frame in labels.items():
        both = pl.concat(
            [
                frame.select("relation", "category"),
                frame.select(pl.lit("all").alias("relation"), "category"),
            ]
        )
        counts = both.group_by("relation", "category").len("n")
        grid = (
            both.select("relation")
            .unique()
            .join(
                pl.DataFrame(
                    {"category": list(CATEGORIES)}, schema={"category": pl.Enum(CATEGORIES)}
                ),
                how="cross",
            )
        )
        counts = grid.join(counts, on=["relation", "category"], how="left").with_columns(
            pl.col("n").fill_null(0)
        )
        frames.append(
            counts.with_columns(
                pl.lit(split).alias("split"),
                (pl.col("n") / pl.col("n").sum().over("relation")).fill_nan(None).alias("share"),
            )
        )
    return (
        pl.concat(frames)
        .select("split", "relation", "category", "n", "share")
        .sort("split", "relation", "category")
    )


def markdown(summary: pl.DataFrame) -> str:
    wide = summary.filter(pl.col("relation") == "all").pivot(
        on="category", index="split", values="n"
    )
    lines = ["| split | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 1) + "|"]
    for row in wide.iter_rows(named=True):
        lines.append(
            f"| {row['split']} | " + " | ".join(str(row.get(c, 0)) for c in CATEGORIES) + " |"
        )
    return "\n".join(lines) + "\n"


def main(smk) -> None:
    setup_logging(smk.log[0])
    splits = Summary.from_param(smk.params.spec).splits
    labels = {s: pl.read_parquet(smk.input[input_name("labels", s)]) for s in splits}
    summary = summarize(labels)
    write_csv(summary, smk.output.csv)
    write_text(markdown(summary), smk.output.md)
    write_provenance([smk.output.csv, smk.output.md], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
