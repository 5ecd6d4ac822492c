# Helpers of workflow/rules/tables.smk: which tables the configured mixtures allow, their inputs
# and config slices, and the table targets (tables_targets(), requested by `rule all`).

# the rows of Table 2 (as eqtools.analysis.TABLE2_MIXTURES; not imported: the Snakefile stays
# free of polars and numpy)
TABLE2_MIXTURES = ["highly_known", "maybe_known", "weakly_known", "unknown", "natural"]
TABLE_CODE = code_hash("analysis", "categories", "em", "mixtures", "sampling")


def table_run(wildcards):
    return f"{wildcards.recipe}{wildcards.seed}"


def table_settings():
    return {k: config["tables"][k] for k in ("n_chunks", "seed")}


def table2_mixtures():
    """D_HighlyKnown ... D_Unknown and D_Natural, those configured."""
    return [m for m in TABLE2_MIXTURES if m in config["mixtures"]["names"]]


def table1_mixtures():
    """Every configured mixture but idk_X (their Unknown examples are trained on "I don't know")."""
    return [m for m in config["mixtures"]["names"] if not m.startswith("idk_")]


def table8_mixtures():
    """unknown_X and idk_X for every X configured with both."""
    names = config["mixtures"]["names"]
    shares = [m.removeprefix("idk_") for m in names if m.startswith("idk_")]
    return [m for x in shares if f"unknown_{x}" in names for m in (f"unknown_{x}", f"idk_{x}")]


def eval_files(wildcards, mixtures, splits):
    return expand(
        "results/eval/{model}/{run}/{mixture}/{stop}/{split}.parquet",
        model=wildcards.model,
        run=table_run(wildcards),
        mixture=mixtures,
        stop=["early_stop", "convergence"],
        split=splits,
    )


def table2_inputs(wildcards):
    return eval_files(wildcards, table2_mixtures(), [wildcards.split])


def table2_spec(wildcards):
    return canon(
        {"table": "table2", "split": wildcards.split, "mixtures": table2_mixtures()}
        | table_settings()
    )


def table1_inputs(wildcards):
    return expand(
        "results/finetune/{model}/{run}/{mixture}/metrics.jsonl",
        model=wildcards.model,
        run=table_run(wildcards),
        mixture=table1_mixtures(),
    )


def table8_inputs(wildcards):
    return eval_files(wildcards, table8_mixtures(), ["test", "ood_test"])


def tables_targets():
    runs = dict(model=config["models"], recipe=config["finetune"]["recipes"], seed=seed_suffixes())
    run_dir = "results/tables/{model}/{recipe}{seed}/"
    names = []
    if table2_mixtures():
        names += [f"table2_accuracy_by_category_{split}" for split in ("test", "ood_test")]
    if table1_mixtures():
        names += ["table1_linear_model"]
    if table8_mixtures():
        names += ["table8_idk_answered"]
    return expand(
        "results/tables/{model}/category_distribution.{ext}",
        model=config["models"],
        ext=["csv", "md"],
    ) + expand(run_dir + "{name}.{ext}", **runs, name=names, ext=["csv", "md"])
