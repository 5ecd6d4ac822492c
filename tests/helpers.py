"""Shared test helpers: the tiny config and running snakemake in a subprocess."""

import copy
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
FIXTURE_ZIP = DATA / "entity_questions_fixture.zip"


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_config(**overrides) -> dict:
    config = yaml.safe_load((DATA / "config.tiny.yaml").read_text())
    config["dataset"]["source"] = str(FIXTURE_ZIP)
    return deep_merge(config, overrides)


def write_config(workdir: Path, config: dict, name: str = "config.yaml") -> Path:
    path = Path(workdir) / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, check: bool = True, timeout: int = 900):
    """Run the workflow's Snakefile in `workdir` with no profile; returns the CompletedProcess."""
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(ROOT / "Snakefile"),
        "--profile", "none", "--workflow-profile", "none",
        "--cores", "2",
    ]
    cmd += list(args)
    if configfile is not None:  # last: --configfile takes several values
        cmd += ["--configfile", str(configfile)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
