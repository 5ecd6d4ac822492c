"""Filtered EntityQuestions splits (docs/study.md, "Data"), then the configured subsampling."""

from eqtools.entity_questions import (
    ARCHIVE_SPLITS,
    OUTPUT_SPLITS,
    build_splits,
    read_archive,
    split_sizes,
    subsample,
)
from eqtools.io import setup_logging, write_csv, write_parquet
from eqtools.provenance import write_provenance
from eqtools.settings import Data


def prepare(archive: str, spec: Data) -> tuple[dict, object]:
    """Filtered, subsampled splits and the per-relation sizes before subsampling."""
    templates = spec.templates
    in_dist, out_dist = spec.relations.in_distribution, spec.relations.out_of_distribution
    needed = {(r, s) for r in in_dist for s in ARCHIVE_SPLITS}
    needed |= {(r, s) for r in out_dist for s in ("dev", "test")}
    needed |= {(r, "test") for r in templates}
    frames = read_archive(archive, templates, sorted(needed))
    splits = build_splits(frames, in_dist, out_dist, list(templates))
    sizes = split_sizes(splits)
    caps = spec.subsample.max_per_relation
    seed = spec.subsample.seed
    return {name: subsample(f, caps[name], seed, salt=name) for name, f in splits.items()}, sizes


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    spec = Data.from_param(smk.params.spec)
    splits, sizes = prepare(smk.input.archive, spec)
    for name in OUTPUT_SPLITS:
        write_parquet(splits[name], smk.output[name])
        log.info(
            "%s: %d questions in %d relations",
            name,
            splits[name].height,
            splits[name]["relation"].n_unique(),
        )
    write_csv(sizes, smk.output.sizes)
    write_provenance([smk.output[n] for n in (*OUTPUT_SPLITS, "sizes")], smk)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
