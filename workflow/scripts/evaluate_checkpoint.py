"""Per-question predictions of a fine-tuned checkpoint (early_stop or convergence) on a test split."""

import json

import polars as pl
import torch

from eqtools.generation import Generator
from eqtools.io import setup_logging, write_parquet
from eqtools.models import load, pick_device
from eqtools.provenance import write_provenance
from eqtools.training import accuracy_by_category, answer_questions


def load_checkpoint(model_dir: str, checkpoint: str, method: str, device: str):
    model, tokenizer, _ = load(model_dir, device=device)
    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, checkpoint).to(device).eval()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint).to(device).eval()
    return model, tokenizer


def main(smk) -> None:
    log = setup_logging(smk.log[0])
    spec = json.loads(smk.params.spec)
    torch.set_num_threads(smk.threads)
    device = pick_device(spec["device"])
    for stop in ("early_stop", "convergence"):
        model, tokenizer = load_checkpoint(smk.input.model, smk.input[stop], spec["method"], device)
        generator = Generator(
            model, tokenizer, max_new_tokens=spec["max_new_tokens"], max_batch_rows=smk.config["engine"]["max_batch_rows"]
        )
        for split in ("test", "ood_test"):
            labels = pl.read_parquet(smk.input[split])
            frame = labels.select("id", "relation", "question", pl.col("answer").alias("gold"), "category")
            graded, summary = accuracy_by_category(frame, answer_questions(generator, frame["question"].to_list()))
            log.info("%s %s: %s", stop, split, summary)
            out = smk.output[f"{stop}_{split}"]
            write_parquet(graded, out)
            write_provenance(out, smk, inputs=[smk.input.model, smk.input[stop], smk.input[split]])


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
