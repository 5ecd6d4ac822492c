# The paper's figures (docs/study.md, "Evaluation and analyses"): results/figures/{model}/{recipe}{seed}/,
# each as PNG and SVG with a .prov.json sidecar; P(True), the baseline of Fig. 5; the comparison
# of models (results/figures/comparison/) when more than one model is configured. A figure whose
# mixtures are not configured is not requested.


include: "figures_common.smk"


rule ptrue:
    input:
        # ancient: different weights rerun P(True) through its labels (identity.json)
        model=ancient("resources/models/{model}"),
        labels="results/labels/{model}/{split}.parquet",
    output:
        "results/labels/{model}/ptrue_{split}.parquet",
    log:
        "logs/ptrue/{model}/{split}.log",
    benchmark:
        "logs/benchmarks/ptrue/{model}/{split}.tsv"
    conda:
        "../../envs/model.yaml"
    threads: model_threads
    resources:
        gpu=model_gpus,
        mem_mb=model_mem_mb("ptrue"),
        runtime=retry_runtime(240, "ptrue"),
        attempt=attempt_number,
    params:
        spec=ptrue_spec,
        code=script_code("ptrue"),
    script:
        "../scripts/ptrue.py"


rule figure_fitting:
    input:
        unpack(figure_inputs("fig1")),
    output:
        png=figure_report(
            "fig1", "results/figures/{model}/{recipe}{seed}/fig1_fitting_known_unknown.png"
        ),
        svg="results/figures/{model}/{recipe}{seed}/fig1_fitting_known_unknown.svg",
    log:
        "logs/figures/{model}/{recipe}{seed}/fig1.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=figure_spec("fig1"),
        code=script_code("make_figures"),
    script:
        "../scripts/make_figures.py"


rule figure_accuracy_vs_unknown_share:
    input:
        unpack(figure_inputs("fig3a")),
    output:
        png=figure_report(
            "fig3a", "results/figures/{model}/{recipe}{seed}/fig3a_accuracy_vs_unknown_share.png"
        ),
        svg="results/figures/{model}/{recipe}{seed}/fig3a_accuracy_vs_unknown_share.svg",
    log:
        "logs/figures/{model}/{recipe}{seed}/fig3a.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=figure_spec("fig3a"),
        code=script_code("make_figures"),
    script:
        "../scripts/make_figures.py"


rule figure_unknown_vs_known_only:
    input:
        unpack(figure_inputs("fig3b")),
    output:
        png=figure_report(
            "fig3b", "results/figures/{model}/{recipe}{seed}/fig3b_unknown_vs_known_only.png"
        ),
        svg="results/figures/{model}/{recipe}{seed}/fig3b_unknown_vs_known_only.svg",
    log:
        "logs/figures/{model}/{recipe}{seed}/fig3b.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=figure_spec("fig3b"),
        code=script_code("make_figures"),
    script:
        "../scripts/make_figures.py"


rule figure_fitting_by_category:
    input:
        unpack(figure_inputs("fig4")),
    output:
        png=figure_report(
            "fig4", "results/figures/{model}/{recipe}{seed}/fig4_fitting_by_category.png"
        ),
        svg="results/figures/{model}/{recipe}{seed}/fig4_fitting_by_category.svg",
    log:
        "logs/figures/{model}/{recipe}{seed}/fig4.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=figure_spec("fig4"),
        code=script_code("make_figures"),
    script:
        "../scripts/make_figures.py"


rule figure_slick_vs_ptrue:
    input:
        unpack(figure_inputs("fig5")),
    output:
        png=figure_report("fig5", "results/figures/{model}/{recipe}{seed}/fig5_slick_vs_ptrue.png"),
        svg="results/figures/{model}/{recipe}{seed}/fig5_slick_vs_ptrue.svg",
    log:
        "logs/figures/{model}/{recipe}{seed}/fig5.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=figure_spec("fig5"),
        code=script_code("make_figures"),
    script:
        "../scripts/make_figures.py"


rule figure_model_comparison:
    input:
        unpack(comparison_inputs),
    output:
        png=report(
            "results/figures/comparison/{recipe}{seed}/accuracy_vs_unknown_share.png",
            caption="../report/comparison.rst",
            category="Figures",
            subcategory="model comparison / {recipe}{seed}",
            labels={"figure": "Fig. 3a per model", "model": "all", "run": "{recipe}{seed}"},
        ),
        svg="results/figures/comparison/{recipe}{seed}/accuracy_vs_unknown_share.svg",
    log:
        "logs/figures/comparison/{recipe}{seed}.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=comparison_spec,
        code=script_code("make_figures"),
    script:
        "../scripts/make_figures.py"
