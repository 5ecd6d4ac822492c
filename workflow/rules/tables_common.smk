# Helpers of workflow/rules/tables.smk: which tables the configured mixtures allow (the
# selection rules are eqtools.study's), their named inputs and settings, and the table targets
# (tables_targets(), requested by `rule all`).


def table_spec(table):
    def spec(wildcards):
        return STUDY.table(table, wildcards.get("split")).param()

    return spec


def table2_inputs(wildcards):
    mixtures = STUDY.table("table2").mixtures
    return eval_inputs(wildcards.model, run_name(wildcards), mixtures, splits=[wildcards.split])


def table1_inputs(wildcards):
    return metrics_inputs(wildcards.model, run_name(wildcards), STUDY.table("table1").mixtures)


def table8_inputs(wildcards):
    return eval_inputs(wildcards.model, run_name(wildcards), STUDY.table("table8").mixtures)


def tables_targets():
    runs = dict(model=RUN_MODELS, recipe=STUDY.finetune_recipes, seed=seed_suffixes())
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
        model=RUN_MODELS,
        ext=["csv", "md"],
    ) + expand(run_dir + "{name}.{ext}", **runs, name=names, ext=["csv", "md"])
