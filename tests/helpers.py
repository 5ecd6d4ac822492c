"""Shared test helpers: the tiny config and running snakemake in a subprocess."""

import ast
import copy
import re
import subprocess
import sys
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


def snakemake_command(*args: str, configfile: Path | None = None, snakefile: Path | None = None) -> list[str]:
    """The command line of `snakemake()`; `snakefile` defaults to the repository's Snakefile."""
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(snakefile or ROOT / "Snakefile"),
        "--profile", "none", "--workflow-profile", "none",
        "--cores", "2",
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


# Reading the rule files: what each rule's code hash covers, its script and its conda env.

RULE_FILES = sorted((ROOT / "workflow/rules").glob("*.smk"))


@dataclass
class RuleInfo:
    name: str
    text: str  # the rule's block in its .smk file
    code: set[str]  # eqtools modules of its `code=code_hash(...)` param
    script: Path | None
    conda: str | None  # file name under envs/


def workflow_rules() -> dict[str, RuleInfo]:
    """Every rule of workflow/rules/*.smk. The code param may name a module-level constant
    (`TABLE_CODE = code_hash(...)`)."""
    rules, texts = {}, {smk: smk.read_text() for smk in RULE_FILES}
    constants = {
        m.group(1): set(re.findall(r'"(\w+)"', m.group(2)))
        for text in texts.values()
        for m in re.finditer(r"^(\w+) = code_hash\(([^)]*)\)", text, re.M)
    }
    for smk, text in texts.items():
        for block in re.split(r"\n(?=rule \w+:)", text):
            if not (name := re.match(r"rule (\w+):", block)):
                continue
            code = set()
            if m := re.search(r"\bcode=code_hash\(([^)]*)\)", block):
                code = set(re.findall(r'"(\w+)"', m.group(1)))
            elif m := re.search(r"\bcode=(\w+),", block):
                code = constants.get(m.group(1), set())
            script = re.search(r'script:\s*\n\s*"([^"]+)"', block)
            conda = re.search(r'conda:\s*\n\s*"\.\./\.\./envs/([\w.-]+)"', block)
            rules[name.group(1)] = RuleInfo(
                name.group(1),
                block,
                code,
                (smk.parent / script.group(1)).resolve() if script else None,
                conda.group(1) if conda else None,
            )
    return rules


def imports(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports, at module level or inside a function;
    `eqtools.<name>` for the workflow's shared package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "eqtools" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            found.add(".".join(parts[:2]) if parts[0] == "eqtools" else parts[0])
    return found


def imported_eqtools(script: Path) -> set[str]:
    """The eqtools modules a rule script imports, directly or through other eqtools modules."""
    eqtools = ROOT / "workflow/scripts/eqtools"
    seen, todo = set(), [m for m in imports(script) if m.startswith("eqtools.")]
    while todo:
        name = todo.pop().removeprefix("eqtools.")
        if name not in seen:
            seen.add(name)
            todo += [m for m in imports(eqtools / f"{name}.py") if m.startswith("eqtools.")]
    return seen
