"""EntityQuestions: reading the archive, subject extraction and the paper's filters (pure)."""

import json
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl

from eqtools.sampling import stable_keys

ARCHIVE_SPLITS = ("train", "dev", "test")
# ood_dev: dev questions of the out-of-distribution relations, the SliCK exemplar pool for them
OUTPUT_SPLITS = ("train", "dev", "test", "ood_test", "ood_dev")
COLUMNS = ("id", "relation", "subject", "question", "answer")


class DataError(ValueError):
    """The archive or one of its files is not what the workflow expects."""


def member_name(relation: str, split: str) -> str:
    return f"dataset/{split}/{relation}.{split}.json"


def split_template(template: str) -> tuple[str, str]:
    prefix, sep, suffix = template.partition("[X]")
    if not sep or "[X]" in suffix:
        raise DataError(f"template {template!r} must contain [X] exactly once")
    return prefix, suffix


def extract_subject(question: str, template: str) -> str | None:
    """The entity that fills [X] in `template` to give `question`, or None if it does not fit."""
    prefix, suffix = split_template(template)
    if (
        len(question) > len(prefix) + len(suffix)
        and question.startswith(prefix)
        and question.endswith(suffix)
    ):
        return question[len(prefix) : len(question) - len(suffix)]
    return None


def parse_relation_file(
    raw: bytes, relation: str, split: str, template: str, where: str
) -> pl.DataFrame:
    """One archive member as rows (id, relation, split, subject, question, answers)."""
    try:
        items = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: malformed JSON: {e}") from None
    if not isinstance(items, list):
        raise DataError(f"{where}: expected a JSON list of questions, got {type(items).__name__}")
    for i, item in enumerate(items):
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("question"), str)
            and isinstance(item.get("answers"), list)
            and len(item["answers"]) > 0
            and all(isinstance(a, str) for a in item["answers"])
        )
        if not ok:
            raise DataError(
                f"{where}: item {i} is not {{'question': str, 'answers': [str, ...]}}: "
                f"{str(item)[:200]}"
            )
    prefix, suffix = split_template(template)
    frame = pl.DataFrame(
        {
            "question": [it["question"] for it in items],
            "answers": [it["answers"] for it in items],
        },
        schema={"question": pl.String, "answers": pl.List(pl.String)},
    )
    q = pl.col("question")
    fits = (
        q.str.starts_with(prefix)
        & q.str.ends_with(suffix)
        & (q.str.len_chars() > len(prefix) + len(suffix))
    )
    frame = frame.with_row_index("index").with_columns(
        fits.alias("fits"),
        q.str.slice(len(prefix), q.str.len_chars() - len(prefix) - len(suffix)).alias("subject"),
    )
    misfit = frame.filter(~pl.col("fits"))
    if misfit.height:
        row = misfit.row(0, named=True)
        raise DataError(
            f"{where}: question {row['index']} {row['question']!r} does not match the template "
            f"{template!r} of {relation} ({misfit.height} such questions)"
        )
    return frame.select(
        pl.format("{}.{}.{}", pl.lit(relation), pl.lit(split), pl.col("index")).alias("id"),
        pl.lit(relation).alias("relation"),
        pl.lit(split).alias("split"),
        "subject",
        "question",
        "answers",
    )


def read_archive(
    path: str | Path, templates: Mapping[str, str], needed: Iterable[tuple[str, str]]
) -> dict:
    """Parse the (relation, split) members `needed` from the archive at `path`."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e})") from None
    frames = {}
    with zf:
        names = set(zf.namelist())
        for relation, split in needed:
            name = member_name(relation, split)
            if name not in names:
                raise DataError(
                    f"{path}: member {name} is missing; is this the EntityQuestions dataset.zip "
                    f"(layout dataset/{{train,dev,test}}/P<id>.<split>.json)?"
                )
            try:
                raw = zf.read(name)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}: member {name} is corrupt ({e})") from None
            frames[relation, split] = parse_relation_file(
                raw, relation, split, templates[relation], where=f"{path}:{name}"
            )
    return frames


def single_answer(frame: pl.DataFrame) -> pl.DataFrame:
    """Drop questions with more than one gold answer; the rest get a scalar `answer`."""
    return frame.filter(pl.col("answers").list.len() == 1).with_columns(
        pl.col("answers").list.first().alias("answer")
    )


def drop_test_subjects(train: pl.DataFrame, test_subjects: pl.Series) -> pl.DataFrame:
    """Drop train questions whose subject is the subject of any (unfiltered) test question."""
    return train.filter(~pl.col("subject").is_in(test_subjects.implode()))


def build_splits(
    frames: Mapping[tuple[str, str], pl.DataFrame],
    in_distribution: list[str],
    out_of_distribution: list[str],
    filter_relations: Iterable[str],
) -> dict[str, pl.DataFrame]:
    """The paper's filtered splits. `filter_relations`: relations whose test subjects are banned
    from train (the paper: all 24 relations of the archive)."""
    test_subjects = pl.concat([frames[r, "test"]["subject"] for r in filter_relations]).unique()

    def cat(relations, split):
        return pl.concat([frames[r, split] for r in relations]) if relations else None

    splits = {
        "train": drop_test_subjects(single_answer(cat(in_distribution, "train")), test_subjects),
        "dev": single_answer(cat(in_distribution, "dev")),
        "test": single_answer(cat(in_distribution, "test")),
    }
    for name, split in (("ood_test", "test"), ("ood_dev", "dev")):
        ood = cat(out_of_distribution, split)
        splits[name] = single_answer(ood) if ood is not None else splits["test"].clear()
    return {name: frame.select(COLUMNS) for name, frame in splits.items()}


def split_sizes(splits: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """Questions per (relation, split)."""
    return (
        pl.concat(
            [
                f.group_by("relation").len("n").with_columns(pl.lit(name).alias("split"))
                for name, f in splits.items()
            ]
        )
        .select("relation", "split", pl.col("n").cast(pl.Int64))
        .sort("split", "relation")
    )


def subsample(
    frame: pl.DataFrame, max_per_relation: int | None, seed: int, salt: str
) -> pl.DataFrame:
    """At most `max_per_relation` questions of each relation, a seeded draw; order kept."""
    if max_per_relation is None:
        return frame
    keys = stable_keys(frame["id"], seed, salt)
    return (
        frame.with_columns(pl.Series("_key", keys))
        .filter(pl.col("_key").rank("ordinal").over("relation") <= max_per_relation)
        .drop("_key")
    )
