# Helpers of workflow/rules/seeds.smk: the runs of a recipe's seeds, inputs named per run, which
# fine-tunes each claim compares (the selection rules are eqtools.study's), and the over-seeds
# targets (seeds_targets(), requested by `rule all`).

from eqtools.replicates import run_input_name  # noqa: E402
from eqtools.settings import Table, canon  # noqa: E402


def seed_runs(wildcards):
    return [study.run_name(wildcards.recipe, suffix) for suffix in seed_suffixes()]


def over_seeds(inputs_of):
    """An input function that names `inputs_of(model, run)`'s files for every run, each name
    prefixed with its run (eqtools.replicates.run_input_name)."""

    def inputs(wildcards):
        named = {}
        for run in seed_runs(wildcards):
            for name, path in inputs_of(wildcards, run).items():
                named[run_input_name(run, name)] = path
        return named

    return inputs


def seeds_table2_inputs(wildcards, run):
    mixtures = STUDY.table("table2").mixtures
    return eval_inputs(wildcards.model, run, mixtures, splits=[wildcards.split])


def seeds_table1_inputs(wildcards, run):
    return metrics_inputs(wildcards.model, run, STUDY.table("table1").mixtures)


def claims_spec():
    """The fine-tunes each claim compares (eqtools.study's selection rules); None where the
    configured mixtures do not allow the claim."""
    names = STUDY.mixture_names
    shares = study.mixture_shares(names, "unknown")
    fig3b = study.fig3b_mixtures(names)
    table8 = study.table8_mixtures(names)

    def closest(pairs):  # the pair whose Unknown share is nearest the paper's 50 %
        return min(pairs, key=lambda p: (abs(p[0] - 50), p[0]))[1] if pairs else None

    return {
        "fitting": study.fig1_mixture(names),
        "fall": [shares[min(shares)], shares[max(shares)]] if len(shares) >= 2 else None,
        "known_only": closest(
            [
                (study.mixture_share(u)[1], [u, k])
                for u, k in zip(fig3b["unknown"], fig3b["known_only"], strict=True)
            ]
        ),
        "idk": closest(
            [
                (study.mixture_share(table8[i])[1], table8[i : i + 2])
                for i in range(0, len(table8), 2)
            ]
        ),
        "ptrue": STUDY.ptrue_run if STUDY.ptrue_run["mixture"] in names else None,
        "table1": STUDY.table("table1").mixtures or None,
    }


def claims_inputs(wildcards):
    spec = claims_spec()
    model = wildcards.model
    inputs = {}
    for run in seed_runs(wildcards):
        files = {}
        if spec["fitting"]:
            files |= metrics_inputs(model, run, [spec["fitting"]])
        if spec["table1"]:
            files |= metrics_inputs(model, run, spec["table1"])
        for key in ("fall", "known_only", "idk"):
            if spec[key]:
                files |= eval_inputs(model, run, spec[key])
        if spec["ptrue"]:
            files |= eval_inputs(
                model, run, [spec["ptrue"]["mixture"]], [spec["ptrue"]["stop"]], ["test"]
            )
        inputs |= {run_input_name(run, name): path for name, path in files.items()}
    if spec["ptrue"]:
        inputs[study.input_name("ptrue", model, "test")] = study.path(
            "ptrue", model=model, split="test"
        )
    return inputs


def seeds_figure_inputs(figure):
    def inputs_of(wildcards, run):
        spec = STUDY.figure(figure, "")
        if figure == "fig1":
            return metrics_inputs(wildcards.model, run, [spec.mixture])
        if figure == "fig3a":
            return run_inputs(wildcards.model, run, spec.mixtures)
        if figure == "fig4":
            return metrics_inputs(wildcards.model, run, spec.mixtures)
        raise ValueError(figure)

    return over_seeds(inputs_of)


def seeds_figure_spec(figure):
    def spec(wildcards):
        title = f"{wildcards.model}, {wildcards.recipe}, mean of {len(seed_runs(wildcards))} seeds"
        return STUDY.figure(figure, title).param()

    return spec


def seeds_report(kind, path, caption, labels):
    return report(
        path,
        caption=f"../report/{caption}.rst",
        category=kind,
        subcategory="{model} / {recipe}-seeds",
        labels=labels | {"model": "{model}", "run": "{recipe}-seeds"},
    )


def seeds_targets():
    """The over-seeds tables and figures the configured mixtures allow; none without seeds."""
    if not STUDY.seeds:
        return []
    names = STUDY.mixture_names
    tables = []
    if STUDY.table("table2").mixtures:
        tables += [f"table2_accuracy_by_category_{split}" for split in study.TEST_SPLITS]
    if STUDY.table("table1").mixtures:
        tables.append("table1_linear_model")
    if any(claims_spec().values()):
        tables.append("claims")
    figures = [
        study.FIGURE_FILES[f]
        for f in study.available_figures(names, STUDY.ptrue_run["mixture"])
        if f in ("fig1", "fig3a", "fig4")
    ]
    runs = dict(model=RUN_MODELS, recipe=STUDY.finetune_recipes)
    return expand(
        "results/tables/{model}/{recipe}-seeds/{name}.{ext}", **runs, name=tables, ext=["csv", "md"]
    ) + expand(
        "results/figures/{model}/{recipe}-seeds/{name}.{ext}",
        **runs,
        name=figures,
        ext=["png", "svg"],
    )
