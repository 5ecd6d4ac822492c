"""The data stage through snakemake in a subprocess, on the shipped fixture."""

import io
import json
import zipfile

import polars as pl
import pytest

from helpers import FIXTURE_ZIP, ROOT, snakemake, tiny_config, write_config

pytestmark = pytest.mark.workflow
DATA_OUTPUTS = ["train", "dev", "test", "ood_test", "ood_dev"]


def data_targets():
    return [f"results/data/{s}.parquet" for s in DATA_OUTPUTS] + ["results/data/split_sizes.csv"]


def test_data_stage_on_fixture(tmp_path):
    cfg = write_config(tmp_path, tiny_config())
    snakemake(tmp_path, *data_targets(), configfile=cfg)
    train = pl.read_parquet(tmp_path / "results/data/train.parquet")
    assert train.columns == ["id", "relation", "subject", "question", "answer"]
    assert set(train["relation"]) == {"P17", "P36", "P495", "P26"}
    for name in ("ood_test", "ood_dev"):
        assert set(pl.read_parquet(tmp_path / f"results/data/{name}.parquet")["relation"]) == {
            "P50",
            "P407",
        }
    test_subjects = set(pl.read_parquet(tmp_path / "results/data/test.parquet")["subject"])
    assert not set(train["subject"]) & test_subjects
    sizes = pl.read_csv(tmp_path / "results/data/split_sizes.csv")
    assert sizes.columns == ["relation", "split", "n"]
    assert sizes.filter(pl.col("split") == "train")["n"].sum() == train.height
    # provenance chain: splits -> archive
    prov = json.loads((tmp_path / "results/data/train.parquet.prov.json").read_text())
    assert prov["rule"] == "prepare_splits"
    assert prov["inputs"][0]["path"] == "resources/entity_questions/dataset.zip"
    assert prov["inputs"][0]["provenance"] == "resources/entity_questions/dataset.zip.prov.json"
    assert prov["config"]["subsample"]["seed"] == 0
    # a second run has nothing to do
    again = snakemake(tmp_path, "-n", *data_targets(), configfile=cfg)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_subsampling_applies_after_sizes(tmp_path):
    cfg = write_config(
        tmp_path, tiny_config(subsample={"seed": 3, "max_per_relation": {"train": 4, "dev": 2}})
    )
    snakemake(tmp_path, *data_targets(), configfile=cfg)
    train = pl.read_parquet(tmp_path / "results/data/train.parquet")
    assert train.group_by("relation").len()["len"].to_list() == [4, 4, 4, 4]
    sizes = pl.read_csv(tmp_path / "results/data/split_sizes.csv")
    assert sizes.filter(pl.col("split") == "train")["n"].sum() > train.height


@pytest.mark.parametrize(
    "configfiles",
    [
        ["config/config.yaml"],
        ["config/paper.yaml"],
        ["config/study.yaml"],
        ["config/study.yaml", "config/study-gemma.yaml"],
    ],
)
def test_dry_run_of_shipped_configs(tmp_path, configfiles):
    # in an empty directory, so that the checkout's own results/ (e.g. after the quickstart) do not
    # matter; the others are merged over config.yaml, which the Snakefile loads from the working
    # dir. The study's plan holds its seeds' runs and the over-seeds outputs.
    files = dict.fromkeys([str(ROOT / f) for f in ["config/config.yaml", *configfiles]])
    proc = snakemake(tmp_path, "-n", "--quiet", "rules", "--configfile", *files)
    assert "prepare_splits" in proc.stdout
    if "config/study.yaml" in configfiles:
        for rule in ("seeds_claims", "seeds_table_accuracy_by_category", "seeds_figure_fitting"):
            assert rule in proc.stdout
        plan = snakemake(tmp_path, "-n", "--configfile", *files).stdout
        assert "lora-seed2/unknown_100/metrics.jsonl" in plan
        if "config/study-gemma.yaml" in configfiles:
            assert "results/figures/comparison/lora/accuracy_vs_unknown_share.png" in plan
            assert "results/tables/gemma3-270m/lora-seeds/claims.md" in plan


def _assert_failed_cleanly(proc, tmp_path, *needles):
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    for needle in needles:
        assert needle in text, text
    leftovers = (
        [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
        if (tmp_path / "results").exists()
        else []
    )
    assert not leftovers, leftovers
    parts = (
        list((tmp_path / "resources").rglob("*.part")) if (tmp_path / "resources").exists() else []
    )
    assert not parts


def test_unreachable_source(tmp_path):
    cfg = write_config(tmp_path, tiny_config(dataset={"source": "http://127.0.0.1:9/dataset.zip"}))
    proc = snakemake(tmp_path, *data_targets(), configfile=cfg, check=False)
    _assert_failed_cleanly(
        proc, tmp_path, "could not be downloaded", "dataset={source: /path/to/dataset.zip}"
    )
    assert not (tmp_path / "resources/entity_questions/dataset.zip").exists()


def test_corrupt_zip(tmp_path):
    data = bytearray(FIXTURE_ZIP.read_bytes())
    data[200] ^= 0xFF
    (tmp_path / "corrupt.zip").write_bytes(bytes(data))
    cfg = write_config(tmp_path, tiny_config(dataset={"source": str(tmp_path / "corrupt.zip")}))
    proc = snakemake(tmp_path, *data_targets(), configfile=cfg, check=False)
    _assert_failed_cleanly(proc, tmp_path, "corrupt zip archive")
    assert not (tmp_path / "resources/entity_questions/dataset.zip").exists()


def test_malformed_json_member(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(FIXTURE_ZIP) as src, zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            body = (
                b'[{"question": "Which country is'
                if name == "dataset/dev/P17.dev.json"
                else src.read(name)
            )
            dst.writestr(name, body)
    (tmp_path / "malformed.zip").write_bytes(buf.getvalue())
    cfg = write_config(tmp_path, tiny_config(dataset={"source": str(tmp_path / "malformed.zip")}))
    proc = snakemake(tmp_path, *data_targets(), configfile=cfg, check=False)
    _assert_failed_cleanly(proc, tmp_path, "dataset/dev/P17.dev.json: malformed JSON")


def test_bad_config_stops_before_any_job(tmp_path):
    config = tiny_config(subsample={"seed": "zero"}, models={"smollm2-135m": {"dtype": "fp8"}})
    cfg = write_config(tmp_path, config)
    proc = snakemake(tmp_path, *data_targets(), configfile=cfg, check=False)
    _assert_failed_cleanly(
        proc,
        tmp_path,
        "config key 'subsample.seed': 'zero' is not of type 'integer'",
        "config key 'models.smollm2-135m.dtype': 'fp8' is not one of",
    )
    assert not (tmp_path / "resources").exists()
