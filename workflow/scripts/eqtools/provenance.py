"""The one provenance writer: `<output>.prov.json` beside every artefact.

A sidecar records what made the file: rule, wildcards, the rule's config slice, every input with
its sha256 (size and mtime for files over 100 MB) and the path of the input's own sidecar (so
lineage can be walked back to the dataset archive), the git commit and dirtiness of the code,
package versions, device and SLURM job id. Everything is read at run time, never passed as a
param, so that it does not trigger reruns.
"""

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from eqtools.io import sha256_file, write_text

SUFFIX = ".prov.json"
LARGE_FILE = 100 * 1024 * 1024
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "polars",
    "snakemake",
    "numpy",
    "matplotlib",
    "scipy",
    "statsmodels",
)


def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}{SUFFIX}")


def describe_file(path: str | Path) -> dict:
    """Identity of one input: sha256, or size+mtime for big files; and its own sidecar."""
    path = Path(path)
    entry: dict = {"path": str(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        entry["files"] = [describe_file(p) for p in files]
    else:
        st = path.stat()
        if st.st_size > LARGE_FILE:
            entry.update(sha256=None, size=st.st_size, mtime=st.st_mtime)
        else:
            entry["sha256"] = sha256_file(path)
    prov = sidecar_path(path)
    entry["provenance"] = str(prov) if prov.exists() else None
    return entry


def git_state(directory: str | Path) -> dict:
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(directory), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description() -> dict:
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    torch = sys.modules.get("torch")  # only if the job used torch; importing it costs seconds
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "host": platform.node(),
        "cpu": cpu,
        "gpu": gpu,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def build_record(
    rule: str, wildcards: dict, config: object, inputs: list, code_dir: str | Path
) -> dict:
    return {
        "rule": rule,
        "wildcards": dict(wildcards),
        "config": config,
        "inputs": [describe_file(p) for p in inputs],
        "git": git_state(code_dir),
        "versions": package_versions(),
        "device": device_description(),
    }


# Fields that differ between reruns of the same job on the same inputs and code: where it ran,
# and the mtime of big inputs (identified by size+mtime instead of a hash).
VOLATILE = ("device", "record_id")


def _stable(entry: dict) -> dict:
    out = {k: v for k, v in entry.items() if k != "mtime"}
    if "files" in out:
        out["files"] = [_stable(f) for f in out["files"]]
    return out


def record_id(record: dict) -> str:
    """Short id of a provenance record: the first 12 hex of the sha256 of its canonical JSON
    without the volatile fields. Equal for reruns of a job with the same inputs, config and code
    (same commit), so it can be embedded in an output without breaking byte-identical reruns."""
    stable = {k: v for k, v in record.items() if k not in VOLATILE}
    stable["inputs"] = [_stable(e) for e in record.get("inputs", [])]
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def job_record(smk, config: object = None, inputs=None) -> dict:
    """The provenance record of the running Snakemake job `smk` (see write_provenance)."""
    if config is None and hasattr(smk.params, "spec"):
        config = json.loads(smk.params.spec)
    return build_record(
        rule=smk.rule,
        wildcards={k: v for k, v in smk.wildcards.items()},
        config=config,
        inputs=[str(p) for p in (smk.input if inputs is None else inputs)],
        code_dir=smk.scriptdir,
    )


def write_record(record: dict, outputs) -> None:
    """Write `record` (with its record_id) as the sidecar of each of `outputs`."""
    record = record | {"record_id": record_id(record)}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    for out in [outputs] if isinstance(outputs, (str, Path)) else outputs:
        write_text(text, sidecar_path(out))


def write_provenance(outputs, smk, config: object = None, inputs=None) -> None:
    """Write a sidecar for each of `outputs` of the running Snakemake job `smk`.

    `config` defaults to the rule's `params.spec` (its canonical config slice). For outputs that
    embed their own provenance id (figures), build the record first with `job_record`, embed
    `record_id(record)`, then call `write_record`."""
    write_record(job_record(smk, config, inputs), outputs)


def read_provenance(path: str | Path) -> dict:
    with open(sidecar_path(path)) as f:
        return json.load(f)
