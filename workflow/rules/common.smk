# Helpers shared by the workflow files (config validation, config slices for params, code hashes).
import hashlib
import json
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from eqtools.config import ConfigError, load_schema, validate_config  # noqa: E402

try:
    validate_config(
        config, load_schema(Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")
    )
except ConfigError as e:
    raise WorkflowError(str(e)) from None

SPLITS = ["train", "dev", "test", "ood_test", "ood_dev"]
# the splits that get SliCK labels (ood_dev is only the exemplar pool of the OOD relations)
LABELLED_SPLITS = ["train", "dev", "test", "ood_test"]


def canon(obj):
    """Canonical JSON of a config slice: equal slices give equal params, so only real changes
    trigger reruns (Snakemake compares params by their repr)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def code_hash(*modules):
    """Content hash of the shared modules (workflow/scripts/eqtools/<name>.py) a script imports.
    Snakemake tracks a script's own file, not what it imports. The bookkeeping modules `io`
    (atomic writes, logging) and `provenance` (the sidecars) are left out on purpose: they do
    not change any result, and hashing them would rerun the whole study for a logging tweak;
    each sidecar records the commit of the code that actually wrote it."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        h.update(name.encode())
        h.update((SCRIPTS / "eqtools" / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def data_spec():
    return canon(
        {
            "relations": config["relations"],
            "templates": config["templates"],
            "subsample": config["subsample"],
        }
    )


def model_spec(wildcards):
    return canon(config["models"][wildcards.model])


def exemplar_spec():
    slick = config["slick"]
    return canon({k: slick[k] for k in ("n_exemplar_sets", "k_shot", "seed")})


def label_spec(wildcards):
    """Everything that changes a label: the SliCK settings and the model entry."""
    return canon({"slick": config["slick"], "model": config["models"][wildcards.model]})


def split_relations(split):
    rels = config["relations"]
    return rels["out_of_distribution"] if split.startswith("ood_") else rels["in_distribution"]


def label_chunks(wildcards):
    return expand(
        "results/labels/{model}/chunks/{split}/{relation}.parquet",
        model=wildcards.model,
        split=wildcards.split,
        relation=split_relations(wildcards.split),
    )


def mixture_spec():
    mix = config["mixtures"]
    return canon({k: mix[k] for k in ("per_relation_size", "relations", "seed")})


def run_seed(wildcards):
    """The training seed of a run: the recipe's own `seed` for the run at `{recipe}/`, N for
    the replicate at `{recipe}-seed{N}/` (finetune.seeds)."""
    if wildcards.seed:
        return int(wildcards.seed.removeprefix("-seed"))
    return config["recipes"][wildcards.recipe]["seed"]


def seed_suffixes():
    """Values of the {seed} wildcard: "" (the recipe's own seed) and "-seed{N}" per extra seed."""
    return [""] + [f"-seed{n}" for n in config["finetune"]["seeds"]]


def finetune_spec(wildcards):
    ft = config["finetune"]
    return canon(
        {
            "recipe": config["recipes"][wildcards.recipe] | {"seed": run_seed(wildcards)},
            "eval_every": ft["eval_every"],
            "device": ft["device"],
        }
    )


def retry_mem_mb(mb):
    """mem_mb that grows with each attempt (the slurm profile retries failed jobs): an
    out-of-memory kill is retried with 2x, then 3x the memory."""

    def mem_mb(wildcards, attempt):
        return mb * attempt

    return mem_mb


def recipe_mem_mb(wildcards, attempt):
    return config["recipes"][wildcards.recipe]["mem_mb"] * attempt


def recipe_runtime(wildcards):
    return config["recipes"][wildcards.recipe]["runtime"]


def finetune_targets():
    ft = dict(
        model=config["models"],
        recipe=config["finetune"]["recipes"],
        seed=seed_suffixes(),
        mixture=config["mixtures"]["names"],
    )
    return expand("results/finetune/{model}/{recipe}{seed}/{mixture}/metrics.jsonl", **ft) + expand(
        "results/eval/{model}/{recipe}{seed}/{mixture}/{stop}/{split}.parquet",
        **ft,
        stop=["early_stop", "convergence"],
        split=["test", "ood_test"],
    )


def all_targets():
    return (
        expand("results/data/{split}.parquet", split=SPLITS)
        + ["results/data/split_sizes.csv"]
        + expand(
            "results/labels/{model}/{split}.parquet", model=config["models"], split=LABELLED_SPLITS
        )
        + expand("results/labels/{model}/category_summary.csv", model=config["models"])
        + finetune_targets()
    )
