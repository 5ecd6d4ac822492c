"""Training-set mixtures (docs/study.md, "Training sets"): which labelled train questions go into
each fine-tuning set D. Pure functions on polars frames; no I/O. The names of the mixtures
(their grammar) are eqtools.study's.

Every variant of one seed draws from the same orderings: a relation's pool of one category group
(a single SliCK category, all Known, or the whole relation for `natural`) is shuffled once by
`stable_keys` and a variant takes a prefix of it. So D_Unknown is unknown_100, unknown_50's
Unknown rows are a subset of unknown_75's, and known_only_X / idk_X hold the very rows of
unknown_X."""

import polars as pl

from eqtools.sampling import stable_keys
from eqtools.study import CATEGORIES, IDK_ANSWER, KNOWN, MixtureError, parse_mixture

OUTPUT_COLUMNS = ("id", "relation", "question", "answer", "gold_answer", "category", "known")
REQUIRED_COLUMNS = ("id", "relation", "question", "answer", "category")
_KNOWN_GROUP = "Known"  # salt and message name of the HighlyKnown+MaybeKnown+WeaklyKnown pool


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _checked(labels: pl.DataFrame) -> pl.DataFrame:
    """The label columns needed here, with category as a plain string."""
    missing = [c for c in REQUIRED_COLUMNS if c not in labels.columns]
    if missing:
        raise MixtureError(f"labels lack column(s) {', '.join(missing)}")
    out = labels.select(*REQUIRED_COLUMNS).with_columns(pl.col("category").cast(pl.String))
    bad = sorted(set(out["category"].drop_nulls().unique()) - set(CATEGORIES))
    if bad or out["category"].null_count():
        raise MixtureError(f"labels hold categories {bad or [None]} outside {list(CATEGORIES)}")
    if out["id"].n_unique() != out.height:
        raise MixtureError("labels hold duplicate ids")
    return out


def relation_sizes(
    labels: pl.DataFrame, relations: list[str] | None = None, per_relation_size: int | None = None
) -> dict[str, int]:
    """n_r per taking-part relation (|D| = their sum), sorted by relation.

    Default: the paper's rule, the size of the relation's smallest SliCK category (0 when a
    category is empty), so that every single-category variant can be drawn at equal size.
    `per_relation_size` instead fixes n_r; whether the pools are big enough is checked when a
    mixture is built, since that depends on the variant."""
    labels = _checked(labels)
    present = set(labels["relation"].unique())
    if relations is None:
        chosen = sorted(present)
    else:
        absent = sorted(set(relations) - present)
        if absent:
            raise MixtureError(
                f"mixtures.relations names relation(s) {', '.join(absent)} with no labelled train "
                f"questions; present: {', '.join(sorted(present))}"
            )
        chosen = sorted(set(relations))
    if per_relation_size is not None:
        if not _is_count(per_relation_size):
            raise MixtureError(
                "mixtures.per_relation_size must be a non-negative integer, "
                f"got {per_relation_size!r}"
            )
        return {r: per_relation_size for r in chosen}
    counts = labels.group_by("relation", "category").len()
    count = {(r, c): n for r, c, n in counts.iter_rows()}
    return {r: min(count.get((r, c), 0) for c in CATEGORIES) for r in chosen}


def _draw(
    pool: pl.DataFrame, n: int, seed: int, relation: str, group: str, mixture: str
) -> pl.DataFrame:
    """The first n rows of the pool's seeded order (the same order for every variant)."""
    if pool.height < n:
        raise MixtureError(
            f"mixture {mixture}: relation {relation} needs {n} {group} examples but has only "
            f"{pool.height} available; set mixtures.per_relation_size lower, or leave relation "
            f"{relation} out with mixtures.relations"
        )
    keyed = pool.with_columns(
        pl.Series("_key", stable_keys(pool["id"], seed, salt=f"{relation}:{group}"))
    )
    return keyed.sort("_key", "id").head(n).drop("_key")


def unknown_count(percent: int, n: int) -> int:
    """u_r = floor(percent/100 * n + 0.5), in integers so that no float rounding creeps in."""
    return (2 * percent * n + 100) // 200


def build_mixture(
    labels: pl.DataFrame, name: str, sizes: dict[str, int], seed: int
) -> pl.DataFrame:
    """The training set `name` drawn from `labels` with n_r = sizes[r] for each relation in
    `sizes` (see relation_sizes). Columns: OUTPUT_COLUMNS, sorted by relation then id."""
    spec = parse_mixture(name)
    labels = _checked(labels)
    present = set(labels["relation"].unique())
    absent = sorted(set(sizes) - present)
    if absent:
        raise MixtureError(
            f"mixture {name}: relation(s) {', '.join(absent)} have no labelled train questions"
        )
    is_known = pl.col("category").is_in(list(KNOWN))

    parts = []
    for relation in sorted(sizes):
        n = sizes[relation]
        if not _is_count(n):
            raise MixtureError(
                f"mixture {name}: size of relation {relation} "
                f"must be a non-negative integer, got {n!r}"
            )
        pool = labels.filter(pl.col("relation") == relation)
        if spec["kind"] == "category":
            category = spec["category"]
            parts.append(
                _draw(
                    pool.filter(pl.col("category") == category), n, seed, relation, category, name
                )
            )
        elif spec["kind"] == "natural":
            parts.append(_draw(pool, n, seed, relation, "natural", name))
        else:
            u = unknown_count(spec["percent"], n)
            # drawn even for known_only_X, so that it fails exactly when unknown_X does
            unknown = _draw(
                pool.filter(pl.col("category") == "Unknown"), u, seed, relation, "Unknown", name
            )
            known = _draw(pool.filter(is_known), n - u, seed, relation, _KNOWN_GROUP, name)
            parts.extend([known] if spec["drop_unknown"] else [known, unknown])

    out = pl.concat(parts) if parts else labels.clear()
    out = out.with_columns(pl.col("answer").alias("gold_answer"), is_known.alias("known"))
    if spec.get("idk"):
        out = out.with_columns(
            pl.when(pl.col("known"))
            .then(pl.col("answer"))
            .otherwise(pl.lit(IDK_ANSWER))
            .alias("answer")
        )
    return (
        out.with_columns(pl.col("category").cast(pl.Enum(CATEGORIES)))
        .select(OUTPUT_COLUMNS)
        .sort("relation", "id")
    )
