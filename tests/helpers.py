"""Shared test helpers: the tiny config and running snakemake in a subprocess."""

import ast
import copy
import functools
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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


def snakemake_command(
    *args: str, configfile: Path | None = None, snakefile: Path | None = None
) -> list[str]:
    """The command line of `snakemake()`; `snakefile` defaults to the repository's Snakefile."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(snakefile or ROOT / "Snakefile"),
        "--profile",
        "none",
        "--workflow-profile",
        "none",
        "--cores",
        "2",
    ]
    cmd += list(args)
    if configfile is not None:  # last: --configfile takes several values
        cmd += ["--configfile", str(configfile)]
    return cmd


def snakemake(
    workdir: Path,
    *args: str,
    configfile: Path | None = None,
    snakefile: Path | None = None,
    check: bool = True,
    timeout: int = 900,
):
    """Run the workflow's Snakefile (or `snakefile`, e.g. a copy of the workflow) in `workdir`
    with no profile; returns the CompletedProcess."""
    cmd = snakemake_command(*args, configfile=configfile, snakefile=snakefile)
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# The workflow's rules as Snakemake parsed them: script, conda env and params.


@dataclass
class RuleInfo:
    name: str
    script: Path | None
    conda: str | None  # file name under envs/
    params: dict
    resources: dict  # as declared: values or the functions that compute them
    local: bool  # a localrule (runs on the submitting node)


@functools.cache
def workflow_rules(*configfiles: Path) -> dict[str, RuleInfo]:
    """Every rule of the workflow (config/config.yaml, then `configfiles` merged over it), from
    Snakemake's own parse of it."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    rules = {}
    with tempfile.TemporaryDirectory() as work, SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[ROOT / "config/config.yaml", *configfiles]),
            storage_settings=StorageSettings(),
            snakefile=ROOT / "Snakefile",
            workdir=Path(work),
        )._workflow  # the parsed workflow; the API has no public accessor for its rules
        for rule in workflow.rules:
            base = Path(rule.snakefile).parent
            rules[rule.name] = RuleInfo(
                rule.name,
                (base / rule.script).resolve() if rule.script else None,
                Path(rule.conda_env).name if rule.conda_env else None,
                dict(rule.params.items()),
                # Snakemake 9 wraps each declared value (or function) in a Resource
                {k: getattr(v, "_value", v) for k, v in rule.resources.items()},
                rule.name in workflow._localrules,  # is_local() is True for every rule here
            )
    return rules


def imports(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
    return found


# Readers of what the workflow writes, for the tests only.


def read_png_text(path: str | Path) -> dict[str, str]:
    """The tEXt/iTXt entries of a PNG (the metadata eqtools.figures.save_figure writes)."""
    from PIL import Image

    with Image.open(path) as img:
        return dict(img.text)


def read_svg_identifier(path: str | Path) -> str | None:
    """The Dublin Core identifier of an SVG written by eqtools.figures.save_figure."""
    m = re.search(r"<dc:identifier>([^<]*)</dc:identifier>", Path(path).read_text())
    return m.group(1) if m else None


def load_checkpoint(model_dir: str, checkpoint: str | Path, method: str, device: str = "cpu"):
    """A saved early_stop or convergence checkpoint, ready for generation: (model, tokenizer)."""
    from eqtools.models import load

    model, tokenizer, _ = load(model_dir, device=device)
    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    return model.to(device).eval(), tokenizer
