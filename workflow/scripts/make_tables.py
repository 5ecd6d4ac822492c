"""The paper's tables, each as CSV (tidy, full precision) and Markdown (readable: percentages with
one decimal, best in bold, significance stars). One rule per table runs this script; the rule's
settings (`params.spec`, an eqtools.settings.Table) say which, and its inputs are named by
eqtools.study.input_name (the computations are in eqtools/analysis.py):

- table2: Table 2 (and its OOD version): accuracy on the Full test set and per SliCK category of
  the test questions, for D_HighlyKnown, D_MaybeKnown, D_WeaklyKnown, D_Unknown and D_Natural at
  EARLY_STOP and CONVERGENCE, with App. I's paired t-test against the column's best.
- table1: Table 1: Accuracy = b0 + b_kn * N_kn/|D| + b_unk * N_unk/|D| over every (variant,
  epoch), ID and OOD test, plus the points it was fitted on.
- table8: Table 8: D (X% Unknown) vs D_IDK (its Unknown answers replaced by "I don't know"):
  accuracy on answered questions and share answered, both stops, ID and OOD test.
- category_distribution: Tables 3-5: SliCK categories of each labelled split per relation.
"""

import math

import polars as pl

from eqtools import analysis
from eqtools.io import setup_logging, write_csv, write_text
from eqtools.provenance import write_provenance
from eqtools.settings import Table
from eqtools.study import (
    CATEGORIES,
    SPLIT_NAMES,
    STOP_NAMES,
    STOPS,
    TEST_SPLITS,
    input_name,
    run_name,
    variant_name,
)

DASH = "–"


def predictions(inputs: dict, model: str, mixtures, splits) -> pl.DataFrame:
    """read_predictions of the named eval inputs of `mixtures` x stops x `splits`."""
    files = {
        (mixture, stop, split): inputs[input_name("eval", model, mixture, stop, split)]
        for mixture in mixtures
        for stop in STOPS
        for split in splits
    }
    return analysis.read_predictions(files)


def pct(value: float | None, digits: int = 1) -> str:
    return (
        DASH
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def num(value: float | None, digits: int = 2) -> str:
    return pct(value, digits)


def p_text(p: float | None) -> str:
    if p is None or math.isnan(p):
        return f"p {DASH}"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- Table 2


def table2_markdown(table: pl.DataFrame, title: str, n_chunks: int) -> str:
    if table.is_empty():
        return (
            f"# {title}\n\nNo fine-tune of D_HighlyKnown ... D_Unknown or D_Natural is "
            "configured.\n"
        )
    sizes = dict(table.select("subset", "n_questions").unique().iter_rows())
    header = ["Stop", "Variant"] + [f"{s} (n={sizes.get(s, 0)})" for s in analysis.SUBSETS]
    rows = []
    for (stop, variant), group in table.group_by("stop", "variant", maintain_order=True):
        cells = {r["subset"]: r for r in group.iter_rows(named=True)}
        row = [STOP_NAMES[stop], variant_name(variant)]
        for subset in analysis.SUBSETS:
            r = cells[subset]
            text = pct(r["accuracy_pct"])
            if r["is_best"]:
                text = f"**{text}**"
            row.append(text + r["significance"].replace("*", "\\*"))
        rows.append(row)
    legend = (
        "Accuracy (%) of the fine-tuned model on the test questions of each SliCK category of the "
        "base model (n = questions). **Bold**: the best of the column at that stop. \\* / \\*\\*: "
        "significantly below the best (App. I: the column's questions shuffled (seeded) and cut "
        f"into min({n_chunks}, n) chunks, paired t-test of per-chunk accuracies; "
        "p < 0.05 / p < 0.01). "
        f"{DASH}: no test question in that category."
    )
    return f"# {title}\n\n" + markdown_table(header, rows) + "\n" + legend + "\n"


def make_table2(smk, spec: Table, title: str) -> None:
    preds = predictions(smk.input, smk.wildcards.model, spec.mixtures, [spec.split])
    table = analysis.accuracy_by_category(preds, spec.mixtures, spec.n_chunks, spec.seed)
    split = pl.lit(spec.split).alias("split")
    write_csv(table.with_columns(split).select("split", *table.columns), smk.output.csv)
    write_text(table2_markdown(table, title, spec.n_chunks), smk.output.md)


# ---------------------------------------------------------------------------------- Table 1


def table1_markdown(fits: list[dict], points: pl.DataFrame, mixtures: list[str], title: str) -> str:
    header = ["Test set", "b0", "b_kn", "b_unk", "R^2", "points"]
    rows = []
    for fit in fits:
        cells = [SPLIT_NAMES[fit["split"]]]
        for term in analysis.TERMS:
            t = fit["terms"][term]
            cells.append(
                f"{num(t['estimate'], 1)} (SE {num(t['std_error'], 1)}; {p_text(t['p_value'])})"
            )
        cells += [num(fit["r_squared"]), str(fit["n_points"])]
        rows.append(cells)
    d_size = points["d_size"].max() if points.height else None
    notes = [f"- {SPLIT_NAMES[f['split']]}: {f['note']}" for f in fits if f["note"]]
    text = (
        f"# {title}\n\n"
        + markdown_table(header, rows)
        + "\nOLS fit of Accuracy (%) = b0 + b_kn * N_kn/|D| + b_unk * N_unk/|D|, one point per "
        "epoch of each fine-tune with that test split evaluated. N_kn, N_unk: the Known "
        "(HighlyKnown + MaybeKnown + WeaklyKnown) and Unknown training examples the model answers "
        f"correctly after that epoch; |D| = {d_size} (the largest training set). "
        f"Variants: {', '.join(variant_name(m) for m in mixtures)} "
        '(D_IDK runs are left out: their Unknown examples are trained on "I don\'t know"). '
        "Paper (PaLM 2-M): ID 36.9 / 7.3 / -8.3, R^2 0.86; OOD 36.2 / 3.2 / -3.0, R^2 0.95.\n"
    )
    return text + ("\nNotes:\n" + "\n".join(notes) + "\n" if notes else "")


def make_table1(smk, spec: Table, title: str) -> None:
    model = smk.wildcards.model
    metrics = {
        m: analysis.read_metrics(smk.input[input_name("metrics", model, m)]) for m in spec.mixtures
    }
    points = analysis.fit_points(metrics)
    fits = [analysis.fit_linear_model(points, split) for split in TEST_SPLITS]
    write_csv(analysis.linear_model_frame(fits), smk.output.csv)
    write_csv(points, smk.output.points)
    write_text(table1_markdown(fits, points, list(metrics), title), smk.output.md)


# ---------------------------------------------------------------------------------- Table 8


def table8_markdown(table: pl.DataFrame, title: str) -> str:
    header = ["Variant", "Stop"] + [
        f"{SPLIT_NAMES[s]}: {c}"
        for s in TEST_SPLITS
        for c in ("accuracy on answered", "% answered")
    ]
    rows = []
    cells = {(r["split"], r["stop"], r["variant"]): r for r in table.iter_rows(named=True)}
    for variant, stop in table.select("variant", "stop").unique(maintain_order=True).iter_rows():
        row = [variant_name(variant), STOP_NAMES[stop]]
        for split in TEST_SPLITS:
            r = cells.get((split, stop, variant))
            row += [pct(r["accuracy_answered_pct"]), pct(r["answered_pct"])] if r else [DASH, DASH]
        rows.append(row)
    legend = (
        "Accuracy (%) among the questions the model answers (a prediction that is not "
        "\"I don't know\" after the exact match's normalisation; an empty prediction counts as an "
        "answer) and the share of questions answered (%). Paper (PaLM 2-M, 50% Unknown): "
        "D 43.0 / 38.8 at EARLY_STOP / "
        "CONVERGENCE (100% answered); D_IDK 61.8 (58.7% answered) / 61.8 (55.6% answered).\n"
    )
    return f"# {title}\n\n" + markdown_table(header, rows) + "\n" + legend


def make_table8(smk, spec: Table, title: str) -> None:
    preds = predictions(smk.input, smk.wildcards.model, spec.mixtures, TEST_SPLITS)
    order = {m: i for i, m in enumerate(spec.mixtures)}
    table = (
        analysis.answered_accuracy(preds)
        .with_columns(
            pl.col("variant").replace_strict(order, return_dtype=pl.Int64).alias("_v"),
            pl.col("stop")
            .replace_strict({s: i for i, s in enumerate(STOPS)}, return_dtype=pl.Int64)
            .alias("_s"),
            pl.col("split")
            .replace_strict({s: i for i, s in enumerate(TEST_SPLITS)}, return_dtype=pl.Int64)
            .alias("_p"),
        )
        .sort("_v", "_s", "_p")
        .drop("_v", "_s", "_p")
    )
    write_csv(table, smk.output.csv)
    write_text(table8_markdown(table, title), smk.output.md)


# ---------------------------------------------------------------------------------- Tables 3-5


def distribution_markdown(table: pl.DataFrame, title: str) -> str:
    header = ["Split", "Relation", "Questions"] + list(CATEGORIES)
    rows = [
        [r["split"], r["relation"], str(r["n_total"])]
        + [f"{r[f'n_{c}']} ({pct(r[f'pct_{c}'])}%)" for c in CATEGORIES]
        for r in table.iter_rows(named=True)
    ]
    legend = (
        "Questions per SliCK category of the base model: count (share of the relation's "
        "questions).\n"
    )
    return f"# {title}\n\n" + markdown_table(header, rows) + "\n" + legend


def make_category_distribution(smk, spec: Table, title: str) -> None:
    columns = ["relation", "category"]
    labels = {
        split: pl.read_parquet(smk.input[input_name("labels", split)], columns=columns)
        for split in spec.splits
    }
    table = analysis.category_distribution(labels)
    write_csv(table, smk.output.csv)
    write_text(distribution_markdown(table, title), smk.output.md)


TABLES = {
    "table2": (make_table2, "Table 2: test accuracy per SliCK category"),
    "table1": (make_table1, "Table 1: test accuracy vs Known and Unknown training examples fitted"),
    "table8": (make_table8, 'Table 8: training on "I don\'t know" for the Unknown examples'),
    "category_distribution": (
        make_category_distribution,
        "Tables 3-5: SliCK categories per relation",
    ),
}


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    spec = Table.from_param(smk.params.spec)
    make, title = TABLES[spec.table]
    where = [smk.wildcards.model]
    if smk.wildcards.get("recipe"):
        where.append(run_name(smk.wildcards.recipe, smk.wildcards.get("seed", "")))
    if spec.split:
        where.append(SPLIT_NAMES[spec.split])
    make(smk, spec, f"{title} ({', '.join(where)})")
    outputs = list(smk.output)
    write_provenance(outputs, smk)
    log.info("%s: %s", spec.table, ", ".join(outputs))


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
