"""Results over training seeds through snakemake (workflow/rules/seeds.smk): the tiny study with
one extra seed, its over-seeds tables and figures checked against the runs they are made of."""

import copy

import polars as pl
import pytest

from eqtools.provenance import read_provenance

pytestmark = pytest.mark.workflow

TABLES = "results/tables/tiny/lora-seeds"
FIGURES = "results/figures/tiny/lora-seeds"
OUTPUTS = [
    f"{TABLES}/{name}.{ext}"
    for name in (
        "table2_accuracy_by_category_test",
        "table2_accuracy_by_category_ood_test",
        "table1_linear_model",
        "claims",
    )
    for ext in ("csv", "md")
] + [
    f"{FIGURES}/{name}.{ext}"
    for name in (
        "fig1_fitting_known_unknown",
        "fig3a_accuracy_vs_unknown_share",
        "fig4_fitting_by_category",
    )
    for ext in ("png", "svg")
]


def seeded(config: dict) -> dict:
    config = copy.deepcopy(config)
    config["finetune"]["seeds"] = [1]
    return config


def accuracy(path) -> float:
    return float(pl.read_parquet(path)["correct"].mean())


def test_over_seeds_outputs(tiny_study):
    work, config = tiny_study.work, seeded(tiny_study.config)
    # requested by `all` with seeds, for every recipe; the single-seed study requests none
    dry = tiny_study.run("-n", config=config).stdout
    for recipe in ("lora", "lora_b"):
        assert f"results/tables/tiny/{recipe}-seeds/claims.md" in dry
        assert f"results/figures/tiny/{recipe}-seeds/fig3a_accuracy_vs_unknown_share.png" in dry
    assert not list((work / "results/tables/tiny").glob("*-seeds"))

    tiny_study.run(*OUTPUTS, config=config)
    for target in OUTPUTS:
        prov = read_provenance(work / target)
        assert prov["rule"].startswith("seeds_")
        runs = {i["path"].split("/")[3] for i in prov["inputs"] if "/finetune/" in i["path"]}
        runs |= {i["path"].split("/")[3] for i in prov["inputs"] if "/eval/" in i["path"]}
        assert runs == {"lora", "lora-seed1"}, target

    # Table 2: the mean of the two runs' accuracies, with an interval around it
    table2 = pl.read_csv(work / f"{TABLES}/table2_accuracy_by_category_test.csv")
    assert set(table2["variant"]) == {"unknown", "natural"}
    for row in table2.filter(pl.col("subset") == "Full").iter_rows(named=True):
        runs = [
            accuracy(work / f"results/eval/tiny/{run}/{row['variant']}/{row['stop']}/test.parquet")
            for run in ("lora", "lora-seed1")
        ]
        assert row["n_seeds"] == 2 and row["n_questions"] == 3
        assert row["accuracy_pct"] == pytest.approx(100 * sum(runs) / 2)
        assert row["ci_low_pct"] <= row["accuracy_pct"] <= row["ci_high_pct"]
    md = (work / f"{TABLES}/table2_accuracy_by_category_test.md").read_text()
    assert "mean of 2 seeds" in md and "95 %" in md

    # Table 1: the points of both runs, clustered by fine-tune
    points = pl.read_csv(work / f"{TABLES}/table1_fit_points.csv")
    assert set(points["run"]) == {"lora", "lora-seed1"}
    single = pl.read_csv(work / "results/tables/tiny/lora/table1_fit_points.csv")
    assert points.filter(pl.col("run") == "lora").drop("run", "fine_tune").equals(single)
    table1 = pl.read_csv(work / f"{TABLES}/table1_linear_model.csv")
    assert set(table1["n_clusters"]) == {points["fine_tune"].n_unique()} == {10}
    assert "clustered" not in (work / "results/tables/tiny/lora/table1_linear_model.md").read_text()

    # claims: one row per claim and test split, the fall computed from the runs' predictions
    claims = pl.read_csv(work / f"{TABLES}/claims.csv")
    verdicts = {"reproduced", "not reproduced", "inconclusive", "inconclusive (no fall measured)"}
    assert set(claims["verdict"]) <= verdicts
    # the tiny model answers nothing: no fall, so nothing for early stopping to avoid
    early = claims.filter(pl.col("statistic").str.starts_with("fall at CONVERGENCE"))
    assert set(early["verdict"]) == {"inconclusive (no fall measured)"}
    assert claims.filter(pl.col("evidence").str.starts_with("Fig. 1")).height == 1
    assert claims.filter(pl.col("evidence") == "Table 1").height == 4  # b_kn, b_unk x 2 splits
    fall = claims.filter(
        pl.col("evidence").str.starts_with("Fig. 3a (") & (pl.col("split") == "test")
    )
    expected = sum(
        accuracy(work / f"results/eval/tiny/{run}/unknown_0/convergence/test.parquet")
        - accuracy(work / f"results/eval/tiny/{run}/unknown_50/convergence/test.parquet")
        for run in ("lora", "lora-seed1")
    )
    assert fall["estimate"][0] == pytest.approx(100 * expected / 2)
    ptrue = claims.filter(pl.col("evidence").str.starts_with("Fig. 5"))
    assert ptrue["split"].to_list() == ["test"]
    recorded = read_provenance(work / f"{TABLES}/claims.csv")["config"]
    assert recorded["runs"] == ["lora", "lora-seed1"]
    spec = recorded["claims"]
    assert spec["fall"] == ["unknown_0", "unknown_50"] and spec["idk"] == ["unknown_50", "idk_50"]

    # nothing left to do, and the single-seed outputs were not touched
    assert "Nothing to be done" in tiny_study.run(*OUTPUTS, "-n", config=config).stdout
