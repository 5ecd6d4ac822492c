# Results over training seeds, requested when finetune.seeds is set (docs/study.md, "Seeds"):
# results/tables/{model}/{recipe}-seeds/ (Table 2 with 95 % intervals, Table 1 with standard
# errors clustered by fine-tune, the claims with their verdicts) and
# results/figures/{model}/{recipe}-seeds/ (Figs. 1, 3a and 4 with bands). Each reads the same
# files as its per-run rule, of every run: the recipe's own seed and each of finetune.seeds.
# The single-seed results of each run are made as before.


include: "seeds_common.smk"


rule seeds_table_accuracy_by_category:
    input:
        unpack(over_seeds(seeds_table2_inputs)),
    output:
        csv=seeds_report(
            "Tables",
            "results/tables/{model}/{recipe}-seeds/table2_accuracy_by_category_{split}.csv",
            "table_category_accuracy",
            {"table": "Table 2", "split": "{split}"},
        ),
        md="results/tables/{model}/{recipe}-seeds/table2_accuracy_by_category_{split}.md",
    log:
        "logs/tables/{model}/{recipe}-seeds/table2_{split}.log",
    wildcard_constraints:
        split="test|ood_test",
    conda:
        "../../envs/data.yaml"
    params:
        spec=table_spec("table2"),
        runs=seed_runs,
        code=script_code("make_tables"),
    script:
        "../scripts/make_tables.py"


rule seeds_table_linear_model:
    input:
        unpack(over_seeds(seeds_table1_inputs)),
    output:
        csv=seeds_report(
            "Tables",
            "results/tables/{model}/{recipe}-seeds/table1_linear_model.csv",
            "table_linear_model",
            {"table": "Table 1"},
        ),
        md="results/tables/{model}/{recipe}-seeds/table1_linear_model.md",
        points="results/tables/{model}/{recipe}-seeds/table1_fit_points.csv",
    log:
        "logs/tables/{model}/{recipe}-seeds/table1.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=table_spec("table1"),
        runs=seed_runs,
        code=script_code("make_tables"),
    script:
        "../scripts/make_tables.py"


rule seeds_claims:
    input:
        unpack(claims_inputs),
    output:
        csv=seeds_report(
            "Tables",
            "results/tables/{model}/{recipe}-seeds/claims.csv",
            "table_claims",
            {"table": "Claims"},
        ),
        md="results/tables/{model}/{recipe}-seeds/claims.md",
    log:
        "logs/tables/{model}/{recipe}-seeds/claims.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=Table("claims").param(),
        claims=canon(claims_spec()),
        runs=seed_runs,
        code=script_code("make_tables"),
    script:
        "../scripts/make_tables.py"


rule seeds_figure_fitting:
    input:
        unpack(seeds_figure_inputs("fig1")),
    output:
        png=seeds_report(
            "Figures",
            "results/figures/{model}/{recipe}-seeds/fig1_fitting_known_unknown.png",
            "fig1",
            {"figure": "Fig. 1"},
        ),
        svg="results/figures/{model}/{recipe}-seeds/fig1_fitting_known_unknown.svg",
    log:
        "logs/figures/{model}/{recipe}-seeds/fig1.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=seeds_figure_spec("fig1"),
        runs=seed_runs,
        code=script_code("make_figures"),
    script:
        "../scripts/make_figures.py"


rule seeds_figure_accuracy_vs_unknown_share:
    input:
        unpack(seeds_figure_inputs("fig3a")),
    output:
        png=seeds_report(
            "Figures",
            "results/figures/{model}/{recipe}-seeds/fig3a_accuracy_vs_unknown_share.png",
            "fig3a",
            {"figure": "Fig. 3a"},
        ),
        svg="results/figures/{model}/{recipe}-seeds/fig3a_accuracy_vs_unknown_share.svg",
    log:
        "logs/figures/{model}/{recipe}-seeds/fig3a.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=seeds_figure_spec("fig3a"),
        runs=seed_runs,
        code=script_code("make_figures"),
    script:
        "../scripts/make_figures.py"


rule seeds_figure_fitting_by_category:
    input:
        unpack(seeds_figure_inputs("fig4")),
    output:
        png=seeds_report(
            "Figures",
            "results/figures/{model}/{recipe}-seeds/fig4_fitting_by_category.png",
            "fig4",
            {"figure": "Fig. 4"},
        ),
        svg="results/figures/{model}/{recipe}-seeds/fig4_fitting_by_category.svg",
    log:
        "logs/figures/{model}/{recipe}-seeds/fig4.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=seeds_figure_spec("fig4"),
        runs=seed_runs,
        code=script_code("make_figures"),
    script:
        "../scripts/make_figures.py"
