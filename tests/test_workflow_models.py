"""Models through snakemake, apart from the tiny study (so that these run beside it under
pytest-xdist): the real embedded model labelled on a few questions, and models that cannot be
used, refused before any job."""

import json

import pytest
from test_workflow_labels import check_labels, label_targets

from helpers import snakemake, tiny_config, write_config

pytestmark = pytest.mark.workflow


@pytest.mark.e2e  # 52 s: in make test-e2e, to keep make test under its time budget
def test_labels_with_embedded_model(tmp_path):
    # one relation of each kind: the real model through every labelling rule, 4 chunks
    config = tiny_config(
        relations={"in_distribution": ["P17"], "out_of_distribution": ["P50"]},
        subsample={
            "max_per_relation": {"train": 2, "dev": 6, "test": 2, "ood_test": 1, "ood_dev": 6}
        },
    )
    cfg = write_config(tmp_path, config)
    snakemake(tmp_path, *label_targets("smollm2-135m"), configfile=cfg)
    check_labels(tmp_path, "smollm2-135m")
    model_prov = json.loads((tmp_path / "resources/models/smollm2-135m.prov.json").read_text())
    assert model_prov["rule"] == "prepare_model"


def test_missing_model_package_fails_clearly(tmp_path):
    config = tiny_config()
    config["models"] = {"ghost": {"package": "no_such_model_package"}}
    cfg = write_config(tmp_path, config)
    proc = snakemake(tmp_path, "resources/models/ghost", configfile=cfg, check=False)
    assert proc.returncode != 0
    assert (
        "models.ghost: package 'no_such_model_package' is not installed"
        in proc.stdout + proc.stderr
    )
    assert not (tmp_path / "resources/models/ghost").exists()


def test_bad_model_path_fails_clearly_before_any_job(tmp_path):
    """A local path that does not exist stops even a dry run, naming the entry and the path; a
    hub id (org/name) is planned, to be downloaded by fetch_model."""
    config = tiny_config()
    missing = str(tmp_path / "missing-dir")
    config["models"] = {"nowhere": {"path": missing}}
    cfg = write_config(tmp_path, config)
    proc = snakemake(tmp_path, "-n", configfile=cfg, check=False)
    assert proc.returncode != 0
    assert f"models.nowhere: path {missing!r} does not exist" in proc.stdout + proc.stderr
    config["models"] = {"hub": {"path": "org/name"}}
    snakemake(tmp_path, "-n", configfile=write_config(tmp_path, config))
