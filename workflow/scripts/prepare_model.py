"""Materialise a registry model once as safetensors + tokenizer (fast loading for every later job)."""

import json
import shutil
from pathlib import Path

from eqtools.generation import check_generation
from eqtools.io import setup_logging
from eqtools.models import materialise
from eqtools.provenance import write_provenance


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    out = Path(smk.output[0])
    tmp = out.with_name(f".{out.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        entry = materialise(smk.wildcards.model, json.loads(smk.params.spec), tmp, check=check_generation)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("materialised %s: %s parameters; engine path %s", smk.wildcards.model, entry["n_parameters"], entry["check"])
    write_provenance(out, smk, inputs=[])


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
