"""The study's vocabulary in one place (docs/study.md): splits, SliCK categories, stops, the
mixture grammar and which mixtures each table and figure uses, the names the tables and figures
print, run names and the path templates of results/.

Pure Python, no third-party imports: the Snakefile (which must stay free of polars, numpy and
torch) imports it, and so do the scripts, so a rule and its script can never disagree on a name
or a path.
"""

import re

# ---------------------------------------------------------------------------------- data

SPLITS = ("train", "dev", "test", "ood_test", "ood_dev")
# the splits that get SliCK labels (ood_dev is only the exemplar pool of the OOD relations)
LABELLED_SPLITS = ("train", "dev", "test", "ood_test")
TEST_SPLITS = ("test", "ood_test")
SPLIT_NAMES = {"test": "ID test", "ood_test": "OOD test"}
SPLIT_TITLES = {"test": "in-distribution test", "ood_test": "out-of-distribution test"}

# ---------------------------------------------------------------------------------- SliCK

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
KNOWN = CATEGORIES[:3]


def categorize(n_greedy_correct: int, n_greedy: int, n_sampled_correct: int) -> str:
    """The SliCK category of a question from its correct greedy and sampled answers."""
    if n_greedy_correct == n_greedy:
        return "HighlyKnown"
    if n_greedy_correct > 0:
        return "MaybeKnown"
    return "WeaklyKnown" if n_sampled_correct > 0 else "Unknown"


# ---------------------------------------------------------------------------------- mixtures

# mixture name -> SliCK category of the single-category variants
SINGLE_CATEGORY = {
    "highly_known": "HighlyKnown",
    "maybe_known": "MaybeKnown",
    "weakly_known": "WeaklyKnown",
    "unknown": "Unknown",
}
NATURAL = "natural"
# the families of mixtures with X% Unknown: unknown_X, its Known part alone, its Unknown answers
# replaced by "I don't know"
SHARE_FAMILIES = ("unknown", "known_only", "idk")
_SHARE = re.compile(rf"({'|'.join(SHARE_FAMILIES)})_(0|[1-9][0-9]*)")
IDK_ANSWER = "I don't know"


class MixtureError(ValueError):
    pass


def mixture_share(name: str) -> tuple[str, int] | None:
    """("unknown", 50) for unknown_50, ("known_only", 25) for known_only_25, else None."""
    match = _SHARE.fullmatch(name) if isinstance(name, str) else None
    if match and int(match[2]) <= 100:
        return match[1], int(match[2])
    return None


def parse_mixture(name: str) -> dict:
    """{"kind": "category", "category": ...}, {"kind": "natural"}, or
    {"kind": "unknown_share", "percent": X, "drop_unknown": bool, "idk": bool}."""
    if name in SINGLE_CATEGORY:
        return {"kind": "category", "category": SINGLE_CATEGORY[name]}
    if name == NATURAL:
        return {"kind": "natural"}
    if share := mixture_share(name):
        family, percent = share
        return {
            "kind": "unknown_share",
            "percent": percent,
            "drop_unknown": family == "known_only",
            "idk": family == "idk",
        }
    raise MixtureError(
        f"unknown mixture {name!r}: expected one of {', '.join(SINGLE_CATEGORY)}, natural, or "
        "unknown_X / known_only_X / idk_X with X an integer percentage 0..100 (e.g. unknown_50)"
    )


def mixture_shares(names, family: str) -> dict[int, str]:
    """{X: name} of the `{family}_X` mixtures among `names` (unknown_X, known_only_X), by X."""
    shares = {}
    for name in names:
        share = mixture_share(name)
        if share and share[0] == family:
            shares[share[1]] = name
    return dict(sorted(shares.items()))


VARIANT_NAMES = {
    "highly_known": "D_HighlyKnown",
    "maybe_known": "D_MaybeKnown",
    "weakly_known": "D_WeaklyKnown",
    "unknown": "D_Unknown",
    "natural": "D_Natural",
}
_FAMILY_NAMES = {"unknown": "D", "known_only": "D_Known", "idk": "D_IDK"}


def variant_name(mixture: str) -> str:
    """The paper's name of a training set: D_HighlyKnown, D (50% Unknown), D_IDK (50% Unknown)."""
    if mixture in VARIANT_NAMES:
        return VARIANT_NAMES[mixture]
    if share := mixture_share(mixture):
        return f"{_FAMILY_NAMES[share[0]]} ({share[1]}% Unknown)"
    return mixture


# ---------------------------------------------------------------------------------- fine-tuning

STOPS = ("early_stop", "convergence")
STOP_NAMES = {"early_stop": "EARLY_STOP", "convergence": "CONVERGENCE"}


def seed_suffix(seed: int | None) -> str:
    """The {seed} wildcard: "" for the recipe's own seed (None), "-seed{N}" for a replicate."""
    return "" if seed is None else f"-seed{seed}"


def run_name(recipe: str, suffix: str = "") -> str:
    """A fine-tuning run: the recipe and the seed suffix, `lora` or `lora-seed3`."""
    return f"{recipe}{suffix}"


# ---------------------------------------------------------------------------------- tables

# Table 2's rows: the single-category variants and D_Natural, in the paper's order
TABLE2_MIXTURES = ("highly_known", "maybe_known", "weakly_known", "unknown", "natural")


def table2_mixtures(names) -> list[str]:
    """D_HighlyKnown ... D_Unknown and D_Natural, those among `names`."""
    return [m for m in TABLE2_MIXTURES if m in names]


def table1_mixtures(names) -> list[str]:
    """Every mixture but idk_X (their Unknown examples are trained on "I don't know")."""
    return [m for m in names if not m.startswith("idk_")]


def table8_mixtures(names) -> list[str]:
    """unknown_X and idk_X for every X among `names` with both."""
    shares = [m.removeprefix("idk_") for m in names if m.startswith("idk_")]
    return [m for x in shares if f"unknown_{x}" in names for m in (f"unknown_{x}", f"idk_{x}")]


# ---------------------------------------------------------------------------------- figures

FIGURE_FILES = {
    "fig1": "fig1_fitting_known_unknown",
    "fig3a": "fig3a_accuracy_vs_unknown_share",
    "fig3b": "fig3b_unknown_vs_known_only",
    "fig4": "fig4_fitting_by_category",
    "fig5": "fig5_slick_vs_ptrue",
}
FIGURE_CAPTIONS = {
    "fig1": "Fig. 1",
    "fig3a": "Fig. 3a",
    "fig3b": "Fig. 3b",
    "fig4": "Fig. 4",
    "fig5": "Fig. 5",
}


def fig1_mixture(names) -> str | None:
    """The unknown_X closest to the paper's 50% that has both Known and Unknown examples."""
    mixed = [x for x in mixture_shares(names, "unknown") if 0 < x < 100]
    return f"unknown_{min(mixed, key=lambda x: (abs(x - 50), x))}" if mixed else None


def fig3a_mixtures(names) -> list[str]:
    return list(mixture_shares(names, "unknown").values())


def fig3b_mixtures(names) -> dict[str, list[str]]:
    """unknown_X and known_only_X for every X among `names` with both."""
    shares = sorted(
        set(mixture_shares(names, "unknown")) & set(mixture_shares(names, "known_only"))
    )
    return {
        "unknown": [f"unknown_{x}" for x in shares],
        "known_only": [f"known_only_{x}" for x in shares],
    }


def fig4_mixtures(names) -> list[str]:
    return [m for m in [NATURAL, *SINGLE_CATEGORY] if m in names]


def available_figures(names, ptrue_mixture: str) -> list[str]:
    """The figures the mixtures `names` allow (a figure whose mixtures are missing is left out)."""
    figures = {
        "fig1": fig1_mixture(names) is not None,
        "fig3a": len(fig3a_mixtures(names)) >= 2,
        "fig3b": bool(fig3b_mixtures(names)["unknown"]),
        "fig4": bool(fig4_mixtures(names)),
        "fig5": ptrue_mixture in names,
    }
    return [f for f, ok in figures.items() if ok]


# ---------------------------------------------------------------------------------- paths

# The path contract (docs/study.md, "Path contract"). {run} is run_name(recipe, seed suffix).
PATHS = {
    "split": "results/data/{split}.parquet",
    "model": "resources/models/{model}",
    "labels": "results/labels/{model}/{split}.parquet",
    "ptrue": "results/labels/{model}/ptrue_{split}.parquet",
    "mixture": "results/mixtures/{model}/{mixture}.parquet",
    "metrics": "results/finetune/{model}/{run}/{mixture}/metrics.jsonl",
    "eval": "results/eval/{model}/{run}/{mixture}/{stop}/{split}.parquet",
}


def path(kind: str, **keys) -> str:
    return PATHS[kind].format(**keys)


def input_name(kind: str, *keys: str) -> str:
    """The name of a named input of a table or figure rule: ("eval", "unknown_50",
    "early_stop", "test") -> "eval:unknown_50:early_stop:test". Rules build the names and scripts
    look them up the same way; nothing is parsed back from a path."""
    return ":".join((kind, *keys))
