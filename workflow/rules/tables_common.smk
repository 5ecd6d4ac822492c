# Helpers of workflow/rules/tables.smk: which tables the configured mixtures allow (the
# selection rules are eqtools.study's), their named inputs and settings, and the table targets
# (tables_targets(), requested by `rule all`).


def table_spec(table):
    def spec(wildcards):
        return STUDY.table(table, wildcards.get("split")).param()

    return spec


def eval_inputs(wildcards, mixtures, splits):
    """{"eval:<mixture>:<stop>:<split>": path} of the run's test predictions."""
    return {
        study.input_name("eval", mixture, stop, split): study.path(
            "eval",
            model=wildcards.model,
            run=run_name(wildcards),
            mixture=mixture,
            stop=stop,
            split=split,
        )
        for mixture in mixtures
        for stop in study.STOPS
        for split in splits
    }


def metrics_inputs(wildcards, mixtures):
    """{"metrics:<mixture>": path} of the run's per-epoch metrics."""
    return {
        study.input_name("metrics", mixture): study.path(
            "metrics", model=wildcards.model, run=run_name(wildcards), mixture=mixture
        )
        for mixture in mixtures
    }


def table2_inputs(wildcards):
    return eval_inputs(wildcards, STUDY.table("table2").mixtures, [wildcards.split])


def table1_inputs(wildcards):
    return metrics_inputs(wildcards, STUDY.table("table1").mixtures)


def table8_inputs(wildcards):
    return eval_inputs(wildcards, STUDY.table("table8").mixtures, study.TEST_SPLITS)


def tables_targets():
    runs = dict(model=config["models"], recipe=STUDY.finetune_recipes, seed=seed_suffixes())
    run_dir = "results/tables/{model}/{recipe}{seed}/"
    names = []
    if STUDY.table("table2").mixtures:
        names += [f"table2_accuracy_by_category_{split}" for split in study.TEST_SPLITS]
    if STUDY.table("table1").mixtures:
        names += ["table1_linear_model"]
    if STUDY.table("table8").mixtures:
        names += ["table8_idk_answered"]
    return expand(
        "results/tables/{model}/category_distribution.{ext}",
        model=config["models"],
        ext=["csv", "md"],
    ) + expand(run_dir + "{name}.{ext}", **runs, name=names, ext=["csv", "md"])
