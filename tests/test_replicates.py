"""Results over training seeds (eqtools/replicates.py): intervals against closed forms and
simulations, the paired comparisons, the verdicts, Table 2 over seeds and Table 1 clustered by
fine-tune (eqtools/analysis.py)."""

import math

import numpy as np
import polars as pl
import pytest

from eqtools import analysis, replicates
from eqtools.study import CATEGORIES


def frames(matrix, categories=None, predictions=None) -> list[pl.DataFrame]:
    """One prediction frame per seed (row of `matrix`), questions q0000..."""
    matrix = np.asarray(matrix, dtype=bool)
    n = matrix.shape[1]
    categories = categories or ["Unknown"] * n
    return [
        pl.DataFrame(
            {
                "id": [f"q{i:04d}" for i in range(n)],
                "category": pl.Series(categories, dtype=pl.Enum(CATEGORIES)),
                "prediction": predictions[s] if predictions else ["x"] * n,
                "correct": row,
            }
        )
        for s, row in enumerate(matrix)
    ]


# ------------------------------------------------------------------------------- seeds only


def test_seed_interval_is_the_t_interval():
    mean, low, high = replicates.seed_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) x SD / sqrt(S)
    assert mean == 2.0
    assert low == pytest.approx(2.0 - half) and high == pytest.approx(2.0 + half)


def test_seed_interval_of_one_seed_has_no_bounds_and_skips_missing_values():
    assert replicates.seed_interval([0.4])[0] == 0.4
    assert all(math.isnan(v) for v in replicates.seed_interval([0.4])[1:])
    assert replicates.seed_interval([None, 1.0, float("nan"), 3.0])[0] == 2.0
    assert all(math.isnan(v) for v in replicates.seed_interval([]))


def test_seed_bands_group_by_keys():
    long = pl.DataFrame({"epoch": [1, 1, 1, 2, 2, 2], "value": [0.1, 0.2, 0.3, 0.5, 0.5, 0.5]})
    bands = replicates.seed_bands(long, ["epoch"], "value")
    assert bands["mean"].to_list() == pytest.approx([0.2, 0.5])
    assert bands["n_seeds"].to_list() == [3, 3]
    assert bands["low"][1] == pytest.approx(0.5) and bands["high"][1] == pytest.approx(0.5)


def test_seed_bands_of_an_accuracy_stay_within_0_and_1():
    """Three seeds at 0.9, 1.0, 1.0 (Fig. 1's Known examples): the t interval passes 1."""
    long = pl.DataFrame({"epoch": [1, 1, 1, 2], "value": [0.9, 1.0, 1.0, 0.4]})
    assert replicates.seed_bands(long, ["epoch"], "value")["high"][0] > 1
    bands = replicates.seed_bands(long, ["epoch"], "value", bounds=(0.0, 1.0))
    assert bands["high"][0] == 1.0 and 0 <= bands["low"][0] < bands["mean"][0]
    assert math.isnan(bands["low"][1]) and math.isnan(bands["high"][1])  # one seed: no band


# ------------------------------------------------------------------------------- intervals


def ones(m):
    return np.ones_like(m)


def test_interval_without_a_seed_effect_is_near_the_binomial():
    """Independent 0/1 answers at p = 0.3 over 3 seeds x 400 questions: on average the variance
    is the binomial one plus at most the noise counted a second time (factor 2)."""
    rng = np.random.default_rng(1)
    analytic = 0.3 * 0.7 / 1200
    ratios = []
    for i in range(40):
        matrix = (rng.random((3, 400)) < 0.3).astype(float)
        c = replicates.Intervals({"a": ("a", matrix, ones(matrix))}, 500, seed=i).contrast({"a": 1})
        assert c["estimate"] == pytest.approx(matrix.mean())
        assert c["low"] < c["estimate"] < c["high"]
        ratios.append(c["se"] ** 2 / analytic)
    assert 1.6 < np.mean(ratios) < 2.2


def population_mean(seed_sd: float) -> float:
    """E[sigmoid(-0.5 + q + s)] for q ~ N(0, 1), s ~ N(0, seed_sd^2), by quadrature."""
    xs = np.linspace(-8, 8, 1601)
    w = np.exp(-(xs**2) / 2) / math.sqrt(2 * math.pi) * (xs[1] - xs[0])
    logits = -0.5 + xs[:, None] + seed_sd * xs[None, :]
    return float(np.sum(w[:, None] * w[None, :] / (1 + np.exp(-logits))))


@pytest.mark.parametrize("seed_sd", [0.0, 0.4])
def test_coverage_of_a_crossed_design(seed_sd):
    """Simulated fine-tunes of 3 seeds x 300 questions: question effects, a seed effect (none, or
    one that moves accuracy by about 9 points) and noise. The 95 % interval holds the population
    mean in at least 90 % of 300 draws, and is not absurdly conservative."""
    rng = np.random.default_rng(11)
    truth, hits = population_mean(seed_sd), 0
    for _ in range(300):
        question, seed = rng.normal(0, 1.0, 300), rng.normal(0, seed_sd, 3)
        p = 1 / (1 + np.exp(-(-0.5 + question[None, :] + seed[:, None])))
        matrix = (rng.random((3, 300)) < p).astype(float)
        _, low, high = replicates.Intervals({"a": ("a", matrix, ones(matrix))}, 400).interval("a")
        hits += low <= truth <= high
    assert 0.9 <= hits / 300 <= 0.995


def test_a_share_interval_stays_within_0_and_1():
    """Three seeds that disagree wildly on a low accuracy: the t interval would reach below 0."""
    matrix = np.zeros((3, 100))
    matrix[0, :30] = 1.0
    cells = replicates.Intervals({"a": ("a", matrix, ones(matrix))})
    estimate, low, high = cells.interval("a")
    assert estimate == pytest.approx(0.1) and low == 0.0 and high < 1.0
    assert cells.contrast({"a": 1})["low"] < 0  # a contrast is not clipped


def test_a_seed_effect_widens_the_interval():
    """The same questions, but each seed shifts every answer (a seed that helps everywhere): the
    interval must widen, since three seeds say little about the next one."""
    rng = np.random.default_rng(3)
    base = rng.random(400)
    plain = np.stack([(base < 0.3)] * 3).astype(float)
    shifted = np.stack([(base < p) for p in (0.15, 0.3, 0.45)]).astype(float)
    width = {}
    for name, m in (("plain", plain), ("shifted", shifted)):
        _, low, high = replicates.Intervals({name: (name, m, ones(m))}).interval(name)
        width[name] = high - low
    assert width["shifted"] > 5 * width["plain"]


def test_contrast_is_paired_on_questions():
    """Two fine-tunes that answer alike but for 20 of 400 questions, which the second gets
    right: the paired difference is 5 points with a narrow interval above zero, though each
    accuracy alone is uncertain by more than that."""
    rng = np.random.default_rng(4)
    a = np.stack([rng.random(400) < 0.4] * 3).astype(float)
    b = a.copy()
    wrong = np.flatnonzero(a[0] == 0)[:20]
    b[:, wrong] = 1.0
    cells = replicates.Intervals({"a": ("a", a, ones(a)), "b": ("b", b, ones(b))})
    diff = cells.contrast({"b": 1, "a": -1})
    assert diff["estimate"] == pytest.approx(0.05)
    assert 0 < diff["low"] < 0.05 < diff["high"] < 0.08
    assert diff["p_value"] < 0.01
    _, low, high = cells.interval("a")
    assert high - low > diff["high"] - diff["low"]


def test_identical_cells_differ_by_nothing():
    m = np.ones((2, 10))
    cells = replicates.Intervals({"a": ("a", m, ones(m)), "b": ("b", m, ones(m))})
    diff = cells.contrast({"a": 1, "b": -1})
    assert diff["estimate"] == 0 and diff["low"] == diff["high"] == 0
    assert math.isnan(diff["p_value"])


def test_cells_of_one_fine_tune_share_its_seeds():
    """Two stops of one fine-tune: a seed effect common to both cancels in their difference;
    the same matrices as two separate fine-tunes do not cancel it."""
    rng = np.random.default_rng(5)
    base = rng.random(300)
    early = np.stack([(base < p) for p in (0.2, 0.4, 0.6)]).astype(float)
    late = early.copy()
    late[:, :15] = 1.0  # the late stop gains a few questions on every seed
    same = replicates.Intervals({"e": ("ft", early, ones(early)), "l": ("ft", late, ones(late))})
    apart = replicates.Intervals({"e": ("f1", early, ones(early)), "l": ("f2", late, ones(late))})
    width = {
        name: (c := b.contrast({"l": 1, "e": -1}))["high"] - c["low"]
        for name, b in (("same", same), ("apart", apart))
    }
    assert width["same"] < width["apart"] / 5


def test_ratio_cells_and_shape_checks():
    correct = np.array([[1, 0, 1, 0]], dtype=float)
    answered = np.array([[1, 1, 1, 0]], dtype=float)
    cells = replicates.Intervals({"x": ("x", correct * answered, answered)})
    assert cells.estimate("x") == pytest.approx(2 / 3)
    one, four = np.ones((1, 3)), np.ones((1, 4))
    with pytest.raises(ValueError, match="different numbers of questions"):
        replicates.Intervals({"a": ("a", one, one), "b": ("b", four, four)})
    with pytest.raises(ValueError, match="other seed counts"):
        replicates.Intervals({"a": ("g", one, one), "b": ("g", np.ones((2, 3)), np.ones((2, 3)))})


def test_verdicts():
    assert replicates.verdict(0.5, 2.0, 1) == "reproduced"
    assert replicates.verdict(-2.0, -0.5, 1) == "not reproduced"
    assert replicates.verdict(-2.0, -0.5, -1) == "reproduced"
    assert replicates.verdict(-0.5, 2.0, 1) == "inconclusive"
    assert replicates.verdict(float("nan"), 2.0, 1) == "inconclusive"


def test_question_matrix_refuses_other_questions():
    a, b = frames([[1, 0, 1]])[0], frames([[1, 0, 1, 1]])[0]
    with pytest.raises(ValueError, match="other questions"):
        replicates.question_matrix([a, b])
    matrix, ids = replicates.question_matrix([a.reverse(), a])  # sorted by id, whatever the order
    assert ids == ["q0000", "q0001", "q0002"] and matrix.tolist() == [[1, 0, 1], [1, 0, 1]]


def test_answered_matrix_reads_idk_predictions():
    (f,) = frames([[0, 1, 0]], predictions=[["I don't know", "Rome", "i dont know."]])
    assert replicates.answered_matrix([f]).tolist() == [[0.0, 1.0, 0.0]]


# ------------------------------------------------------------------------------- Table 2


def test_table2_over_seeds():
    cats = ["HighlyKnown"] * 2 + ["Unknown"] * 2
    preds = {
        ("highly_known", "early_stop"): frames([[1, 1, 0, 0], [1, 1, 1, 0]], cats),
        ("natural", "early_stop"): frames([[1, 0, 0, 0], [0, 0, 0, 0]], cats),
    }
    table = replicates.accuracy_by_category(preds, ["highly_known", "natural"], replicates=500)
    assert set(table["stop"]) == {"early_stop"}  # no convergence predictions given
    full = {r["variant"]: r for r in table.filter(pl.col("subset") == "Full").iter_rows(named=True)}
    assert full["highly_known"]["accuracy_pct"] == pytest.approx(62.5)
    assert full["natural"]["accuracy_pct"] == pytest.approx(12.5)
    assert full["highly_known"]["is_best"] and not full["natural"]["is_best"]
    assert full["highly_known"]["n_seeds"] == 2 and full["highly_known"]["n_questions"] == 4
    assert full["highly_known"]["seed_sd_pct"] == pytest.approx(100 * math.sqrt(0.03125))
    assert full["highly_known"]["ci_low_pct"] <= 62.5 <= full["highly_known"]["ci_high_pct"]
    assert math.isnan(full["highly_known"]["p_value"])
    unknown = table.filter((pl.col("subset") == "Unknown") & (pl.col("variant") == "natural"))
    assert unknown["accuracy_pct"][0] == 0.0 and unknown["n_questions"][0] == 2
    empty = table.filter(pl.col("subset") == "WeaklyKnown")
    assert empty["n_questions"].to_list() == [0, 0] and empty["accuracy_pct"].is_nan().all()


# ------------------------------------------------------------------------------- Table 1


def test_linear_model_clustered_by_fine_tune():
    """Pooled points of several fine-tunes: the cluster-robust standard errors are statsmodels'
    with groups, and the fit records the number of clusters."""
    import statsmodels.api as sm

    rng = np.random.default_rng(6)
    rows = []
    for ft in range(6):
        shift = rng.normal(0, 3)  # a fine-tune's own offset, shared by its epochs
        for _epoch in range(1, 5):
            kn, unk = rng.random(), rng.random()
            acc = (30 + 8 * kn - 9 * unk + shift + rng.normal(0, 1)) / 100
            rows.append(
                {
                    "fine_tune": f"ft{ft}",
                    "known_fitted_share": kn,
                    "unknown_fitted_share": unk,
                    "test_accuracy": acc,
                }
            )
    points = pl.DataFrame(rows)
    fit = analysis.fit_linear_model(points, "test", cluster="fine_tune")
    x = sm.add_constant(points.select("known_fitted_share", "unknown_fitted_share").to_numpy())
    groups = np.repeat(np.arange(6), 4)
    ref = sm.OLS(100 * points["test_accuracy"].to_numpy(), x).fit(
        cov_type="cluster", cov_kwds={"groups": groups}, use_t=True
    )
    assert fit["n_clusters"] == 6 and fit["n_points"] == 24
    for i, term in enumerate(analysis.TERMS):
        assert fit["terms"][term]["estimate"] == pytest.approx(ref.params[i])
        assert fit["terms"][term]["std_error"] == pytest.approx(ref.bse[i])
        assert fit["terms"][term]["p_value"] == pytest.approx(ref.pvalues[i])
    plain = analysis.fit_linear_model(points, "test")
    assert "n_clusters" not in plain
    assert plain["terms"]["b0"]["std_error"] != pytest.approx(fit["terms"]["b0"]["std_error"])
    low, high = replicates.linear_term_interval(fit, "b_unk")
    assert low < fit["terms"]["b_unk"]["estimate"] < high
    frame = analysis.linear_model_frame([fit])
    assert frame["n_clusters"].to_list() == [6, 6, 6]
    assert "n_clusters" not in analysis.linear_model_frame([plain]).columns


def test_linear_model_with_one_cluster_has_no_standard_errors():
    points = pl.DataFrame(
        {
            "fine_tune": ["a"] * 5,
            "known_fitted_share": [0.1, 0.5, 0.2, 0.9, 0.4],
            "unknown_fitted_share": [0.0, 0.3, 0.8, 0.2, 0.5],
            "test_accuracy": [0.1, 0.2, 0.15, 0.3, 0.22],
        }
    )
    fit = analysis.fit_linear_model(points, "test", cluster="fine_tune")
    assert math.isnan(fit["terms"]["b_kn"]["std_error"])
    assert "one fine-tune only" in fit["note"]
    assert not math.isnan(fit["terms"]["b_kn"]["estimate"])


# ------------------------------------------------------------------------------- claims


def test_fitting_gap_per_seed():
    def line(epoch, kn, unk):
        return {"epoch": epoch, "kn": kn, "unk": unk}

    runs = [[line(1, 0.8, 0.2), line(2, 1.0, 0.6)], [line(1, 0.6, 0.2), line(2, 1.0, 1.0)]]
    mean, low, high = replicates.fitting_gap(runs, lambda x: x["kn"], lambda x: x["unk"])
    assert mean == pytest.approx(35.0)  # seeds: 50 and 20 points
    assert low < 20 and high > 50


def test_ptrue_masks_take_as_many_lowest_scores_as_slick_unknowns():
    (f,) = frames([[0, 0, 1, 1]], ["Unknown", "HighlyKnown", "Unknown", "MaybeKnown"])
    ptrue = pl.DataFrame(
        {"id": ["q0000", "q0001", "q0002", "q0003"], "p_true": [0.9, 0.1, 0.5, 0.5]}
    )
    masks = replicates.ptrue_masks(f, ptrue)
    assert masks["slick"].tolist() == [1, 0, 1, 0]
    assert masks["ptrue"].tolist() == [0, 1, 1, 0]  # 0.1, then 0.5 with the smaller id
    with pytest.raises(ValueError, match="no P\\(True\\) score"):
        replicates.ptrue_masks(f, ptrue.head(3))
