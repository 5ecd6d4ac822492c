import polars as pl
import pytest

from eqtools.mixtures import (
    IDK_ANSWER,
    OUTPUT_COLUMNS,
    MixtureError,
    build_mixture,
    parse_mixture,
    relation_sizes,
    unknown_count,
)
from eqtools.study import CATEGORIES, KNOWN

# (HighlyKnown, MaybeKnown, WeaklyKnown, Unknown) per relation; P26 has no MaybeKnown example
COUNTS = {
    "P17": (10, 8, 6, 12),  # smallest category 6
    "P19": (5, 9, 4, 7),  # 4
    "P36": (20, 7, 9, 11),  # 7
    "P26": (3, 0, 5, 6),  # 0
}
MIN_SIZES = {"P17": 6, "P19": 4, "P26": 0, "P36": 7}
SHARES = [0, 25, 33, 50, 75, 100]
EQUAL_SIZE_VARIANTS = ["highly_known", "maybe_known", "weakly_known", "unknown", "natural"] + [
    f"unknown_{x}" for x in SHARES
]
ALL_VARIANTS = (
    EQUAL_SIZE_VARIANTS + [f"known_only_{x}" for x in SHARES] + [f"idk_{x}" for x in SHARES]
)


def make_labels(counts=COUNTS, enum=True) -> pl.DataFrame:
    rows = []
    for relation, per_category in counts.items():
        i = 0
        for category, n in zip(CATEGORIES, per_category, strict=True):
            for _ in range(n):
                rows.append(
                    {
                        "id": f"{relation}.train.{i}",
                        "relation": relation,
                        "question": f"q {relation} {i}?",
                        "answer": f"ans {relation} {i}",
                        "category": category,
                        "n_greedy_correct": 3,  # an extra column, as real label tables have
                    }
                )
                i += 1
    frame = pl.DataFrame(rows)
    return frame.with_columns(pl.col("category").cast(pl.Enum(CATEGORIES))) if enum else frame


@pytest.fixture(scope="module")
def labels():
    return make_labels()


def per_relation(frame: pl.DataFrame) -> dict[str, int]:
    return dict(frame.group_by("relation").len().iter_rows())


def per_relation_category(frame: pl.DataFrame) -> dict[tuple[str, str], int]:
    counts = (
        frame.with_columns(pl.col("category").cast(pl.String))
        .group_by("relation", "category")
        .len()
    )
    return {(r, c): n for r, c, n in counts.iter_rows()}


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("highly_known", {"kind": "category", "category": "HighlyKnown"}),
        ("maybe_known", {"kind": "category", "category": "MaybeKnown"}),
        ("weakly_known", {"kind": "category", "category": "WeaklyKnown"}),
        ("unknown", {"kind": "category", "category": "Unknown"}),
        ("natural", {"kind": "natural"}),
        ("unknown_0", {"kind": "unknown_share", "percent": 0, "drop_unknown": False, "idk": False}),
        (
            "unknown_50",
            {"kind": "unknown_share", "percent": 50, "drop_unknown": False, "idk": False},
        ),
        (
            "unknown_100",
            {"kind": "unknown_share", "percent": 100, "drop_unknown": False, "idk": False},
        ),
        (
            "known_only_25",
            {"kind": "unknown_share", "percent": 25, "drop_unknown": True, "idk": False},
        ),
        ("idk_50", {"kind": "unknown_share", "percent": 50, "drop_unknown": False, "idk": True}),
    ],
)
def test_parse_mixture(name, spec):
    assert parse_mixture(name) == spec


@pytest.mark.parametrize(
    "name",
    [
        "unknown_101",
        "unknown_-1",
        "unknown_05",
        "unknown_50.0",
        "unknown_",
        "Unknown",
        "idk",
        "known_only",
        "natural_50",
        "highly-known",
        "unknown_50 ",
        "",
    ],
)
def test_parse_mixture_rejects_bad_names(name):
    with pytest.raises(MixtureError, match="unknown mixture") as err:
        parse_mixture(name)
    assert repr(name) in str(err.value)
    assert "unknown_X" in str(err.value)  # the message says what is allowed


def test_unknown_count_rounds_half_up():
    assert [unknown_count(50, n) for n in range(8)] == [0, 1, 1, 2, 2, 3, 3, 4]
    assert unknown_count(25, 6) == 2  # 1.5 -> 2
    assert unknown_count(25, 2) == 1  # 0.5 -> 1
    assert unknown_count(33, 4) == 1  # 1.32 -> 1
    assert unknown_count(75, 6) == 5  # 4.5 -> 5
    assert all(unknown_count(0, n) == 0 and unknown_count(100, n) == n for n in range(20))


# --- sizes ---------------------------------------------------------------------------------------


def test_paper_rule_is_the_smallest_category_and_zero_for_an_empty_one(labels):
    sizes = relation_sizes(labels, None, None)
    assert sizes == MIN_SIZES
    assert list(sizes) == sorted(sizes)
    assert sum(sizes.values()) == 17


def test_sizes_do_not_depend_on_the_category_dtype(labels):
    assert relation_sizes(make_labels(enum=False), None, None) == relation_sizes(labels, None, None)


def test_relations_option_restricts_the_relations(labels):
    assert relation_sizes(labels, ["P36", "P17"], None) == {"P17": 6, "P36": 7}
    assert relation_sizes(labels, ["P19"], 3) == {"P19": 3}


def test_unknown_relation_is_an_error(labels):
    with pytest.raises(MixtureError, match=r"mixtures\.relations.*P999") as err:
        relation_sizes(labels, ["P17", "P999"], None)
    assert "P17" in str(err.value)  # lists the relations that are present


def test_per_relation_size_is_fixed_for_every_relation(labels):
    assert relation_sizes(labels, None, 5) == {"P17": 5, "P19": 5, "P26": 5, "P36": 5}
    assert relation_sizes(labels, None, 0) == dict.fromkeys(MIN_SIZES, 0)
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(MixtureError, match="per_relation_size"):
            relation_sizes(labels, None, bad)


def test_bad_labels_are_rejected(labels):
    with pytest.raises(MixtureError, match="question"):
        relation_sizes(labels.drop("question"), None, None)
    odd = labels.with_columns(pl.col("category").cast(pl.String).replace("MaybeKnown", "Maybe"))
    with pytest.raises(MixtureError, match="Maybe"):
        build_mixture(odd, "natural", MIN_SIZES, 0)
    with pytest.raises(MixtureError, match="duplicate"):
        relation_sizes(pl.concat([labels, labels.head(1)]), None, None)


# --- compositions --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EQUAL_SIZE_VARIANTS + [f"idk_{x}" for x in SHARES])
def test_every_variant_has_size_D_and_the_same_relation_distribution(labels, name):
    sizes = relation_sizes(labels, None, None)
    mixture = build_mixture(labels, name, sizes, seed=0)
    assert mixture.height == sum(sizes.values()) == 17
    assert per_relation(mixture) == {r: n for r, n in sizes.items() if n}
    assert mixture["id"].n_unique() == mixture.height


@pytest.mark.parametrize("category", CATEGORIES)
def test_single_category_variants_hold_only_that_category(labels, category):
    name = {
        "HighlyKnown": "highly_known",
        "MaybeKnown": "maybe_known",
        "WeaklyKnown": "weakly_known",
        "Unknown": "unknown",
    }[category]
    mixture = build_mixture(labels, name, MIN_SIZES, seed=0)
    assert set(mixture["category"].cast(pl.String)) == {category}
    assert mixture["known"].to_list() == [category in KNOWN] * mixture.height
    assert "P26" not in mixture["relation"].to_list()  # n_r = 0: its MaybeKnown pool is empty


@pytest.mark.parametrize("x", SHARES)
def test_unknown_share_composition_per_relation(labels, x):
    mixture = build_mixture(labels, f"unknown_{x}", MIN_SIZES, seed=0)
    counts = per_relation_category(mixture)
    for relation, n in MIN_SIZES.items():
        n_unknown = counts.get((relation, "Unknown"), 0)
        n_known = sum(counts.get((relation, c), 0) for c in KNOWN)
        assert n_unknown == unknown_count(x, n)
        assert n_known == n - unknown_count(x, n)
    assert mixture["known"].to_list() == [c in KNOWN for c in mixture["category"].cast(pl.String)]


def test_unknown_0_has_no_unknown_and_unknown_100_only_unknown(labels):
    none = build_mixture(labels, "unknown_0", MIN_SIZES, seed=0)
    assert none["known"].all() and "Unknown" not in none["category"].cast(pl.String).to_list()
    only = build_mixture(labels, "unknown_100", MIN_SIZES, seed=0)
    assert not only["known"].any() and set(only["category"].cast(pl.String)) == {"Unknown"}
    # same pool order: D_Unknown is the 100% Unknown mixture
    assert only.equals(build_mixture(labels, "unknown", MIN_SIZES, seed=0))


def test_unknown_share_draws_are_nested_across_shares(labels):
    draws = {x: build_mixture(labels, f"unknown_{x}", MIN_SIZES, seed=3) for x in SHARES}
    for low, high in zip(SHARES, SHARES[1:], strict=False):
        unknown_low = set(draws[low].filter(~pl.col("known"))["id"])
        unknown_high = set(draws[high].filter(~pl.col("known"))["id"])
        known_low = set(draws[low].filter(pl.col("known"))["id"])
        known_high = set(draws[high].filter(pl.col("known"))["id"])
        assert unknown_low <= unknown_high
        assert known_high <= known_low


def test_natural_keeps_relation_shares_and_draws_from_every_category(labels):
    mixture = build_mixture(labels, "natural", MIN_SIZES, seed=0)
    assert per_relation(mixture) == {r: n for r, n in MIN_SIZES.items() if n}
    # a draw of a whole pool is the pool itself, so its distribution is the natural one
    whole = {r: sum(c) for r, c in COUNTS.items()}
    everything = build_mixture(labels, "natural", whole, seed=0)
    assert sorted(everything["id"]) == sorted(labels["id"])
    assert per_relation_category(everything) == {
        (r, c): n for r, per in COUNTS.items() for c, n in zip(CATEGORIES, per, strict=True) if n
    }


def test_natural_follows_the_pool_distribution_on_a_large_pool():
    big = make_labels({"P17": (500, 300, 150, 50)})
    mixture = build_mixture(big, "natural", {"P17": 400}, seed=0)
    shares = {c: n / 400 for (_, c), n in per_relation_category(mixture).items()}
    for category, expected in zip(CATEGORIES, (0.5, 0.3, 0.15, 0.05), strict=True):
        assert abs(shares[category] - expected) < 0.06, (category, shares)


@pytest.mark.parametrize("x", SHARES)
def test_known_only_is_the_known_part_of_unknown_x(labels, x):
    full = build_mixture(labels, f"unknown_{x}", MIN_SIZES, seed=1)
    known_only = build_mixture(labels, f"known_only_{x}", MIN_SIZES, seed=1)
    assert known_only.equals(full.filter(pl.col("known")))
    assert known_only.height > 0 or x == 100
    assert known_only.height == sum(n - unknown_count(x, n) for n in MIN_SIZES.values())
    assert per_relation(known_only) == {
        r: n - unknown_count(x, n) for r, n in MIN_SIZES.items() if n - unknown_count(x, n)
    }


@pytest.mark.parametrize("x", [25, 50, 100])
def test_idk_replaces_only_unknown_answers(labels, x):
    base = build_mixture(labels, f"unknown_{x}", MIN_SIZES, seed=0)
    idk = build_mixture(labels, f"idk_{x}", MIN_SIZES, seed=0)
    assert idk.drop("answer").equals(base.drop("answer"))
    unknown, known = idk.filter(~pl.col("known")), idk.filter(pl.col("known"))
    assert unknown.height == sum(unknown_count(x, n) for n in MIN_SIZES.values()) > 0
    assert (
        unknown["answer"].to_list()
        == [IDK_ANSWER] * unknown.height
        == ["I don't know"] * unknown.height
    )
    assert known["answer"].to_list() == known["gold_answer"].to_list()
    assert IDK_ANSWER not in base["answer"].to_list()
    # gold_answer is the labelled answer, for every row
    gold = dict(labels.select("id", "answer").iter_rows())
    assert idk["gold_answer"].to_list() == [gold[i] for i in idk["id"]]


def test_rows_and_columns_come_from_the_labels(labels):
    mixture = build_mixture(labels, "unknown_50", MIN_SIZES, seed=0)
    assert mixture.columns == list(OUTPUT_COLUMNS)
    assert mixture.schema["category"] == pl.Enum(CATEGORIES)
    assert mixture.schema["known"] == pl.Boolean
    assert mixture.equals(mixture.sort("relation", "id"))
    source = labels.select("id", "relation", "question", "answer", "category")
    joined = mixture.join(source, on="id", suffix="_src")
    assert joined.height == mixture.height
    for column in ("relation", "question", "answer", "category"):
        assert joined[column].to_list() == joined[f"{column}_src"].to_list()
    assert mixture["answer"].to_list() == mixture["gold_answer"].to_list()


def test_string_categories_give_the_same_mixture(labels):
    strings = make_labels(enum=False)
    for name in ("natural", "unknown_50", "weakly_known"):
        assert build_mixture(strings, name, MIN_SIZES, 4).equals(
            build_mixture(labels, name, MIN_SIZES, 4)
        )


def test_zero_sizes_give_an_empty_mixture(labels):
    empty = build_mixture(labels, "unknown_50", dict.fromkeys(MIN_SIZES, 0), seed=0)
    assert empty.height == 0 and empty.columns == list(OUTPUT_COLUMNS)
    assert build_mixture(labels, "natural", {}, seed=0).height == 0


# --- seeds ---------------------------------------------------------------------------------------


# known_only_100 is empty whatever the seed (checked by the known_only test)
@pytest.mark.parametrize("name", [n for n in ALL_VARIANTS if n != "known_only_100"])
def test_deterministic_per_seed_and_different_across_seeds(labels, name):
    first = build_mixture(labels, name, MIN_SIZES, seed=0)
    assert first.equals(build_mixture(labels, name, MIN_SIZES, seed=0))
    shuffled = labels.sample(fraction=1.0, shuffle=True, seed=7)
    assert first.equals(build_mixture(shuffled, name, MIN_SIZES, seed=0))
    others = [set(build_mixture(labels, name, MIN_SIZES, seed=s)["id"]) for s in (1, 2, 3)]
    assert any(ids != set(first["id"]) for ids in others)


def test_a_relation_draw_does_not_depend_on_other_relations(labels):
    alone = build_mixture(
        labels.filter(pl.col("relation") == "P17"), "unknown_50", {"P17": 6}, seed=0
    )
    together = build_mixture(labels, "unknown_50", MIN_SIZES, seed=0)
    assert alone.equals(together.filter(pl.col("relation") == "P17"))


# --- options and errors --------------------------------------------------------------------------


def test_relations_and_per_relation_size_options(labels):
    sizes = relation_sizes(labels, ["P17", "P36"], 5)
    for name in ("highly_known", "unknown", "natural", "unknown_50"):
        mixture = build_mixture(labels, name, sizes, seed=0)
        assert per_relation(mixture) == {"P17": 5, "P36": 5}
    known_only = build_mixture(labels, "known_only_50", sizes, seed=0)
    assert per_relation(known_only) == {"P17": 2, "P36": 2}  # 5 - round(2.5) = 2


def test_not_enough_examples_names_everything_needed(labels):
    sizes = relation_sizes(labels, None, 6)
    with pytest.raises(MixtureError) as err:
        build_mixture(labels, "highly_known", sizes, seed=0)
    message = str(err.value)
    for part in (
        "highly_known",
        "P19",
        "HighlyKnown",
        "needs 6",
        "only 5",
        "mixtures.per_relation_size",
        "mixtures.relations",
    ):
        assert part in message, (part, message)


def test_not_enough_examples_for_an_empty_category(labels):
    with pytest.raises(
        MixtureError, match=r"maybe_known: relation P26 needs 3 MaybeKnown .* only 0"
    ):
        build_mixture(labels, "maybe_known", relation_sizes(labels, ["P26"], 3), seed=0)
    # the other categories of P26 have 3 examples
    assert build_mixture(labels, "highly_known", {"P26": 3}, seed=0).height == 3


def test_not_enough_known_or_unknown_or_pool_examples(labels):
    with pytest.raises(MixtureError, match=r"unknown_0: relation P19 needs 20 Known .* only 18"):
        build_mixture(labels, "unknown_0", {"P19": 20}, seed=0)
    # 50% of 15 rounds to 8 Unknown; P19 has 7 (and 18 Known, enough for the other 7)
    with pytest.raises(
        MixtureError, match=r"unknown_50: relation P19 needs 8 Unknown .* only 7"
    ) as err:
        build_mixture(labels, "unknown_50", {"P19": 15}, seed=0)
    assert "leave relation P19 out" in str(err.value)
    # the Known ablation fails with its mixture, not with a silently different D
    with pytest.raises(MixtureError, match="known_only_50: relation P19 needs 8 Unknown"):
        build_mixture(labels, "known_only_50", {"P19": 15}, seed=0)
    with pytest.raises(MixtureError, match=r"natural: relation P19 needs 26 natural .* only 25"):
        build_mixture(labels, "natural", {"P19": 26}, seed=0)


def test_build_rejects_unknown_relations_names_and_sizes(labels):
    with pytest.raises(MixtureError, match="P999"):
        build_mixture(labels, "natural", {"P17": 2, "P999": 2}, seed=0)
    with pytest.raises(MixtureError, match="unknown mixture 'unknown_150'"):
        build_mixture(labels, "unknown_150", MIN_SIZES, seed=0)
    with pytest.raises(MixtureError, match="P17"):
        build_mixture(labels, "natural", {"P17": -1}, seed=0)
