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


def test_figures_report_and_provenance_with_tiny_model(tiny_study):
    tmp_path, config = tiny_study.work, tiny_study.config
    assert tiny_study.relabelled > 0  # the study gave the random model Known train examples
    figures = [
        f"results/figures/tiny/lora/{name}.{ext}" for name in FIGURES for ext in ("png", "svg")
    ]
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

    # rule all requests exactly these figures for each recipe (the mixtures allow every one but
    # the comparison)
    dry = tiny_study.run("-n", "--summary").stdout
    assert {
        line.split("\t")[0] for line in dry.splitlines() if line.startswith("results/figures/")
    } == {f.replace("/lora/", f"/{run}/") for f in figures for run in ("lora", "lora_b")}
    # nothing reruns; the report holds every figure
    dry = tiny_study.run("-n", *figures)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    report = tiny_study.run("--report", "results/report.html", *figures)
    assert "ERROR/" not in report.stderr, report.stderr  # docutils errors in a caption
    html = (base / "report.html").read_text()
    for name in FIGURES:
        assert f"{name}.png" in html
    assert "Fig. 3b" in html

    # re-rendering the same inputs gives the same bytes
    before = {f: (tmp_path / f).read_bytes() for f in figures}
    tiny_study.run(*figures, "--forcerun", *FIGURE_RULES)
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
