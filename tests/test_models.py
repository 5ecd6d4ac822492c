"""The model registry: fetch_model stages a model (links or downloads), prepare_model refuses what
the workflow cannot run, before writing anything, naming the registry entry, the architecture
and the reason; it links local safetensors weights and converts any other source once. A model
is identified by the checksums of its files, not by where they lie."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import prepare_model

from archs import build_tiny, char_tokenizer
from eqtools.engine import EngineError, check_generation
from eqtools.io import sha256_file
from eqtools.models import SOURCE_FILE, ModelError, fingerprint, identity, load, placement


def save(model, directory):
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def test_an_encoder_decoder_is_refused_by_name(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    source = save(
        T5ForConditionalGeneration(
            T5Config(vocab_size=101, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
        ),
        tmp_path / "t5",
    )
    with pytest.raises(
        ModelError,
        match=(
            r"models\.tiny-t5: T5ForConditionalGeneration \(model_type 't5'\) is not a causal "
            r"language model"
        ),
    ):
        prepare_model("tiny-t5", {"path": str(source)}, tmp_path, check=check_generation)
    assert not (tmp_path / "tiny-t5").exists()


def test_a_model_the_engine_cannot_run_is_refused_by_name(tmp_path):
    model = build_tiny("reformer", len(char_tokenizer()))
    # random LSH rotations at every forward: no answer is reproducible
    model.config.hash_seed = None
    source = save(model, tmp_path / "reformer")
    with pytest.raises(
        EngineError,
        match=(
            r"models\.tiny-reformer: the generation engine cannot run ReformerModelWithLMHead: "
            r".*give different logits"
        ),
    ):
        prepare_model("tiny-reformer", {"path": str(source)}, tmp_path, check=check_generation)
    assert not (tmp_path / "tiny-reformer").exists()


def test_a_model_with_several_output_heads_is_refused():
    with pytest.raises(
        EngineError, match=r"models\.tiny-musicgen: .*MusicgenForCausalLM.*no single output layer"
    ):
        check_generation(
            "tiny-musicgen", build_tiny("musicgen", len(char_tokenizer())), char_tokenizer()
        )


@pytest.mark.parametrize("arch, path", [("gemma2", "levels"), ("jamba", "reference")])
def test_prepare_records_the_path_the_engine_takes(tmp_path, arch, path):
    torch.set_num_threads(1)
    source = save(build_tiny(arch, len(char_tokenizer())), tmp_path / arch)
    entry = prepare_model(f"tiny-{arch}", {"path": str(source)}, tmp_path, check=check_generation)
    assert entry["check"] == path
    assert (tmp_path / f"tiny-{arch}" / "config.json").is_file()


def sharded_model(directory):
    build_tiny("llama", len(char_tokenizer())).save_pretrained(directory, max_shard_size="50KB")
    char_tokenizer().save_pretrained(directory)
    return directory


def test_a_local_safetensors_directory_is_linked_not_copied(tmp_path):
    torch.set_num_threads(1)
    source = sharded_model(tmp_path / "sharded")
    root = tmp_path / "resources" / "models"
    for _ in range(2):  # the second run swaps a complete copy in over the first one
        entry = prepare_model("tiny", {"path": str(source)}, root, check=check_generation)
    assert entry["logit_check"] is None  # nothing was converted: no reloaded copy to compare
    out, staged = root / "tiny", root / "tiny.source"
    written = sorted(p.name for p in out.iterdir() if not p.is_symlink())
    assert written == [SOURCE_FILE]
    links = {p.name: p.readlink() for p in out.iterdir() if p.is_symlink()}
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json"} <= set(links)
    assert len([n for n in links if n.endswith(".safetensors")]) > 1
    # through the staged links: relative here, absolute there
    assert all(target == Path("../tiny.source", name) for name, target in links.items())
    assert all((staged / name).readlink() == source / name for name in links)
    recorded = json.loads((out / SOURCE_FILE).read_text())
    assert recorded["source"] == str(source)
    assert {e["path"]: e["sha256"] for e in recorded["linked"]} == {
        str(source / name): sha256_file(source / name) for name in links
    }


def test_a_model_is_identified_by_its_files_not_their_directory(tmp_path):
    torch.set_num_threads(1)
    source = sharded_model(tmp_path / "sharded")
    root = tmp_path / "models"
    before = prepare_model("tiny", {"path": str(source)}, root)["identity"]
    planned = fingerprint("tiny", {"path": str(source)})
    assert before == identity(root / "tiny.source")
    assert set(before["files"]) == {p.name for p in source.iterdir()}

    moved = source.rename(tmp_path / "elsewhere")  # mv: names, sizes and mtimes kept
    assert not (root / "tiny" / "config.json").exists()  # the old staged links dangle
    assert fingerprint("tiny", {"path": str(moved)}) == planned
    after = prepare_model("tiny", {"path": str(moved)}, root)
    assert after["identity"] == before and after["source"] == str(moved)
    model, _, _ = load(root / "tiny", device="cpu")  # the materialised links follow the move

    # other weights under the same names: another identity, and planning sees the change
    weights = sorted(moved.glob("model-*.safetensors"))[-1]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 1))
    assert fingerprint("tiny", {"path": str(moved)}) != planned
    assert identity(root / "tiny.source") != before


def test_an_unresolvable_entry_is_planned_and_refused_when_staged(tmp_path):
    spec = {"path": str(tmp_path / "missing")}
    unresolved = fingerprint("gone", spec)["unresolved"]
    assert unresolved.startswith(f"models.gone: path {str(tmp_path / 'missing')!r} does not exist")
    assert "a hub id (org/name)" in unresolved and "`package`" in unresolved
    with pytest.raises(ModelError, match="models.gone: path .* does not exist"):
        prepare_model("gone", spec, tmp_path)
    assert not (tmp_path / "gone.source").exists() and not (tmp_path / "gone").exists()


def test_a_pytorch_bin_source_is_converted_once_in_the_entry_dtype(tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    source = tmp_path / "bin"
    model = build_tiny("llama", len(char_tokenizer()))
    model.config.save_pretrained(source)
    torch.save(model.state_dict(), source / "pytorch_model.bin")  # float32
    char_tokenizer().save_pretrained(source)
    entry = prepare_model("tiny", {"path": str(source)}, tmp_path, dtype="bfloat16")
    out = tmp_path / "tiny"
    assert entry["logit_check"] == "identical" and "linked" not in entry
    assert "pytorch_model.bin" in entry["identity"]["files"]
    assert not any(p.is_symlink() for p in out.iterdir())
    assert not list(out.glob("*.bin"))
    saved = load_file(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


def test_a_directory_without_a_model_is_refused_by_name(tmp_path):
    source = tmp_path / "tokenizer-only"
    char_tokenizer().save_pretrained(source)
    with pytest.raises(ModelError, match=rf"models\.empty: {source} holds no model"):
        prepare_model("empty", {"path": str(source)}, tmp_path)
    assert not (tmp_path / "empty.source").exists()


def test_load_puts_the_model_on_its_device_in_the_entry_dtype(tiny_model_dir):
    model, _, device = load(tiny_model_dir, dtype="bfloat16", device="cpu")
    assert device == "cpu"
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.bfloat16)}


def test_a_model_is_spread_over_gpus_only_when_one_cannot_hold_it():
    gib = 1 << 30
    assert placement("cuda", 16 * gib, [80 * gib, 80 * gib]) == "cuda"
    assert placement("cuda", 140 * gib, [80 * gib, 80 * gib]) == "auto"
    # the weights may take GPU_SHARE of the free memory: the rest is for the KV cache
    assert placement("cuda", 70 * gib, [80 * gib] * 4) == "auto"
    assert placement("cuda", 140 * gib, [80 * gib]) == "cuda"  # one GPU: nothing to spread over
    assert placement("cpu", 140 * gib, []) == "cpu"
