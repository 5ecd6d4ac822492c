"""Which job a resumable state belongs to: a stamp of the job's tracked settings and the
checksums of its inputs, written into the state directory when the job starts it. A state is
resumed only by a job whose stamp is equal; any other state (other settings, other inputs, or a
state of a version without a stamp) is removed, with one log line naming what differs.
Scheduling settings (processes, GPUs, runtime, memory, batch rows) are not in the stamp, so a
state saved at 4 processes resumes at 2.

Bookkeeping like eqtools.io: it decides whether earlier work is reused, never what a result is
(a resumed run ends with the files of an uninterrupted one, tested), so it is left out of the
code hashes."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

from eqtools.io import sha256_file, write_text

log = logging.getLogger("workflow")

STAMP = "stamp.json"
# the small files that identify a materialised model (resources/models/{model}/): its registry
# entry records the sha256 of every weight file it links, and hashing 140 GB of weights on every
# start of a job would cost minutes
MODEL_IDENTITY = ("registry_entry.json", "config.json")


def input_checksum(path: str | Path) -> str:
    """The sha256 of a file; of a directory, over its identity files (a materialised model) or
    else over every file's relative path and sha256."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    files = [path / name for name in MODEL_IDENTITY if (path / name).is_file()]
    for f in files or sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def job_stamp(params: dict[str, str], inputs: dict[str, str | Path]) -> dict:
    """The stamp of a job: its tracked params (the rule's spec and code hash) as given, and the
    checksum of each named input."""
    return {
        "params": dict(sorted(params.items())),
        "inputs": {name: input_checksum(p) for name, p in sorted(inputs.items())},
    }


def stamp_differences(saved: dict | None, current: dict) -> list[str]:
    """What differs between two stamps, as dotted keys ("params.spec", "inputs.mixture");
    ["no stamp"] for a state without one."""
    if saved is None:
        return ["no stamp"]
    keys = sorted(
        {(s, k) for s in ("params", "inputs") for k in {**saved.get(s, {}), **current.get(s, {})}}
    )
    return [f"{s}.{k}" for s, k in keys if saved.get(s, {}).get(k) != current.get(s, {}).get(k)]


def read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / STAMP).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def claim_state(folder: str | Path, stamp: dict, what: str) -> bool:
    """Make `folder` the state directory of the job stamped `stamp`. Returns True when it holds
    that job's earlier state (resume); else removes whatever is there (one log line says what
    differed), writes the stamp into the empty folder and returns False. A single process
    calls it (rank 0 of a distributed job, before the other ranks look)."""
    folder = Path(folder)
    try:
        has_content = folder.is_dir() and any(folder.iterdir())
    except OSError as e:
        raise OSError(f"{what}: cannot read its state directory {folder}: {e}") from e
    if has_content:
        differences = stamp_differences(read_stamp(folder), stamp)
        if not differences:
            return True
        log.warning(
            "%s: discarding the saved state in %s, written by another job (differs in: %s)",
            what,
            folder,
            ", ".join(differences),
        )
        shutil.rmtree(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n", folder / STAMP)
    except OSError as e:
        raise OSError(f"{what}: cannot write its state directory {folder}: {e}") from e
    return False
