# Helpers of workflow/rules/figures.smk: which figures the configured mixtures allow, their inputs
# and config slices, and the figure targets (figures_targets(), requested by `rule all`).

FIGURE_FILES = {
    "fig1": "fig1_fitting_known_unknown",
    "fig3a": "fig3a_accuracy_vs_unknown_share",
    "fig3b": "fig3b_unknown_vs_known_only",
    "fig4": "fig4_fitting_by_category",
    "fig5": "fig5_slick_vs_ptrue",
}
FIGURE_CAPTIONS = {
    "fig1": "Fig. 1",
    "fig3a": "Fig. 3a",
    "fig3b": "Fig. 3b",
    "fig4": "Fig. 4",
    "fig5": "Fig. 5",
}
SINGLE_CATEGORY_MIXTURES = ["highly_known", "maybe_known", "weakly_known", "unknown"]


def mixture_shares(family):
    """{X: name} of the configured `{family}_X` mixtures (unknown_X, known_only_X), by X."""
    shares = {}
    for name in config["mixtures"]["names"]:
        head, _, tail = name.rpartition("_")
        if head == family and tail.isdigit():
            shares[int(tail)] = name
    return dict(sorted(shares.items()))


def fig1_mixture():
    """The unknown_X closest to the paper's 50% that has both Known and Unknown examples."""
    mixed = [x for x in mixture_shares("unknown") if 0 < x < 100]
    return f"unknown_{min(mixed, key=lambda x: (abs(x - 50), x))}" if mixed else None


def fig3b_shares():
    return sorted(set(mixture_shares("unknown")) & set(mixture_shares("known_only")))


def fig4_mixtures():
    names = config["mixtures"]["names"]
    return [m for m in ["natural"] + SINGLE_CATEGORY_MIXTURES if m in names]


def fig5_run():
    run = config["figures"]["ptrue_run"]
    return run if run["mixture"] in config["mixtures"]["names"] else None


def available_figures():
    figures = {
        "fig1": fig1_mixture() is not None,
        "fig3a": len(mixture_shares("unknown")) >= 2,
        "fig3b": bool(fig3b_shares()),
        "fig4": bool(fig4_mixtures()),
        "fig5": fig5_run() is not None,
    }
    return [f for f, ok in figures.items() if ok]


def run_files(
    model, run, mixtures, stops=("early_stop", "convergence"), splits=("test", "ood_test")
):
    """metrics.jsonl and test predictions of the fine-tunes of `run` ({recipe}{seed}) on `mixtures`."""
    return expand(
        "results/finetune/{model}/{run}/{mixture}/metrics.jsonl",
        model=model,
        run=run,
        mixture=mixtures,
    ) + expand(
        "results/eval/{model}/{run}/{mixture}/{stop}/{split}.parquet",
        model=model,
        run=run,
        mixture=mixtures,
        stop=stops,
        split=splits,
    )


def run_name(wildcards):
    return f"{wildcards.recipe}{wildcards.seed}"


def figure_title(wildcards):
    return f"{wildcards.model}, {run_name(wildcards)}"


def fig1_inputs(wildcards):
    return run_files(wildcards.model, run_name(wildcards), [fig1_mixture()], stops=[], splits=[])


def fig1_spec(wildcards):
    return canon({"figure": "fig1", "mixture": fig1_mixture(), "title": figure_title(wildcards)})


def fig3a_inputs(wildcards):
    return run_files(wildcards.model, run_name(wildcards), list(mixture_shares("unknown").values()))


def fig3a_spec(wildcards):
    return canon(
        {
            "figure": "fig3a",
            "mixtures": list(mixture_shares("unknown").values()),
            "epochs": config["figures"]["epochs"],
            "title": figure_title(wildcards),
        }
    )


def fig3b_mixtures():
    return {
        "unknown": [f"unknown_{x}" for x in fig3b_shares()],
        "known_only": [f"known_only_{x}" for x in fig3b_shares()],
    }


def fig3b_inputs(wildcards):
    mixtures = fig3b_mixtures()
    return run_files(
        wildcards.model, run_name(wildcards), mixtures["unknown"] + mixtures["known_only"]
    )


def fig3b_spec(wildcards):
    return canon({"figure": "fig3b", "title": figure_title(wildcards)} | fig3b_mixtures())


def fig4_inputs(wildcards):
    return run_files(wildcards.model, run_name(wildcards), fig4_mixtures(), stops=[], splits=[])


def fig4_spec(wildcards):
    return canon({"figure": "fig4", "mixtures": fig4_mixtures(), "title": figure_title(wildcards)})


def fig5_inputs(wildcards):
    run = fig5_run()
    return {
        "predictions": f"results/eval/{wildcards.model}/{run_name(wildcards)}/{run['mixture']}/{run['stop']}/test.parquet",
        "ptrue": f"results/labels/{wildcards.model}/ptrue_test.parquet",
    }


def fig5_spec(wildcards):
    return canon({"figure": "fig5", "title": figure_title(wildcards)} | fig5_run())


def comparison_inputs(wildcards):
    unknown = list(mixture_shares("unknown").values())
    return [
        path
        for model in config["models"]
        for path in run_files(model, run_name(wildcards), unknown, splits=["test", "ood_test"])
    ]


def comparison_spec(wildcards):
    return canon(
        {
            "figure": "comparison",
            "models": list(config["models"]),
            "mixtures": list(mixture_shares("unknown").values()),
            "title": f"all models, {run_name(wildcards)}",
        }
    )


def ptrue_spec(wildcards):
    """Everything that changes a P(True) score: its settings and the model entry."""
    return canon({"ptrue": config["ptrue"], "model": config["models"][wildcards.model]})


def figure_report(figure, path):
    return report(
        path,
        caption=f"../report/{figure}.rst",
        category="Figures",
        subcategory="{model} / {recipe}{seed}",
        labels={"figure": FIGURE_CAPTIONS[figure], "model": "{model}", "run": "{recipe}{seed}"},
    )


def figures_targets():
    runs = dict(model=config["models"], recipe=config["finetune"]["recipes"], seed=seed_suffixes())
    targets = []
    for figure in available_figures():
        targets += expand(
            "results/figures/{model}/{recipe}{seed}/{name}.{ext}",
            **runs,
            name=FIGURE_FILES[figure],
            ext=["png", "svg"],
        )
    if len(config["models"]) > 1 and len(mixture_shares("unknown")) >= 2:
        targets += expand(
            "results/figures/comparison/{recipe}{seed}/accuracy_vs_unknown_share.{ext}",
            recipe=config["finetune"]["recipes"],
            seed=seed_suffixes(),
            ext=["png", "svg"],
        )
    return targets


# the eqtools modules the figure scripts import (figures re-uses analysis' loaders)
FIGURE_CODE = code_hash("figures", "analysis", "categories", "em", "mixtures", "sampling")
