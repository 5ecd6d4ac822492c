"""envs/*.yaml (for `--sdm conda` on a cluster) use the same pins as the venv (pyproject.toml),
every rule has one, and each rule's env holds what the rule's script imports."""

import importlib.metadata
import re
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from eqtools.codehash import module_files, reached_modules
from helpers import ROOT, imports, workflow_rules

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINS = {}
for spec in PYPROJECT["project"]["dependencies"] + PYPROJECT["tool"]["slick-workflow"]["no-deps"]:
    name, version = spec.split("==")
    PINS[name.lower()] = version
ENV_FILES = sorted((ROOT / "envs").glob("*.yaml"))


def test_every_direct_dependency_is_pinned_exactly():
    for spec in (
        PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]
    ):
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", spec), spec


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_match_pyproject(env_file):
    env = yaml.safe_load(env_file.read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pip, env_file
    for line in pip:
        name, version = line.split("==")
        assert name.lower() in PINS, f"{env_file.name}: {name} is not pinned in pyproject.toml"
        assert version == PINS[name.lower()], (
            f"{env_file.name}: {name}=={version}, pyproject has {PINS[name.lower()]}"
        )


def test_every_rule_has_an_existing_env_and_every_env_is_used():
    rules = workflow_rules()
    assert len(rules) >= 10
    missing = [r.name for r in rules.values() if r.script and r.conda is None]
    assert not missing, f"rules without conda: {missing}"
    used = {r.conda for r in rules.values() if r.conda}
    assert used == {p.name for p in ENV_FILES}


def env_distributions(env_file) -> set[str]:
    """The distributions an env ends up with: its pip pins (and the post-deploy no-deps
    packages) and what they require, resolved in this venv's metadata."""
    pip = next(
        d["pip"]
        for d in yaml.safe_load(env_file.read_text())["dependencies"]
        if isinstance(d, dict)
    )
    names = [line.split("==")[0] for line in pip]
    post_deploy = env_file.with_suffix(".post-deploy.sh")
    if post_deploy.exists():
        names += re.findall(r"--no-deps ([\w.-]+)==", post_deploy.read_text())
    seen = set()
    while names:
        name = names.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        if name in NO_DEPS:
            continue
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                names.append(req.name)
    return seen


NO_DEPS = {spec.split("==")[0] for spec in PYPROJECT["tool"]["slick-workflow"]["no-deps"]}
# eqtools.slick imports eqtools.engine (torch) only inside the labelling function, which
# select_exemplars (data env, no torch) never calls.
NOT_LOADED = {"select_exemplars": {"engine"}}


@pytest.mark.parametrize("rule", sorted(r for r, info in workflow_rules().items() if info.script))
def test_rule_env_provides_what_its_script_imports(rule):
    info = workflow_rules()[rule]
    modules = reached_modules(info.script) - NOT_LOADED.get(rule, set())
    eqtools = ROOT / "workflow/scripts/eqtools"
    names = imports(info.script).union(
        *(imports(f) for m in modules for f in module_files(m, eqtools))
    )
    third_party = {
        n for n in names if not n.startswith("eqtools") and n not in sys.stdlib_module_names
    }
    provided = env_distributions(ROOT / "envs" / info.conda)
    dists = importlib.metadata.packages_distributions()
    for module in sorted(third_party):
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert owners & provided, (
            f"rule {rule} imports {module} ({owners}); envs/{info.conda} lacks it"
        )


def test_post_deploy_installs_the_pinned_no_deps_packages():
    script = (ROOT / "envs/model.post-deploy.sh").read_text()
    for spec in PYPROJECT["tool"]["slick-workflow"]["no-deps"]:
        assert f"pip install --no-deps {spec}" in script
