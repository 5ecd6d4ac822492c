"""The audit tool on a constructed lineage: archive -> split -> model dir -> figure."""

import json
import os
from types import SimpleNamespace

import pytest

import audit
from eqtools.figures import plt, save_figure
from eqtools.models import SOURCE_FILE
from eqtools.provenance import LARGE_FILE, build_record, write_provenance, write_record


def job(rule, inputs, config=None):
    return SimpleNamespace(
        rule=rule,
        wildcards={},
        params=SimpleNamespace(spec=json.dumps(config or {})),
        input=inputs,
        scriptdir=".",
    )


@pytest.fixture
def chain(tmp_path, monkeypatch):
    """archive (root) -> data/train.parquet -> models/m/ (a directory) -> figure.png"""
    monkeypatch.chdir(tmp_path)
    os.makedirs("resources/entity_questions")
    with open("resources/entity_questions/dataset.zip", "wb") as f:
        f.write(b"zip bytes")
    write_provenance(
        "resources/entity_questions/dataset.zip", job("download_entity_questions", []), inputs=[]
    )
    os.makedirs("results/data")
    with open("results/data/train.parquet", "w") as f:
        f.write("train")
    write_provenance(
        "results/data/train.parquet",
        job("prepare_splits", ["resources/entity_questions/dataset.zip"]),
    )
    os.makedirs("resources/models/m")
    for name in ("config.json", "model.safetensors"):
        with open(f"resources/models/m/{name}", "w") as f:
            f.write(name)
    write_provenance("resources/models/m", job("prepare_model", ["results/data/train.parquet"]))
    record = build_record(
        "figure_fitting",
        {},
        {"figure": "fig1"},
        ["resources/models/m", "results/data/train.parquet"],
        ".",
    )
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    os.makedirs("results/figures")
    save_figure(fig, {"png": "results/figures/f.png", "svg": "results/figures/f.svg"}, record, "f")
    return tmp_path


def test_intact_chain_passes_and_reaches_the_archive(chain, capsys):
    assert audit.main(["results/figures/f.png"]) == 0
    out = capsys.readouterr().out
    assert "resources/entity_questions/dataset.zip  ok" in out
    assert "resources/models/m  ok (2 files)" in out
    assert "embedded id matches" in out
    assert "lineage roots: download_entity_questions" in out
    assert audit.main(["results/figures/f.svg"]) == 0


def test_changed_input_is_reported(chain, capsys):
    with open("results/data/train.parquet", "w") as f:
        f.write("train, edited")
    assert audit.main(["results/figures/f.png"]) == 1
    out = capsys.readouterr().out
    assert "results/data/train.parquet: sha256 changed" in out


def test_changed_file_in_an_input_directory_and_extra_file(chain):
    with open("resources/models/m/config.json", "w") as f:
        f.write("other")
    with open("resources/models/m/extra.bin", "w") as f:
        f.write("x")
    result = audit.audit("results/figures/f.png")
    assert any("resources/models/m/config.json: sha256 changed" in p for p in result.problems)
    assert any(
        "resources/models/m/extra.bin: not in the recorded directory" in p for p in result.problems
    )


def test_missing_sidecar_missing_file_and_foreign_figure_id(chain):
    os.remove("resources/entity_questions/dataset.zip.prov.json")
    result = audit.audit("results/figures/f.png")
    assert any("dataset.zip.prov.json: sidecar missing" in p for p in result.problems)
    os.remove("resources/entity_questions/dataset.zip")
    assert any("dataset.zip: missing" in p for p in audit.audit("results/figures/f.png").problems)
    # a sidecar that is not the one the figure was saved with
    other = build_record("figure_fitting", {}, {"figure": "other"}, [], ".")
    write_record(other, "results/figures/f.png")
    assert any("embedded provenance id" in p for p in audit.audit("results/figures/f.png").problems)
    assert audit.main(["results/nothing.png"]) == 1


def test_input_without_sidecar_is_a_problem(chain):
    with open("loose.txt", "w") as f:
        f.write("no provenance")
    write_provenance("results/data/derived.csv", job("derive", ["loose.txt"]))
    with open("results/data/derived.csv", "w") as f:
        f.write("x")
    result = audit.audit("results/data/derived.csv")
    assert result.problems == ["loose.txt: no sidecar recorded"]


def test_big_files_are_checked_by_size_and_mtime(chain, monkeypatch):
    monkeypatch.setattr("eqtools.provenance.LARGE_FILE", 3)
    write_provenance("results/data/derived.csv", job("derive", ["results/data/train.parquet"]))
    with open("results/data/derived.csv", "w") as f:
        f.write("x")
    with open("results/data/derived.csv.prov.json") as f:
        entry = json.load(f)["inputs"][0]
    assert entry["sha256"] is None and LARGE_FILE > 3
    assert audit.audit("results/data/derived.csv").problems == []
    st = os.stat("results/data/train.parquet")
    os.utime("results/data/train.parquet", (st.st_atime, st.st_mtime + 10))
    assert any("size/mtime changed" in p for p in audit.audit("results/data/derived.csv").problems)


def test_a_changed_source_of_a_linked_model_is_reported(chain, tmp_path):
    # a model directory that links its weights, with their sha256 in its registry entry
    source = tmp_path / "elsewhere" / "weights.safetensors"
    source.parent.mkdir()
    source.write_text("weights")
    os.symlink(source, "resources/models/m/weights.safetensors")
    linked = [{"path": str(source), "sha256": audit.sha256_file(source)}]
    with open(f"resources/models/m/{SOURCE_FILE}", "w") as f:
        json.dump({"linked": linked}, f)
    write_provenance("results/data/derived.csv", job("derive", ["resources/models/m"]))
    with open("results/data/derived.csv", "w") as f:
        f.write("x")
    assert audit.audit("results/data/derived.csv").problems == []
    # the source directory moved, and was staged again: the same weights, no problem
    source = source.parent.rename(tmp_path / "moved") / source.name
    os.unlink("resources/models/m/weights.safetensors")
    os.symlink(source, "resources/models/m/weights.safetensors")
    assert audit.audit("results/data/derived.csv").problems == []
    source.write_text("other weights")
    recorded = linked[0]["sha256"][:12]
    assert set(audit.audit("results/data/derived.csv").problems) == {
        f"{source}: sha256 changed (recorded {recorded}…) (linked by resources/models/m)",
        f"resources/models/m/weights.safetensors: sha256 changed (recorded {recorded}…)",
    }
