import json

import polars as pl
import pytest

from eqtools.entity_questions import (
    ARCHIVE_SPLITS,
    DataError,
    build_splits,
    drop_test_subjects,
    extract_subject,
    parse_relation_file,
    read_archive,
    single_answer,
    split_sizes,
    subsample,
)
from helpers import DATA, FIXTURE_ZIP

TEMPLATES = json.loads((DATA / "fixture_templates.json").read_text())
IN_DIST = ["P17", "P36", "P495", "P26"]
OOD = ["P50", "P407"]


@pytest.fixture(scope="module")
def frames():
    return read_archive(FIXTURE_ZIP, TEMPLATES, [(r, s) for r in TEMPLATES for s in ARCHIVE_SPLITS])


@pytest.fixture(scope="module")
def splits(frames):
    return build_splits(frames, IN_DIST, OOD, list(TEMPLATES))


@pytest.mark.parametrize(
    ("question", "template", "subject"),
    [
        ("Which country is Painblanc located in?", "Which country is [X] located in?", "Painblanc"),
        ("What is the capital of Douglas County?", "What is the capital of [X]?", "Douglas County"),
        ("Who is Anne's child?", "Who is [X]'s child?", "Anne"),
        # the subject may itself contain template words and punctuation
        ("What is the capital of What?", "What is the capital of [X]?", "What"),
        ("Where is [X] located?", "Where is [X] located?", "[X]"),
    ],
)
def test_extract_subject(question, template, subject):
    assert extract_subject(question, template) == subject


@pytest.mark.parametrize(
    "question",
    [
        "Which country is located in?",
        "Which country is Paris located?",
        "where is Paris located in?",
        "",
    ],
)
def test_extract_subject_rejects_questions_off_template(question):
    assert extract_subject(question, "Which country is [X] located in?") is None


def test_template_needs_one_placeholder():
    with pytest.raises(DataError, match="exactly once"):
        extract_subject("x", "no placeholder")


def test_subjects_of_fixture_match_extract_subject(frames):
    for (rel, _), frame in frames.items():
        for row in frame.iter_rows(named=True):
            assert row["subject"] == extract_subject(row["question"], TEMPLATES[rel])


def test_question_off_template_names_file_and_question():
    raw = json.dumps(
        [
            {"question": "Which country is X located in?", "answers": ["A"]},
            {"question": "Where is Y?", "answers": ["B"]},
        ]
    ).encode()
    with pytest.raises(
        DataError, match=r"P17\.test\.json: question 1 'Where is Y\?' does not match"
    ):
        parse_relation_file(
            raw, "P17", "test", TEMPLATES["P17"], where="a.zip:dataset/test/P17.test.json"
        )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'[{"question": ', "malformed JSON"),
        (b'{"question": "q"}', "expected a JSON list"),
        (b'[{"question": "Which country is A located in?"}]', "item 0 is not"),
        (b'[{"question": "Which country is A located in?", "answers": []}]', "item 0 is not"),
        (b'[{"question": 3, "answers": ["a"]}]', "item 0 is not"),
    ],
)
def test_malformed_files_name_the_file(raw, message):
    with pytest.raises(DataError, match=message) as err:
        parse_relation_file(
            raw, "P17", "test", TEMPLATES["P17"], where="x.zip:dataset/test/P17.test.json"
        )
    assert "x.zip:dataset/test/P17.test.json" in str(err.value)


def test_single_answer_drops_multi_answer_questions():
    frame = pl.DataFrame({"id": ["a", "b", "c"], "answers": [["x"], ["x", "y"], ["z"]]})
    out = single_answer(frame)
    assert out["id"].to_list() == ["a", "c"]
    assert out["answer"].to_list() == ["x", "z"]


def test_drop_test_subjects_uses_subjects_not_answers():
    train = pl.DataFrame(
        {"subject": ["Paris", "Rome", "Oslo"], "answer": ["France", "Italy", "Paris"]}
    )
    out = drop_test_subjects(train, pl.Series(["Paris", "Berlin"]))
    assert out["subject"].to_list() == ["Rome", "Oslo"]


def test_splits_have_single_answers_only(frames, splits):
    for name, split in splits.items():
        multi_ids = {
            i
            for (r, s), f in frames.items()
            for i in f.filter(pl.col("answers").list.len() > 1)["id"]
        }
        assert multi_ids, "the fixture must contain multi-answer questions"
        assert not set(split["id"]) & multi_ids, name


def test_train_excludes_subjects_of_all_test_files(frames, splits):
    all_test_subjects = set(pl.concat([frames[r, "test"]["subject"] for r in TEMPLATES]))
    assert not set(splits["train"]["subject"]) & all_test_subjects
    # the fixture has train subjects that occur only in the test file of P20, a relation that is
    # neither in- nor out-of-distribution: the filter must use it too
    p20 = set(frames["P20", "test"]["subject"])
    raw_train = pl.concat([frames[r, "train"] for r in IN_DIST])
    assert set(raw_train["subject"]) & p20
    assert not set(splits["train"]["subject"]) & p20
    # every single-answer train question without a banned subject is kept
    expected = single_answer(raw_train).filter(~pl.col("subject").is_in(list(all_test_subjects)))
    assert sorted(splits["train"]["id"]) == sorted(expected["id"])


def test_dev_and_test_keep_their_subjects(frames, splits):
    raw_test = single_answer(pl.concat([frames[r, "test"] for r in IN_DIST]))
    assert sorted(splits["test"]["id"]) == sorted(raw_test["id"])


def test_split_relations(splits):
    for name in ("train", "dev", "test"):
        assert set(splits[name]["relation"]) == set(IN_DIST)
    assert set(splits["ood_test"]["relation"]) == set(OOD)
    assert splits["train"].columns == ["id", "relation", "subject", "question", "answer"]
    assert splits["train"]["id"].is_unique().all()


def test_split_sizes_counts_per_relation(splits):
    sizes = split_sizes(splits)
    for row in sizes.iter_rows(named=True):
        assert row["n"] == splits[row["split"]].filter(pl.col("relation") == row["relation"]).height


def test_subsample_caps_per_relation_deterministically(splits):
    train = splits["train"]
    a = subsample(train, 5, seed=1, salt="train")
    assert a.group_by("relation").len()["len"].to_list() == [5] * 4
    assert a.equals(subsample(train, 5, seed=1, salt="train"))
    assert not a.equals(subsample(train, 5, seed=2, salt="train"))
    assert subsample(train, None, seed=1, salt="train").equals(train)
    # a question's selection does not depend on the other relations present
    p17 = train.filter(pl.col("relation") == "P17")
    assert subsample(p17, 5, 1, "train").equals(a.filter(pl.col("relation") == "P17"))
