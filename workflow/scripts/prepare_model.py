"""Materialise a staged registry model once for fast loading by every later job, after checking
that the generation engine runs it exactly (a job: it loads the whole model): safetensors weights
are linked, any other source converted once to safetensors in the entry's dtype
(eqtools.models.materialise). Writes identity.json beside it, the sha256 of each staged file by
name: what the later jobs take as the model's identity."""

from pathlib import Path

from eqtools.engine import check_generation
from eqtools.io import atomic_path, setup_logging, write_text
from eqtools.models import materialise
from eqtools.provenance import write_provenance
from eqtools.settings import TrackedModel, canon


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    name = smk.wildcards.model
    out = Path(smk.output.model)
    spec = TrackedModel.from_param(smk.params.spec)
    device = smk.config["models"][name]["device"]  # scheduling: deliberately untracked
    with atomic_path(out, directory=True) as tmp:
        entry = materialise(name, smk.input.source, tmp, spec.dtype, device, check=check_generation)
        # inside the block: a failure here leaves neither output
        write_text(canon(entry["identity"]) + "\n", smk.output.identity)
    log.info(
        "materialised %s (%s): %s parameters; engine path %s",
        name,
        "linked" if "linked" in entry else "converted",
        entry["n_parameters"],
        entry["check"],
    )
    recorded = {k: entry[k] for k in ("source", "gguf_file", "dtype")}
    write_provenance([out, smk.output.identity], smk, config=recorded, inputs=[])


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
