"""envs/*.yaml (for `--sdm conda` on a cluster) use the same pins as the venv (pyproject.toml)."""

import re
import tomllib

import pytest
import yaml
from helpers import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINS = {}
for spec in PYPROJECT["project"]["dependencies"] + PYPROJECT["tool"]["slick-workflow"]["no-deps"]:
    name, version = spec.split("==")
    PINS[name.lower()] = version
ENV_FILES = sorted((ROOT / "envs").glob("*.yaml"))


def test_every_direct_dependency_is_pinned_exactly():
    for spec in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]:
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
        assert version == PINS[name.lower()], f"{env_file.name}: {name}=={version}, pyproject has {PINS[name.lower()]}"


def test_every_rule_env_exists():
    referenced = set()
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        referenced |= set(re.findall(r'"\.\./\.\./envs/([\w.-]+\.yaml)"', smk.read_text()))
    assert referenced
    assert referenced <= {p.name for p in ENV_FILES}


def test_post_deploy_installs_the_pinned_no_deps_packages():
    script = (ROOT / "envs/model.post-deploy.sh").read_text()
    for spec in PYPROJECT["tool"]["slick-workflow"]["no-deps"]:
        assert f"pip install --no-deps {spec}" in script
