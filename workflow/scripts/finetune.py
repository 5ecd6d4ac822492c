"""Fine-tune a model on a mixture with per-epoch evaluation (dev, the training set, ID/OOD test)
and the per-question test predictions at both stops; resumes from its state directory after a
kill."""

from pathlib import Path

import polars as pl
import torch

from eqtools.io import setup_logging
from eqtools.models import pick_device
from eqtools.provenance import write_provenance
from eqtools.settings import Finetune
from eqtools.study import STOPS, TEST_SPLITS
from eqtools.training import finetune


def eval_frame(labels_path: str) -> pl.DataFrame:
    return pl.read_parquet(labels_path).select(
        "id", "relation", "question", pl.col("answer").alias("gold"), "category"
    )


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    spec = Finetune.from_param(smk.params.spec)
    recipe = spec.recipe
    torch.set_num_threads(smk.threads)
    device = pick_device(spec.device)
    train = pl.read_parquet(smk.input.mixture).select(
        "id", "question", "answer", pl.col("gold_answer").alias("gold"), "category"
    )
    evals = {name: eval_frame(smk.input[name]) for name in ("dev", "test", "ood_test")}
    out = {
        "metrics": smk.output.metrics,
        "early_stop": smk.output.early_stop,
        "convergence": smk.output.convergence,
        "state": str(Path(smk.output.metrics).parent / "state"),
        "predictions": {
            stop: {split: smk.output[f"{stop}_{split}"] for split in TEST_SPLITS} for stop in STOPS
        },
    }
    log.info(
        "%s on %s: %d examples, %s, device %s",
        smk.wildcards.recipe,
        smk.wildcards.mixture,
        train.height,
        recipe,
        device,
    )
    finetune(
        smk.input.model,
        train,
        evals,
        recipe,
        out,
        eval_every=spec.eval_every,
        device=device,
        max_batch_rows=smk.config["engine"][
            "max_batch_rows"
        ],  # runtime settings, deliberately untracked
        backend=smk.config["engine"]["backend"],
    )
    write_provenance([smk.output.metrics, smk.output.early_stop, smk.output.convergence], smk)
    for stop in STOPS:
        for split in TEST_SPLITS:
            out = smk.output[f"{stop}_{split}"]
            write_provenance(
                out,
                smk,
                inputs=[smk.input.model, smk.input.mixture, smk.input.dev, smk.input[split]],
            )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
