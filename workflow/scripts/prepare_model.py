"""Materialise a registry model once for fast loading by every later job, after checking that the
generation engine runs it exactly: a local directory of safetensors weights is linked, any other
source converted once to safetensors in the entry's dtype (eqtools.models.materialise)."""

from pathlib import Path

from eqtools.engine import check_generation
from eqtools.io import atomic_path, setup_logging
from eqtools.models import materialise
from eqtools.provenance import write_provenance
from eqtools.settings import ModelEntry


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    out = Path(smk.output[0])
    spec = ModelEntry.from_param(smk.params.spec)
    with atomic_path(out, directory=True) as tmp:
        entry = materialise(smk.wildcards.model, spec.to_dict(), tmp, check=check_generation)
    log.info(
        "materialised %s (%s): %s parameters; engine path %s",
        smk.wildcards.model,
        "linked" if "linked" in entry else "converted",
        entry["n_parameters"],
        entry["check"],
    )
    write_provenance(out, smk, inputs=[])


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
