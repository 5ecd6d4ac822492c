"""A job's partial results (eqtools.partial): the stamp that decides whether a saved state is
resumed, the groups, and the output assembled from them."""

import json
import logging

import polars as pl
import pytest

from eqtools.jobstate import job_stamp, model_files, stamp_differences
from eqtools.partial import (
    PartialResults,
    assemble,
    forget_complete,
    group_bounds,
    partial_dir,
    start_progress,
)
from eqtools.slick import LABEL_SCHEMA


def labels(n: int) -> pl.DataFrame:
    """`n` rows of a labelled chunk, with every column type a chunk has (nulls included)."""
    return pl.DataFrame(
        [
            {
                "id": f"P1.train.{i}",
                "relation": "P1",
                "n_greedy": 2,
                "n_greedy_correct": i % 3 == 0,
                "n_sampled": 0 if i % 3 == 0 else 6,
                "n_sampled_correct": 0,
                "p_correct_greedy": 0.5 if i % 3 == 0 else 0.0,
                "p_correct_sampled": None if i % 3 == 0 else 0.0,
                "category": "MaybeKnown" if i % 3 == 0 else "Unknown",
                "greedy_answers": [f"answer {i}", ""],
            }
            for i in range(n)
        ],
        schema=LABEL_SCHEMA,
    )


def stamp(seed: int = 7, questions: str = "q") -> dict:
    return {
        "spec": {"slick": {"seed": seed, "n_samples": 16}, "model": {"dtype": "float32"}},
        "code": "abc",
        "inputs": {"questions": questions, "model/config.json": "c"},
    }


def save_in_groups(state: PartialResults, frame: pl.DataFrame, size: int, start: int = 0):
    for first, end in group_bounds(start, frame.height, size):
        state.save(first, frame[first:end])


def test_the_partial_directory_is_hidden_beside_the_output(tmp_path):
    output = tmp_path / "chunks/train/P17.parquet"
    assert partial_dir(output) == tmp_path / "chunks/train/.P17.partial"
    assert partial_dir("results/labels/m/ptrue_test.parquet").name == ".ptrue_test.partial"


def test_stamp_differences_name_each_setting_and_input_that_differs():
    assert stamp_differences(stamp(), stamp()) == []
    assert stamp_differences(stamp(seed=7), stamp(seed=8)) == ["spec.slick.seed: 7 -> 8"]
    other = stamp(questions="other digest")
    other["code"] = "def"
    other["spec"]["slick"]["full_p_correct"] = True
    assert stamp_differences(stamp(), other) == [
        'code: "abc" -> "def"',
        "inputs.questions: other content",
        "spec.slick.full_p_correct: new",
    ]
    assert stamp_differences(other, stamp())[-1] == "spec.slick.full_p_correct: gone"


def test_job_stamp_hashes_the_inputs_and_parses_the_spec(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text("{}")
    (tmp_path / "q.parquet").write_bytes(b"questions")
    spec = json.dumps({"slick": {"seed": 7}})
    made = job_stamp(
        spec, "abc", {"questions": tmp_path / "q.parquet", **model_files(tmp_path / "model")}
    )
    assert made["spec"] == {"slick": {"seed": 7}} and made["code"] == "abc"
    assert set(made["inputs"]) == {"questions", "model/config.json", "model/registry_entry.json"}
    assert made["inputs"]["model/registry_entry.json"] is None  # absent: named, not hashed
    (tmp_path / "q.parquet").write_bytes(b"other questions")
    again = job_stamp(
        spec, "abc", {"questions": tmp_path / "q.parquet", **model_files(tmp_path / "model")}
    )
    assert stamp_differences(made, again) == ["inputs.questions: other content"]


def test_group_bounds_cover_the_items_from_the_start():
    assert list(group_bounds(0, 7, 3)) == [(0, 3), (3, 6), (6, 7)]
    assert list(group_bounds(4, 7, 2)) == [(4, 6), (6, 7)]
    assert list(group_bounds(7, 7, 2)) == []
    with pytest.raises(ValueError, match="at least 1"):
        list(group_bounds(0, 3, 0))


def test_an_output_assembled_from_groups_is_byte_identical_to_one_written_whole(tmp_path):
    frame = labels(10)
    whole = tmp_path / "whole.parquet"
    state = PartialResults(
        tmp_path / ".whole.partial", stamp(), frame["id"].to_list(), LABEL_SCHEMA
    )
    assert state.resume() == 0
    save_in_groups(state, frame, 10)
    state.complete(whole)
    for size in (1, 3, 4):
        output = tmp_path / f"groups{size}.parquet"
        state = PartialResults(partial_dir(output), stamp(), frame["id"].to_list(), LABEL_SCHEMA)
        assert state.resume() == 0
        save_in_groups(state, frame, size)
        written = state.complete(output)
        assert output.read_bytes() == whole.read_bytes(), size
        assert written.schema == pl.Schema(LABEL_SCHEMA) and written.n_chunks() == 1
        # the groups are gone; the result stays beside the stamp, the output a link to it
        kept = partial_dir(output)
        assert sorted(p.name for p in kept.iterdir()) == ["complete.parquet", "stamp.json"]
        assert (kept / "complete.parquet").stat().st_ino == output.stat().st_ino
    assert pl.read_parquet(whole).equals(frame)


def test_a_retry_publishes_the_completed_result_and_a_new_invocation_computes_afresh(tmp_path):
    """Killed after completing (Snakemake then deletes the output): the retry finds all items
    done and writes the same bytes. A job's first attempt in a new invocation forgets it."""
    frame = labels(5)
    ids = frame["id"].to_list()
    output = tmp_path / "out.parquet"
    state = PartialResults(partial_dir(output), stamp(), ids, LABEL_SCHEMA)
    assert state.resume() == 0
    save_in_groups(state, frame, 2)
    state.complete(output)
    written = output.read_bytes()
    output.unlink()  # Snakemake, after the failed attempt
    retry = PartialResults(partial_dir(output), stamp(), ids, LABEL_SCHEMA)
    assert retry.resume() == 5
    assert retry.complete(output).equals(frame) and output.read_bytes() == written
    assert forget_complete(output) and not forget_complete(output)
    assert PartialResults(partial_dir(output), stamp(), ids, LABEL_SCHEMA).resume() == 0


def test_a_resumed_state_continues_after_its_last_group_whatever_the_group_size(tmp_path):
    frame = labels(9)
    ids = frame["id"].to_list()
    first = PartialResults(tmp_path / ".out.partial", stamp(), ids, LABEL_SCHEMA)
    assert first.resume() == 0
    first.save(0, frame[0:2])
    first.save(2, frame[2:4])  # then the job is killed
    second = PartialResults(tmp_path / ".out.partial", stamp(), ids, LABEL_SCHEMA)
    assert second.resume() == 4
    save_in_groups(second, frame, 3, start=4)  # another group size: a scheduling setting
    assert second.complete(tmp_path / "out.parquet").equals(frame)
    with pytest.raises(ValueError, match="not the rows of items 0 to 2"):
        PartialResults(tmp_path / ".x.partial", stamp(), ids, LABEL_SCHEMA).save(0, frame[1:3])


def test_a_state_with_another_stamp_is_discarded_with_one_line_naming_why(tmp_path, caplog):
    frame = labels(6)
    ids = frame["id"].to_list()
    old = PartialResults(tmp_path / ".out.partial", stamp(seed=7), ids, LABEL_SCHEMA)
    old.resume()
    old.save(0, frame[0:3])
    caplog.set_level(logging.INFO, logger="workflow")
    new = PartialResults(tmp_path / ".out.partial", stamp(seed=8), ids, LABEL_SCHEMA)
    assert new.resume() == 0
    lines = [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()]
    assert len(lines) == 1 and "spec.slick.seed: 7 -> 8" in lines[0], lines
    assert [p.name for p in (tmp_path / ".out.partial").iterdir()] == ["stamp.json"]
    saved = json.loads((tmp_path / ".out.partial/stamp.json").read_text())
    assert saved["spec"]["slick"]["seed"] == 8


def test_parts_that_do_not_match_the_items_are_discarded(tmp_path, caplog):
    frame = labels(6)
    state = PartialResults(tmp_path / ".out.partial", stamp(), frame["id"].to_list(), LABEL_SCHEMA)
    state.resume()
    state.save(0, frame[0:2])
    state.save(2, frame[2:4])
    (tmp_path / ".out.partial/rows-000000000-000000002.parquet").unlink()  # a gap
    caplog.set_level(logging.INFO, logger="workflow")
    again = PartialResults(tmp_path / ".out.partial", stamp(), frame["id"].to_list(), LABEL_SCHEMA)
    assert again.resume() == 0
    assert "do not follow on the first 0 items" in caplog.text
    # the same ids in another order (the questions changed without the stamp noticing)
    again.save(0, frame[0:3])
    reordered = frame["id"].to_list()[::-1]
    assert PartialResults(tmp_path / ".out.partial", stamp(), reordered, LABEL_SCHEMA).resume() == 0
    assert "holds other items than positions 0 to 3" in caplog.text


def test_assemble_keeps_the_parts_order_and_the_schema():
    frame = labels(5)
    parts = [frame[3:5], frame[0:3]]
    got = assemble(parts, LABEL_SCHEMA)
    assert got["id"].to_list() == frame["id"].to_list()[3:] + frame["id"].to_list()[:3]
    assert assemble([], LABEL_SCHEMA).schema == pl.Schema(LABEL_SCHEMA)


def test_the_first_progress_line_says_what_a_resumed_run_found_done(caplog):
    caplog.set_level(logging.INFO, logger="workflow")
    progress = start_progress("labelling", "train/P17", 400, "questions", 120, "labelled")
    assert caplog.records[-1].getMessage() == (
        "resuming: 120 of 400 questions of train/P17 already labelled"
    )
    assert progress.done == 120 and progress.total == 400
    start_progress("labelling", "train/P17", 400, "questions", 0, "labelled")
    assert "none labelled before this attempt" in caplog.records[-1].getMessage()
