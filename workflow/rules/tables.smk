# The paper's tables (PAPER.md, "Evaluation and analyses"): results/tables/{model}/{recipe}{seed}/.


def tables_targets():
    return []
