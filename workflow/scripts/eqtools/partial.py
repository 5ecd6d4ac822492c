"""A long job's partial results, saved group by group outside its declared outputs, so that a
killed job (preempted, timed out) resumes where it stopped instead of from zero.

Snakemake deletes a job's declared outputs before it runs the job and after it fails, so the
finished groups live in an undeclared hidden directory next to the output
(`partial_dir(output)`): one parquet file per group of items (`rows-<start>-<end>.parquet`) and
`stamp.json`, the job's tracked settings and the sha256 of its inputs (eqtools.jobstate). A
state is resumed only by a job with the same stamp; any other is discarded with one log line
naming what differs.
Scheduling settings (GPUs, ranks, group size, batch rows) are not in the stamp: changing them
keeps the state. When the job completes, the output is written once from all groups, in the
items' order, into the directory (`complete.parquet`, replacing the groups) and linked to its
declared place: a job killed after that (a time limit or a preemption before Snakemake recorded
it; Snakemake then deletes the output) publishes it again on its retry instead of starting
over. The file stays, its link costing no disk; a new invocation of Snakemake (--forcerun, or
after Snakemake itself was killed) computes afresh.

Bookkeeping like eqtools.io: the result is the same whether it was computed in one attempt or
several (every group's rows are computed exactly as they would be in one run), so it is left out
of the code hashes."""

import logging
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import polars as pl

from eqtools.io import link_file, write_parquet
from eqtools.jobstate import claim_state
from eqtools.progress import Progress

log = logging.getLogger("workflow")

PART = re.compile(r"rows-(\d+)-(\d+)\.parquet")
COMPLETE = "complete.parquet"


def partial_dir(output: str | Path) -> Path:
    """Where the partial results of the job writing `output` live: `.<stem>.partial/` beside it
    (undeclared, so that Snakemake leaves it alone)."""
    output = Path(output)
    return output.with_name(f".{output.stem}.partial")


def forget_complete(output: str | Path) -> bool:
    """Remove the result that a job writing `output` completed before this invocation of
    Snakemake (which then recorded it, or runs it again with --forcerun); returns whether there
    was one. The first attempt of a job calls it: only a retry publishes a finished result."""
    done = partial_dir(output) / COMPLETE
    if not done.exists():
        return False
    log.info("%s: the result finished before this invocation goes", done)
    done.unlink()
    return True


def group_bounds(start: int, total: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the groups of `size` items from `start` to `total`."""
    if size < 1:
        raise ValueError(f"the group size must be at least 1, not {size}")
    for first in range(start, total, size):
        yield first, min(first + size, total)


def assemble(parts: list[pl.DataFrame], schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """One frame of `parts` in their order, with `schema`'s columns and types, in one chunk (so
    that the file written from it does not depend on how the items were grouped)."""
    frames = [part.select(list(schema)).cast(dict(schema)) for part in parts]
    return pl.concat([pl.DataFrame(schema=schema), *frames], rechunk=True)


class PartialResults:
    """The saved groups of one job whose items are `ids` (in the order of its output rows, each
    item one row keyed by `key`), in `directory`, for the job stamped `stamp`. Only the main
    rank of a distributed job uses it."""

    def __init__(
        self,
        directory: str | Path,
        stamp: dict,
        ids: list[str],
        schema: Mapping[str, pl.DataType],
        key: str = "id",
    ):
        self.directory = Path(directory)
        self.stamp, self.ids, self.schema, self.key = stamp, ids, schema, key
        self.parts: list[Path] = []

    def _discard(self, why: str) -> None:
        log.info("discarding the partial results in %s: %s", self.directory, why)
        shutil.rmtree(self.directory)

    def _saved_parts(self) -> list[Path] | str:
        """The saved parts that cover the first items without a gap, or why the state is
        unusable."""
        found = {}
        for path in self.directory.iterdir():
            match = PART.fullmatch(path.name)
            if match:
                found[int(match[1])] = (int(match[2]), path)
        parts, done = [], 0
        while done in found:
            end, path = found.pop(done)
            if end > len(self.ids):
                return f"{path.name} goes past the {len(self.ids)} items"
            ids = pl.read_parquet(path, columns=[self.key])[self.key].to_list()
            if ids != self.ids[done:end]:
                return f"{path.name} holds other items than positions {done} to {end}"
            parts.append(path)
            done = end
        if found:  # a gap: a part saved by no run of this job
            return f"parts that do not follow on the first {done} items: {sorted(found)}"
        return parts

    def resume(self) -> int:
        """How many of the first items are done: those of a saved state with this stamp, or 0
        (a state with another stamp is discarded, one log line naming what differs). The
        directory then holds this job's stamp."""
        kind = "partial results"
        if claim_state(self.directory, self.stamp, kind, kind):
            if (self.directory / COMPLETE).exists():
                log.info("%s: complete in an earlier attempt", self.directory)
                return len(self.ids)
            parts = self._saved_parts()
            if isinstance(parts, str):
                self._discard(parts)
                claim_state(self.directory, self.stamp, kind, kind)  # a fresh one, stamped
            else:
                self.parts = parts
        return int(PART.fullmatch(self.parts[-1].name)[2]) if self.parts else 0

    def save(self, start: int, frame: pl.DataFrame) -> None:
        """Save the rows of the items from position `start` on (one group), atomically."""
        end = start + frame.height
        if frame[self.key].to_list() != self.ids[start:end]:
            raise ValueError(f"the group at {start} is not the rows of items {start} to {end}")
        path = self.directory / f"rows-{start:09d}-{end:09d}.parquet"
        write_parquet(frame, path)
        self.parts.append(path)

    def complete(self, output: str | Path) -> pl.DataFrame:
        """Write the result from every group, in the items' order, in place of the groups, and
        link it to `output`; returns it."""
        done = self.directory / COMPLETE
        if done.exists():  # completed by an earlier attempt
            frame = pl.read_parquet(done)
        else:
            frame = assemble([pl.read_parquet(p) for p in self.parts], self.schema)
            if frame[self.key].to_list() != self.ids:
                raise ValueError(
                    f"{self.directory}: the saved groups hold {frame.height} of "
                    f"{len(self.ids)} items"
                )
            write_parquet(frame, done)
            for part in self.parts:
                part.unlink()
        link_file(done, output)
        return frame


def start_progress(
    task: str, subject: str, total: int, unit: str, done: int, finished: str
) -> Progress:
    """The progress of `task` (e.g. "labelling") on `subject` (e.g. "train/P17"), which found
    `done` of `total` units already `finished` (e.g. "labelled"), and its first line:
    "resuming: 120 of 400 questions of train/P17 already labelled"."""
    if done:
        log.info("resuming: %d of %d %s of %s already %s", done, total, unit, subject, finished)
    else:
        log.info("%s %s: %d %s, none %s before this attempt", task, subject, total, unit, finished)
    return Progress(f"{task} {subject}", total, unit, done=done)


def shared_by_main(ranks, value):
    """`value` as the main rank has it, on every rank of a distributed job (a collective)."""
    if not ranks.initialised:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
