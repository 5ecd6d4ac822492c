"""The model registry: prepare_model refuses what the workflow cannot run, before writing anything,
naming the registry entry, the architecture and the reason."""

import pytest
import torch

from archs import build_tiny, char_tokenizer
from eqtools.generation import EngineError, check_generation
from eqtools.models import ModelError, materialise


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
    out = tmp_path / "out"
    with pytest.raises(
        ModelError,
        match=(
            r"models\.tiny-t5: T5ForConditionalGeneration \(model_type 't5'\) is not a causal "
            r"language model"
        ),
    ):
        materialise("tiny-t5", {"path": str(source)}, out, check=check_generation)
    assert not out.exists()


def test_a_model_the_engine_cannot_run_is_refused_by_name(tmp_path):
    model = build_tiny("reformer", len(char_tokenizer()))
    # random LSH rotations at every forward: no answer is reproducible
    model.config.hash_seed = None
    source = save(model, tmp_path / "reformer")
    out = tmp_path / "out"
    with pytest.raises(
        EngineError,
        match=(
            r"models\.tiny-reformer: the generation engine cannot run ReformerModelWithLMHead: "
            r".*give different logits"
        ),
    ):
        materialise("tiny-reformer", {"path": str(source)}, out, check=check_generation)
    assert not out.exists()


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
    entry = materialise(
        f"tiny-{arch}", {"path": str(source)}, tmp_path / "out", check=check_generation
    )
    assert entry["check"] == path
    assert (tmp_path / "out" / "config.json").is_file()
