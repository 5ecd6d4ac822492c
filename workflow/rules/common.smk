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

SPLITS = ["train", "dev", "test", "ood_test"]


def canon(obj):
    """Canonical JSON of a config slice: equal slices give equal params, so only real changes
    trigger reruns (Snakemake compares params by their repr)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def code_hash(*modules):
    """Content hash of the shared modules (workflow/scripts/eqtools/<name>.py) a script imports.
    Snakemake tracks a script's own file, not what it imports."""
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


def all_targets():
    return expand("results/data/{split}.parquet", split=SPLITS) + ["results/data/split_sizes.csv"]
