"""The one atomic-write helper (eqtools.io.atomic_path), for files and directories."""

import pytest

from eqtools.io import atomic_path, write_text


def test_file_is_replaced_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text("old", target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    write_text("new", target)
    assert target.read_text() == "new"


def test_directory_is_swapped_in_whole_and_a_failure_leaves_the_old_one(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a").write_text("1")
    assert [p.name for p in target.iterdir()] == ["a"]
    (tmp_path / ".checkpoint.part").mkdir()  # the leftover of a killed job
    (tmp_path / ".checkpoint.part" / "stale").write_text("x")
    with pytest.raises(RuntimeError), atomic_path(target, directory=True) as tmp:
        assert list(tmp.iterdir()) == []  # the leftover was cleared
        (tmp / "b").write_text("2")
        raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["a"]
    with atomic_path(target, directory=True) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_directory_swap_interrupted_between_its_renames_is_completed(tmp_path):
    """A kill after the old copy was moved aside and before the new one was renamed into place
    leaves both whole: the next writer (or a reader calling finish_swap) puts the new one in
    place instead of losing both."""
    from eqtools.io import finish_swap, old_path, part_path

    target = tmp_path / "state"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "v").write_text("1")
    # the interrupted second swap: the complete new copy built, the old one moved aside
    part_path(target).mkdir()
    (part_path(target) / "v").write_text("2")
    target.rename(old_path(target))
    finish_swap(target)
    assert (target / "v").read_text() == "2"
    assert not old_path(target).exists() and not part_path(target).exists()
    # a swap that never got that far (no old copy aside): the partial new copy is not used
    part_path(target).mkdir()
    (part_path(target) / "v").write_text("half")
    finish_swap(target)
    assert (target / "v").read_text() == "2"
    with atomic_path(target, directory=True) as tmp:  # the writer completes it first, too
        (tmp / "v").write_text("3")
    assert (target / "v").read_text() == "3"
