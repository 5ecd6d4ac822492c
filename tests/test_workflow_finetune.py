"""Mixtures, fine-tuning and the test predictions at both stops through snakemake, on the
tiny study (tests/tiny_study.py)."""

import copy
import json

import polars as pl
import pytest

from helpers import snakemake, tiny_config, write_config

pytestmark = pytest.mark.workflow


def test_finetune_end_to_end_with_tiny_model(tiny_study):
    base = tiny_study.work / "results"
    mixture = pl.read_parquet(base / "mixtures/tiny/idk_50.parquet")
    assert mixture.height == 2  # per_relation_size 2 x 1 relation
    unknown = mixture.filter(~pl.col("known"))
    assert unknown.height == 1 and (unknown["answer"] == "I don't know").all()
    assert (mixture.filter(pl.col("known"))["answer"] != "I don't know").all()
    assert mixture["gold_answer"].is_not_null().all()
    for recipe in ("lora", "lora_b"):
        for name in tiny_study.config["mixtures"]["names"]:
            run = base / f"finetune/tiny/{recipe}/{name}"
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert [x["epoch"] for x in lines] == [1, 2]
            keys = {"train_loss", "dev_accuracy", "train_accuracy", "test_accuracy"}
            assert keys | {"ood_test_accuracy"} <= set(lines[0])
            assert (run / "early_stop/adapter_config.json").exists()
            assert (run / "convergence/adapter_config.json").exists()
            # of its state a finished run keeps the record and the weights, not the optimizer
            assert not (run / "state/epoch").exists() and (run / "state/finished").is_dir()
            for stop in ("early_stop", "convergence"):
                for split in ("test", "ood_test"):
                    preds = pl.read_parquet(
                        base / f"eval/tiny/{recipe}/{name}/{stop}/{split}.parquet"
                    )
                    assert {"id", "prediction", "correct", "category"} <= set(preds.columns)
                    assert preds.height == pl.read_parquet(base / f"data/{split}.parquet").height
    # changing one recipe value reruns the fine-tunes and what follows, nothing upstream
    config = copy.deepcopy(tiny_study.config)
    config["recipes"]["lora"]["learning_rate"] = 2e-3
    dry = tiny_study.run("-n", config=config).stdout
    assert "rule finetune:" in dry
    for upstream in ("label_questions", "build_mixture", "prepare_splits", "prepare_model"):
        assert f"rule {upstream}:" not in dry


def test_a_distributed_recipe_runs_its_ranks_through_the_rule(tiny_study):
    """A recipe with `distributed` makes the finetune rule start torchrun with that many
    processes (gloo on CPU); the outputs and their provenance are those of any fine-tune."""
    config = copy.deepcopy(tiny_study.config)
    config["recipes"]["lora_fsdp"] = dict(
        config["recipes"]["lora"], distributed={"strategy": "fsdp", "nproc_per_node": 2}
    )
    run = "finetune/tiny/lora_fsdp/unknown"
    targets = [f"results/{run}/metrics.jsonl"] + [
        f"results/eval/tiny/lora_fsdp/unknown/{stop}/{split}.parquet"
        for stop in ("early_stop", "convergence")
        for split in ("test", "ood_test")
    ]
    tiny_study.run("--cores", "2", *targets, config=config)
    lines = [
        json.loads(x)
        for x in (tiny_study.work / f"results/{run}/metrics.jsonl").read_text().splitlines()
    ]
    assert [x["world_size"] for x in lines] == [2, 2]
    log = (tiny_study.work / "logs/finetune/tiny/lora_fsdp/unknown.log").read_text()
    assert "torch.distributed.run" in log and "--nproc-per-node=2" in log
    assert "2 process(es) (fsdp)" in log
    assert (tiny_study.work / f"results/{run}/convergence/adapter_config.json").exists()
    assert not list((tiny_study.work / f"results/{run}").glob(".job.*"))  # the job file is gone
    assert not (tiny_study.work / f"results/{run}/state/epoch").exists()
    from eqtools.provenance import sidecar_path

    for target in targets:
        assert sidecar_path(tiny_study.work / target).exists(), target


def test_extra_seeds_replicate_every_finetune(tmp_path, tiny_model_dir):
    config = tiny_config(mixtures={"names": ["unknown"]}, finetune={"seeds": [7]})
    config["models"] = {"tiny": {"path": str(tiny_model_dir)}}
    dry = snakemake(tmp_path, "-n", "-p", configfile=write_config(tmp_path, config)).stdout
    for run in ("lora", "lora-seed7"):
        assert f"results/finetune/tiny/{run}/unknown/metrics.jsonl" in dry
        assert f"results/eval/tiny/{run}/unknown/early_stop/test.parquet" in dry
