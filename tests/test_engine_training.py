"""Training and P(True) on other architectures, after the engine ran on the same model: they see
the model's own attention, never the engine's (compared with an untouched copy)."""

import copy
import logging

import polars as pl
import pytest
import torch

from archs import build_tiny, char_tokenizer
from eqtools.engine import Generator, Request
from eqtools.ptrue import score_p_true
from eqtools.training import (
    TrainingError,
    build_model,
    encode_examples,
    set_attention_dropout,
    train_epoch,
)

# Gemma2 (softcapping), gpt-oss (sinks, windows), Phi3 (fused projections), GPT-2 (Conv1D,
# attn_pdrop), Mistral with a short window, and two hybrids on the reference path
ARCHS = ["gemma2", "gpt_oss", "phi3", "gpt2", "mistral", "jamba", "lfm2"]
RECIPE = {
    "learning_rate": 1e-3, "dropout": 0.0, "weight_decay": 0.0, "warmup_steps": 0,
    "dtype": "float32", "eval_dtype": "float32", "batch_size": 1, "epochs": 1, "seed": 0,
    "max_new_tokens": 4,
    "lora": {"rank": 2, "alpha": 4, "target_modules": "all-linear"},
}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    torch.set_num_threads(1)
    return char_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    out = {}
    for arch in ARCHS:
        directory = tmp_path_factory.mktemp(arch)
        build_tiny(arch, len(tok), window=8).save_pretrained(directory)
        tok.save_pretrained(directory)
        out[arch] = directory
    return out


def use_engine(model, tok):
    gen = Generator(model, tok, max_new_tokens=3, temperature=0.7)
    pid = gen.add_prefix("Q: Where is Rome?\nA: Italy\n")
    list(
        gen.generate(
            [
                Request(pid, gen.prompt_tokens(pid, "Q: Who wrote Hamlet, the long play?\nA:"), key)
                for key in (None, 1)
            ]
        )
    )


def one_step(model, tok) -> float:
    examples = encode_examples(
        tok, ["Who wrote the play Hamlet, a tragedy?", "Where is Rome?"], ["Shakespeare", "Italy"]
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.manual_seed(1)  # the same dropout masks (GPT-2 keeps its own residual dropout)
    total, tokens, _ = train_epoch(
        model, optimizer, scheduler, examples, [0, 1], 2, 2, tok.pad_token_id, "cpu"
    )
    return total / tokens


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step_sees_the_models_own_attention(arch, method, model_dirs, tok, caplog):
    recipe = dict(RECIPE, method=method)
    with caplog.at_level(logging.INFO, logger="eqtools.training"):
        torch.manual_seed(0)
        model = build_model(str(model_dirs[arch]), recipe, "cpu")
    torch.manual_seed(0)
    untouched = build_model(str(model_dirs[arch]), recipe, "cpu")
    if method == "lora":
        assert "LoRA (all-linear) adapts" in caplog.text and "parameters trainable" in caplog.text
        if arch == "phi3":  # fused projections: adapted too, not silently left out
            assert "'qkv_proj'" in caplog.text.split("adapts")[1].split("of the linear")[0]
    if arch == "gpt2":  # GPT-2 names it attn_pdrop; passing attention_dropout used to break it
        assert "attention dropout 0.0 on attn_pdrop" in caplog.text
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    use_engine(model.eval(), tok)
    loss = one_step(model, tok)
    assert loss == pytest.approx(one_step(untouched, tok), rel=1e-5, abs=1e-6)
    assert torch.isfinite(torch.tensor(loss))
    changed = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert changed, "the step changed no trainable parameter"


def test_attention_dropout_is_set_only_where_the_config_has_it():
    from transformers import GPT2Config, LlamaConfig, MambaConfig

    assert set_attention_dropout(LlamaConfig(), 0.1) == ["attention_dropout"]
    gpt2 = GPT2Config()
    assert set_attention_dropout(gpt2, 0.1) == ["attn_pdrop"] and gpt2.attn_pdrop == 0.1
    mamba = MambaConfig()
    assert set_attention_dropout(mamba, 0.1) == [] and not hasattr(mamba, "attention_dropout")


def test_lora_targets_that_match_nothing_list_the_linear_modules(model_dirs):
    recipe = dict(
        RECIPE, method="lora", lora=dict(RECIPE["lora"], target_modules=["q_proj", "v_proj"])
    )
    with pytest.raises(
        TrainingError,
        match=r"\['q_proj', 'v_proj'\] match no module of Phi3ForCausalLM.*'qkv_proj'",
    ):
        build_model(str(model_dirs["phi3"]), recipe, "cpu")


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss", "mistral", "jamba"])
def test_p_true_gives_eager_probabilities(arch, model_dirs, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()
    eager = AutoModelForCausalLM.from_pretrained(
        model_dirs[arch], attn_implementation="eager"
    ).eval()
    rows = pl.DataFrame(
        {
            "question": ["Who wrote Hamlet?", "Where is the old town of Rome located?", "Hi?"],
            "answer": ["Shakespeare", "Italy", "Paris, the capital of France"],
        }
    )
    use_engine(model, tok)
    got = score_p_true(model, tok, rows, "cpu", batch_rows=2)
    want = score_p_true(copy.deepcopy(eager), tok, rows, "cpu", batch_rows=3)
    assert got == pytest.approx(want, abs=1e-5)
