"""File output that never leaves a partial file behind, and small readers."""

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def part_path(path: Path) -> Path:
    """Where `atomic_path(path, directory=True)` builds the directory (the other ranks of a
    distributed job write into it too)."""
    return path.with_name(f".{path.name}.part")


def old_path(path: Path) -> Path:
    """Where `atomic_path(path, directory=True)` moves the complete old copy aside while it swaps
    the new one in."""
    return path.with_name(f".{path.name}.old")


def finish_swap(path: str | Path) -> None:
    """Complete a directory swap of `atomic_path` that a kill interrupted between its two
    renames: the old copy moved aside and the new, complete one not yet in place. Without this
    `path` would look absent, and its state lost, although both copies are whole on disk. A
    reader of a directory written by `atomic_path` calls it first (atomic_path does too)."""
    path = Path(path)
    old, new = old_path(path), part_path(path)
    if not path.exists() and old.is_dir() and new.is_dir():
        # the old copy is moved aside only once the new one is complete
        new.rename(path)
        log.info("%s: completed a swap that a kill interrupted", path)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, directory: bool = False):
    """Yield a temporary path next to `path`; move it into place only if the block succeeds,
    and remove it if the block fails. The one atomic-write helper of the workflow.

    A file is renamed over `path` in one step. A directory (`directory=True`: the block fills
    the yielded, empty directory) is built at `.<name>.part` (a leftover of a killed job is
    cleared first) and swapped in: a complete old copy is moved aside, the new one renamed into
    place, the old one removed. A reader never sees a half-written file or directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        finish_swap(path)
        tmp = part_path(path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            old = old_path(path)
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def link_file(source: str | Path, target: str | Path) -> bool:
    """`target` as a hard link to the file `source` (no copy of the data), or a copy where they
    are on different filesystems, atomically. Returns whether it is a link."""
    with atomic_path(target) as tmp:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
            return True
        except OSError:
            shutil.copy2(source, tmp)
            return False


def write_parquet(frame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression="zstd", statistics=True)


def write_csv(frame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.write_csv(tmp)


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _Tee:
    """A text stream that writes to several streams (the rule's log and the console)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False


def attempt_logs(log_path: str | Path) -> Path:
    """The folder of a rule log's per-attempt copies: `<log>.attempts/` beside it. Snakemake
    deletes a job's declared log before it runs the job again, so a failed attempt's traceback
    lives on there (`1.log`, `2.log`, ...)."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.name + ".attempts")


def setup_logging(log_path: str | Path | None, rank: int | None = None) -> logging.Logger:
    """Send logging and stderr (tracebacks, tqdm) to the rule's log file and to the console.
    The file is opened for appending (after emptying it), so that the processes a job starts
    (torchrun and its ranks) can add to it. It is a hard link to this attempt's copy in
    `attempt_logs(log_path)`, which outlives Snakemake's deletion of the log before a rerun; the
    first line names the earlier attempts' copies. A rank of a distributed run (`rank`) logs to
    stderr, which torchrun passes on; ranks other than 0 log warnings and errors only."""
    # tqdm's bars (transformers' "Loading weights") redraw with carriage returns: unreadable in
    # a log file; progress is logged as lines (eqtools.progress)
    os.environ.setdefault("TQDM_DISABLE", "1")
    earlier: list[Path] = []
    if log_path:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        folder = attempt_logs(log_path)
        folder.mkdir(exist_ok=True)
        earlier = sorted(folder.glob("*.log"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
        attempt = folder / f"{len(earlier) + 1}.log"
        attempt.write_text("")
        try:
            os.link(attempt, log_path)
        except OSError:  # a filesystem without hard links: the log alone
            log_path.write_text("")
        log_file = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the job
        sys.stderr = _Tee(log_file, sys.__stderr__)
    where = "" if rank is None else f"[rank {rank}] "
    logging.basicConfig(
        level=logging.INFO if not rank else logging.WARNING,
        format=f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(sys.stderr)],
        force=True,
    )
    logger = logging.getLogger("workflow")
    if earlier:
        logger.info(
            "attempt %d of this job; the earlier attempts' logs: %s",
            len(earlier) + 1,
            ", ".join(str(p) for p in earlier),
        )
    return logger
