"""SliCK knowledge categories (PAPER.md): kept apart from the labeller so that table-only code
(mixtures, summaries, analyses) does not import torch."""

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
KNOWN = CATEGORIES[:3]


def categorize(n_greedy_correct: int, n_greedy: int, n_sampled_correct: int) -> str:
    if n_greedy_correct == n_greedy:
        return "HighlyKnown"
    if n_greedy_correct > 0:
        return "MaybeKnown"
    return "WeaklyKnown" if n_sampled_correct > 0 else "Unknown"
