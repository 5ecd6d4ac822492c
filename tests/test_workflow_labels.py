"""SliCK labelling through snakemake on the fixture: a tiny random model for the mechanics, and
the real embedded model on a few questions."""

import copy
import json
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.workflow
SPLITS = ["train", "dev", "test", "ood_test"]


def label_targets(model):
    return [f"results/labels/{model}/{s}.parquet" for s in SPLITS] + [
        f"results/labels/{model}/category_summary.csv"
    ]


def check_labels(workdir, model):
    for split in SPLITS:
        questions = pl.read_parquet(workdir / f"results/data/{split}.parquet")
        labels = pl.read_parquet(workdir / f"results/labels/{model}/{split}.parquet")
        assert labels["id"].to_list() == questions["id"].to_list()
        assert labels["category"].null_count() == 0
        assert {"p_correct_greedy", "p_correct_sampled", "category", "greedy_answers"} <= set(
            labels.columns
        )
    exemplars = json.loads((workdir / f"results/labels/{model}/exemplars.json").read_text())
    dev_ids = set(pl.read_parquet(workdir / "results/data/dev.parquet")["id"]) | set(
        pl.read_parquet(workdir / "results/data/ood_dev.parquet")["id"]
    )
    for rel in exemplars.values():
        assert {e["id"] for s in rel["sets"] for e in s} | {rel["spare"]["id"]} <= dev_ids
    summary = pl.read_csv(workdir / f"results/labels/{model}/category_summary.csv")
    assert set(summary["split"]) == set(SPLITS)
    prov = json.loads((workdir / f"results/labels/{model}/test.parquet.prov.json").read_text())
    assert any(
        i["path"].startswith(f"results/labels/{model}/chunks/test/") and i["provenance"]
        for i in prov["inputs"]
    )


def test_labels_with_tiny_random_model(tiny_study):
    work = tiny_study.work
    check_labels(work, "tiny")
    # one chunk per (split, relation): train, dev and test of P17; ood_test of P50
    base = work / "results/labels/tiny/chunks"
    chunks = sorted(p.relative_to(base).as_posix() for p in base.glob("*/*.parquet"))
    assert "ood_test/P50.parquet" in chunks and "train/P17.parquet" in chunks
    assert len(chunks) == 3 + 1
    # each chunk's assembled result stays beside it, the chunk a hard link to it (eqtools.partial)
    for chunk in chunks:
        kept = base / Path(chunk).parent / f".{Path(chunk).stem}.partial/complete.parquet"
        assert kept.stat().st_ino == (base / chunk).stat().st_ino
    # a rerun is a no-op; the engine's batch size and path are runtime settings, rerun nothing
    again = tiny_study.run("-n", *label_targets("tiny"))
    assert "Nothing to be done" in again.stdout + again.stderr
    config = copy.deepcopy(tiny_study.config)
    config["engine"] = {"max_batch_rows": 7, "backend": "reference"}
    again = tiny_study.run("-n", *label_targets("tiny"), config=config)
    assert "Nothing to be done" in again.stdout + again.stderr
    # a labelling parameter reruns the labels, not the data
    config["slick"]["n_samples"] = 2
    dry = tiny_study.run("-n", *label_targets("tiny"), config=config).stdout
    assert "label_questions" in dry and "prepare_splits" not in dry and "prepare_model" not in dry
