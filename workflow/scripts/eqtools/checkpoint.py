"""The early_stop and convergence checkpoints of a fine-tune, written and read by every rank of
a sharded (FSDP2) model without an unsharded copy anywhere.

A full fine-tune is a directory that `AutoModelForCausalLM.from_pretrained` loads: the tensors
`save_pretrained` would write (tied weights once, its weight-name conversions reverted), gathered
one at a time and written by rank 0 straight into model.safetensors, so that no process ever
holds the whole model. A LoRA fine-tune is the adapter that `PeftModel.from_pretrained` loads:
its (small) weights gathered whole, then written by peft itself.
"""

import json
import struct
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor, distribute_tensor

from eqtools import distributed
from eqtools.distributed import Ranks
from eqtools.io import atomic_path, part_path

WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# safetensors' names of the dtypes a fine-tuned model holds
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointError(RuntimeError):
    pass


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def gathered(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor | None:
    """The whole tensor in rank 0's CPU memory (None on the other ranks); a collective for a
    sharded tensor, which every rank calls in the same order."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu() if ranks.main else None


def save_checkpoint(
    model, target: str | Path, ranks: Ranks, dtype: torch.dtype | None = None
) -> None:
    """Write `model` (sharded or not) to the checkpoint directory `target`, atomically. Every
    rank calls it (it gathers the shards); rank 0 writes, and every rank returns once the
    checkpoint is in place, so that any rank may load it next. A full model's floating-point
    tensors are written in `dtype` when given (a LoRA adapter, a few MB, as trained)."""
    model = distributed.unwrapped(model)
    if ranks.main:
        with atomic_path(target, directory=True) as tmp:
            _save(model, tmp, ranks, dtype)
    else:
        _save(model, part_path(Path(target)), ranks, dtype)
    distributed.barrier(ranks)


def load_checkpoint(model, directory: str | Path) -> None:
    """Load a checkpoint that `save_checkpoint` (or `save_pretrained`) wrote into `model` in
    place, one tensor at a time; a rank of a sharded model keeps only its own shard of each, cut
    from the file without communication (every rank reads the file itself)."""
    model = distributed.unwrapped(model)
    directory = Path(directory)
    if is_lora(model):
        targets, path = _adapter_tensors(model, model.state_dict()), directory / ADAPTER_WEIGHTS
    else:
        targets, path = _full_tensors_to_load(model), directory / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    with safe_open(path, framework="pt") as f:
        stored = set(f.keys())
        if missing := sorted(set(targets) - stored):
            raise CheckpointError(f"{path} lacks tensors of the model: {missing[:5]}")
        if unknown := sorted(stored - set(targets)):
            raise CheckpointError(f"{path} holds tensors the model lacks: {unknown[:5]}")
        for name, tensor in targets.items():
            full = f.get_tensor(name)
            if full.shape != tensor.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {list(full.shape)}, the model's {list(tensor.shape)}"
                )
            _copy_into(tensor, full)


def _copy_into(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor `full` into the model's `tensor`, or into this rank's shard of it."""
    with torch.no_grad():
        if isinstance(tensor, DTensor):
            full = full.to(tensor.device)
            # src_data_rank=None: every rank cuts its shard from its own copy (no communication)
            shard = distribute_tensor(
                full, tensor.device_mesh, tensor.placements, src_data_rank=None
            )
            tensor.to_local().copy_(shard.to_local())
        else:
            tensor.copy_(full)


def _save(model, directory: Path, ranks: Ranks, dtype: torch.dtype | None) -> None:
    if is_lora(model):
        _save_adapter(model, directory, ranks)
    else:
        _save_full(model, directory, ranks, dtype)


# LoRA: the adapter, written by peft


def _adapter_tensors(model, state: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their names in peft's file (without the adapter name): peft's
    choice from the model's state dict, the same tensors (possibly sharded)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=state)


def _save_adapter(model, directory: Path, ranks: Ranks) -> None:
    """Gather the adapter weights whole, then let peft write them (rank 0), with the config's
    `target_modules` sorted (peft writes them from a set, in an order that changes from one
    process to the next)."""
    state = model.state_dict()
    selected = _adapter_tensors(model, state)
    name_of = {id(tensor): name for name, tensor in state.items()}
    weights = {name_of[id(tensor)]: gathered(tensor, ranks) for tensor in selected.values()}
    if not ranks.main:
        return
    model.save_pretrained(directory, state_dict=weights)
    config = directory / ADAPTER_CONFIG
    data = json.loads(config.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True))


# Full model: model.safetensors streamed tensor by tensor


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    """A stand-in of the tensor's global shape and dtype, without data."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


class Source(NamedTuple):
    """A tensor of the model's state dict (possibly sharded) and the file tensors it becomes:
    stand-ins of their shapes and dtypes; `renamed` when it is written as it is, under its file
    name (else transformers' weight conversion computes them from it)."""

    name: str
    tensor: torch.Tensor
    becomes: dict[str, torch.Tensor]
    renamed: bool


def _file_layout(base) -> list[Source]:
    """What `save_pretrained` writes for `base`, one model tensor at a time. Mirrors it: the state
    dict without `_keys_to_ignore_on_save`, tied weights once, the weight conversions of
    transformers reverted (each tensor alone, checked against the whole state dict at once)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = base.state_dict()
    for key in base._keys_to_ignore_on_save or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, base)
    stand_ins = {name: _meta(tensor) for name, tensor in state.items()}
    sources = []
    for name, tensor in state.items():
        becomes = revert_weight_conversion(base, {name: stand_ins[name]})
        # a renaming hands the same tensor on; a conversion makes new ones
        renamed = len(becomes) == 1 and next(iter(becomes.values())) is stand_ins[name]
        sources.append(Source(name, tensor, becomes, renamed))

    def signature(tensors: dict) -> dict:
        return {k: (v.shape, v.dtype) for k, v in tensors.items()}

    one_by_one = {k: v for source in sources for k, v in source.becomes.items()}
    if signature(one_by_one) != signature(revert_weight_conversion(base, stand_ins)):
        raise CheckpointError(
            f"{type(base).__name__}: transformers' weight conversion for saving merges several "
            "tensors into one; the checkpoint cannot be written one tensor at a time"
        )
    return sources


def _header(tensors: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of `tensors` (stand-ins), and where each tensor's bytes start
    after it: wider dtypes first, then by name (as safetensors orders them), so that every
    tensor stays aligned to its element size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    starts, offset = {}, 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: safetensors has no dtype {tensor.dtype}")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        starts[name] = offset
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, starts


def _save_full(model, directory: Path, ranks: Ranks, dtype: torch.dtype | None = None) -> None:
    """model.safetensors streamed one gathered tensor at a time (rank 0 writes each at its
    place; the other ranks only join the gathers), its floating-point tensors in `dtype` when
    given, and the configs `save_pretrained` writes."""
    from transformers.core_model_loading import revert_weight_conversion

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    sources = _file_layout(model)
    if not ranks.main:
        for source in sources:
            gathered(source.tensor, ranks)
        return
    header, starts = _header({k: cast(v) for s in sources for k, v in s.becomes.items()})
    with open(directory / WEIGHTS, "wb") as out:
        out.write(header)
        for source in sources:
            full = gathered(source.tensor, ranks)
            pieces = (
                {next(iter(source.becomes)): full}
                if source.renamed
                else revert_weight_conversion(model, {source.name: full})
            )
            for name, piece in pieces.items():
                out.seek(len(header) + starts[name])
                out.write(cast(piece).contiguous().reshape(-1).view(torch.uint8).numpy().data)
    _save_config(model, directory, dtype)


def _save_config(base, directory: Path, dtype: torch.dtype | None = None) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them: it records the
    weights' dtype (as written) and the model class (which FSDP2 renames FSDP<class>)."""
    base.config.dtype = str(dtype or base.dtype).split(".")[1]
    base.config.architectures = [type(base).__name__.removeprefix("FSDP")]
    if base.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(base, directory, config=base.config)
    base.config.save_pretrained(directory)
    if base.can_generate():
        base.generation_config.save_pretrained(directory)


def _full_tensors_to_load(base) -> dict[str, torch.Tensor]:
    """The model's tensors by their names in model.safetensors (a tied weight once)."""
    sources = _file_layout(base)
    if converted := [s.name for s in sources if not s.renamed]:
        raise CheckpointError(
            f"{type(base).__name__}: transformers converts {converted[:3]} when saving; "
            "load_checkpoint copies file tensors into the model one to one"
        )
    return {next(iter(s.becomes)): s.tensor for s in sources}
