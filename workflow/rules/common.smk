# Shared by the workflow files: the validated config as typed settings (eqtools.settings), the
# study's vocabulary (eqtools.study), and each rule script's code hash, derived from its imports.
import functools
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from eqtools import study  # noqa: E402
from eqtools.codehash import code_hash  # noqa: E402
from eqtools.config import ConfigError, load_schema, validate_config  # noqa: E402
from eqtools.models import ModelError, fingerprint, prepare_bytes, resolve_source  # noqa: E402
from eqtools.settings import Study, Summary, canon  # noqa: E402

try:
    validate_config(
        config, load_schema(Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")
    )
except ConfigError as e:
    raise WorkflowError(str(e)) from None

STUDY = Study.from_config(config)
# The models whose study runs (config `run_models`, default every entry; scheduling only): the
# targets of rule all iterate these, never config["models"].
RUN_MODELS = list(config["run_models"])
# a local model path that does not exist stops the run before any job (a hub id is fetched
# later, and a package may be installed by a make target: fetch_model checks them)
for _name in RUN_MODELS:
    try:
        if "path" in config["models"][_name]:
            resolve_source(_name, config["models"][_name])
    except ModelError as e:
        raise WorkflowError(str(e)) from None
SPLITS = list(study.SPLITS)
LABELLED_SPLITS = list(study.LABELLED_SPLITS)


@functools.cache  # several rules share a script, and check_code_params asks again
def script_code(name):
    """The code param for the script workflow/scripts/<name>.py, the content hash of the
    eqtools modules it imports, directly or not (eqtools/codehash.py). Snakemake tracks the
    script file itself, not what it imports."""
    return code_hash(SCRIPTS / f"{name}.py")


def check_code_params(rules):
    """Every script rule passes script_code(<its own script>), since a copy-pasted code param
    that names another script would leave the rule blind to its imports."""
    for r in rules:
        if r.script is None or r.name == "download_entity_questions":
            continue
        expected = script_code(Path(r.script).stem)
        if r.params.get("code") != expected:
            raise WorkflowError(
                f"params.code of rule {r.name} must be script_code({Path(r.script).stem!r})"
            )


def model_spec(wildcards):
    """The registry entry fetch_model stages: where the weights are (path or package)."""
    return STUDY.models[wildcards.model].param()


def tracked_model_spec(wildcards):
    """What of the entry changes prepare_model's output besides the weights: the dtype."""
    return STUDY.models[wildcards.model].tracked().param()


def model_fingerprint(wildcards):
    """The staged files' names, sizes and mtimes, read when Snakemake plans (a few stat calls,
    never the weights): prepare_model reruns when the weights may have changed, and not when
    only the directory holding them moved (eqtools.models.fingerprint)."""
    return canon(fingerprint(wildcards.model, STUDY.models[wildcards.model].to_dict()))


def prepare_mem_mb(wildcards, attempt):
    """Memory of prepare_model, from the size of the model's weight files
    (eqtools.models.prepare_bytes), grown with each attempt up to the cluster's cap."""
    entry = STUDY.models[wildcards.model].to_dict()
    first = 2000 + prepare_bytes(wildcards.model, entry) // 2**20
    what = f"rule prepare_model for model {wildcards.model!r}"
    return attempt_request("mem_mb", first, attempt, what, "the size of the model's weights")


def label_spec(wildcards):
    """Everything that changes a label besides the model's weights (identity.json, an input):
    the SliCK settings and the model's dtype."""
    return STUDY.labelling(wildcards.model).param()


def summary_spec():
    return Summary(LABELLED_SPLITS).param()


def split_relations(split):
    rels = STUDY.data.relations
    return rels.out_of_distribution if split.startswith("ood_") else rels.in_distribution


def label_chunks(wildcards):
    return expand(
        "results/labels/{model}/chunks/{split}/{relation}.parquet",
        model=wildcards.model,
        split=wildcards.split,
        relation=split_relations(wildcards.split),
    )


def labelled_inputs(wildcards):
    """{"labels:<split>": path} of the model's labelled splits, in LABELLED_SPLITS order."""
    return {
        study.input_name("labels", split): study.path("labels", model=wildcards.model, split=split)
        for split in LABELLED_SPLITS
    }


def metrics_inputs(model, run, mixtures):
    """{"metrics:<model>:<mixture>": path}: the per-epoch metrics of the fine-tunes of `run`."""
    return {
        study.input_name("metrics", model, mixture): study.path(
            "metrics", model=model, run=run, mixture=mixture
        )
        for mixture in mixtures
    }


def eval_inputs(model, run, mixtures, stops=study.STOPS, splits=study.TEST_SPLITS):
    """{"eval:<model>:<mixture>:<stop>:<split>": path}: the test predictions of the fine-tunes
    of `run`."""
    return {
        study.input_name("eval", model, mixture, stop, split): study.path(
            "eval", model=model, run=run, mixture=mixture, stop=stop, split=split
        )
        for mixture in mixtures
        for stop in stops
        for split in splits
    }


def seed_suffixes():
    """Values of the {seed} wildcard: "" (the recipe's own seed) and "-seed{N}" per extra seed."""
    return STUDY.seed_suffixes()


def finetune_spec(wildcards):
    return STUDY.finetuning(wildcards.recipe, wildcards.seed).param()


def attempt_number(wildcards, attempt):
    """The attempt of a job as a resource (a script sees no attempt otherwise): scheduling only.
    A long job's first attempt forgets a result that it finished before this invocation of
    Snakemake; only a retry (attempt > 1) publishes it again (eqtools.partial, training)."""
    return attempt


# A job's mem_mb and runtime grow with the attempt (the slurm profile retries failed jobs): an
# out-of-memory kill or a time-out is retried with 2x, then 3x the first request, up to the
# cluster's caps (config `cluster`, scheduling only). A cap below a first request stops the run
# before any job, naming the cap and the setting that asks for more.
RESOURCE_CAPS = {"mem_mb": "max_mem_mb", "runtime": "max_runtime"}


def check_cap(resource, first, what, setting):
    """Raise a WorkflowError if `first`, the first-attempt `resource` of `what` (asked for by
    `setting`), exceeds its cap."""
    key = RESOURCE_CAPS[resource]
    cap = config["cluster"][key]
    if cap is not None and first > cap:
        raise WorkflowError(
            f"config key 'cluster.{key}' is {cap}, below the {resource} that {what} asks for "
            f"on its first attempt ({first}, {setting}): raise the cap to at least {first} if "
            "the cluster allows it, or lower the request"
        )


def attempt_request(resource, first, attempt, what, setting):
    """`first` x `attempt`, at most the cap of `resource` (cluster.max_mem_mb / max_runtime)."""
    check_cap(resource, first, what, setting)
    cap = config["cluster"][RESOURCE_CAPS[resource]]
    return first * attempt if cap is None else min(first * attempt, cap)


def retry_runtime(minutes, rule):
    """runtime (minutes) of `rule`, declared in the rule: grows with each attempt."""
    setting = f"the runtime of rule {rule} in workflow/rules"
    check_cap("runtime", minutes, f"rule {rule}", setting)

    def runtime(wildcards, attempt):
        return attempt_request("runtime", minutes, attempt, f"rule {rule}", setting)

    return runtime


def model_mem_mb(rule):
    """mem_mb of a labelling or P(True) job: the model entry's `mem_mb` for its first process
    and `rank_mem_mb` for each further one (one per GPU; scheduling only), growing with each
    attempt. The models that run are checked against the cap here, before any job."""

    # the first requests, from this parse's config (a later parse in the same process, as in
    # the tests, rebinds the module's globals)
    firsts = {
        model: entry["mem_mb"] + (STUDY.model_gpus[model] - 1) * entry["rank_mem_mb"]
        for model, entry in config["models"].items()
    }

    def request(model, attempt):
        what = f"rule {rule} for model {model!r}"
        setting = f"models.{model}.mem_mb + (gpus - 1) x rank_mem_mb"
        return attempt_request("mem_mb", firsts[model], attempt, what, setting)

    for model in RUN_MODELS:
        request(model, 1)

    def mem_mb(wildcards, attempt):
        return request(wildcards.model, attempt)

    return mem_mb


def model_gpus(wildcards):
    """GPUs of a labelling or P(True) job: the model entry's `gpus` (scheduling only)."""
    return STUDY.model_gpus[wildcards.model]


def model_threads(wildcards):
    """CPU threads of a labelling or P(True) job: engine.threads per process, one process per
    GPU unless `multi_gpu: device_map` (scheduling only)."""
    entry = config["models"][wildcards.model]
    ranks = 1 if entry["multi_gpu"] == "device_map" else entry["gpus"]
    return config["engine"]["threads"] * ranks


def recipe_request(resource, recipe, attempt):
    first = config["recipes"][recipe][resource]
    return attempt_request(
        resource, first, attempt, f"recipe {recipe!r}", f"recipes.{recipe}.{resource}"
    )


def recipe_mem_mb(wildcards, attempt):
    return recipe_request("mem_mb", wildcards.recipe, attempt)


def recipe_runtime(wildcards, attempt):
    return recipe_request("runtime", wildcards.recipe, attempt)


# The recipes that run are checked against the caps before any job (a recipe requested by
# path alone is checked when its job is planned).
for _recipe in STUDY.finetune_recipes:
    for _resource in RESOURCE_CAPS:
        recipe_request(_resource, _recipe, 1)


# The resources of a fine-tune follow its recipe's `distributed` block (scheduling only, so never
# a param): engine.threads per process, one GPU per process unless finetune.device is cpu, the
# nodes, and for several nodes an `mpi` job with one task per node (the slurm plugin then runs
# the job without its own srun, and the script starts `srun torchrun` on every node).


def recipe_threads(wildcards):
    return config["engine"]["threads"] * STUDY.schedules[wildcards.recipe].nproc_per_node


def recipe_gpus(wildcards):
    schedule = STUDY.schedules[wildcards.recipe]
    return 0 if STUDY.device == "cpu" else schedule.world


def recipe_nodes(wildcards):
    return STUDY.schedules[wildcards.recipe].nodes


def recipe_launcher(wildcards):
    return "srun" if STUDY.schedules[wildcards.recipe].nodes > 1 else None


def recipe_tasks(wildcards):
    nodes = STUDY.schedules[wildcards.recipe].nodes
    return nodes if nodes > 1 else None


def run_name(wildcards):
    return study.run_name(wildcards.recipe, wildcards.seed)


def finetune_targets():
    ft = dict(
        model=RUN_MODELS,
        recipe=STUDY.finetune_recipes,
        seed=seed_suffixes(),
        mixture=STUDY.mixture_names,
    )
    return expand("results/finetune/{model}/{recipe}{seed}/{mixture}/metrics.jsonl", **ft) + expand(
        "results/eval/{model}/{recipe}{seed}/{mixture}/{stop}/{split}.parquet",
        **ft,
        stop=study.STOPS,
        split=study.TEST_SPLITS,
    )


def all_targets():
    return (
        expand("results/data/{split}.parquet", split=SPLITS)
        + ["results/data/split_sizes.csv"]
        + expand("results/labels/{model}/{split}.parquet", model=RUN_MODELS, split=LABELLED_SPLITS)
        + expand("results/labels/{model}/category_summary.csv", model=RUN_MODELS)
        + finetune_targets()
    )
