"""Which job a resumable state belongs to: a stamp of the job's tracked settings and the
checksums of its inputs, written into the state directory when the job starts it. A state is
resumed only by a job whose stamp is equal; any other state (other settings, other inputs, or a
state of a version without a stamp) is removed, with one log line naming what differs.
Scheduling settings (processes, GPUs, runtime, memory, batch rows) are not in the stamp, so a
state saved at 4 processes resumes at 2.

Bookkeeping like eqtools.io: it decides whether earlier work is reused, never what a result is
(a resumed run ends with the files of an uninterrupted one, tested), so it is left out of the
code hashes."""

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

from eqtools.io import sha256_file, write_text

log = logging.getLogger("workflow")

STAMP = "stamp.json"


def input_digests(files: Mapping[str, str | Path]) -> dict[str, str | None]:
    """{name: sha256} of input files (None for one that does not exist)."""
    return {
        name: sha256_file(path) if Path(path).is_file() else None
        for name, path in sorted(files.items())
    }


def model_files(model_dir: str | Path) -> dict[str, Path]:
    """The files that identify a materialised model without reading its weights (hashing 140 GB
    on every start of a job would cost minutes): the registry entry (source and sha256 of every
    linked file) and the architecture's config."""
    model_dir = Path(model_dir)
    return {f"model/{name}": model_dir / name for name in ("registry_entry.json", "config.json")}


def job_stamp(spec: str, code: str, inputs: Mapping[str, str | Path]) -> dict:
    """The stamp of a job: its tracked settings (the rule's params.spec, a canonical JSON text,
    and params.code) and the sha256 of its `inputs`."""
    return {"spec": json.loads(spec), "code": code, "inputs": input_digests(inputs)}


def stamp_differences(saved, current, key: str = "") -> list[str]:
    """What differs between two stamps, as dotted keys with both values (e.g.
    `spec.slick.seed: 7 -> 8`); a digest that differs is named without its values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for name in sorted(set(saved) | set(current), key=str):
            where = f"{key}.{name}" if key else str(name)
            if name not in saved:
                out.append(f"{where}: new")
            elif name not in current:
                out.append(f"{where}: gone")
            else:
                out += stamp_differences(saved[name], current[name], where)
        return out
    if saved == current:
        return []
    if key.startswith("inputs."):
        return [f"{key}: other content"]
    return [f"{key}: {json.dumps(saved)} -> {json.dumps(current)}"]


def read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / STAMP).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def claim_state(folder: str | Path, stamp: dict, what: str, kind: str = "saved state") -> bool:
    """Make `folder` the state directory of the job stamped `stamp` (`what`, named in errors).
    Returns True when it holds that job's earlier state (resume); else removes whatever is there
    (one log line says what differed, naming the state as `kind`), writes the stamp into the
    empty folder and returns False. A single process calls it (rank 0 of a distributed job,
    before the other ranks look)."""
    folder = Path(folder)
    try:
        has_content = folder.is_dir() and any(folder.iterdir())
    except OSError as e:
        raise OSError(f"{what}: cannot read its state directory {folder}: {e}") from e
    if has_content:
        saved = read_stamp(folder)
        differences = stamp_differences(saved, stamp) if saved else [f"no {STAMP}"]
        if not differences:
            return True
        log.warning(
            "discarding the %s in %s, written by another job: %s",
            kind,
            folder,
            "; ".join(differences),
        )
        shutil.rmtree(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n", folder / STAMP)
    except OSError as e:
        raise OSError(f"{what}: cannot write its state directory {folder}: {e}") from e
    return False
