"""The paper's figures (docs/study.md, "Evaluation and analyses") for one fine-tuning run
(results/figures/{model}/{recipe}{seed}/), over the training seeds (Figs. 1, 3a and 4 with 95 %
bands, results/figures/{model}/{recipe}-seeds/, when the rule passes `params.runs`), or, for the
comparison figure, for every model.

Each figure is a pure data function (metrics and predictions -> a tidy frame, unit-tested) and a
plot function (frame -> matplotlib figure). The rule's settings (`params.spec`, an
eqtools.settings.Figure) say which figure; its inputs are named by eqtools.study.input_name
("metrics:<model>:<mixture>", "eval:<model>:<mixture>:<stop>:<split>", "ptrue:<model>:<split>").
"""

import json
import math

import polars as pl

from eqtools.figures import (
    CATEGORY_COLORS,
    eval_accuracy,
    group_accuracy,
    known_accuracy,
    plt,
    read_metrics,
    save_figure,
    use_style,
)
from eqtools.io import setup_logging
from eqtools.provenance import job_record
from eqtools.replicates import Intervals, accuracy_cells, run_input_name, seed_bands
from eqtools.settings import Figure
from eqtools.study import (
    CATEGORIES,
    SINGLE_CATEGORY,
    SPLIT_TITLES,
    STOP_NAMES,
    STOPS,
    TEST_SPLITS,
    input_name,
    mixture_share,
)

# ---------------------------------------------------------------- data (pure)


def fitting_by_epoch(lines: list[dict]) -> pl.DataFrame:
    """Fig. 1: per epoch, train accuracy on the Known and on the Unknown training examples, and
    dev accuracy (None where a group is empty)."""
    return pl.DataFrame(
        {
            "epoch": [line["epoch"] for line in lines],
            "train_known": [known_accuracy(line, "train") for line in lines],
            "train_unknown": [group_accuracy(line, "train", ["Unknown"]) for line in lines],
            "dev": [line.get("dev_accuracy") for line in lines],
        },
        schema={
            "epoch": pl.Int64,
            "train_known": pl.Float64,
            "train_unknown": pl.Float64,
            "dev": pl.Float64,
        },
    )


def duration_accuracy(
    stop_acc: dict, metrics: list[dict], epochs, split: str
) -> dict[str, float | None]:
    """Test accuracy of one fine-tune per training duration: EARLY_STOP and CONVERGENCE from the
    test predictions (`stop_acc`: stop -> accuracy), each of `epochs` from the metrics of that
    epoch (None where the split was not evaluated at that epoch)."""
    out = {STOP_NAMES[s]: stop_acc.get(s) for s in STOPS}
    by_epoch = {line["epoch"]: line for line in metrics}
    for e in epochs:
        out[f"epoch {e}"] = by_epoch.get(e, {}).get(f"{split}_accuracy")
    return out


SHARE_SCHEMA = {
    "share": pl.Int64,
    "variant": pl.String,
    "duration": pl.String,
    "split": pl.String,
    "accuracy": pl.Float64,
}


def accuracy_vs_share(points: list[dict]) -> pl.DataFrame:
    """Fig. 3a/3b/comparison: tidy rows (share, variant, duration, split, accuracy) sorted for
    plotting; `points` are dicts with those keys (accuracy None = not available, dropped)."""
    schema = SHARE_SCHEMA
    frame = pl.DataFrame(points, schema=schema) if points else pl.DataFrame(schema=schema)
    # stable sort: lines keep the order in which their first point came (legend order)
    return frame.filter(pl.col("accuracy").is_not_null()).sort("share", maintain_order=True)


def category_fitting(lines_by_mixture: dict[str, list[dict]]) -> pl.DataFrame:
    """Fig. 4: train accuracy per epoch for each SliCK category present in each mixture's
    training set (mixture, epoch, category, accuracy, n)."""
    rows = []
    for mixture, lines in lines_by_mixture.items():
        for line in lines:
            for cat in CATEGORIES:
                n = line.get(f"train_n_{cat}") or 0
                acc = line.get(f"train_accuracy_{cat}")
                if n and acc is not None:
                    rows.append(
                        {
                            "mixture": mixture,
                            "epoch": line["epoch"],
                            "category": cat,
                            "accuracy": acc,
                            "n": n,
                        }
                    )
    schema = {
        "mixture": pl.String,
        "epoch": pl.Int64,
        "category": pl.String,
        "accuracy": pl.Float64,
        "n": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema)


def ptrue_unknown_curve(
    graded: pl.DataFrame, ptrue: pl.DataFrame, n_points: int = 200
) -> pl.DataFrame:
    """Fig. 5, P(True): call the k test questions with the lowest P(True) Unknown (ties broken by
    id) and measure the fine-tuned model's accuracy on them, for k over a grid of shares.
    Returns (share, n, accuracy) with share = k / |test|."""
    joined = graded.select("id", "correct").join(ptrue.select("id", "p_true"), on="id", how="inner")
    ranked = joined.sort("p_true", "id")
    n_total = ranked.height
    if n_total == 0:
        return pl.DataFrame(schema={"share": pl.Float64, "n": pl.Int64, "accuracy": pl.Float64})
    cum = ranked["correct"].cast(pl.Int64).cum_sum().to_list()
    ks = sorted({max(1, math.ceil(n_total * i / n_points)) for i in range(1, n_points + 1)})
    return pl.DataFrame(
        {"share": [k / n_total for k in ks], "n": ks, "accuracy": [cum[k - 1] / k for k in ks]},
        schema={"share": pl.Float64, "n": pl.Int64, "accuracy": pl.Float64},
    )


def ptrue_at_share(graded: pl.DataFrame, ptrue: pl.DataFrame, k: int) -> float | None:
    """Accuracy on the k questions with the lowest P(True): the P(True) 'Unknown' set of the same
    size as a SliCK set."""
    joined = graded.select("id", "correct").join(ptrue.select("id", "p_true"), on="id", how="inner")
    low = joined.sort("p_true", "id").head(k)
    return float(low["correct"].mean()) if k and low.height else None


def slick_unknown_points(graded: pl.DataFrame) -> pl.DataFrame:
    """Fig. 5, SliCK: the test questions SliCK calls Unknown (and, as a second, larger set,
    Unknown or WeaklyKnown): their share of the test set and the fine-tuned model's accuracy."""
    n_total = graded.height
    rows = []
    for label, cats in (
        ("Unknown", ["Unknown"]),
        ("Unknown + WeaklyKnown", ["Unknown", "WeaklyKnown"]),
    ):
        sub = graded.filter(pl.col("category").cast(pl.String).is_in(cats))
        if sub.height:
            rows.append(
                {
                    "set": label,
                    "share": sub.height / n_total,
                    "n": sub.height,
                    "accuracy": float(sub["correct"].mean()),
                }
            )
    schema = {"set": pl.String, "share": pl.Float64, "n": pl.Int64, "accuracy": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


# ---------------------------------------------------------------- plots


def _epoch_axis(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _percent_axis(ax, axis="y"):
    from matplotlib.ticker import PercentFormatter

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0))


def plot_fitting(data: pl.DataFrame, title: str, mixture: str):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    series = (
        ("train_known", "Train, Known examples", "#1b7837", "o"),
        ("train_unknown", "Train, Unknown examples", "#b2182b", "s"),
        ("dev", "Dev (all)", "#2166ac", "^"),
    )
    for col, label, color, marker in series:
        sub = data.filter(pl.col(col).is_not_null())
        if sub.height:
            ax.plot(sub["epoch"], sub[col], label=label, color=color, marker=marker, markersize=4)
            _band(ax, sub, "epoch", col, color)
    ax.set_xlabel("fine-tuning epoch")
    _epoch_axis(ax)
    ax.set_ylabel("accuracy (exact match)")
    ax.set_ylim(-0.02, 1.02)
    _percent_axis(ax)
    ax.set_title(
        f"{title}: fitting Known vs Unknown examples (Fig. 1)\nfine-tuned on {mixture}", fontsize=10
    )
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def _band(ax, data: pl.DataFrame, x: str, col: str, color: str) -> None:
    """The 95 % band of `col` (columns <col>_low / <col>_high, over seeds) where the frame has
    them."""
    low, high = f"{col}_low", f"{col}_high"
    if low in data.columns:
        part = data.filter(pl.col(low).is_not_null() & pl.col(low).is_not_nan())
        if part.height:
            ax.fill_between(part[x], part[low], part[high], color=color, alpha=0.18, linewidth=0)


def _duration_style(duration: str, index: int):
    if duration == STOP_NAMES["early_stop"]:
        return {"color": "#2166ac", "linestyle": "-", "marker": "o"}
    if duration == STOP_NAMES["convergence"]:
        return {"color": "#b2182b", "linestyle": "-", "marker": "s"}
    greys = ["#636363", "#969696", "#bdbdbd", "#525252"]
    return {"color": greys[index % len(greys)], "linestyle": ":", "marker": "."}


def plot_accuracy_vs_share(
    data: pl.DataFrame, title: str, splits=("test", "ood_test"), line_key="duration", style_key=None
):
    """One panel per split; one line per value of `line_key` (duration or model); linestyle per
    value of `style_key` (variant) if given."""
    splits = [s for s in splits if data.filter(pl.col("split") == s).height]
    fig, axes = plt.subplots(
        1, max(1, len(splits)), figsize=(5.2 * max(1, len(splits)), 4), squeeze=False
    )
    line_values = list(dict.fromkeys(data[line_key].to_list()))
    dashes = ["-", "--", "-.", ":"]
    for ax, split in zip(axes[0], splits, strict=False):
        sub = data.filter(pl.col("split") == split)
        for i, value in enumerate(line_values):
            lines = sub.filter(pl.col(line_key) == value)
            groups = list(dict.fromkeys(lines[style_key].to_list())) if style_key else [None]
            for j, group in enumerate(groups):
                part = lines.filter(pl.col(style_key) == group) if style_key else lines
                if not part.height:
                    continue
                style = (
                    _duration_style(value, i)
                    if line_key == "duration"
                    else {"color": f"C{i}", "marker": "o"}
                )
                if style_key:  # the second group hollow, so that equal points stay visible
                    style = style | {"linestyle": dashes[j % len(dashes)], "marker": "os^v"[j % 4]}
                    if j:
                        style["markerfacecolor"] = "none"
                label = f"{value}, {group}" if style_key else value
                ax.plot(part["share"], part["accuracy"], label=label, markersize=5, **style)
                _band(ax, part, "share", "accuracy", style["color"])
        ax.set_xlabel("Unknown examples in the fine-tuning set (%)")
        ax.set_ylabel("accuracy (exact match)")
        ax.set_title(SPLIT_TITLES.get(split, split))
        ax.set_xlim(-5, 105)
        top = sub["accuracy_high"] if "accuracy_high" in sub.columns else sub["accuracy"]
        ax.set_ylim(0, max(0.05, 1.15 * float(top.fill_nan(None).max() or 0)))
        _percent_axis(ax)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_category_fitting(data: pl.DataFrame, title: str):
    natural = data.filter(pl.col("mixture") == "natural")
    # a single-category set's own category (its only one, unless the labels were relabelled)
    single = data.filter(
        pl.col("mixture").replace_strict(SINGLE_CATEGORY, default=None) == pl.col("category")
    )
    panels = [
        (name, frame) for name, frame in (("natural", natural), ("single", single)) if frame.height
    ]
    fig, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False
    )
    for ax, (name, frame) in zip(axes[0], panels, strict=False):
        for cat in CATEGORIES:
            part = frame.filter(pl.col("category") == cat).sort("epoch")
            if part.height:
                label = cat if name == "natural" else f"D_{cat}"
                ax.plot(
                    part["epoch"],
                    part["accuracy"],
                    label=label,
                    color=CATEGORY_COLORS[cat],
                    marker="o",
                    markersize=4,
                )
                _band(ax, part, "epoch", "accuracy", CATEGORY_COLORS[cat])
        ax.set_title(
            "D_Natural, per category of its examples"
            if name == "natural"
            else "single-category training sets"
        )
        ax.set_xlabel("fine-tuning epoch")
        _epoch_axis(ax)
        ax.set_ylabel("train accuracy (exact match)")
        ax.set_ylim(-0.02, 1.02)
        _percent_axis(ax)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{title}\nfitting the training examples per SliCK category (Fig. 4)")
    fig.tight_layout()
    return fig


def plot_slick_vs_ptrue(
    curve: pl.DataFrame, slick: pl.DataFrame, equal: list[dict], title: str, run: str
):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if curve.height:
        ax.plot(
            curve["share"], curve["accuracy"], color="#636363", label="P(True) below a threshold"
        )
    markers = {"Unknown": "*", "Unknown + WeaklyKnown": "D"}
    for row in slick.iter_rows(named=True):
        ax.scatter(
            row["share"],
            row["accuracy"],
            s=140 if row["set"] == "Unknown" else 60,
            marker=markers[row["set"]],
            color="#b2182b",
            zorder=3,
            label=f"SliCK {row['set']} (n={row['n']})",
        )
    for row in equal:
        if row["accuracy"] is not None:
            ax.scatter(
                row["share"],
                row["accuracy"],
                s=50,
                marker="o",
                facecolors="none",
                edgecolors="#2166ac",
                zorder=3,
                label=f"P(True), same share as SliCK {row['set']}",
            )
    ax.set_xlabel("test questions called Unknown (%)")
    ax.set_ylabel("accuracy after fine-tuning on them")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(
        -0.02, max(0.2, float(curve["accuracy"].max() or 0) + 0.05) if curve.height else 1.0
    )
    _percent_axis(ax, "x")
    _percent_axis(ax)
    ax.set_title(
        f"{title}: SliCK vs P(True) as detectors of Unknown questions (Fig. 5)\n"
        f"accuracy of the model fine-tuned on {run}",
        fontsize=10,
    )
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- figures
# `inputs`: the rule's named inputs, {eqtools.study.input_name(...): path}


def _accuracies(inputs: dict, model: str, mixture: str, split: str) -> dict:
    """{stop: test accuracy} of the fine-tune on `mixture`, for the stops among the inputs."""
    names = {s: input_name("eval", model, mixture, s, split) for s in STOPS}
    return {s: eval_accuracy(inputs[name]) for s, name in names.items() if name in inputs}


def _metrics(inputs: dict, model: str, mixture: str) -> list[dict]:
    name = input_name("metrics", model, mixture)
    return read_metrics(inputs[name]) if name in inputs else []


def figure_fitting(inputs, spec: Figure, model):
    data = fitting_by_epoch(_metrics(inputs, model, spec.mixture))
    return plot_fitting(data, spec.title, spec.mixture)


def share_points(inputs, model, mixtures, epochs, variant) -> list[dict]:
    points = []
    for mixture in mixtures:
        share = mixture_share(mixture)[1]
        metrics = _metrics(inputs, model, mixture)
        for split in TEST_SPLITS:
            stops = _accuracies(inputs, model, mixture, split)
            acc = duration_accuracy(stops, metrics, epochs, split)
            points += [
                {"share": share, "variant": variant, "duration": d, "split": split, "accuracy": a}
                for d, a in acc.items()
            ]
    return points


def figure_unknown_share(inputs, spec: Figure, model):
    data = accuracy_vs_share(share_points(inputs, model, spec.mixtures, spec.epochs, "D"))
    title = f"{spec.title}\ntest accuracy vs share of Unknown fine-tuning examples (Fig. 3a)"
    return plot_accuracy_vs_share(data, title)


def figure_known_only(inputs, spec: Figure, model):
    points = share_points(inputs, model, spec.unknown, [], "D")
    points += share_points(inputs, model, spec.known_only, [], "D_Known")
    title = f"{spec.title}\nD vs D_Known: the same mixture without its Unknown examples (Fig. 3b)"
    return plot_accuracy_vs_share(accuracy_vs_share(points), title, style_key="variant")


def figure_category_fitting(inputs, spec: Figure, model):
    lines = {m: _metrics(inputs, model, m) for m in spec.mixtures}
    return plot_category_fitting(category_fitting(lines), spec.title)


def figure_slick_vs_ptrue(inputs, spec: Figure, model):
    graded = pl.read_parquet(inputs[input_name("eval", model, spec.mixture, spec.stop, "test")])
    ptrue = pl.read_parquet(inputs[input_name("ptrue", model, "test")])
    slick = slick_unknown_points(graded)
    equal = [
        {"set": r["set"], "share": r["share"], "accuracy": ptrue_at_share(graded, ptrue, r["n"])}
        for r in slick.iter_rows(named=True)
    ]
    run = f"{spec.mixture}, {STOP_NAMES[spec.stop]}"
    curve = ptrue_unknown_curve(graded, ptrue)
    return plot_slick_vs_ptrue(curve, slick, equal, spec.title, run)


def figure_comparison(inputs, spec: Figure, model=None):
    points = []
    for name in spec.models:
        for p in share_points(inputs, name, spec.mixtures, [], "D"):
            points.append(p | {"variant": name})
    data = accuracy_vs_share(points).rename({"variant": "model"})
    title = f"{spec.title}\ntest accuracy vs share of Unknown examples, per model (Fig. 3a)"
    return plot_accuracy_vs_share(data, title, line_key="model", style_key="duration")


# ---------------------------------------------------------------- over seeds


def _run_metrics(inputs: dict, run: str, model: str, mixture: str) -> list[dict]:
    return read_metrics(inputs[run_input_name(run, input_name("metrics", model, mixture))])


def seeds_fitting(runs_lines: list[list[dict]]) -> pl.DataFrame:
    """Fig. 1 over seeds: fitting_by_epoch's columns as the mean over the seeds, each with
    <col>_low / <col>_high, the t interval over seeds clipped to [0, 1]."""
    frames = [fitting_by_epoch(lines) for lines in runs_lines]
    long = pl.concat(frames).unpivot(index="epoch", variable_name="series")
    bands = seed_bands(long, ["series", "epoch"], "value", bounds=(0.0, 1.0))
    wide = None
    for col in ("train_known", "train_unknown", "dev"):
        part = bands.filter(pl.col("series") == col).select(
            "epoch",
            pl.col("mean").alias(col),
            pl.col("low").alias(f"{col}_low"),
            pl.col("high").alias(f"{col}_high"),
        )
        wide = part if wide is None else wide.join(part, on="epoch", how="full", coalesce=True)
    return wide.sort("epoch")


def seeds_category_fitting(runs: list[dict[str, list[dict]]]) -> pl.DataFrame:
    """Fig. 4 over seeds: (mixture, epoch, category, accuracy = mean over seeds, accuracy_low,
    accuracy_high, n)."""
    long = pl.concat([category_fitting(lines) for lines in runs])
    n = long.group_by("mixture", "category").agg(pl.col("n").max())
    bands = seed_bands(long, ["mixture", "epoch", "category"], "accuracy", bounds=(0.0, 1.0))
    return bands.join(n, on=["mixture", "category"], how="left").select(
        "mixture",
        "epoch",
        "category",
        pl.col("mean").alias("accuracy"),
        pl.col("low").alias("accuracy_low"),
        pl.col("high").alias("accuracy_high"),
        "n",
    )


def seeds_share_points(inputs, model, runs, mixtures) -> pl.DataFrame:
    """Fig. 3a over seeds: test accuracy per (share, stop, split), the mean over seeds and test
    questions with its 95 % interval (eqtools.replicates.Intervals)."""
    points = []
    for split in TEST_SPLITS:
        keys = [(m, s) for m in mixtures for s in STOPS]
        preds = {
            (m, s): [
                pl.read_parquet(
                    inputs[run_input_name(r, input_name("eval", model, m, s, split))],
                    columns=["id", "correct"],
                )
                for r in runs
            ]
            for m, s in keys
        }
        boot = Intervals(accuracy_cells(preds, keys))
        for m, s in keys:
            mean, low, high = boot.interval((m, s))
            points.append(
                {
                    "share": mixture_share(m)[1],
                    "variant": "D",
                    "duration": STOP_NAMES[s],
                    "split": split,
                    "accuracy": mean,
                    "accuracy_low": low,
                    "accuracy_high": high,
                }
            )
    schema = SHARE_SCHEMA | {"accuracy_low": pl.Float64, "accuracy_high": pl.Float64}
    frame = pl.DataFrame(points, schema=schema, orient="row")
    return frame.filter(pl.col("accuracy").is_not_nan()).sort("share", maintain_order=True)


def seeds_figure_fitting(inputs, spec: Figure, model, runs):
    data = seeds_fitting([_run_metrics(inputs, r, model, spec.mixture) for r in runs])
    return plot_fitting(
        data, spec.title, f"{spec.mixture}; bands: 95 % over seeds, clipped to 0-100 %"
    )


def seeds_figure_unknown_share(inputs, spec: Figure, model, runs):
    data = seeds_share_points(inputs, model, runs, spec.mixtures)
    title = (
        f"{spec.title}\ntest accuracy vs share of Unknown fine-tuning examples (Fig. 3a); "
        "bands: 95 % over test questions and seeds"
    )
    return plot_accuracy_vs_share(data, title)


def seeds_figure_category_fitting(inputs, spec: Figure, model, runs):
    data = seeds_category_fitting(
        [{m: _run_metrics(inputs, r, model, m) for m in spec.mixtures} for r in runs]
    )
    return plot_category_fitting(data, f"{spec.title}; bands: 95 % over seeds, clipped to 0-100 %")


SEED_FIGURES = {
    "fig1": seeds_figure_fitting,
    "fig3a": seeds_figure_unknown_share,
    "fig4": seeds_figure_category_fitting,
}

FIGURES = {
    "fig1": figure_fitting,
    "fig3a": figure_unknown_share,
    "fig3b": figure_known_only,
    "fig4": figure_category_fitting,
    "fig5": figure_slick_vs_ptrue,
    "comparison": figure_comparison,
}


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    use_style()
    spec = Figure.from_param(smk.params.spec)
    runs = list(getattr(smk.params, "runs", None) or [])
    config = json.loads(smk.params.spec) | {"runs": runs} if runs else None
    record = job_record(smk, config)  # before saving: the figure embeds the record's id
    inputs, model = dict(smk.input.items()), smk.wildcards.get("model")
    if runs:
        fig = SEED_FIGURES[spec.figure](inputs, spec, model, runs)
    else:
        fig = FIGURES[spec.figure](inputs, spec, model)
    save_figure(fig, {"png": smk.output.png, "svg": smk.output.svg}, record, spec.title)
    log.info("%s: %s", spec.figure, smk.output.png)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
