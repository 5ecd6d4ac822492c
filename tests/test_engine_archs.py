"""The generation engine on every decoder architecture of the pinned transformers.

Each entry of `AutoModelForCausalLM`'s mapping is built tiny with random weights
(tests/archs.py), with a sliding window of 8 wherever the architecture has one, and prompted
with a few-shot prefix and questions of 12 to 71 tokens, so that every window is exceeded. The
reference is `generate(do_sample=False)` on an untouched copy of the model with eager attention,
one prompt at a time: never the engine's own model.

Floating-point near-ties: the engine computes the same logits in another order (its level
attention, or batched rows), so where the two best tokens of the reference are within
`TIE` of each other the greedy choice may flip, and the rest of that answer diverges. Such
answers are compared up to the tie, counted, and bounded; any other difference fails.
"""

import contextlib
import copy
import logging

import pytest
import torch

from archs import ARCHITECTURES, Unbuildable, build_tiny, char_tokenizer
from eqtools.engine import EngineError, Generator, Request, check_generation
from eqtools.engine.reference import _plain_generation_config

PREFIX = "Q: Where is Rome?\nA: Italy\nQ: Who wrote Hamlet?\nA: Shakespeare\n"
PROMPTS = [
    "Q: What is the capital of Peru?\nA:",
    "Q: Hi?\nA:",
    "Q: Which country is the city of Lyon located in?\nA:",
]
MAX_NEW = 4
TIE = 1e-4  # reference logits this close count as a near-tie (fp32, tiny models)
MAX_TIES = 1  # per architecture and comparison
# Moshi's forward attends causally without a window, while its generate cache keeps only the
# window: the two disagree beyond it, so its window is set beyond the prompts (real checkpoints:
# 3000 tokens).
WINDOW = {"moshi": 256}
# Architectures the engine refuses (in prepare_model too), and why
REFUSED = {
    "musicgen": "no single output layer",
    "musicgen_melody": "no single output layer",
}

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def tok():
    torch.set_num_threads(1)
    return char_tokenizer()


def build(model_type: str, tok):
    """(model for the engine, untouched eager copy)."""
    try:
        reference = build_tiny(model_type, len(tok), window=WINDOW.get(model_type, 8), attn="eager")
    except Unbuildable as e:
        pytest.skip(f"{model_type}: {e}")
    # plain greedy decoding: none of the model's own generation defaults (repetition penalty,
    # forced tokens, ...), as the engine
    reference.generation_config = _plain_generation_config(
        reference.generation_config, MAX_NEW, tok.pad_token_id
    )
    model = copy.deepcopy(reference)
    # the engine's model carries the workflow's default attention where the model has it
    with contextlib.suppress(ValueError, ImportError):
        model.set_attn_implementation("sdpa")
    return model, reference


def requests(gen: Generator, keys=(None,)) -> list[tuple[str, Request]]:
    """Each prompt after the few-shot prefix, and the longest one alone."""
    out = []
    for prefix, prompt in [(PREFIX, p) for p in PROMPTS] + [("", PROMPTS[2])]:
        pid = gen.add_prefix(prefix)
        for key in keys:
            out.append((prefix + prompt, Request(pid, gen.prompt_tokens(pid, prompt), key)))
    return out


def reference_greedy(model, tok, text: str) -> tuple[list[int], list[torch.Tensor]]:
    """Generated ids up to the first stop, and the logits of every step."""
    ids = tok(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            pad_token_id=tok.pad_token_id,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, ids.shape[1] :].tolist(), [x[0] for x in out.logits]


def compare_greedy(
    got: list[int], want: list[int], logits: list[torch.Tensor], stop: torch.Tensor
) -> str:
    """ "equal", "tie" (the first difference is a near-tie in the reference's logits) or
    "differ"."""
    cut = next((j for j, t in enumerate(want) if stop[t]), len(want))
    want = want[:cut]
    if got == want:
        return "equal"
    j = next(
        j
        for j in range(min(len(got), len(want)) + 1)
        if j >= len(got) or j >= len(want) or got[j] != want[j]
    )
    if j >= len(logits):
        return "differ"
    ours = got[j] if j < len(got) else None  # None: the engine stopped at j
    step = logits[j].float()
    candidates = [int(t) for t in stop.nonzero().flatten()] if ours is None else [ours]
    best = float(step.max())
    return (
        "tie"
        if any(best - float(step[t]) <= TIE * max(1.0, abs(best)) for t in candidates)
        else "differ"
    )


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_engine_is_exact_for(model_type, tok, caplog):
    model, reference = build(model_type, tok)
    probe = tok(PREFIX + PROMPTS[2], return_tensors="pt").input_ids
    with torch.inference_mode():
        logits_before = model(input_ids=probe).logits
    implementation = model.config._attn_implementation

    if model_type in REFUSED:
        with pytest.raises(EngineError, match=REFUSED[model_type]):
            check_generation("tiny", model, tok)
        return
    with caplog.at_level(logging.INFO, logger="eqtools.engine"):
        gen = Generator(model, tok, max_new_tokens=MAX_NEW, temperature=0.8, top_k=20)
    backend = gen.backend
    log.info("%s: %s", model_type, caplog.records[-1].getMessage())

    # greedy: equal to generate on the untouched eager copy, at two batch sizes
    ties = 0
    wanted = {}
    for rows in (2, 64):
        gen.max_batch_rows = rows
        reqs = requests(gen)
        got = dict(gen.generate([r for _, r in reqs]))
        assert sorted(got) == list(range(len(reqs)))
        for i, (text, _) in enumerate(reqs):
            if text not in wanted:
                wanted[text] = reference_greedy(reference, tok, text)
            verdict = compare_greedy(got[i], *wanted[text], gen.stop_token)
            assert verdict != "differ", (model_type, backend, rows, text, got[i], wanted[text][0])
            ties += verdict == "tie"
    assert ties <= MAX_TIES, (model_type, ties)

    # sampled: identical across batch sizes, and across the two paths up to near-ties
    samples = []
    for rows in (2, 64):
        gen.max_batch_rows = rows
        samples.append(dict(gen.generate([r for _, r in requests(gen, keys=(11, 12))])))
    assert samples[0] == samples[1], model_type
    if backend == "levels":
        gen = Generator(
            model, tok, max_new_tokens=MAX_NEW, temperature=0.8, top_k=20, backend="reference"
        )
        other = dict(gen.generate([r for _, r in requests(gen, keys=(11, 12))]))
        differ = sum(samples[0][i] != other[i] for i in other)
        assert differ <= MAX_TIES, (model_type, differ)

    # the model is left as it was found
    assert model.config._attn_implementation == implementation
    with torch.inference_mode():
        assert torch.equal(model(input_ids=probe).logits, logits_before), model_type


def test_levels_refuses_a_model_it_cannot_run(tok):
    model, _ = build("mamba", tok)
    with pytest.raises(EngineError, match="cannot run on it"):
        Generator(model, tok, backend="levels")
