"""The training loss from the logits of the answer positions only (eqtools.training
`answer_logits`) against the loss from the model's full logits: equal loss and gradients within
float32 rounding, on the embedded model, a tiny Gemma 3 (final-logit softcapping, a tied
262k-style output layer) and a tiny Granite (logit scaling), full and LoRA."""

import pytest
import torch

from eqtools import distributed
from eqtools.training import add_lora, answer_logits, check_answer_logits, token_loss


def tiny(arch: str):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GraniteConfig,
        GraniteForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    if arch == "gemma3":
        config = Gemma3TextConfig(
            vocab_size=4096, head_dim=16, final_logit_softcapping=3.0, sliding_window=8, **common
        )
        return Gemma3ForCausalLM(config)
    config = GraniteConfig(vocab_size=1024, logits_scaling=8.0, **common)
    return GraniteForCausalLM(config)


@pytest.fixture(scope="module")
def embedded():
    from conftest import embedded_gguf
    from transformers import AutoModelForCausalLM

    package, gguf = embedded_gguf()
    return AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf, dtype=torch.float32)


def batch(vocab: int):
    """Three right-padded rows of different prompt and answer lengths (labels -100 outside the
    answers), as `collate` builds them."""
    g = torch.Generator().manual_seed(1)
    rows = [(9, 3), (14, 5), (6, 2)]  # (prompt, answer) tokens
    width = max(p + a for p, a in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (p, a) in enumerate(rows):
        ids[r, : p + a] = torch.randint(1, vocab, (p + a,), generator=g)
        labels[r, p : p + a] = ids[r, p : p + a]
        mask[r, : p + a] = 1
    return ids, labels, mask


def loss_and_grads(model, ids, labels, mask, answer_only: bool):
    model.zero_grad(set_to_none=True)
    model.train()
    with answer_logits(model, labels) if answer_only else torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = token_loss(logits, labels, answer_only)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, logits.shape


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize(
    "arch", [pytest.param("embedded", marks=pytest.mark.e2e), "gemma3", "granite"]
)  # the embedded 135M model takes minutes on 2 cores: make test-e2e
def test_answer_logits_give_the_loss_and_gradients_of_full_logits(arch, method, request):
    model = request.getfixturevalue("embedded") if arch == "embedded" else tiny(arch)
    if method == "lora":
        model = add_lora(model, {"rank": 4, "alpha": 8, "target_modules": "all-linear"}, 0.0)
    model.config.use_cache = False
    ids, labels, mask = batch(model.config.vocab_size)
    full, full_grads, full_shape = loss_and_grads(model, ids, labels, mask, False)
    ours, grads, shape = loss_and_grads(model, ids, labels, mask, True)
    answers = int((labels[:, 1:] != -100).sum())
    assert shape[:2] == (1, answers) and full_shape[:2] == ids.shape  # only those positions
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=0)
    assert grads.keys() == full_grads.keys() and grads
    for name, grad in full_grads.items():
        scale = float(grad.abs().max()) or 1.0
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    if method == "lora":
        model = model.unload()


def test_the_check_takes_answer_logits_where_they_are_exact_and_draws_no_random_numbers(caplog):
    model = tiny("gemma3")
    ids, labels, mask = batch(model.config.vocab_size)
    examples = [
        (ids[r, : int(mask[r].sum())].tolist(), labels[r, : int(mask[r].sum())].tolist())
        for r in range(ids.shape[0])
    ]
    state = torch.get_rng_state()
    with caplog.at_level("INFO"):
        assert check_answer_logits(model, examples, 0, "cpu", "float32", distributed.ONE_PROCESS)
    assert torch.equal(torch.get_rng_state(), state)  # dropout masks stay those of a resumed run
    assert "logits at the answer positions only" in caplog.text
    assert model.training


def test_a_model_whose_forward_does_more_after_its_output_layer_keeps_full_logits(caplog):
    model = tiny("granite")
    original = type(model).forward

    def forward(self, *args, **kwargs):  # mixes positions after the output layer
        out = original(self, *args, **kwargs)
        out.logits = out.logits - out.logits.mean(dim=1, keepdim=True)
        return out

    model.forward = forward.__get__(model)
    ids, labels, mask = batch(model.config.vocab_size)
    examples = [
        (ids[r, : int(mask[r].sum())].tolist(), labels[r, : int(mask[r].sum())].tolist())
        for r in range(ids.shape[0])
    ]
    with caplog.at_level("INFO"):
        assert not check_answer_logits(
            model, examples, 0, "cpu", "float32", distributed.ONE_PROCESS
        )
    assert "full logits (GraniteForCausalLM" in caplog.text
