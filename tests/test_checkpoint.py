"""The early_stop / convergence checkpoints written and read by every rank (eqtools.checkpoint),
with the tiny random Llama: sharded (FSDP2) or not, full or LoRA.

The references are transformers' and peft's own `save_pretrained` on an unsharded model (for
LoRA with `target_modules` sorted, as eqtools.checkpoint does so that equal adapters are equal
files), and the weights of the model saved, never another output of eqtools.checkpoint.
"""

import json
import os
import re
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from eqtools import checkpoint, distributed
from eqtools.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from eqtools.settings import Lora, Schedule
from eqtools.training import add_lora

FSDP = Schedule(strategy="fsdp")


def save_model(model, target: Path) -> None:
    """The reference writer: peft's (or transformers') own save_pretrained, with the adapter's
    `target_modules` sorted (peft writes them from a set, in an order that varies by process)."""
    model.save_pretrained(target)
    config = target / "adapter_config.json"
    if config.exists():
        data = json.loads(config.read_text())
        data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True))


def build(model_dir: Path, method: str = "full", seed: int = 0):
    """The tiny model (LoRA adapters on every linear layer), every trainable weight moved by
    noise drawn from `seed`: a model whose weights differ from the file's and from another
    seed's (and LoRA's B matrices, zero when created, are not)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method == "lora":
        model = add_lora(model, Lora(rank=4, alpha=8, target_modules="all-linear"), dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model


def saved_by_us(model_dir: Path, method: str, sharded: bool, request, target: Path) -> Path:
    """`save_checkpoint` of the model `build` makes, sharded in a world of one or not."""
    model = build(model_dir, method)
    ranks = distributed.ONE_PROCESS
    if sharded:
        ranks = request.getfixturevalue("world_of_one")
        model = distributed.shard(model)
    save_checkpoint(model, target, ranks)
    return target


def full_weights(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def assert_same_tensors(path: Path, reference: Path) -> None:
    """Same names, dtypes and bits."""
    ours, theirs = load_file(path), load_file(reference)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("sharded", [False, True], ids=["one", "fsdp"])
def test_full_checkpoint_is_what_save_pretrained_writes(tiny_model_dir, tmp_path, sharded, request):
    from transformers import AutoModelForCausalLM

    reference = build(tiny_model_dir)
    reference.save_pretrained(tmp_path / "reference")
    ours = saved_by_us(tiny_model_dir, "full", sharded, request, tmp_path / "ours")
    assert_same_tensors(ours / "model.safetensors", tmp_path / "reference/model.safetensors")
    assert "lm_head.weight" not in load_file(ours / "model.safetensors")  # tied: written once
    with safe_open(ours / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    for name in ("config.json", "generation_config.json"):
        assert read_json(ours / name) == read_json(tmp_path / "reference" / name), name
    assert sorted(p.name for p in ours.iterdir()) == sorted(
        p.name for p in (tmp_path / "reference").iterdir()
    )
    loaded = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference.eval()(ids).logits)


def test_a_full_checkpoint_in_bf16_is_what_save_pretrained_writes_of_a_bf16_copy(
    tiny_model_dir, tmp_path
):
    """`checkpoint_dtype` (or a mixed-precision recipe's dtype) bfloat16: the float32 trained
    weights written in bf16, as transformers writes the model cast to bf16."""
    reference = build(tiny_model_dir).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "reference")
    save_checkpoint(
        build(tiny_model_dir), tmp_path / "ours", distributed.ONE_PROCESS, torch.bfloat16
    )
    assert_same_tensors(
        tmp_path / "ours/model.safetensors", tmp_path / "reference/model.safetensors"
    )
    assert {t.dtype for t in load_file(tmp_path / "ours/model.safetensors").values()} == {
        torch.bfloat16
    }
    assert read_json(tmp_path / "ours/config.json") == read_json(tmp_path / "reference/config.json")


@pytest.mark.parametrize("sharded", [False, True], ids=["one", "fsdp"])
def test_lora_checkpoint_is_the_adapter_save_model_writes(
    tiny_model_dir, tmp_path, sharded, request
):
    save_model(build(tiny_model_dir, "lora"), tmp_path / "reference")
    ours = saved_by_us(tiny_model_dir, "lora", sharded, request, tmp_path / "ours")
    assert not (ours / "model.safetensors").exists()
    weights = load_file(ours / "adapter_model.safetensors")
    assert any(".lora_B.weight" in k for k in weights)
    assert_same_tensors(
        ours / "adapter_model.safetensors", tmp_path / "reference/adapter_model.safetensors"
    )
    config = (ours / "adapter_config.json").read_text()
    assert config == (tmp_path / "reference/adapter_config.json").read_text()
    assert json.loads(config)["target_modules"] == sorted(json.loads(config)["target_modules"])


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one", "fsdp"])
def test_load_checkpoint_restores_the_saved_weights(
    tiny_model_dir, tmp_path, method, sharded, request
):
    saved = build(tiny_model_dir, method, seed=1)
    save_checkpoint(saved, tmp_path / "checkpoint", distributed.ONE_PROCESS)
    model = build(tiny_model_dir, method, seed=2)
    if sharded:
        request.getfixturevalue("world_of_one")
        model = distributed.shard(model)
    expected, before = full_weights(saved), full_weights(model)
    assert not all(torch.equal(before[k], v) for k, v in expected.items())

    load_checkpoint(model, tmp_path / "checkpoint")
    after = full_weights(model)
    assert sorted(after) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(after[name], tensor), name


def test_a_tensor_missing_or_unknown_is_an_error_naming_file_and_tensor(tiny_model_dir, tmp_path):
    model = build(tiny_model_dir)
    save_checkpoint(model, tmp_path / "checkpoint", distributed.ONE_PROCESS)
    path = tmp_path / "checkpoint/model.safetensors"
    weights = load_file(path)
    name = "model.layers.1.mlp.down_proj.weight"

    save_file({k: v for k, v in weights.items() if k != name}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.*lacks.*{re.escape(name)}"):
        load_checkpoint(model, path.parent)

    save_file(weights | {"extra.weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.*holds.*extra\.weight"):
        load_checkpoint(model, path.parent)


def test_a_failed_save_leaves_the_previous_checkpoint_and_nothing_partial(
    tiny_model_dir, tmp_path, monkeypatch
):
    model = build(tiny_model_dir)
    target = tmp_path / "checkpoint"
    save_checkpoint(model, target, distributed.ONE_PROCESS)
    before = load_file(target / "model.safetensors")
    calls = []

    def fails_midway(tensor, ranks):
        calls.append(tensor)
        if len(calls) == 5:
            raise OSError("disk full")
        return tensor.detach().cpu()

    monkeypatch.setattr(checkpoint, "gathered", fails_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build(tiny_model_dir, seed=3), target, distributed.ONE_PROCESS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    after = load_file(target / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in before.items())

    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "new", distributed.ONE_PROCESS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def two_ranks(rank: int, model_dir: str, out: str, store: str) -> None:
    """A rank of a two-process gloo job: save the sharded model, load that checkpoint into a
    sharded model of other weights and save that one too; save a sharded LoRA model."""
    torch.set_num_threads(1)
    # a rank that fails makes the other one time out in its next gather, not hang the test
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    ranks = distributed.Ranks(rank, 2, rank)
    try:
        model = distributed.shard(build(Path(model_dir)))
        save_checkpoint(model, Path(out) / "saved", ranks)
        other = distributed.shard(build(Path(model_dir), seed=4))
        load_checkpoint(other, Path(out) / "saved")
        save_checkpoint(other, Path(out) / "reloaded", ranks)
        save_checkpoint(
            distributed.shard(build(Path(model_dir), "lora")), Path(out) / "adapter", ranks
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_and_read_what_one_process_writes(tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp

    build(tiny_model_dir).save_pretrained(tmp_path / "reference")
    save_model(build(tiny_model_dir, "lora"), tmp_path / "reference_adapter")
    store = tmp_path / "store"  # the file the two ranks rendezvous at
    mp.spawn(two_ranks, args=(str(tiny_model_dir), str(tmp_path), str(store)), nprocs=2)
    reference = tmp_path / "reference/model.safetensors"
    for name in ("saved", "reloaded"):
        assert_same_tensors(tmp_path / name / "model.safetensors", reference)
        assert read_json(tmp_path / name / "config.json") == read_json(
            tmp_path / "reference/config.json"
        )
    assert_same_tensors(
        tmp_path / "adapter/adapter_model.safetensors",
        tmp_path / "reference_adapter/adapter_model.safetensors",
    )
    assert (tmp_path / "adapter/adapter_config.json").read_text() == (
        tmp_path / "reference_adapter/adapter_config.json"
    ).read_text()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
