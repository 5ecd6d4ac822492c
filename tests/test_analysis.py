"""The tables' statistics (eqtools/analysis.py) on synthetic inputs with known answers."""

import json
import math

import numpy as np
import polars as pl
import pytest

from eqtools import analysis
from eqtools.study import CATEGORIES, TABLE2_MIXTURES, variant_name


def predictions(
    rows: dict[tuple[str, str], list[bool]], categories: list[str], split: str = "test"
) -> pl.DataFrame:
    """read_predictions' frame from {(mixture, stop): correct per question}."""
    frames = []
    for (mixture, stop), correct in rows.items():
        n = len(correct)
        frames.append(
            pl.DataFrame(
                {
                    "mixture": [mixture] * n,
                    "stop": [stop] * n,
                    "split": [split] * n,
                    "id": [f"q{i:04d}" for i in range(n)],
                    "category": pl.Series(categories, dtype=pl.Enum(CATEGORIES)),
                    "prediction": ["x"] * n,
                    "correct": correct,
                }
            )
        )
    return pl.concat(frames)


def cell(table: pl.DataFrame, stop: str, variant: str, subset: str) -> dict:
    rows = table.filter(
        (pl.col("stop") == stop) & (pl.col("variant") == variant) & (pl.col("subset") == subset)
    )
    assert rows.height == 1
    return rows.row(0, named=True)


# ---------------------------------------------------------------------------------- Table 2


def test_chunks_are_seeded_paired_and_cover_every_question():
    rng = np.random.default_rng(1)
    correct = rng.integers(0, 2, size=(3, 250))
    a = analysis.chunk_accuracies(correct, 100, seed=5)
    assert a.shape == (3, 100)
    np.testing.assert_array_equal(a, analysis.chunk_accuracies(correct, 100, seed=5))
    assert not np.array_equal(a, analysis.chunk_accuracies(correct, 100, seed=6))
    # near-equal chunks of 2 or 3 questions: the size-weighted chunk means give the accuracy back
    order = np.random.default_rng(5).permutation(250)
    sizes = np.array([len(c) for c in np.array_split(order, 100)])
    assert set(sizes) == {2, 3}
    np.testing.assert_allclose((a * sizes).sum(axis=1) / 250, correct.mean(axis=1))


def test_fewer_questions_than_chunks_gives_one_question_per_chunk():
    correct = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]])
    a = analysis.chunk_accuracies(correct, 100, seed=0)
    assert a.shape == (2, 5)
    assert sorted(a[0]) == sorted(correct[0])
    assert analysis.chunk_accuracies(np.empty((2, 0)), 100, seed=0).shape == (2, 0)


def test_paired_p_value_degenerate_cases():
    same = np.array([0.1, 0.5, 0.3, 0.9])
    assert math.isnan(analysis.paired_p_value(same, same))
    assert math.isnan(analysis.paired_p_value(np.array([1.0]), np.array([0.0])))
    assert analysis.paired_p_value(same + 0.2, same) < 0.01  # a constant gap: infinite t
    assert (
        analysis.stars(0.001) == "**" and analysis.stars(0.03) == "*" and analysis.stars(0.2) == ""
    )
    assert analysis.stars(float("nan")) == "" and analysis.stars(None) == ""


def test_table2_best_row_and_significance():
    n = 400
    rng = np.random.default_rng(0)
    cats = [CATEGORIES[i % 4] for i in range(n)]
    good = rng.random(n) < 0.8
    bad = rng.random(n) < 0.3
    near = good.copy()
    near[:2] = ~near[:2]  # two questions differ from the best: not significant
    rows = {
        ("natural", "early_stop"): good.tolist(),
        ("unknown", "early_stop"): bad.tolist(),
        ("highly_known", "early_stop"): good.tolist(),  # identical to the best: tied best
        ("maybe_known", "early_stop"): near.tolist(),
        ("natural", "convergence"): bad.tolist(),
        ("unknown", "convergence"): good.tolist(),
    }
    preds = predictions(rows, cats)
    table = analysis.accuracy_by_category(preds, TABLE2_MIXTURES, n_chunks=100, seed=0)
    es_variants = (
        table.filter(pl.col("stop") == "early_stop")["variant"]
        .unique(maintain_order=True)
        .to_list()
    )
    assert es_variants == [
        "highly_known",
        "maybe_known",
        "unknown",
        "natural",
    ]  # display order, missing skipped

    full = cell(table, "early_stop", "natural", "Full")
    assert full["accuracy_pct"] == pytest.approx(100 * good.mean())
    assert full["n_questions"] == n and full["n_chunks"] == 100 and full["is_best"]
    tied = cell(table, "early_stop", "highly_known", "Full")
    assert tied["is_best"] and tied["significance"] == ""
    worse = cell(table, "early_stop", "unknown", "Full")
    assert not worse["is_best"] and worse["p_value"] < 0.01 and worse["significance"] == "**"
    close = cell(table, "early_stop", "maybe_known", "Full")
    assert close["p_value"] > 0.05 and close["significance"] == ""
    # the best is taken per stop
    assert cell(table, "convergence", "unknown", "Full")["is_best"]
    assert cell(table, "convergence", "natural", "Full")["significance"] == "**"
    # per category: the category's questions only
    hk = cell(table, "early_stop", "natural", "HighlyKnown")
    mask = np.array([c == "HighlyKnown" for c in cats])
    assert hk["n_questions"] == mask.sum() and hk["accuracy_pct"] == pytest.approx(
        100 * good[mask].mean()
    )
    # deterministic
    assert table.equals(analysis.accuracy_by_category(preds, TABLE2_MIXTURES, n_chunks=100, seed=0))


def test_table2_empty_category_small_test_set_and_all_equal_rows():
    cats = ["HighlyKnown", "Unknown", "Unknown"]  # no MaybeKnown or WeaklyKnown question
    rows = {
        ("natural", "early_stop"): [True, False, False],
        ("unknown", "early_stop"): [True, False, False],
    }
    table = analysis.accuracy_by_category(
        predictions(rows, cats), ["unknown", "natural"], n_chunks=100, seed=0
    )
    assert set(table["stop"]) == {"early_stop"}  # no convergence predictions: no rows
    empty = cell(table, "early_stop", "natural", "MaybeKnown")
    assert empty["n_questions"] == 0 and math.isnan(empty["accuracy_pct"]) and not empty["is_best"]
    full = cell(table, "early_stop", "natural", "Full")
    assert (
        full["n_chunks"] == 3
        and full["is_best"]
        and math.isnan(full["p_value"])
        and full["significance"] == ""
    )
    assert cell(table, "early_stop", "unknown", "Full")["is_best"]  # the reference among equals
    assert analysis.accuracy_by_category(pl.DataFrame(), ["natural"]).is_empty()


def test_table2_rejects_rows_evaluated_on_other_questions():
    preds = predictions({("natural", "early_stop"): [True, False]}, ["Unknown", "Unknown"])
    other = preds.with_columns(
        pl.lit("unknown").alias("mixture"), pl.Series("id", ["q0000", "zzz"])
    )
    with pytest.raises(ValueError, match="other questions"):
        analysis.accuracy_by_category(pl.concat([preds, other]), ["natural", "unknown"])


# ---------------------------------------------------------------------------------- Table 1


def metrics_line(epoch, n, fitted, test_acc, ood_acc):
    """A metrics.jsonl line with train_n_<C> = n[C] and fitted[C] of them answered correctly."""
    line = {
        "epoch": epoch,
        "train_n": sum(n.values()),
        "test_accuracy": test_acc,
        "ood_test_accuracy": ood_acc,
    }
    for cat, k in n.items():
        if k:
            line[f"train_n_{cat}"] = k
            line[f"train_accuracy_{cat}"] = fitted[cat] / k
    return line


def test_fitted_counts_sum_the_known_categories():
    line = metrics_line(
        1,
        {"HighlyKnown": 10, "MaybeKnown": 6, "WeaklyKnown": 0, "Unknown": 14},
        {"HighlyKnown": 9, "MaybeKnown": 5, "WeaklyKnown": 0, "Unknown": 3},
        0.5,
        0.4,
    )
    counts = analysis.fitted_counts(line)
    assert counts == {
        "HighlyKnown": 9,
        "MaybeKnown": 5,
        "WeaklyKnown": 0,
        "Unknown": 3,
        "Known": 14,
        "n_train": 30,
    }


def synthetic_runs(b0, b_kn, b_unk, noise, d=100, epochs=6, seed=0, evaluated=lambda e: True):
    """metrics of mixtures with X% Unknown whose test accuracy (%) follows the linear model."""
    rng = np.random.default_rng(seed)
    metrics = {}
    for x in (0, 25, 50, 75, 100):
        n_unk = d * x // 100
        n = {"HighlyKnown": d - n_unk, "MaybeKnown": 0, "WeaklyKnown": 0, "Unknown": n_unk}
        lines = []
        for e in range(1, epochs + 1):
            fitted = {
                c: round(k * min(1, e / (2 if c != "Unknown" else epochs + 1 - x / 50)))
                for c, k in n.items()
            }
            kn, unk = (fitted["HighlyKnown"]) / d, fitted["Unknown"] / d
            acc = b0 + b_kn * kn + b_unk * unk + noise * rng.standard_normal()
            ood = (b0 - 1) + (b_kn / 2) * kn + (b_unk / 2) * unk + noise * rng.standard_normal()
            lines.append(metrics_line(e, n, fitted, acc / 100 if evaluated(e) else None, ood / 100))
        metrics[f"unknown_{x}"] = lines
    metrics["known_only_50"] = [
        metrics_line(
            e,
            {"HighlyKnown": d // 2},
            {"HighlyKnown": d // 2},
            (b0 + b_kn * 0.5) / 100,
            (b0 - 1 + b_kn / 4) / 100,
        )
        for e in (1, 2)
    ]
    return metrics


def test_linear_model_recovers_planted_coefficients():
    points = analysis.fit_points(synthetic_runs(36.9, 7.3, -8.3, noise=0.01))
    assert points["d_size"].unique().to_list() == [100]
    kn50 = points.filter(pl.col("mixture") == "known_only_50")
    assert kn50["known_fitted_share"].to_list() == [0.5, 0.5]  # N_kn/|D| with the common |D|
    fit = analysis.fit_linear_model(points, "test")
    t = fit["terms"]
    assert t["b0"]["estimate"] == pytest.approx(36.9, abs=0.05)
    assert t["b_kn"]["estimate"] == pytest.approx(7.3, abs=0.1)
    assert t["b_unk"]["estimate"] == pytest.approx(-8.3, abs=0.1)
    assert t["b_unk"]["p_value"] < 1e-6 and t["b_kn"]["std_error"] < 0.1
    assert fit["r_squared"] > 0.999 and fit["n_points"] == 5 * 6 + 2 and fit["note"] == ""
    ood = analysis.fit_linear_model(points, "ood_test")["terms"]
    assert ood["b0"]["estimate"] == pytest.approx(35.9, abs=0.05)
    assert ood["b_unk"]["estimate"] == pytest.approx(-4.15, abs=0.1)
    frame = analysis.linear_model_frame([fit])
    assert frame["term"].to_list() == ["b0", "b_kn", "b_unk"]


def test_linear_model_skips_epochs_without_test_evaluation():
    points = analysis.fit_points(
        synthetic_runs(30, 5, -5, noise=0.01, evaluated=lambda e: e % 2 == 0)
    )
    assert analysis.fit_linear_model(points, "test")["n_points"] == 5 * 3 + 2
    assert analysis.fit_linear_model(points, "ood_test")["n_points"] == 5 * 6 + 2


def test_linear_model_degenerate_fits_give_nan_and_a_note():
    # no Unknown example anywhere: N_unk/|D| is constantly 0 -> singular design
    only_known = {"unknown_0": synthetic_runs(30, 5, -5, 0.01)["unknown_0"]}
    fit = analysis.fit_linear_model(analysis.fit_points(only_known), "test")
    assert "singular" in fit["note"] and all(
        math.isnan(t["estimate"]) for t in fit["terms"].values()
    )
    assert math.isnan(fit["r_squared"])
    # nothing at all
    empty = analysis.fit_linear_model(analysis.fit_points({}), "test")
    assert empty["n_points"] == 0 and empty["note"] and math.isnan(empty["terms"]["b0"]["estimate"])
    # three points for three coefficients: exact, no standard errors
    n = {"HighlyKnown": 2, "MaybeKnown": 0, "WeaklyKnown": 0, "Unknown": 2}
    three = {
        "m": [
            metrics_line(1, n, {"HighlyKnown": 0, "Unknown": 0}, 0.10, 0.1),
            metrics_line(2, n, {"HighlyKnown": 2, "Unknown": 0}, 0.30, 0.1),
            metrics_line(3, n, {"HighlyKnown": 2, "Unknown": 2}, 0.20, 0.1),
        ]
    }
    fit = analysis.fit_linear_model(analysis.fit_points(three), "test")
    assert fit["terms"]["b0"]["estimate"] == pytest.approx(10)
    assert fit["terms"]["b_kn"]["estimate"] == pytest.approx(40)
    assert fit["terms"]["b_unk"]["estimate"] == pytest.approx(-20)
    assert math.isnan(fit["terms"]["b0"]["std_error"]) and "exact" in fit["note"]
    # constant accuracy (a model that never answers right): coefficients 0, R^2 undefined
    fit = analysis.fit_linear_model(analysis.fit_points(three), "ood_test")
    assert "constant" in fit["note"] and math.isnan(fit["r_squared"])
    assert fit["terms"]["b0"]["estimate"] == pytest.approx(10) and fit["terms"]["b_kn"][
        "estimate"
    ] == pytest.approx(0, abs=1e-9)
    assert math.isnan(fit["terms"]["b_kn"]["p_value"])


# ---------------------------------------------------------------------------------- Table 8


def test_idk_answers_are_recognised_after_normalisation():
    for text in ("I don't know", "i dont know.", "  I DON'T KNOW\nmore", "I don't know!"):
        assert analysis.is_idk(text)
    for text in ("", "Paris", "I know", "I don't know Paris", None):
        assert not analysis.is_idk(text)


def test_answered_accuracy_counts_abstentions():
    preds = pl.DataFrame(
        {
            "split": ["test"] * 6 + ["test"] * 2,
            "stop": ["early_stop"] * 8,
            "mixture": ["idk_50"] * 6 + ["idk_0"] * 2,
            "id": [f"q{i}" for i in range(6)] + ["q0", "q1"],
            "category": ["Unknown"] * 8,
            "prediction": [
                "Paris",
                "I don't know",
                "Rome",
                "i dont know",
                "",
                "Berlin",
                "I don't know",
                "I don't know",
            ],
            "correct": [True, False, False, False, False, True, False, False],
        }
    )
    table = analysis.answered_accuracy(preds)
    idk = table.filter(pl.col("variant") == "idk_50").row(0, named=True)
    assert idk["n_questions"] == 6 and idk["n_answered"] == 4 and idk["n_correct"] == 2
    assert idk["answered_pct"] == pytest.approx(100 * 4 / 6)
    assert idk["accuracy_answered_pct"] == pytest.approx(50.0)
    assert idk["accuracy_pct"] == pytest.approx(100 * 2 / 6)
    none = table.filter(pl.col("variant") == "idk_0").row(0, named=True)
    assert (
        none["n_answered"] == 0
        and math.isnan(none["accuracy_answered_pct"])
        and none["answered_pct"] == 0
    )


# ---------------------------------------------------------------------------------- Tables 3-5


def test_category_distribution_per_relation_and_total():
    labels = {
        "train": pl.DataFrame(
            {
                "relation": ["P17", "P17", "P17", "P136"],
                "category": pl.Series(
                    ["HighlyKnown", "Unknown", "Unknown", "Unknown"], dtype=pl.Enum(CATEGORIES)
                ),
            }
        ),
        "test": pl.DataFrame(
            {"relation": [], "category": []},
            schema={"relation": pl.String, "category": pl.Enum(CATEGORIES)},
        ),
    }
    table = analysis.category_distribution(labels)
    assert table.select("split", "relation").rows() == [
        ("train", "P17"),
        ("train", "P136"),
        ("train", "all"),
        ("test", "all"),
    ]
    p17 = table.row(0, named=True)
    assert p17["n_total"] == 3 and p17["n_Unknown"] == 2 and p17["n_MaybeKnown"] == 0
    assert p17["pct_Unknown"] == pytest.approx(200 / 3)
    assert table.row(2, named=True)["n_Unknown"] == 3
    assert math.isnan(table.row(3, named=True)["pct_Unknown"])


def test_loaders_read_metrics_in_epoch_order_and_label_predictions_by_their_keys(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"epoch": 2}) + "\n" + json.dumps({"epoch": 1}) + "\n"
    )
    assert [x["epoch"] for x in analysis.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    path = tmp_path / "any-name.parquet"  # the keys come from the caller, not from the path
    pl.DataFrame(
        {
            "id": ["a"],
            "relation": ["P50"],
            "question": ["q"],
            "gold": ["g"],
            "category": pl.Series(["Unknown"], dtype=pl.Enum(CATEGORIES)),
            "prediction": ["g"],
            "correct": [True],
        }
    ).write_parquet(path)
    preds = analysis.read_predictions({("idk_50", "convergence", "ood_test"): path})
    assert preds.row(0, named=True) | {} == {
        "mixture": "idk_50",
        "stop": "convergence",
        "split": "ood_test",
        "id": "a",
        "category": "Unknown",
        "prediction": "g",
        "correct": True,
    }


# ---------------------------------------------------------------------------------- rendering


def test_markdown_marks_best_in_bold_and_significance_with_escaped_stars():
    import make_tables

    n = 200
    rng = np.random.default_rng(0)
    rows = {
        ("natural", "early_stop"): (rng.random(n) < 0.8).tolist(),
        ("unknown", "early_stop"): (rng.random(n) < 0.2).tolist(),
    }
    table = analysis.accuracy_by_category(predictions(rows, ["Unknown"] * n), TABLE2_MIXTURES)
    md = make_tables.table2_markdown(table, "T", 100)
    natural = next(line for line in md.splitlines() if "D_Natural" in line)
    unknown = next(line for line in md.splitlines() if "| D_Unknown" in line)
    assert natural.split(" | ")[2].startswith("**") and "\\*\\*" in unknown.split(" | ")[2]
    assert "| – |" in natural  # HighlyKnown: no question
    assert "Full (n=200)" in md
    assert variant_name("idk_50") == "D_IDK (50% Unknown)"
    assert variant_name("known_only_25") == "D_Known (25% Unknown)"
    assert variant_name("unknown") == "D_Unknown"
