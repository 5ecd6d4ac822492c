import polars as pl
import pytest

from eqtools.slick import (
    ExemplarError,
    draw_exemplars,
    exemplar_set_for,
    format_exemplars,
    format_question,
    sample_key,
)
from eqtools.study import CATEGORIES, categorize


@pytest.mark.parametrize(
    ("greedy_correct", "sampled_correct", "category"),
    [
        (10, 0, "HighlyKnown"),
        (10, 5, "HighlyKnown"),
        (9, 0, "MaybeKnown"),
        (1, 0, "MaybeKnown"),
        (0, 1, "WeaklyKnown"),
        (0, 160, "WeaklyKnown"),
        (0, 0, "Unknown"),
    ],
)
def test_categories_at_their_boundaries(greedy_correct, sampled_correct, category):
    assert categorize(greedy_correct, 10, sampled_correct) == category


def dev_frame(relations=("P17", "P36"), n=20):
    return pl.DataFrame(
        [
            {"id": f"{r}.dev.{i}", "relation": r, "question": f"q {r} {i}?", "answer": f"a{i}"}
            for r in relations
            for i in range(n)
        ]
    )


def test_exemplar_sets_are_disjoint_fixed_and_from_dev_only():
    dev = dev_frame()
    ex = draw_exemplars(dev, n_sets=4, k=4, seed=0)
    assert ex == draw_exemplars(dev, n_sets=4, k=4, seed=0)
    assert ex != draw_exemplars(dev, n_sets=4, k=4, seed=1)
    for rel, sets in ex.items():
        ids = [e["id"] for s in sets["sets"] for e in s] + [sets["spare"]["id"]]
        assert len(ids) == len(set(ids)) == 17
        assert all(i.startswith(f"{rel}.dev.") for i in ids)
        assert set(ids) <= set(dev["id"])


def test_exemplars_never_include_the_question():
    ex = draw_exemplars(dev_frame(), n_sets=4, k=4, seed=0)["P17"]
    member = ex["sets"][2][1]["id"]
    for e in range(4):
        chosen = exemplar_set_for(ex, e, member)
        assert member not in [c["id"] for c in chosen]
        assert len(chosen) == 4
    assert exemplar_set_for(ex, 2, member)[1] == ex["spare"]
    assert exemplar_set_for(ex, 0, "P17.train.5") == ex["sets"][0]


def test_too_few_dev_questions_names_relation_and_fix():
    with pytest.raises(
        ExemplarError,
        match=r"relation P17: 10 dev questions, but 4 exemplar sets of 4 plus a spare need 17",
    ):
        draw_exemplars(dev_frame(("P17",), 10), n_sets=4, k=4, seed=0)


def test_prompt_format():
    text = format_exemplars(
        [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    )
    assert text + format_question("Q3?") == "Q: Q1?\nA: A1\nQ: Q2?\nA: A2\nQ: Q3?\nA:"


def test_sample_keys_are_distinct_uint32():
    keys = {sample_key(0, "P17.train.1", e, s) for e in range(10) for s in range(16)}
    assert len(keys) == 160 and all(0 <= k < 2**32 for k in keys)
    assert sample_key(0, "x", 0, 0) != sample_key(1, "x", 0, 0)


def test_category_order():
    assert CATEGORIES == ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
