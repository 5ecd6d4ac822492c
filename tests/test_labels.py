"""SliCK labelling on a tiny random model: the exact shortcut gives the categories of full
sampling."""

import polars as pl
import pytest
import torch

from eqtools.engine import Generator, Request
from eqtools.models import load
from eqtools.slick import (
    draw_exemplars,
    exemplar_set_for,
    format_exemplars,
    format_question,
    label_questions,
    sample_key,
)

N_SETS, K, N_SAMPLES, SEED = 3, 2, 4, 7


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    torch.set_num_threads(1)
    model, tok, _ = load(tiny_model_dir, device="cpu")
    dev = pl.DataFrame(
        [
            {
                "id": f"P1.dev.{i}",
                "relation": "P1",
                "question": f"Who is person {i}?",
                "answer": f"name {i}",
            }
            for i in range(10)
        ]
    )
    exemplars = draw_exemplars(dev, N_SETS, K, seed=0)
    questions = pl.DataFrame(
        [
            {
                "id": f"P1.test.{i}",
                "relation": "P1",
                "question": f"Where is place {i}?",
                "answer": "?",
            }
            for i in range(6)
        ]
    )
    return model, tok, exemplars, questions


def generator(model, tok):
    return Generator(model, tok, max_new_tokens=3, temperature=1.0, top_k=50, max_batch_rows=16)


def answer(model, tok, exemplars, row, e, sample=None):
    """What the engine answers for one (question, set[, sample])."""
    gen = generator(model, tok)
    pid = gen.add_prefix(format_exemplars(exemplar_set_for(exemplars["P1"], e, row["id"])))
    key = None if sample is None else sample_key(SEED, row["id"], e, sample)
    ((_, tokens),) = gen.generate(
        [Request(pid, gen.prompt_tokens(pid, format_question(row["question"])), key)]
    )
    return gen.decode(tokens)


def test_shortcut_equals_full_sampling(setup):
    model, tok, exemplars, questions = setup
    rows = questions.to_dicts()
    # plant gold answers so that every category occurs: the set-0 greedy answer (Highly or
    # MaybeKnown), the last set's 3rd sample (WeaklyKnown or better), and an impossible one
    golds = [
        answer(model, tok, exemplars, rows[0], 0),
        answer(model, tok, exemplars, rows[1], 1),
        answer(model, tok, exemplars, rows[2], N_SETS - 1, sample=2),
        answer(model, tok, exemplars, rows[3], 0, sample=0),
        "no such answer 1",
        "no such answer 2",
    ]
    questions = questions.with_columns(pl.Series("answer", golds))
    short = label_questions(generator(model, tok), questions, exemplars, N_SAMPLES, SEED)
    full = label_questions(
        generator(model, tok), questions, exemplars, N_SAMPLES, SEED, full_p_correct=True
    )
    assert short["category"].to_list() == full["category"].to_list()
    assert {"Unknown"} < set(short["category"].to_list())
    assert (
        "WeaklyKnown" in short["category"].to_list() or "MaybeKnown" in short["category"].to_list()
    )
    # greedy-decided questions: identical greedy figures, no samples under the shortcut
    assert short["n_greedy_correct"].to_list() == full["n_greedy_correct"].to_list()
    decided = short.filter(pl.col("n_greedy_correct") > 0)
    assert (
        decided.height
        and (decided["n_sampled"] == 0).all()
        and decided["p_correct_sampled"].is_null().all()
    )
    # full sampling draws everything and gives exact P(T>0)
    assert (full["n_sampled"] == N_SETS * N_SAMPLES).all()
    assert full["p_correct_sampled"].is_not_null().all()
    # the shortcut's Unknown questions had every sample drawn: their P(T>0) = 0 is exact
    unknown = short.filter(pl.col("category") == "Unknown")
    assert (unknown["n_sampled"] == N_SETS * N_SAMPLES).all() and (
        unknown["p_correct_sampled"] == 0
    ).all()
    # the shortcut stops early for WeaklyKnown questions
    weak = short.filter(pl.col("category") == "WeaklyKnown")
    assert (weak["n_sampled"] <= N_SETS * N_SAMPLES).all() and weak[
        "p_correct_sampled"
    ].is_null().all()


def test_labels_are_reproducible(setup):
    model, tok, exemplars, questions = setup
    a = label_questions(generator(model, tok), questions, exemplars, N_SAMPLES, SEED)
    b = label_questions(generator(model, tok), questions, exemplars, N_SAMPLES, SEED)
    assert a.equals(b)
    assert a.columns[:3] == ["id", "relation", "n_greedy"]
    assert a["greedy_answers"].list.len().to_list() == [N_SETS] * questions.height


def test_labels_do_not_depend_on_the_engine_path(setup):
    """The same SliCK labels, answers and sample counts from the fast path and the reference path
    (cancellation included: the shortcut stops sampling at the first correct sample on both)."""
    model, tok, exemplars, questions = setup
    rows = questions.to_dicts()
    golds = [
        answer(model, tok, exemplars, rows[0], 0),
        answer(model, tok, exemplars, rows[2], 1, sample=2),
    ] + ["none"] * 4
    questions = questions.with_columns(pl.Series("answer", golds))
    levels = label_questions(generator(model, tok), questions, exemplars, N_SAMPLES, SEED)
    reference = Generator(
        model,
        tok,
        max_new_tokens=3,
        temperature=1.0,
        top_k=50,
        max_batch_rows=16,
        backend="reference",
    )
    assert levels.equals(label_questions(reference, questions, exemplars, N_SAMPLES, SEED))
