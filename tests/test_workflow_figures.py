"""Figures, P(True) and the report through snakemake with a tiny random model; the provenance
chain of every figure back to the dataset archive; byte-identical re-rendering."""

import json

import polars as pl
import pytest

import audit
from helpers import snakemake, tiny_config, write_config

pytestmark = pytest.mark.workflow

FIGURES = [
    "fig1_fitting_known_unknown",
    "fig3a_accuracy_vs_unknown_share",
    "fig3b_unknown_vs_known_only",
    "fig4_fitting_by_category",
    "fig5_slick_vs_ptrue",
]
FIGURE_RULES = [
    "figure_fitting",
    "figure_accuracy_vs_unknown_share",
    "figure_unknown_vs_known_only",
    "figure_fitting_by_category",
    "figure_slick_vs_ptrue",
]


def give_the_model_some_knowledge(path):
    """A random model knows nothing: every question is Unknown, and no mixture with Known
    examples can be drawn. Relabel every other train question of each relation HighlyKnown
    (the mechanics of figures and provenance are under test here, not SliCK)."""
    labels = pl.read_parquet(path)
    rank = pl.int_range(pl.len()).over("relation")
    relabelled = labels.with_columns(
        pl.when(rank % 2 == 0)
        .then(pl.lit("HighlyKnown"))
        .otherwise(pl.col("category").cast(pl.String))
        .cast(labels.schema["category"])
        .alias("category")
    )
    relabelled.write_parquet(path)


def test_figures_report_and_provenance_with_tiny_model(tmp_path, tiny_model_dir):
    config = tiny_config(
        subsample={"max_per_relation": {"train": 6, "test": 3, "ood_test": 2}},
        slick={"max_new_tokens": 3},
        mixtures={
            "names": ["unknown_0", "unknown_50", "known_only_50", "natural"],
            "per_relation_size": 2,
        },
    )
    config["models"] = {"tiny": {"path": str(tiny_model_dir)}}
    cfg = write_config(tmp_path, config)
    snakemake(tmp_path, "results/labels/tiny/train.parquet", configfile=cfg)
    give_the_model_some_knowledge(tmp_path / "results/labels/tiny/train.parquet")

    figures = [
        f"results/figures/tiny/lora/{name}.{ext}" for name in FIGURES for ext in ("png", "svg")
    ]
    snakemake(tmp_path, *figures, configfile=cfg)
    base = tmp_path / "results"
    for f in figures:
        assert (tmp_path / f).stat().st_size > 1000 and (tmp_path / f"{f}.prov.json").exists()
    assert not (base / "figures/comparison").exists()  # one model: no comparison figure

    ptrue = pl.read_parquet(base / "labels/tiny/ptrue_test.parquet")
    test = pl.read_parquet(base / "labels/tiny/test.parquet")
    assert ptrue["id"].to_list() == test["id"].to_list()
    assert ptrue["p_true"].is_between(0, 1).all()
    assert (ptrue["n_proposals"] == config["slick"]["n_exemplar_sets"]).all()

    # every figure's lineage is complete (every input has a sidecar) and reaches the archive
    for f in figures:
        result = audit.audit(f, tmp_path)
        assert result.problems == [], result.problems
        assert "download_entity_questions" in result.roots
        assert any("resources/entity_questions/dataset.zip" in line for line in result.lines)
    fig5 = json.loads(
        (tmp_path / "results/figures/tiny/lora/fig5_slick_vs_ptrue.png.prov.json").read_text()
    )
    assert {i["path"] for i in fig5["inputs"]} == {
        "results/eval/tiny/lora/natural/early_stop/test.parquet",
        "results/labels/tiny/ptrue_test.parquet",
    }

    # rule all requests exactly these figures (the mixtures allow every one but the comparison)
    dry = snakemake(tmp_path, "-n", "--summary", configfile=cfg).stdout
    assert {
        line.split("\t")[0] for line in dry.splitlines() if line.startswith("results/figures/")
    } == set(figures)
    # nothing reruns; the report holds every figure
    dry = snakemake(tmp_path, "-n", *figures, configfile=cfg)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    report = snakemake(tmp_path, "--report", "results/report.html", *figures, configfile=cfg)
    assert "ERROR/" not in report.stderr, report.stderr  # docutils errors in a caption
    html = (base / "report.html").read_text()
    for name in FIGURES:
        assert f"{name}.png" in html
    assert "Fig. 3b" in html

    # re-rendering the same inputs gives the same bytes
    before = {f: (tmp_path / f).read_bytes() for f in figures}
    snakemake(tmp_path, *figures, "--forcerun", *FIGURE_RULES, configfile=cfg)
    for f in figures:
        assert (tmp_path / f).read_bytes() == before[f], f


def test_only_figures_whose_mixtures_are_configured_are_requested(tmp_path):
    config = tiny_config(mixtures={"names": ["unknown", "unknown_100", "idk_100"]})
    config["models"] = {"a": {"path": str(tmp_path)}, "b": {"path": str(tmp_path)}}
    summary = snakemake(
        tmp_path, "-n", "--summary", configfile=write_config(tmp_path, config)
    ).stdout
    requested = {
        line.split("\t")[0] for line in summary.splitlines() if line.startswith("results/figures/")
    }
    # no unknown_X with 0 < X < 100 (Fig. 1), one share only (Fig. 3a, comparison), no
    # known_only_X (Fig. 3b), no natural (Fig. 5); Fig. 4 from D_Unknown
    assert requested == {
        f"results/figures/{m}/lora/fig4_fitting_by_category.{e}"
        for m in "ab"
        for e in ("png", "svg")
    }
