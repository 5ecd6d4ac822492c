"""Stage a registry model where the later jobs find it, without loading or hashing it (a local
rule: a login node): a local directory's files are linked, a hub id is downloaded
(eqtools.models.stage). prepare_model, a job, does the rest."""

from pathlib import Path

from eqtools.io import atomic_path, setup_logging
from eqtools.models import stage
from eqtools.provenance import write_provenance
from eqtools.settings import ModelEntry


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    out = Path(smk.output[0])
    spec = ModelEntry.from_param(smk.params.spec)
    with atomic_path(out, directory=True) as tmp:
        entry = stage(smk.wildcards.model, spec.to_dict(), tmp)
    log.info("staged %s from %s: %s", smk.wildcards.model, entry["source"], entry["files"])
    write_provenance(out, smk, config=spec.to_dict() | {"source": entry["source"]}, inputs=[])


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
