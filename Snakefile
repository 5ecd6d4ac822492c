# Does fine-tuning an LLM on new knowledge encourage hallucinations? (Gekhman et al., EMNLP 2024)
# The study end to end for any causal LM. Configuration: config/config.yaml (quickstart) and
# config/paper.yaml (the paper's settings); see README.md and docs/study.md.

from snakemake.utils import min_version

min_version("9.19")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    split="|".join(SPLITS),
    model="|".join(map(str, config["models"])),
    relation="P[0-9]+",
    mixture="[a-z_]+(_[0-9]+)?",
    recipe="|".join(map(str, config["recipes"])),
    # "" for the recipe's own seed, "-seed{N}" for the replicates of finetune.seeds
    seed="(-seed[0-9]+)?",
    stop="early_stop|convergence",


include: "workflow/rules/data.smk"
include: "workflow/rules/labels.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/seeds.smk"


rule all:
    default_target: True
    input:
        all_targets() + tables_targets() + figures_targets() + seeds_targets(),


check_code_params(workflow.rules)
