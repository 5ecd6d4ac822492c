# EntityQuestions: download and the paper's filtered splits.


# A localrule: compute nodes of a cluster often have no internet access.
localrules:
    download_entity_questions,


rule download_entity_questions:
    output:
        "resources/entity_questions/dataset.zip",
    # dataset.source/sha256/timeout_s are read by the script from the config on purpose, not
    # passed as params: a mirror or a local copy gives the same archive (its sha256 goes to the
    # provenance sidecar), so switching the source must not rerun the whole study.
    log:
        "logs/download_entity_questions.log",
    conda:
        "../../envs/data.yaml"
    params:
        relations=list(config["templates"]),
    script:
        "../scripts/download_entity_questions.py"


rule prepare_splits:
    input:
        archive=rules.download_entity_questions.output[0],
    output:
        train="results/data/train.parquet",
        dev="results/data/dev.parquet",
        test="results/data/test.parquet",
        ood_test="results/data/ood_test.parquet",
        ood_dev="results/data/ood_dev.parquet",
        sizes="results/data/split_sizes.csv",
    log:
        "logs/prepare_splits.log",
    benchmark:
        "logs/benchmarks/prepare_splits.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        spec=STUDY.data.param(),
        code=script_code("prepare_splits"),
    script:
        "../scripts/prepare_splits.py"
