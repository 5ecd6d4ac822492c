import pytest

from eqtools.em import exact_match, normalize_answer


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The United States of America", "united states of america"),
        ("  Paris,\tFrance. ", "paris france"),
        ("an apple a day", "apple day"),
        ("Theodore", "theodore"),  # articles only as whole words
        ("A.C. Milan", "ac milan"),
        ("Rome\nQ: What is", "rome"),  # up to the first newline
        ("", ""),
        ("Ñandú — Ω", "ñandú — ω"),  # unicode kept; only ASCII punctuation removed
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match():
    assert exact_match("the Netherlands", "Netherlands")
    assert exact_match("Paris.", ["Lyon", "paris"])
    assert not exact_match("Paris, France", "Paris")
    assert not exact_match("", "Paris")
