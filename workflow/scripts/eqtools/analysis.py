"""The paper's analyses as pure functions on polars frames and metrics dicts (docs/study.md,
"Evaluation and analyses"); no torch, no file writes. Used by the table script
(workflow/scripts/make_tables.py) and open to the figures.

Loaders:
    read_metrics(path)                 per-epoch lines of a fine-tune's metrics.jsonl
    read_predictions(files)            the test predictions of several (mixture, stop, split), long

Table 2 (accuracy per SliCK category of the test questions, with App. I's significance):
    accuracy_by_category(preds, mixtures, n_chunks, seed)
    chunk_accuracies(correct, n_chunks, seed), paired_p_value(best, other), stars(p)

Table 1 (linear model of test accuracy on the Known / Unknown training examples fitted):
    fitted_counts(line), fit_points(metrics), fit_linear_model(points, split),
    linear_model_frame(fits)

Table 8 (training on "I don't know" for the Unknown examples):
    is_idk(prediction), answered_accuracy(preds)

Tables 3-5 (category distribution of the labelled splits per relation):
    category_distribution(labels)

Accuracies are shares in [0, 1] in frames and percentages (`*_pct`) in the table frames, as the
paper reports them; the linear model is fitted on accuracy in percentage points, so that its
coefficients read like the paper's Table 1 (b0 36.9, b_kn 7.3, b_unk -8.3).
"""

import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl

from eqtools.em import normalize_answer
from eqtools.study import CATEGORIES, IDK_ANSWER, KNOWN, STOPS, TEST_SPLITS

FULL = "Full"  # the whole test set, next to the four categories (Table 2's first column)
SUBSETS = (FULL, *CATEGORIES)


# ---------------------------------------------------------------------------------- loaders


def read_metrics(path: str | Path) -> list[dict]:
    """The per-epoch lines of a fine-tune's metrics.jsonl, in epoch order."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sorted(lines, key=lambda line: line["epoch"])


def read_predictions(files: dict) -> pl.DataFrame:
    """Test predictions of results/eval files, `{(mixture, stop, split): path}`, long: mixture,
    stop, split, id, category, prediction, correct (one row per question and file)."""
    frames = []
    for (mixture, stop, split), path in files.items():
        frame = pl.read_parquet(path, columns=["id", "category", "prediction", "correct"])
        frames.append(
            frame.select(
                pl.lit(mixture).alias("mixture"),
                pl.lit(stop).alias("stop"),
                pl.lit(split).alias("split"),
                "id",
                pl.col("category").cast(pl.Enum(CATEGORIES)),
                "prediction",
                "correct",
            )
        )
    return pl.concat(frames) if frames else pl.DataFrame()


# ---------------------------------------------------------------------------------- Table 2


def stars(p: float | None) -> str:
    """'**' for p < 0.01, '*' for p < 0.05, '' otherwise (also for a missing or NaN p)."""
    if p is None or not np.isfinite(p):
        return ""
    return "**" if p < 0.01 else "*" if p < 0.05 else ""


def chunk_accuracies(correct: np.ndarray, n_chunks: int, seed: int) -> np.ndarray:
    """App. I: shuffle the questions (seeded; the same order for every row, so that the test is
    paired), cut them into min(n_chunks, n) near-equal chunks (np.array_split) and take each
    row's accuracy per chunk. `correct` is (rows, questions) of 0/1; returns (rows, chunks).
    Fewer than n_chunks questions give one question per chunk; none give zero chunks."""
    correct = np.asarray(correct, dtype=float)
    n = correct.shape[1]
    order = np.random.default_rng(seed).permutation(n)
    chunks = np.array_split(order, min(n_chunks, n)) if n else []
    return (
        np.stack([correct[:, c].mean(axis=1) for c in chunks], axis=1)
        if n
        else np.empty((correct.shape[0], 0))
    )


def paired_p_value(best: np.ndarray, other: np.ndarray) -> float:
    """Two-sided p-value of scipy's paired t-test between two rows' chunk accuracies; NaN when
    it is undefined (fewer than two chunks, or no difference at all between the rows)."""
    from scipy.stats import ttest_rel

    best, other = np.asarray(best, dtype=float), np.asarray(other, dtype=float)
    if best.size < 2 or np.array_equal(best, other):
        return float("nan")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_rel(best, other).pvalue)


def _correct_matrix(preds: pl.DataFrame, mixtures: list[str]) -> tuple[np.ndarray, int]:
    """(rows = mixtures, columns = questions sorted by id) of 0/1; every mixture must have been
    evaluated on the same questions."""
    ids = None
    rows = []
    for mixture in mixtures:
        frame = preds.filter(pl.col("mixture") == mixture).sort("id")
        if ids is None:
            ids = frame["id"]
        elif not frame["id"].equals(ids):
            raise ValueError(f"{mixture} was evaluated on other questions than {mixtures[0]}")
        rows.append(frame["correct"].cast(pl.Float64).to_numpy())
    return np.stack(rows), 0 if ids is None else len(ids)


def accuracy_by_category(
    preds: pl.DataFrame, mixtures, n_chunks: int = 100, seed: int = 0
) -> pl.DataFrame:
    """Table 2 for one test split: accuracy of each mixture at each stop on the Full test set and
    on each SliCK category's questions, the best per column and stop, and the paired t-test
    (App. I) of every other row against the best row.

    `preds` is read_predictions' frame for one split; `mixtures` the rows in display order (those
    absent from `preds` are skipped). Returns one row per (stop, mixture, subset): n_questions,
    n_correct, accuracy_pct (NaN for an empty subset), n_chunks, is_best, p_value (NaN for the
    reference best row, for rows identical to it and where the test is undefined) and
    significance ('*' p < 0.05, '**' p < 0.01; only for rows below the best accuracy)."""
    present = set(preds["mixture"].unique()) if preds.height else set()
    out = []
    for stop in STOPS:
        at_stop = preds.filter(pl.col("stop") == stop) if preds.height else preds
        rows = [
            m for m in mixtures if m in present and at_stop.filter(pl.col("mixture") == m).height
        ]
        if not rows:
            continue
        for subset in SUBSETS:
            part = at_stop if subset == FULL else at_stop.filter(pl.col("category") == subset)
            correct, n = _correct_matrix(part, rows)
            acc = correct.mean(axis=1) if n else np.full(len(rows), np.nan)
            chunks = chunk_accuracies(correct, n_chunks, seed)
            best_acc = np.nanmax(acc) if n else np.nan
            ref = int(np.nanargmax(acc)) if n else None
            for i, mixture in enumerate(rows):
                p = (
                    float("nan")
                    if ref is None or i == ref
                    else paired_p_value(chunks[ref], chunks[i])
                )
                below = bool(n) and acc[i] < best_acc
                out.append(
                    {
                        "stop": stop,
                        "variant": mixture,
                        "subset": subset,
                        "n_questions": n,
                        "n_correct": int(correct[i].sum()) if n else 0,
                        "accuracy_pct": 100 * float(acc[i]),
                        "n_chunks": chunks.shape[1],
                        "is_best": bool(n) and not below,
                        "p_value": p,
                        "significance": stars(p) if below else "",
                    }
                )
    schema = {
        "stop": pl.String,
        "variant": pl.String,
        "subset": pl.String,
        "n_questions": pl.Int64,
        "n_correct": pl.Int64,
        "accuracy_pct": pl.Float64,
        "n_chunks": pl.Int64,
        "is_best": pl.Boolean,
        "p_value": pl.Float64,
        "significance": pl.String,
    }
    return pl.DataFrame(out, schema=schema, orient="row") if out else pl.DataFrame(schema=schema)


# ---------------------------------------------------------------------------------- Table 1


def fitted_counts(line: dict) -> dict:
    """Training examples of each SliCK category fitted (answered correctly) after one epoch:
    round(train_accuracy_<C> * train_n_<C>); a category absent from the mixture counts 0.
    Returns {category: count, "Known": sum of the three Known, "n_train": train_n}."""
    counts = {}
    for cat in CATEGORIES:
        n = line.get(f"train_n_{cat}") or 0
        acc = line.get(f"train_accuracy_{cat}")
        counts[cat] = round(acc * n) if n and acc is not None else 0
    counts["Known"] = sum(counts[c] for c in KNOWN)
    counts["n_train"] = line.get("train_n") or sum(
        line.get(f"train_n_{c}") or 0 for c in CATEGORIES
    )
    return counts


def fit_points(metrics: dict[str, list[dict]]) -> pl.DataFrame:
    """One point per (mixture, epoch): n_train, n_known_fitted, n_unknown_fitted and the test
    accuracies (shares; null where that split was not evaluated at that epoch). |D| is the
    largest training set among the runs (all full mixtures share it; known_only_X has fewer
    examples but the same denominator, as in the paper's N/|D|): column d_size, and
    known_fitted_share = N_kn/|D|, unknown_fitted_share = N_unk/|D|."""
    rows = []
    for mixture, lines in metrics.items():
        for line in lines:
            counts = fitted_counts(line)
            rows.append(
                {
                    "mixture": mixture,
                    "epoch": int(line["epoch"]),
                    "n_train": int(counts["n_train"]),
                    "n_known_fitted": int(counts["Known"]),
                    "n_unknown_fitted": int(counts["Unknown"]),
                    **{f"{s}_accuracy": line.get(f"{s}_accuracy") for s in TEST_SPLITS},
                }
            )
    schema = {
        "mixture": pl.String,
        "epoch": pl.Int64,
        "n_train": pl.Int64,
        "n_known_fitted": pl.Int64,
        "n_unknown_fitted": pl.Int64,
        **{f"{s}_accuracy": pl.Float64 for s in TEST_SPLITS},
    }
    points = (
        pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)
    )
    return fitted_shares(points)


def fitted_shares(points: pl.DataFrame) -> pl.DataFrame:
    """d_size (the largest n_train among the points), known_fitted_share = N_kn/|D| and
    unknown_fitted_share = N_unk/|D|, computed (again) over all of `points` (e.g. several
    seeds' points pooled)."""
    return points.with_columns(pl.col("n_train").max().alias("d_size")).with_columns(
        (pl.col("n_known_fitted") / pl.col("d_size")).alias("known_fitted_share"),
        (pl.col("n_unknown_fitted") / pl.col("d_size")).alias("unknown_fitted_share"),
    )


TERMS = ("b0", "b_kn", "b_unk")


def fit_linear_model(points: pl.DataFrame, split: str, cluster: str | None = None) -> dict:
    """Table 1 for one test split: OLS of accuracy (percentage points) on N_kn/|D| and
    N_unk/|D| over fit_points' rows where `split` was evaluated.

    `cluster` names a column of `points` (e.g. the fine-tune of each point, when the points of
    several seeds are pooled): the standard errors are then cluster-robust (statsmodels'
    `cov_type="cluster"`, with its small-sample correction; t tests with clusters - 1 degrees
    of freedom), since the epochs of one fine-tune are not independent points. The result then
    also holds "n_clusters".

    Returns {"split", "n_points", "r_squared", "note", "terms": {term: {"estimate", "std_error",
    "t_value", "p_value"}}}. A degenerate fit does not raise: with a rank-deficient design
    (fewer than 3 distinct points, or N_kn and N_unk collinear with each other or constant)
    every number is NaN; with exactly 3 points the coefficients are exact and their standard
    errors and p-values NaN; with a constant accuracy (a model that never answers right) b0 is
    that value, b_kn = b_unk = 0, and standard errors, p-values and R^2 NaN; `note` says which."""
    import statsmodels.api as sm

    used = points.filter(pl.col(f"{split}_accuracy").is_not_null()) if points.height else points
    n = used.height
    nan = float("nan")
    result = {
        "split": split,
        "n_points": n,
        "r_squared": nan,
        "note": "",
        "terms": {t: dict(estimate=nan, std_error=nan, t_value=nan, p_value=nan) for t in TERMS},
    }
    if cluster is not None:
        result["n_clusters"] = used[cluster].n_unique() if n else 0
    if n == 0:
        result["note"] = "no epoch with this test split evaluated"
        return result
    x = used.select("known_fitted_share", "unknown_fitted_share").to_numpy().astype(float)
    design = np.column_stack([np.ones(n), x])
    y = 100 * used[f"{split}_accuracy"].to_numpy().astype(float)
    if np.linalg.matrix_rank(design) < design.shape[1]:
        result["note"] = (
            f"singular design ({n} points): N_kn/|D| and N_unk/|D| do not vary independently "
            "(e.g. one of them constant over all points); coefficients not identifiable"
        )
        return result
    exact, constant = n <= design.shape[1], np.ptp(y) == 0
    robust = {}
    if cluster is not None:
        groups = used[cluster].cast(pl.String).to_list()
        codes = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        if len(codes) >= 2:
            robust = dict(
                cov_type="cluster",
                cov_kwds={"groups": np.array([codes[g] for g in groups])},
                use_t=True,
            )
    one_cluster = cluster is not None and not robust
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = sm.OLS(y, design).fit(**robust)
        no_se = exact or constant or one_cluster
        for i, term in enumerate(TERMS):
            result["terms"][term] = {
                "estimate": float(fit.params[i]),
                "std_error": nan if no_se else float(fit.bse[i]),
                "t_value": nan if no_se else float(fit.tvalues[i]),
                "p_value": nan if no_se else float(fit.pvalues[i]),
            }
        result["r_squared"] = nan if constant else float(fit.rsquared)
    notes = []
    if exact:
        notes.append("3 points for 3 coefficients: exact fit, no standard errors")
    if constant:
        notes.append(
            "accuracy constant over all points: b0 is that value, no standard errors, R^2 undefined"
        )
    if one_cluster:
        notes.append("one fine-tune only: no cluster-robust standard errors")
    result["note"] = "; ".join(notes)
    return result


def linear_model_frame(fits: list[dict]) -> pl.DataFrame:
    """fit_linear_model results as one row per (split, term)."""
    rows = [
        {
            "split": f["split"],
            "term": t,
            **f["terms"][t],
            "r_squared": f["r_squared"],
            "n_points": f["n_points"],
            "note": f["note"],
        }
        for f in fits
        for t in TERMS
    ]
    schema = {
        "split": pl.String,
        "term": pl.String,
        "estimate": pl.Float64,
        "std_error": pl.Float64,
        "t_value": pl.Float64,
        "p_value": pl.Float64,
        "r_squared": pl.Float64,
        "n_points": pl.Int64,
        "note": pl.String,
    }
    if any("n_clusters" in f for f in fits):  # pooled seeds: the fine-tunes the SEs cluster by
        for row, (f, _) in zip(rows, [(f, t) for f in fits for t in TERMS], strict=True):
            row["n_clusters"] = f.get("n_clusters")
        schema["n_clusters"] = pl.Int64
    return pl.DataFrame(rows, schema=schema, orient="row")


# ---------------------------------------------------------------------------------- Table 8

_IDK = normalize_answer(IDK_ANSWER)


def is_idk(prediction: str | None) -> bool:
    """Whether a prediction abstains: "I don't know" after the exact match's normalisation
    (so "I don't know." and "i dont know" abstain too). An empty prediction is an answer."""
    return normalize_answer(prediction or "") == _IDK


def answered_accuracy(preds: pl.DataFrame) -> pl.DataFrame:
    """Table 8: per (split, stop, mixture) of read_predictions' frame, n_questions, n_answered
    (predictions that are not "I don't know"), answered_pct, n_correct, accuracy_answered_pct
    (correct among answered; NaN when nothing is answered) and accuracy_pct (on all
    questions: an abstention counts as wrong)."""
    if not preds.height:
        preds = pl.DataFrame(
            schema={
                "split": pl.String,
                "stop": pl.String,
                "mixture": pl.String,
                "prediction": pl.String,
                "correct": pl.Boolean,
            }
        )
    answered = ~pl.col("prediction").map_elements(is_idk, return_dtype=pl.Boolean)
    return (
        preds.with_columns(answered.alias("answered"))
        .group_by("split", "stop", "mixture", maintain_order=True)
        .agg(
            pl.len().cast(pl.Int64).alias("n_questions"),
            pl.col("answered").sum().cast(pl.Int64).alias("n_answered"),
            (pl.col("correct") & pl.col("answered")).sum().cast(pl.Int64).alias("n_correct"),
        )
        .with_columns(
            (100 * pl.col("n_answered") / pl.col("n_questions")).alias("answered_pct"),
            pl.when(pl.col("n_answered") > 0)
            .then(100 * pl.col("n_correct") / pl.col("n_answered"))
            .otherwise(float("nan"))
            .alias("accuracy_answered_pct"),
            (100 * pl.col("n_correct") / pl.col("n_questions")).alias("accuracy_pct"),
        )
        .rename({"mixture": "variant"})
    )


# ---------------------------------------------------------------------------------- Tables 3-5


def category_distribution(labels: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Questions per (split, relation) and SliCK category, wide: n_total, n_<Category> and
    pct_<Category> (share of the relation's questions, %); relation "all" sums the split.
    Splits keep the order of `labels`, relations sorted by number (P17 before P136)."""
    rows = []
    for split, frame in labels.items():
        relations = sorted(frame["relation"].unique().to_list(), key=lambda r: int(r[1:]))
        for relation in [*relations, "all"]:
            part = frame if relation == "all" else frame.filter(pl.col("relation") == relation)
            counts = dict(part.group_by("category").len().iter_rows())
            total = part.height
            row = {"split": split, "relation": relation, "n_total": total}
            row |= {f"n_{c}": int(counts.get(c, 0)) for c in CATEGORIES}
            row |= {
                f"pct_{c}": 100 * counts.get(c, 0) / total if total else float("nan")
                for c in CATEGORIES
            }
            rows.append(row)
    return pl.DataFrame(rows, orient="row")
