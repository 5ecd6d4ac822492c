"""Results over training seeds (`finetune.seeds`): every fine-tune is run once per seed, and the
tables and figures of results/{tables,figures}/{model}/{recipe}-seeds/ show the mean over the
seeds with a 95 % interval. Pure functions on numpy arrays and polars frames; no file writes.

Two kinds of interval, after what varies:

- **Test accuracy** (Table 2, Fig. 3a, the claims) varies with the training seed and with which
  test questions were drawn: a crossed design (every seed answers every question). Its variance
  is the sum of the questions' part, a bootstrap of the test questions with all seeds kept (the
  questions' own variance and the seed-by-question noise; one draw shared by every fine-tune, so
  comparisons stay paired on questions), and the seeds' part, the variance of each fine-tune's
  per-seed accuracies over its number of seeds (it counts the seed-by-question noise a second
  time: conservative). The interval is estimate +- t x SE with Satterthwaite's degrees of
  freedom: where the seeds' part dominates, three seeds give a t with about 2 degrees of
  freedom, and the interval is wide, as it should be. Simulated coverage of the nominal 95 %:
  93-99 % (tests/test_replicates.py). Subtracting the double-counted noise (the method of
  moments of a crossed random-effects model) gave 90-98 %, under 95 % where seeds dominate.
- **Training accuracy per epoch** (Figs. 1 and 4) is measured on the whole training set, so only
  the seed varies: mean over seeds +- t(0.975, S - 1) x SD / sqrt(S).

Table 1 pools the fit points of every seed and reports cluster-robust standard errors, one
cluster per fine-tune (its epochs are not independent points); see eqtools.analysis.
"""

import math

import numpy as np
import polars as pl

from eqtools.analysis import FULL, SUBSETS, is_idk, stars
from eqtools.study import STOPS

LEVEL = 0.95
REPLICATES = 4000


def run_input_name(run: str, name: str) -> str:
    """The input name of one run's file in an over-seeds rule: `<run>@<eqtools.study name>`."""
    return f"{run}@{name}"


# ---------------------------------------------------------------------------------- seeds only


def seed_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of per-seed values: the t interval over seeds (NaN bounds for one seed;
    NaN values are left out, all NaN gives NaN everywhere)."""
    from scipy.stats import t

    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[~np.isnan(x)]
    if not x.size:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if x.size < 2:
        return (mean, math.nan, math.nan)
    half = float(t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return (mean, mean - half, mean + half)


def seed_bands(
    frame: pl.DataFrame, keys: list[str], value: str, bounds: tuple[float, float] | None = None
) -> pl.DataFrame:
    """Per group of `keys` in a long frame with one row per seed: mean, low, high (seed_interval)
    and n_seeds, sorted by `keys`. `bounds` clips low and high to the values' range (an
    accuracy: (0, 1); the t interval of a few seeds that disagree can reach past either end)."""
    rows = []
    for group, part in frame.group_by(keys, maintain_order=True):
        mean, low, high = seed_interval(part[value].to_list())
        if bounds is not None:
            low, high = (float(np.clip(b, *bounds)) for b in (low, high))  # NaN stays NaN
        n = int(part[value].drop_nulls().drop_nans().len())
        rows.append(dict(zip(keys, group, strict=True)) | dict(mean=mean, low=low, high=high))
        rows[-1]["n_seeds"] = n
    schema = {k: frame.schema[k] for k in keys} | {
        "mean": pl.Float64,
        "low": pl.Float64,
        "high": pl.Float64,
        "n_seeds": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema, orient="row").sort(keys, maintain_order=True)


# ---------------------------------------------------------------------------------- intervals


def question_draws(n_questions: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """The question bootstrap's weights: (replicates, questions) counts, drawn once and shared
    by every cell, so that comparisons stay paired on questions."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_questions, np.full(n_questions, 1 / n_questions), replicates).astype(
        float
    )


class Intervals:
    """95 % intervals of ratios sum(num) / sum(den) over (seeds x questions) matrices, and of
    linear combinations of them (see the module docstring).

    `cells` maps a key to (group, numerator, denominator): the group names the fine-tune whose
    seeds the matrices' rows are (cells of one group, e.g. its two stops, share its seeds);
    numerator and denominator are (seeds, questions) arrays over the same questions in the same
    order for every cell (the denominator is all ones for an accuracy, the answered questions
    for an accuracy on answered questions, a subset's indicator for the accuracy on a subset).

    The variance of an estimate has two parts. The questions': a bootstrap of the test questions
    with every seed kept (one draw of questions shared by all cells), which holds the questions'
    own variance and the seed-by-question noise. The seeds': per fine-tune, the variance of its
    per-seed estimates over its number of seeds. The second part holds the seed-by-question
    noise once more, so the interval is conservative where that noise dominates (simulated
    coverage of a nominal 95 % interval: 93-99 %, tests/test_replicates.py). The interval is
    estimate +- t x SE with Satterthwaite's degrees of freedom (few seeds give few degrees of
    freedom where the seeds' part dominates); the p-value of "it is zero" is the same t test's."""

    def __init__(self, cells: dict, replicates: int = REPLICATES, seed: int = 0):
        shapes = {np.shape(num) for _, num, _ in cells.values()} | {
            np.shape(den) for _, _, den in cells.values()
        }
        n_questions = {s[1] for s in shapes}
        if len(n_questions) != 1:
            raise ValueError(f"the cells are over different numbers of questions: {shapes}")
        groups: dict[str, int] = {}
        for key, (group, num, _) in cells.items():
            if groups.setdefault(group, np.shape(num)[0]) != np.shape(num)[0]:
                raise ValueError(f"cell {key}: group {group} has cells with other seed counts")
        self.n_questions = n_questions.pop()
        self.cells = {
            key: (group, np.asarray(num, dtype=float), np.asarray(den, dtype=float))
            for key, (group, num, den) in cells.items()
        }
        questions = question_draws(self.n_questions, replicates, seed)
        self.replicates = {}
        for key, (_, num, den) in self.cells.items():
            top, bottom = questions @ num.sum(axis=0), questions @ den.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                self.replicates[key] = np.where(bottom > 0, top / bottom, np.nan)

    def estimate(self, key) -> float:
        _, num, den = self.cells[key]
        total = float(np.sum(den))
        return float(np.sum(num)) / total if total else math.nan

    def interval(self, key, level: float = LEVEL) -> tuple[float, float, float]:
        """(estimate, low, high) of one cell, the bounds clipped to [0, 1] (a share: the t
        interval of a few seeds that disagree can reach past either end)."""
        c = self.contrast({key: 1}, level)
        return (c["estimate"], max(0.0, c["low"]), min(1.0, c["high"]))

    def per_seed(self, key) -> np.ndarray:
        """The cell's estimate on each seed alone."""
        _, num, den = self.cells[key]
        with np.errstate(invalid="ignore", divide="ignore"):
            return num.sum(axis=1) / den.sum(axis=1)

    def seed_component(self, weights: dict) -> tuple[float, int]:
        """(variance, degrees of freedom) of the seeds' part of sum(w * cell): per fine-tune, the
        variance over its seeds of its cells' combination, over its number of seeds."""
        variance, df = 0.0, 0
        for group in sorted({self.cells[k][0] for k in weights}):
            keys = [k for k in weights if self.cells[k][0] == group]
            combined = sum(weights[k] * self.per_seed(k) for k in keys)
            combined = combined[~np.isnan(combined)]
            if combined.size < 2:
                continue
            variance += float(combined.var(ddof=1)) / combined.size
            df = combined.size - 1 if df == 0 else min(df, combined.size - 1)
        return variance, df

    def contrast(self, weights: dict, level: float = LEVEL) -> dict:
        """A linear combination sum(w * cell) of cells (e.g. {a: 1, b: -1} for a - b): estimate,
        low, high, se, df and the two-sided p-value of "it is zero"."""
        from scipy.stats import t

        estimate = sum(w * self.estimate(k) for k, w in weights.items())
        draws = sum(w * self.replicates[k] for k, w in weights.items())
        draws = draws[~np.isnan(draws)]
        questions = float(draws.var(ddof=1)) if draws.size > 1 else 0.0
        seeds, seed_df = self.seed_component(weights)
        variance = questions + seeds
        if math.isnan(estimate):
            return dict(
                estimate=estimate,
                low=math.nan,
                high=math.nan,
                se=math.nan,
                df=math.nan,
                p_value=math.nan,
            )
        if variance <= 0:
            return dict(
                estimate=estimate,
                low=estimate,
                high=estimate,
                se=0.0,
                df=math.inf,
                p_value=math.nan,
            )
        # Satterthwaite: the questions' part has (questions - 1) degrees of freedom
        parts = questions**2 / max(self.n_questions - 1, 1)
        parts += seeds**2 / seed_df if seed_df else 0.0
        df = variance**2 / parts if parts > 0 else math.inf
        se = math.sqrt(variance)
        half = float(t.ppf(0.5 + level / 2, df)) * se
        p = float(2 * t.sf(abs(estimate) / se, df))
        return dict(
            estimate=estimate, low=estimate - half, high=estimate + half, se=se, df=df, p_value=p
        )


def verdict(low: float, high: float, expected_sign: int) -> str:
    """The claim's verdict from the 95 % interval of a statistic whose sign the paper predicts:
    reproduced (the interval on the paper's side of zero), not reproduced (on the other side) or
    inconclusive (it holds zero)."""
    if any(math.isnan(v) for v in (low, high)):
        return "inconclusive"
    if expected_sign * low > 0 and expected_sign * high > 0:
        return "reproduced"
    if expected_sign * low < 0 and expected_sign * high < 0:
        return "not reproduced"
    return "inconclusive"


# ---------------------------------------------------------------------------------- matrices


def question_matrix(
    frames: list[pl.DataFrame], column: str = "correct", ids: list | None = None
) -> tuple[np.ndarray, list]:
    """(seeds, questions) of one evaluation's `column` over the runs' frames (one per seed), the
    questions sorted by id; every run must have been evaluated on the same questions (`ids`, if
    given, must be those)."""
    rows = []
    for i, frame in enumerate(frames):
        frame = frame.sort("id")
        if ids is None:
            ids = frame["id"].to_list()
        elif frame["id"].to_list() != list(ids):
            raise ValueError(f"seed run {i} was evaluated on other questions than the first")
        rows.append(frame[column].cast(pl.Float64).to_numpy())
    return np.stack(rows), list(ids or [])


def answered_matrix(frames: list[pl.DataFrame]) -> np.ndarray:
    """(seeds, questions) of 1 where the prediction is an answer (not "I don't know")."""
    return np.stack(
        [
            np.array([0.0 if is_idk(p) else 1.0 for p in f.sort("id")["prediction"].to_list()])
            for f in frames
        ]
    )


# ---------------------------------------------------------------------------------- Table 2


def accuracy_by_category(
    preds: dict, mixtures: list[str], replicates: int = REPLICATES, seed: int = 0
) -> pl.DataFrame:
    """Table 2 over seeds for one test split. `preds` maps (mixture, stop) to the list of the
    seeds' prediction frames (id, category, correct). One row per (stop, mixture, subset):
    n_questions, n_seeds, accuracy_pct (the mean over seeds and questions), ci_low_pct,
    ci_high_pct, seed_sd_pct (SD of the per-seed accuracies), is_best (the highest mean of the
    column at that stop), p_value (the t test of best - row by Intervals; NaN for the best)
    and significance ('*' p < 0.05, '**' p < 0.01)."""
    out = []
    for stop in STOPS:
        rows = [m for m in mixtures if (m, stop) in preds]
        if not rows:
            continue
        matrices = {m: question_matrix(preds[(m, stop)])[0] for m in rows}
        categories = {
            m: preds[(m, stop)][0].sort("id")["category"].cast(pl.String).to_list() for m in rows
        }
        for subset in SUBSETS:
            cells = {}
            n = 0
            for m in rows:
                correct = matrices[m]
                mask = np.array([subset == FULL or c == subset for c in categories[m]], dtype=float)
                n = int(mask.sum())
                cells[m] = (m, correct * mask, np.broadcast_to(mask, correct.shape))
            if n == 0:
                for m in rows:
                    out.append(_table2_row(stop, m, subset, 0, len(preds[(m, stop)])))
                continue
            boot = Intervals(cells, replicates, seed)
            means = {m: boot.estimate(m) for m in rows}
            best = max(rows, key=lambda m: means[m])
            for m in rows:
                _, low, high = boot.interval(m)
                per_seed = cells[m][1].sum(axis=1) / n
                p = math.nan if m == best else boot.contrast({best: 1, m: -1})["p_value"]
                below = means[m] < means[best]
                out.append(
                    _table2_row(stop, m, subset, n, per_seed.size)
                    | {
                        "accuracy_pct": 100 * means[m],
                        "ci_low_pct": 100 * low,
                        "ci_high_pct": 100 * high,
                        "seed_sd_pct": 100 * float(np.std(per_seed, ddof=1))
                        if per_seed.size > 1
                        else math.nan,
                        "is_best": not below,
                        "p_value": p,
                        "significance": stars(p) if below else "",
                    }
                )
    return pl.DataFrame(out, schema=TABLE2_SCHEMA, orient="row")


TABLE2_SCHEMA = {
    "stop": pl.String,
    "variant": pl.String,
    "subset": pl.String,
    "n_questions": pl.Int64,
    "n_seeds": pl.Int64,
    "accuracy_pct": pl.Float64,
    "ci_low_pct": pl.Float64,
    "ci_high_pct": pl.Float64,
    "seed_sd_pct": pl.Float64,
    "is_best": pl.Boolean,
    "p_value": pl.Float64,
    "significance": pl.String,
}


def _table2_row(stop: str, mixture: str, subset: str, n: int, n_seeds: int) -> dict:
    nan = math.nan
    return {
        "stop": stop,
        "variant": mixture,
        "subset": subset,
        "n_questions": n,
        "n_seeds": n_seeds,
        "accuracy_pct": nan,
        "ci_low_pct": nan,
        "ci_high_pct": nan,
        "seed_sd_pct": nan,
        "is_best": False,
        "p_value": nan,
        "significance": "",
    }


# ---------------------------------------------------------------------------------- claims

CLAIM_COLUMNS = {
    "claim": pl.String,
    "evidence": pl.String,
    "split": pl.String,
    "statistic": pl.String,
    "expected": pl.String,
    "estimate": pl.Float64,
    "low": pl.Float64,
    "high": pl.Float64,
    "p_value": pl.Float64,
    "n_seeds": pl.Int64,
    "verdict": pl.String,
}


def claim_row(claim, evidence, split, statistic, sign, estimate, low, high, p, n_seeds) -> dict:
    return {
        "claim": claim,
        "evidence": evidence,
        "split": split,
        "statistic": statistic,
        "expected": "> 0" if sign > 0 else "< 0",
        "estimate": estimate,
        "low": low,
        "high": high,
        "p_value": p,
        "n_seeds": n_seeds,
        "verdict": verdict(low, high, sign),
    }


def fitting_gap(runs: list[list[dict]], known, unknown) -> tuple[float, float, float]:
    """Fig. 1's claim per seed: the mean over epochs of (training accuracy on the Known examples
    - on the Unknown ones), in points; `known` / `unknown` give a metrics line's accuracy of each
    group (eqtools.figures.known_accuracy / group_accuracy). t interval over the seeds."""
    gaps = []
    for lines in runs:
        pairs = [(known(line), unknown(line)) for line in lines]
        pairs = [(k, u) for k, u in pairs if k is not None and u is not None]
        gaps.append(100 * float(np.mean([k - u for k, u in pairs])) if pairs else math.nan)
    return seed_interval(gaps)


def accuracy_cells(preds: dict, keys) -> dict:
    """Interval cells (group = mixture) of the accuracy of each (mixture, stop) in `keys`."""
    cells = {}
    for mixture, stop in keys:
        correct, _ = question_matrix(preds[(mixture, stop)])
        cells[(mixture, stop)] = (mixture, correct, np.ones_like(correct))
    return cells


def answered_cells(preds: dict, keys) -> dict:
    """Interval cells of the accuracy among the answered questions (Table 8)."""
    cells = {}
    for mixture, stop in keys:
        frames = preds[(mixture, stop)]
        correct, _ = question_matrix(frames)
        answered = answered_matrix(frames)
        cells[(mixture, stop)] = (mixture, correct * answered, answered)
    return cells


def subset_cells(frames: list[pl.DataFrame], group: str, masks: dict[str, np.ndarray]) -> dict:
    """Interval cells of one fine-tune's accuracy on question subsets (0/1 masks by id order)."""
    correct, _ = question_matrix(frames)
    return {
        name: (group, correct * mask, np.broadcast_to(mask, correct.shape))
        for name, mask in masks.items()
    }


def ptrue_masks(frame: pl.DataFrame, ptrue: pl.DataFrame) -> dict[str, np.ndarray]:
    """Fig. 5's two question sets over `frame`'s questions sorted by id: SliCK's Unknown, and as
    many questions with the lowest P(True) (ties broken by id)."""
    ordered = frame.sort("id").select("id", pl.col("category").cast(pl.String))
    slick = (ordered["category"] == "Unknown").to_numpy().astype(float)
    k = int(slick.sum())
    scored = ordered.join(ptrue.select("id", "p_true"), on="id", how="left")
    if scored["p_true"].null_count():
        raise ValueError(f"{scored['p_true'].null_count()} test questions have no P(True) score")
    low = set(scored.sort("p_true", "id").head(k)["id"].to_list())
    return {
        "slick": slick,
        "ptrue": np.array([i in low for i in ordered["id"].to_list()], dtype=float),
    }


def linear_term_interval(fit: dict, term: str, level: float = LEVEL) -> tuple[float, float]:
    """The t interval of a Table 1 coefficient (clusters - 1 degrees of freedom when clustered,
    else points - 3)."""
    from scipy.stats import t

    estimate, se = fit["terms"][term]["estimate"], fit["terms"][term]["std_error"]
    df = (fit.get("n_clusters") or fit["n_points"] - 2) - 1
    if math.isnan(se) or df < 1:
        return (math.nan, math.nan)
    half = float(t.ppf(0.5 + level / 2, df) * se)
    return (estimate - half, estimate + half)
