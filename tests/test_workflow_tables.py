"""The tables through snakemake with a tiny random model: from the fixture archive to
results/tables/, each table checked against the predictions and metrics it is made from."""

import copy
import json

import polars as pl
import pytest

from eqtools.provenance import read_provenance

pytestmark = pytest.mark.workflow

RUN = "results/tables/tiny/lora"
TABLES = [
    f"{RUN}/table2_accuracy_by_category_test",
    f"{RUN}/table2_accuracy_by_category_ood_test",
    f"{RUN}/table1_linear_model",
    f"{RUN}/table8_idk_answered",
    "results/tables/tiny/category_distribution",
]


def test_tables_end_to_end_with_tiny_model(tiny_study):
    # the tiny study's mixtures give every table its rows
    tmp_path = tiny_study.work
    targets = [f"{t}.{ext}" for t in TABLES for ext in ("csv", "md")]
    base = tmp_path / "results"

    for target in targets:
        path = tmp_path / target
        assert path.stat().st_size > 0
        prov = read_provenance(path)
        assert prov["rule"].startswith("table_") and prov["inputs"] and prov["config"]["table"]
        assert all(i["provenance"] for i in prov["inputs"])  # lineage continues upstream

    # Table 2: the accuracies are those of the evaluation files; every variant at both stops
    table2 = pl.read_csv(tmp_path / f"{RUN}/table2_accuracy_by_category_test.csv")
    assert set(table2["variant"]) == {"unknown", "natural"} and set(table2["stop"]) == {
        "early_stop",
        "convergence",
    }
    assert set(table2["subset"]) == {"Full", "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"}
    for row in table2.filter(pl.col("subset") == "Full").iter_rows(named=True):
        preds = pl.read_parquet(
            base / f"eval/tiny/lora/{row['variant']}/{row['stop']}/test.parquet"
        )
        assert row["n_questions"] == preds.height == 3  # 3 per relation x 1 relation
        assert row["accuracy_pct"] == pytest.approx(100 * preds["correct"].mean())
        assert row["n_chunks"] == 3  # fewer questions than 100 chunks: one per chunk
    best = table2.group_by("stop", "subset").agg(
        pl.col("is_best").any(), pl.col("n_questions").first()
    )
    assert (best["is_best"] == (best["n_questions"] > 0)).all()  # a best per non-empty column
    md = (tmp_path / f"{RUN}/table2_accuracy_by_category_test.md").read_text()
    assert "D_Unknown" in md and "D_Natural" in md and "EARLY_STOP" in md and "Full (n=3)" in md

    # Table 1: one point per (mixture but idk_X, epoch); an undefined fit is NaN with a note
    table1 = pl.read_csv(tmp_path / f"{RUN}/table1_linear_model.csv")
    assert table1.select("split", "term").rows() == [
        (s, t) for s in ("test", "ood_test") for t in ("b0", "b_kn", "b_unk")
    ]
    undefined = table1.filter(pl.col("estimate").is_nan())
    assert undefined["note"].is_not_null().all() and (undefined["note"] != "").all()
    assert (table1["n_points"] == 5 * 2).all()  # 5 mixtures (idk_50 left out) x 2 epochs
    points = pl.read_csv(tmp_path / f"{RUN}/table1_fit_points.csv")
    assert set(points["mixture"]) == {
        "unknown",
        "natural",
        "unknown_0",
        "unknown_50",
        "known_only_50",
    }
    last = json.loads(
        (base / "finetune/tiny/lora/unknown/metrics.jsonl").read_text().splitlines()[-1]
    )
    unknown_last = points.filter((pl.col("mixture") == "unknown") & (pl.col("epoch") == 2)).row(
        0, named=True
    )
    assert unknown_last["n_unknown_fitted"] == round(
        last["train_accuracy_Unknown"] * last["train_n_Unknown"]
    )

    # Table 8: unknown_50 vs idk_50, both stops and test splits
    table8 = pl.read_csv(tmp_path / f"{RUN}/table8_idk_answered.csv")
    assert table8.height == 2 * 2 * 2 and set(table8["variant"]) == {"unknown_50", "idk_50"}
    assert (table8["n_answered"] <= table8["n_questions"]).all()

    # Tables 3-5: every labelled split, its relations and a total
    dist = pl.read_csv(tmp_path / "results/tables/tiny/category_distribution.csv")
    test_total = dist.filter((pl.col("split") == "test") & (pl.col("relation") == "all")).row(
        0, named=True
    )
    assert test_total["n_total"] == 3 and test_total["n_Unknown"] + test_total["n_HighlyKnown"] <= 3

    # a table setting reruns Table 2 only; nothing upstream, not the other tables
    config = copy.deepcopy(tiny_study.config)
    config["tables"] = {"n_chunks": 50}
    dry = tiny_study.run("-n", *targets, config=config).stdout
    assert "rule table_accuracy_by_category:" in dry
    for other in ("table_linear_model", "table_idk", "table_category_distribution", "finetune"):
        assert f"rule {other}:" not in dry
