"""Long jobs' bookkeeping: the stamp of a resumable state, progress lines, per-attempt logs."""

import json
import logging
import sys
from pathlib import Path

import pytest

from eqtools.io import attempt_logs, setup_logging
from eqtools.jobstate import STAMP, claim_state, job_stamp
from eqtools.progress import Progress, duration


def stamp(learning_rate: float, data: Path) -> dict:
    spec = json.dumps({"recipe": {"learning_rate": learning_rate}})
    return job_stamp(spec, "code", {"mixture": data})


def test_claim_state_resumes_its_own_and_discards_another(tmp_path, caplog):
    data = tmp_path / "mixture.parquet"
    data.write_bytes(b"rows")
    state = tmp_path / "state"
    mine = stamp(1e-3, data)
    assert not claim_state(state, mine, "job")  # a new run: the stamp is written
    assert json.loads((state / STAMP).read_text()) == mine
    (state / "epoch").mkdir()
    assert claim_state(state, mine, "job")  # the same job resumes
    assert (state / "epoch").exists()
    with caplog.at_level(logging.WARNING, logger="workflow"):
        assert not claim_state(state, stamp(5e-4, data), "job")
    assert not (state / "epoch").exists()  # the other job's state is gone
    assert "spec.recipe.learning_rate: 0.001 -> 0.0005" in caplog.text
    (state / "epoch").mkdir()
    data.write_bytes(b"other rows")
    with caplog.at_level(logging.WARNING, logger="workflow"):
        assert not claim_state(state, stamp(5e-4, data), "job")
    assert "inputs.mixture: other content" in caplog.text


def test_a_state_without_a_stamp_is_discarded(tmp_path, caplog):
    state = tmp_path / "state"
    (state / "epoch").mkdir(parents=True)  # a state of the version before stamps
    with caplog.at_level(logging.WARNING, logger="workflow"):
        assert not claim_state(state, stamp(1e-3, tmp_path / "none"), "job")
    assert "no stamp.json" in caplog.text and not (state / "epoch").exists()


def test_an_unwritable_state_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write its state directory"):
        claim_state(blocker / "state", stamp(1e-3, blocker), "job")


def test_progress_lines_are_throttled_and_count_this_attempt(caplog):
    now = [0.0]
    progress = Progress("labelling", 10, "questions", done=4, every=30, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="workflow"):
        now[0] = 10
        progress.advance(2)  # 10 s since the start: no line
        assert caplog.text == ""
        now[0] = 40
        progress.advance(1)
        assert "labelling: 7/10 questions (70%), 4 before this attempt" in caplog.text
        assert "0.08 questions/s" not in caplog.text  # 3 in 40 s
        assert "13.3 s/question" in caplog.text and "ETA 40 s" in caplog.text
        progress.finish()
    assert len(caplog.records) == 2


def test_duration_reads_as_hours_minutes_seconds():
    assert duration(12) == "12 s"
    assert duration(185) == "3 min 05 s"
    assert duration(3720) == "1 h 02 min"


def test_each_attempt_keeps_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # setup_logging tees it into the log
    log = tmp_path / "logs/job.log"
    setup_logging(log).info("first attempt")
    log.unlink()  # as snakemake does before it runs the job again
    setup_logging(log).info("second attempt")
    attempts = attempt_logs(log)
    assert "first attempt" in (attempts / "1.log").read_text()
    assert "second attempt" in (attempts / "2.log").read_text()
    text = log.read_text()
    assert "attempt 2 of this job" in text and str(attempts / "1.log") in text
    logging.getLogger().handlers.clear()
