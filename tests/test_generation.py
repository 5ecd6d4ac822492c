"""The generation engine on a tiny random model: exact against transformers' generate."""

import pytest
import torch

from eqtools.engine import EngineError, Generator, Request, choose_tokens, gumbel_noise
from eqtools.models import load

PREFIXES = [
    "Q: What is the capital of France?\nA: Paris\n",
    "Q: Who wrote Hamlet?\nA: Shakespeare\nQ: Where is Rome?\nA: Italy\n",
    "",
]
QUESTIONS = [
    "Q: What is the capital of Peru?\nA:",
    "Q: Which country is Lyon located in?\nA:",
    "Q: Hi?\nA:",
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.set_num_threads(1)
    return load(tiny_model_dir, device="cpu")[:2]


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    """An untouched copy with eager attention: the reference, never the engine's model."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


def reference_greedy(model, tokenizer, prompt, max_new):
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **ids, do_sample=False, max_new_tokens=max_new, pad_token_id=tokenizer.eos_token_id
        )
    return (
        tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
        .split("\n")[0]
        .strip()
    )


def greedy_answers(gen) -> tuple[list, dict]:
    """(cases, {case index: the engine's greedy answer}) for every prefix and question."""
    cases = [(p, q) for p in PREFIXES for q in QUESTIONS]
    reqs = []
    for p, q in cases:
        pid = gen.add_prefix(p)
        reqs.append(Request(pid, gen.prompt_tokens(pid, q)))
    return cases, {i: gen.decode(t) for i, t in gen.generate(reqs)}


@pytest.mark.parametrize("backend", ["levels", "reference"])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_greedy_matches_generate(model, eager, rows, backend):
    m, tok = model
    gen = Generator(m, tok, max_new_tokens=6, max_batch_rows=rows, backend=backend)
    cases, got = greedy_answers(gen)
    assert len(got) == len(cases)
    for i, (p, q) in enumerate(cases):
        assert got[i] == reference_greedy(eager, tok, p + q, 6), (p, q)
    assert gen.stats.tokens > 0 and gen.stats.padded_tokens >= gen.stats.tokens


def test_samples_do_not_depend_on_batching_or_path(model):
    m, tok = model
    outs = []
    for rows, backend in (
        (1, "levels"),
        (5, "levels"),
        (200, "levels"),
        (5, "reference"),
        (200, "reference"),
    ):
        gen = Generator(
            m,
            tok,
            max_new_tokens=5,
            max_batch_rows=rows,
            temperature=0.7,
            top_k=20,
            backend=backend,
        )
        reqs = []
        for p in PREFIXES:
            pid = gen.add_prefix(p)
            reqs += [
                Request(pid, gen.prompt_tokens(pid, q), key=100 * len(reqs) + s)
                for q in QUESTIONS
                for s in range(4)
            ]
        outs.append(dict(gen.generate(reqs)))
    assert all(out == outs[0] for out in outs[1:])
    assert len({tuple(t) for t in outs[0].values()}) > 1  # the samples differ from each other


@pytest.mark.parametrize("backend", ["levels", "reference"])
def test_cancelled_requests_yield_nothing(model, backend):
    m, tok = model
    gen = Generator(m, tok, max_new_tokens=4, max_batch_rows=4, backend=backend)
    pid = gen.add_prefix(PREFIXES[0])
    reqs = [Request(pid, gen.prompt_tokens(pid, QUESTIONS[0]), key=k) for k in range(10)]
    got = dict(gen.generate(reqs, keep=lambda i: i % 2 == 0))
    assert sorted(got) == [0, 2, 4, 6, 8]


def test_prompt_tokens_equal_whole_prompt_tokenization(model):
    m, tok = model
    gen = Generator(m, tok)
    for p in PREFIXES:
        pid = gen.add_prefix(p)
        for q in QUESTIONS:
            assert (
                list(gen.prefixes[pid].tokens) + list(gen.prompt_tokens(pid, q))
                == tok(p + q).input_ids
            )
    pid = gen.add_prefix("Hello wor")
    with pytest.raises(ValueError, match="merges tokens across the prefix/prompt boundary"):
        gen.prompt_tokens(pid, "ld")


def test_sampler_follows_the_top_k_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    n = 20000
    keys = torch.arange(n, dtype=torch.long)
    tokens = choose_tokens(
        logits.expand(n, -1), keys, torch.ones(n, dtype=torch.bool), 0, temperature=0.5, top_k=5
    )
    top = logits[0].topk(5)
    probs = torch.softmax(top.values / 0.5, dim=-1)
    freq = torch.stack([(tokens == t).float().mean() for t in top.indices])
    assert set(tokens.unique().tolist()) <= set(top.indices.tolist())
    assert torch.allclose(freq, probs, atol=0.015), (freq, probs)


def test_gumbel_noise_is_a_pure_function():
    keys = torch.tensor([1, 2, 3])
    assert torch.equal(gumbel_noise(keys, 4, 8), gumbel_noise(keys, 4, 8))
    assert not torch.equal(gumbel_noise(keys, 4, 8), gumbel_noise(keys, 5, 8))
    assert torch.equal(gumbel_noise(keys, 4, 8)[1], gumbel_noise(torch.tensor([2]), 4, 8)[0])


def test_the_engine_leaves_the_model_as_it_found_it(model, caplog):
    m, tok = model
    ids = tok(PREFIXES[1] + QUESTIONS[0], return_tensors="pt")
    with torch.inference_mode():
        before = m(**ids).logits
    implementation = m.config._attn_implementation
    with caplog.at_level("INFO", logger="eqtools.engine"):
        for backend in ("auto", "reference"):
            gen = Generator(m, tok, max_new_tokens=4, backend=backend)
            pid = gen.add_prefix(PREFIXES[1])
            list(
                gen.generate(
                    [
                        Request(pid, gen.prompt_tokens(pid, q), key=k)
                        for q in QUESTIONS
                        for k in (None, 3)
                    ]
                )
            )
    assert "levels path for LlamaForCausalLM" in caplog.text and "reference path" in caplog.text
    assert m.config._attn_implementation == implementation
    with torch.inference_mode():
        assert torch.equal(m(**ids).logits, before)


def test_a_model_spread_over_devices_steps_aside_from_the_levels(tiny_model_dir):
    m, tok, _ = load(tiny_model_dir, device="cpu")  # its own copy: one layer is moved
    gen = Generator(m, tok, max_new_tokens=4, backend="reference")
    # a second device, as where a model is spread over a node's GPUs (none here)
    m.model.layers[1].to("meta")
    assert "spread over 2 devices" in gen._levels_obstacle(m.config)


def test_the_engine_refuses_a_model_in_training_mode(model):
    m, tok = model
    gen = Generator(m, tok, max_new_tokens=2)
    m.train()
    try:
        with pytest.raises(EngineError, match="training mode"):
            list(gen.generate([Request(gen.add_prefix(""), (5, 6))]))
    finally:
        m.eval()


def test_an_unknown_backend_is_refused(model):
    with pytest.raises(EngineError, match="expected one of auto, levels, reference"):
        Generator(*model, backend="fast")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_building_the_engine_leaves_training_as_it_was(tiny_model_dir, backend):
    """A fine-tune builds the engine before it trains, with the model in training mode (LoRA and
    attention dropout on): the probes run without dropout, draw nothing from the global random
    streams and leave every module's training flag as it was, so the training's dropout masks do
    not change."""
    from test_training import RECIPE
    from transformers import AutoTokenizer

    from eqtools.training import build_model

    lora = {"rank": 2, "alpha": 4, "target_modules": "all-linear"}
    recipe = dict(RECIPE, method="lora", dropout=0.1, lora=lora)
    m = build_model(str(tiny_model_dir), recipe, "cpu")
    m.train()
    state = torch.get_rng_state()
    gen = Generator(
        m, AutoTokenizer.from_pretrained(tiny_model_dir), max_new_tokens=2, backend=backend
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert all(module.training for module in m.modules())
    assert gen.backend == ("levels" if backend == "auto" else "reference")


@pytest.mark.parametrize("backend", ["levels", "reference"])
def test_bf16_compute_matches_generate_under_the_same_autocast(model, eager, backend):
    """`compute_dtype` bfloat16 (a recipe's `eval_dtype: bfloat16`): bf16 autocast over the fp32
    weights, as training's forward; the reference is transformers' generate on the untouched
    eager copy under the same autocast."""
    m, tok = model
    gen = Generator(m, tok, max_new_tokens=6, backend=backend, compute_dtype=torch.bfloat16)
    assert gen.backend == backend and next(m.parameters()).dtype == torch.float32
    cases, got = greedy_answers(gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = [reference_greedy(eager, tok, p + q, 6) for p, q in cases]
    assert [got[i] for i in range(len(cases))] == want
    assert not torch.is_autocast_enabled("cpu")  # only inside the engine's own calls


@pytest.mark.parametrize("backend", ["levels", "reference"])
def test_a_long_outlier_takes_a_narrower_wave_and_the_answers_stay(model, eager, backend):
    """Waves hold at most max_batch_rows rows of the requests' mean width: the wave of a long
    outlier question takes fewer rows, and every answer is generate's."""
    m, tok = model
    gen = Generator(m, tok, max_new_tokens=4, max_batch_rows=6, backend=backend)
    pid = gen.add_prefix("")
    outlier = "Who " + "really " * 40 + "wrote the play Hamlet?"
    questions = [f"Q: Where is place {i}?\nA:" for i in range(11)] + [f"Q: {outlier}\nA:"]
    requests = [Request(pid, gen.prompt_tokens(pid, q)) for q in questions]
    widths = [len(r.prompt) + 4 for r in requests]
    got = {i: gen.decode(t) for i, t in gen.generate(requests)}
    assert [got[i] for i in range(len(questions))] == [
        reference_greedy(eager, tok, q, 4) for q in questions
    ]
    # 12 requests, 6 rows a wave: 2 waves if the outlier's wave were as wide as the rest
    assert gen.stats.waves == 3 and max(widths) * 6 > gen.wave_budget(widths)
