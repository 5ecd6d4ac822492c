# Training mixtures, and fine-tuning with per-epoch evaluation. The fine-tune writes the test
# predictions at both stops itself: its per-epoch evaluation computes them with the checkpoints'
# weights (a separate evaluation job cost the quickstart a fifth of its time).


rule build_mixture:
    input:
        "results/labels/{model}/train.parquet",
    output:
        "results/mixtures/{model}/{mixture}.parquet",
    log:
        "logs/build_mixture/{model}/{mixture}.log",
    conda:
        "../../envs/data.yaml"
    params:
        spec=STUDY.mixtures.param(),
        code=script_code("build_mixture"),
    script:
        "../scripts/build_mixture.py"


rule finetune:
    input:
        # ancient: different weights rerun the fine-tune through its labels, which take the
        # model's identity.json
        model=ancient("resources/models/{model}"),
        mixture="results/mixtures/{model}/{mixture}.parquet",
        dev="results/labels/{model}/dev.parquet",
        test="results/labels/{model}/test.parquet",
        ood_test="results/labels/{model}/ood_test.parquet",
    output:
        metrics="results/finetune/{model}/{recipe}{seed}/{mixture}/metrics.jsonl",
        early_stop=directory("results/finetune/{model}/{recipe}{seed}/{mixture}/early_stop"),
        convergence=directory("results/finetune/{model}/{recipe}{seed}/{mixture}/convergence"),
        early_stop_test="results/eval/{model}/{recipe}{seed}/{mixture}/early_stop/test.parquet",
        early_stop_ood_test="results/eval/{model}/{recipe}{seed}/{mixture}/early_stop/ood_test.parquet",
        convergence_test="results/eval/{model}/{recipe}{seed}/{mixture}/convergence/test.parquet",
        convergence_ood_test="results/eval/{model}/{recipe}{seed}/{mixture}/convergence/ood_test.parquet",
    log:
        "logs/finetune/{model}/{recipe}{seed}/{mixture}.log",
    benchmark:
        "logs/benchmarks/finetune/{model}/{recipe}{seed}/{mixture}.tsv"
    conda:
        "../../envs/model.yaml"
    threads: recipe_threads
    resources:
        gpu=recipe_gpus,
        nodes=recipe_nodes,
        # several nodes: no srun around the job, which starts one torchrun per node itself
        mpi=recipe_launcher,
        tasks=recipe_tasks,
        mem_mb=recipe_mem_mb,
        runtime=recipe_runtime,
        attempt=attempt_number,
    params:
        spec=finetune_spec,
        code=script_code("finetune"),
    script:
        "../scripts/finetune.py"
