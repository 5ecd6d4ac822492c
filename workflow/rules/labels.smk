# SliCK knowledge labels: what the base model knows, per question (docs/study.md, "SliCK").


# A localrule: a hub id is downloaded here, and compute nodes often have no internet access.
localrules:
    prepare_model,


rule prepare_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/prepare_model/{model}.log",
    conda:
        "../../envs/model.yaml"
    params:
        spec=model_spec,
        code=script_code("prepare_model"),
    script:
        "../scripts/prepare_model.py"


rule select_exemplars:
    input:
        "results/data/dev.parquet",
        "results/data/ood_dev.parquet",
    output:
        "results/labels/{model}/exemplars.json",
    log:
        "logs/select_exemplars/{model}.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=STUDY.slick.exemplars().param(),
        code=script_code("select_exemplars"),
    script:
        "../scripts/select_exemplars.py"


rule label_questions:
    input:
        model="resources/models/{model}",
        questions="results/data/{split}.parquet",
        exemplars="results/labels/{model}/exemplars.json",
    output:
        "results/labels/{model}/chunks/{split}/{relation}.parquet",
    log:
        "logs/label_questions/{model}/{split}/{relation}.log",
    benchmark:
        "logs/benchmarks/label_questions/{model}/{split}/{relation}.tsv"
    conda:
        "../../envs/model.yaml"
    threads: model_threads
    resources:
        gpu=model_gpus,
        mem_mb=model_mem_mb("label_questions"),
        runtime=retry_runtime(240, "label_questions"),
    params:
        spec=label_spec,
        code=script_code("label_questions"),
    script:
        "../scripts/label_questions.py"


rule merge_labels:
    input:
        questions="results/data/{split}.parquet",
        chunks=label_chunks,
    output:
        "results/labels/{model}/{split}.parquet",
    log:
        "logs/merge_labels/{model}/{split}.log",
    conda:
        "../../envs/data.yaml"
    params:
        code=script_code("merge_labels"),
    script:
        "../scripts/merge_labels.py"


rule summarize_labels:
    input:
        unpack(labelled_inputs),
    output:
        csv="results/labels/{model}/category_summary.csv",
        md="results/labels/{model}/category_summary.md",
    log:
        "logs/summarize_labels/{model}.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=summary_spec(),
        code=script_code("summarize_labels"),
    script:
        "../scripts/summarize_labels.py"
