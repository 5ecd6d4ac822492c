# The paper's figures (PAPER.md, "Evaluation and analyses"): results/figures/{model}/{recipe}{seed}/.


def figures_targets():
    return []
