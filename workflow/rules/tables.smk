# The paper's tables (docs/study.md, "Evaluation and analyses"): results/tables/{model}/{recipe}{seed}/,
# each as CSV and Markdown with a .prov.json sidecar (computations in eqtools/analysis.py). A table
# whose mixtures are not configured is not requested; each rule reads only the fine-tunes it needs.


include: "tables_common.smk"


rule table_accuracy_by_category:
    input:
        unpack(table2_inputs),
    output:
        csv=report(
            "results/tables/{model}/{recipe}{seed}/table2_accuracy_by_category_{split}.csv",
            caption="../report/table_category_accuracy.rst",
            category="Tables",
            subcategory="{model} / {recipe}{seed}",
            labels={
                "table": "Table 2",
                "split": "{split}",
                "model": "{model}",
                "run": "{recipe}{seed}",
            },
        ),
        md="results/tables/{model}/{recipe}{seed}/table2_accuracy_by_category_{split}.md",
    log:
        "logs/tables/{model}/{recipe}{seed}/table2_{split}.log",
    wildcard_constraints:
        split="test|ood_test",
    conda:
        "../../envs/data.yaml"
    params:
        spec=table_spec("table2"),
        code=script_code("make_tables"),
    script:
        "../scripts/make_tables.py"


rule table_linear_model:
    input:
        unpack(table1_inputs),
    output:
        csv=report(
            "results/tables/{model}/{recipe}{seed}/table1_linear_model.csv",
            caption="../report/table_linear_model.rst",
            category="Tables",
            subcategory="{model} / {recipe}{seed}",
            labels={"table": "Table 1", "model": "{model}", "run": "{recipe}{seed}"},
        ),
        md="results/tables/{model}/{recipe}{seed}/table1_linear_model.md",
        points="results/tables/{model}/{recipe}{seed}/table1_fit_points.csv",
    log:
        "logs/tables/{model}/{recipe}{seed}/table1.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=table_spec("table1"),
        code=script_code("make_tables"),
    script:
        "../scripts/make_tables.py"


rule table_idk:
    input:
        unpack(table8_inputs),
    output:
        csv=report(
            "results/tables/{model}/{recipe}{seed}/table8_idk_answered.csv",
            caption="../report/table_idk.rst",
            category="Tables",
            subcategory="{model} / {recipe}{seed}",
            labels={"table": "Table 8", "model": "{model}", "run": "{recipe}{seed}"},
        ),
        md="results/tables/{model}/{recipe}{seed}/table8_idk_answered.md",
    log:
        "logs/tables/{model}/{recipe}{seed}/table8.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=table_spec("table8"),
        code=script_code("make_tables"),
    script:
        "../scripts/make_tables.py"


rule table_category_distribution:
    input:
        unpack(labelled_inputs),
    output:
        csv=report(
            "results/tables/{model}/category_distribution.csv",
            caption="../report/table_category_distribution.rst",
            category="Tables",
            subcategory="{model}",
            labels={"table": "Tables 3-5", "model": "{model}"},
        ),
        md="results/tables/{model}/category_distribution.md",
    log:
        "logs/tables/{model}/category_distribution.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=table_spec("category_distribution"),
        code=script_code("make_tables"),
    script:
        "../scripts/make_tables.py"
