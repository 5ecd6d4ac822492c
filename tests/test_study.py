"""The study's vocabulary (eqtools.study), the typed settings (eqtools.settings) and the code
hashes derived from the import graph (eqtools.codehash)."""

import subprocess
import sys

import pytest
import yaml

from eqtools import study
from eqtools.codehash import BOOKKEEPING, code_hash, code_modules, imported_modules, module_files
from eqtools.config import load_schema, validate_config
from eqtools.settings import RECIPE_SCHEDULING, Finetune, Recipe, Study, Table
from helpers import ROOT

NAMES = [
    "highly_known", "maybe_known", "weakly_known", "unknown", "natural",
    "unknown_0", "unknown_25", "unknown_50", "unknown_100", "known_only_50", "idk_50", "idk_25",
]  # fmt: skip


def validated(path="config/config.yaml") -> dict:
    config = yaml.safe_load((ROOT / path).read_text())
    return validate_config(config, load_schema(ROOT / "workflow/schemas/config.schema.yaml"))


# ---------------------------------------------------------------------------------- vocabulary


def test_vocabulary_module_imports_nothing_but_the_standard_library():
    """The Snakefile imports eqtools.study and eqtools.settings: no polars, numpy or torch."""
    code = (
        "import sys; sys.path.insert(0, 'workflow/scripts');"
        "import eqtools.study, eqtools.settings, eqtools.codehash, eqtools.config;"
        "heavy = {'polars', 'numpy', 'torch', 'transformers'} & set(sys.modules); print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "set()", out.stderr


def test_mixture_selections_of_the_tables_and_figures():
    assert study.table2_mixtures(NAMES) == list(study.TABLE2_MIXTURES)
    assert "idk_50" not in study.table1_mixtures(NAMES) and "unknown_50" in study.table1_mixtures(
        NAMES
    )
    assert study.table8_mixtures(NAMES) == ["unknown_50", "idk_50", "unknown_25", "idk_25"]
    assert study.fig1_mixture(NAMES) == "unknown_50"
    assert study.fig1_mixture(["unknown_0", "unknown_100"]) is None
    assert study.fig1_mixture(["unknown_25", "unknown_75"]) == "unknown_25"  # tie: the smaller
    assert study.fig3a_mixtures(NAMES) == ["unknown_0", "unknown_25", "unknown_50", "unknown_100"]
    assert study.fig3b_mixtures(NAMES) == {
        "unknown": ["unknown_50"],
        "known_only": ["known_only_50"],
    }
    assert study.fig4_mixtures(NAMES) == [
        "natural",
        "highly_known",
        "maybe_known",
        "weakly_known",
        "unknown",
    ]
    assert study.available_figures(["natural"], "natural") == ["fig4", "fig5"]
    assert study.available_figures(NAMES, "natural") == ["fig1", "fig3a", "fig3b", "fig4", "fig5"]


def test_table8_pairs_need_both_variants():
    assert study.table8_mixtures(["unknown_25", "idk_25", "idk_50"]) == ["unknown_25", "idk_25"]


def test_names_and_paths():
    assert study.variant_name("unknown_50") == "D (50% Unknown)"
    assert study.variant_name("natural") == "D_Natural"
    assert study.run_name("lora", study.seed_suffix(3)) == "lora-seed3"
    assert study.run_name("lora", study.seed_suffix(None)) == "lora"
    assert study.path(
        "eval", model="m", run="lora", mixture="natural", stop="early_stop", split="test"
    ) == ("results/eval/m/lora/natural/early_stop/test.parquet")
    assert (
        study.input_name("eval", "natural", "early_stop", "test") == "eval:natural:early_stop:test"
    )


def test_mixture_grammar_matches_the_config_schema():
    """The schema's pattern for mixtures.names and parse_mixture accept the same names."""
    import re

    schema = load_schema(ROOT / "workflow/schemas/config.schema.yaml")
    pattern = schema["properties"]["mixtures"]["properties"]["names"]["items"]["pattern"]
    for name in NAMES + ["unknown_101", "idk_05", "known_only", "natural_1", "unknown_-1"]:
        try:
            study.parse_mixture(name)
            parsed = True
        except study.MixtureError:
            parsed = False
        assert parsed == bool(re.fullmatch(pattern, name)), name


# ---------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("path", ["config/config.yaml", "tests/data/config.tiny.yaml"])
def test_settings_round_trip_through_their_param(path):
    s = Study.from_config(validated(path))
    model, recipe = next(iter(s.models)), s.finetune_recipes[0]
    objects = [
        s.data, s.slick, s.slick.exemplars(), s.mixtures, s.labelling(model),
        s.ptrue_scoring(model),
        s.finetuning(recipe, ""), s.finetuning(recipe, "-seed7"), s.table("table2", "test"),
        s.table("table1"), s.figure("fig4", "t"),
    ]  # fmt: skip
    for obj in objects:
        assert type(obj).from_param(obj.param()) == obj
        assert obj.param() == type(obj).from_param(obj.param()).param()


def test_no_scheduling_key_reaches_a_param():
    config = validated()
    s = Study.from_config(config)
    for recipe in config["recipes"].values():
        assert set(RECIPE_SCHEDULING) <= set(recipe)
    param = s.finetuning("lora", "").param()
    for key in (*RECIPE_SCHEDULING, "threads", "max_batch_rows", "backend", "gpu", "partition"):
        assert f'"{key}"' not in param
    assert Finetune.from_param(param).recipe.seed == config["recipes"]["lora"]["seed"]
    assert s.finetuning("lora", "-seed4").recipe.seed == 4


def test_settings_reject_unknown_keys_by_name():
    with pytest.raises(ValueError, match="Table: unknown setting.*colour"):
        Table.from_dict({"table": "table1", "colour": "red"})
    with pytest.raises(ValueError, match="Recipe: unknown setting.*mem_mb"):
        Recipe.from_dict(validated()["recipes"]["lora"])


# ---------------------------------------------------------------------------------- code hashes


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_code_modules_follow_every_import_form_and_skip_bookkeeping(tmp_path):
    pkg = tmp_path / "eqtools"
    write(pkg / "a.py", "from eqtools.b import x\n")
    write(pkg / "b.py", "x = 1\ndef f():\n    import eqtools.c  # lazy: still a dependency\n")
    write(pkg / "c.py", "from eqtools import io, d\n")
    write(pkg / "d.py", "")
    write(pkg / "io.py", "")
    script = write(tmp_path / "s.py", "import json\nfrom eqtools.a import y\n")
    assert imported_modules(pkg / "c.py", pkg) == {"io", "d"}
    assert code_modules(script, pkg) == ["a", "b", "c", "d"]
    assert "io" in BOOKKEEPING


def test_a_subpackage_is_one_module_reached_by_every_import_form(tmp_path):
    pkg = tmp_path / "eqtools"
    write(pkg / "sub/__init__.py", "from eqtools.sub.inner import x\n")
    write(pkg / "sub/inner.py", "from .deep.leaf import y\nfrom .. import em\nx = 1\n")
    write(pkg / "sub/deep/leaf.py", "from . import z\ny = 1\n")
    write(pkg / "em.py", "")
    write(pkg / "other.py", "")
    forms = [
        "from eqtools.sub import x\n",
        "from eqtools.sub.inner import x\n",
        "import eqtools.sub.inner\n",
        "from eqtools import sub\n",
    ]
    scripts = [write(tmp_path / f"s{i}.py", form) for i, form in enumerate(forms)]
    for script in scripts:
        assert imported_modules(script, pkg) == {"sub"}, script.read_text()
        assert code_modules(script, pkg) == ["em", "sub"]  # em: through a relative import
    assert imported_modules(pkg / "sub/deep/leaf.py", pkg) == {"sub"}
    assert [f.relative_to(pkg).as_posix() for f in module_files("sub", pkg)] == [
        "sub/__init__.py", "sub/deep/leaf.py", "sub/inner.py",
    ]  # fmt: skip
    bystander = write(tmp_path / "s9.py", "from eqtools import other\n")
    before = {s: code_hash(s, pkg) for s in [*scripts, bystander]}
    write(pkg / "sub/deep/leaf.py", "from . import z\ny = 2\n")  # any file of the subpackage
    after = {s: code_hash(s, pkg) for s in [*scripts, bystander]}
    assert [s for s in before if before[s] != after[s]] == scripts
    assert len(set(after.values()) - {after[bystander]}) == 1


def test_adding_an_import_puts_the_module_into_every_reaching_scripts_hash(tmp_path):
    pkg = tmp_path / "eqtools"
    write(pkg / "shared.py", "")
    write(pkg / "other.py", "")
    users = [write(tmp_path / f"s{i}.py", "from eqtools import shared\n") for i in range(2)]
    bystander = write(tmp_path / "s9.py", "from eqtools import other\n")
    write(pkg / "shared.py", "from eqtools import new\n")
    write(pkg / "new.py", "A = 1\n")
    before = {s: code_hash(s, pkg) for s in [*users, bystander]}
    write(pkg / "new.py", "A = 2\n")
    after = {s: code_hash(s, pkg) for s in [*users, bystander]}
    assert [s for s in before if before[s] != after[s]] == users


def test_every_rule_hashes_what_its_script_reaches():
    """Snakemake parses the workflow; every script rule's code param is its script's hash."""
    from helpers import workflow_rules

    rules = [r for r in workflow_rules().values() if r.script and "code" in r.params]
    assert len(rules) >= 19
    for rule in rules:
        assert rule.params["code"] == code_hash(rule.script), rule.name
    modules = code_modules(ROOT / "workflow/scripts/make_tables.py")
    assert {"analysis", "study", "settings", "em"} <= set(modules) and "provenance" not in modules


@pytest.mark.workflow
def test_a_code_param_naming_another_script_stops_the_workflow(tmp_path):
    import shutil

    from helpers import snakemake, tiny_config, write_config

    shutil.copy2(ROOT / "Snakefile", tmp_path / "Snakefile")
    for d in ("workflow", "envs"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    rules = tmp_path / "workflow/rules/labels.smk"
    text = rules.read_text()
    rules.write_text(text.replace('script_code("merge_labels")', 'script_code("build_mixture")'))
    cfg = write_config(tmp_path, tiny_config())
    proc = snakemake(tmp_path, "-n", configfile=cfg, snakefile=tmp_path / "Snakefile", check=False)
    assert proc.returncode != 0
    assert "params.code of rule merge_labels must be script_code('merge_labels')" in (
        proc.stdout + proc.stderr
    )
