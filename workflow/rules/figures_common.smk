# Helpers of workflow/rules/figures.smk: which figures the configured mixtures allow (the
# selection rules are eqtools.study's), their named inputs and settings, and the figure targets
# (figures_targets(), requested by `rule all`).


def figure_title(wildcards):
    return f"{wildcards.model}, {run_name(wildcards)}"


def figure_spec(figure):
    def spec(wildcards):
        return STUDY.figure(figure, figure_title(wildcards)).param()

    return spec


def run_inputs(model, run, mixtures):
    """The metrics and the test predictions of the fine-tunes of `run` on `mixtures`."""
    return metrics_inputs(model, run, mixtures) | eval_inputs(model, run, mixtures)


def figure_inputs(figure):
    def inputs(wildcards):
        spec = STUDY.figure(figure, figure_title(wildcards))
        model, run = wildcards.model, run_name(wildcards)
        if figure == "fig1":
            return metrics_inputs(model, run, [spec.mixture])
        if figure == "fig3a":
            return run_inputs(model, run, spec.mixtures)
        if figure == "fig3b":
            return run_inputs(model, run, spec.unknown + spec.known_only)
        if figure == "fig4":
            return metrics_inputs(model, run, spec.mixtures)
        if figure == "fig5":
            predictions = eval_inputs(model, run, [spec.mixture], [spec.stop], ["test"])
            ptrue = study.path("ptrue", model=model, split="test")
            return predictions | {study.input_name("ptrue", model, "test"): ptrue}
        raise ValueError(figure)

    return inputs


def comparison_spec(wildcards):
    title = f"all models, {run_name(wildcards)}"
    return STUDY.figure("comparison", title, models=list(RUN_MODELS)).param()


def comparison_inputs(wildcards):
    unknown = study.fig3a_mixtures(STUDY.mixture_names)
    inputs = {}
    for model in RUN_MODELS:
        inputs |= run_inputs(model, run_name(wildcards), unknown)
    return inputs


def ptrue_spec(wildcards):
    """Everything that changes a P(True) score: its settings and the model's dtype (different
    weights rerun it through its labels, whose jobs take identity.json)."""
    return STUDY.ptrue_scoring(wildcards.model).param()


def figure_report(figure, path):
    return report(
        path,
        caption=f"../report/{figure}.rst",
        category="Figures",
        subcategory="{model} / {recipe}{seed}",
        labels={
            "figure": study.FIGURE_CAPTIONS[figure],
            "model": "{model}",
            "run": "{recipe}{seed}",
        },
    )


def figures_targets():
    runs = dict(model=RUN_MODELS, recipe=STUDY.finetune_recipes, seed=seed_suffixes())
    names = STUDY.mixture_names
    targets = []
    for figure in study.available_figures(names, STUDY.ptrue_run["mixture"]):
        targets += expand(
            "results/figures/{model}/{recipe}{seed}/{name}.{ext}",
            **runs,
            name=study.FIGURE_FILES[figure],
            ext=["png", "svg"],
        )
    if len(RUN_MODELS) > 1 and len(study.fig3a_mixtures(names)) >= 2:
        targets += expand(
            "results/figures/comparison/{recipe}{seed}/accuracy_vs_unknown_share.{ext}",
            recipe=STUDY.finetune_recipes,
            seed=seed_suffixes(),
            ext=["png", "svg"],
        )
    return targets
