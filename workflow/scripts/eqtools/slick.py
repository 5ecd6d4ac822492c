"""SliCK (docs/study.md, "SliCK"): exemplar sets, few-shot prompts, the exact sampling shortcut
and categories."""

import hashlib
import logging
from collections.abc import Mapping

import polars as pl

from eqtools.em import exact_match
from eqtools.sampling import stable_keys
from eqtools.study import CATEGORIES, categorize

log = logging.getLogger(__name__)


# One row per question, as `label_questions` returns it and a labelled chunk is written.
LABEL_SCHEMA = {
    "id": pl.String,
    "relation": pl.String,
    "n_greedy": pl.Int32,
    "n_greedy_correct": pl.Int32,
    "n_sampled": pl.Int32,
    "n_sampled_correct": pl.Int32,
    "p_correct_greedy": pl.Float64,
    "p_correct_sampled": pl.Float64,
    "category": pl.Enum(CATEGORIES),
    "greedy_answers": pl.List(pl.String),
}


class ExemplarError(ValueError):
    pass


def draw_exemplars(dev: pl.DataFrame, n_sets: int, k: int, seed: int) -> dict:
    """Per relation: `n_sets` disjoint sets of `k` dev questions, and one spare that replaces a
    question in its own set when that question is labelled (so no prompt contains its question).

    Returns {relation: {"sets": [[{id, question, answer}, ...], ...], "spare": {...}}}."""
    out = {}
    need = n_sets * k + 1
    for relation in sorted(dev["relation"].unique()):
        rows = dev.filter(pl.col("relation") == relation).select("id", "question", "answer")
        if rows.height < need:
            raise ExemplarError(
                f"relation {relation}: {rows.height} dev questions, but {n_sets} exemplar sets of "
                f"{k} plus a spare need {need}; lower slick.n_exemplar_sets or slick.k_shot, or "
                f"raise subsample.max_per_relation.dev"
            )
        order = rows.with_columns(
            pl.Series("_key", stable_keys(rows["id"], seed, f"exemplars:{relation}"))
        )
        picked = order.sort("_key").head(need).drop("_key").to_dicts()
        out[relation] = {
            "sets": [picked[i * k : (i + 1) * k] for i in range(n_sets)],
            "spare": picked[-1],
        }
    return out


def exemplar_set_for(relation_sets: dict, set_index: int, question_id: str) -> list[dict]:
    """The exemplar set, with the spare in place of the question itself if it is a member."""
    chosen = relation_sets["sets"][set_index]
    return [relation_sets["spare"] if ex["id"] == question_id else ex for ex in chosen]


def format_exemplars(exemplars: list[dict]) -> str:
    return "".join(f"Q: {ex['question']}\nA: {ex['answer']}\n" for ex in exemplars)


def format_question(question: str) -> str:
    return f"Q: {question}\nA:"


def sample_key(seed: int, question_id: str, set_index: int, sample_index: int) -> int:
    """The random stream of one sample: a uint32 from (seed, question, set, sample)."""
    digest = hashlib.sha256(f"{seed}:{question_id}:{set_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def label_questions(
    generator,
    questions: pl.DataFrame,
    exemplars: Mapping[str, dict],
    n_samples: int,
    seed: int,
    full_p_correct: bool = False,
) -> pl.DataFrame:
    """SliCK labels of `questions` (columns id, relation, question, answer).

    Greedy answers for every exemplar set first; then, unless `full_p_correct`, samples only for
    questions whose greedy answers are all wrong, stopping at the first correct sample. The
    categories equal those of full sampling: samples are drawn from per-sample random streams.
    `generator` is an eqtools.engine.Generator."""
    from eqtools.engine import Request  # torch: only the labelling job needs it

    rows = questions.select("id", "relation", "question", "answer").to_dicts()
    n_sets = len(next(iter(exemplars.values()))["sets"]) if exemplars else 0
    prompts = []  # (question position, set index, prefix id, prompt tokens)
    for qi, row in enumerate(rows):
        if row["relation"] not in exemplars:
            raise ExemplarError(
                f"question {row['id']}: no exemplar sets for relation {row['relation']}"
            )
        for e in range(n_sets):
            ex = exemplar_set_for(exemplars[row["relation"]], e, row["id"])
            prefix = generator.add_prefix(format_exemplars(ex))
            prompts.append(
                (qi, e, prefix, generator.prompt_tokens(prefix, format_question(row["question"])))
            )
    # group rows by prefix so that a wave shares few prefixes
    prompts.sort(key=lambda p: (p[2], len(p[3])))

    greedy_answers = [[""] * n_sets for _ in rows]
    greedy_correct = [0] * len(rows)
    requests = [Request(prefix, tokens) for _, _, prefix, tokens in prompts]
    for i, tokens in generator.generate(requests):
        qi, e = prompts[i][0], prompts[i][1]
        answer = generator.decode(tokens)
        greedy_answers[qi][e] = answer
        greedy_correct[qi] += exact_match(answer, rows[qi]["answer"])

    sampled = [0] * len(rows)
    sampled_correct = [0] * len(rows)
    todo = [full_p_correct or greedy_correct[qi] == 0 for qi in range(len(rows))]
    # called with no requests too: under lockstep (a sharded model) every rank takes part
    if n_samples > 0:
        # set by set, so that a question settled by an early set skips the later ones
        order = sorted((p for p in prompts if todo[p[0]]), key=lambda p: (p[1], p[2], len(p[3])))
        meta = [(p[0], s) for p in order for s in range(n_samples)]
        requests = [
            Request(prefix, tokens, sample_key(seed, rows[qi]["id"], e, s))
            for qi, e, prefix, tokens in order
            for s in range(n_samples)
        ]
        settled = [False] * len(rows)

        def keep(i):
            return full_p_correct or not settled[meta[i][0]]

        for i, tokens in generator.generate(requests, keep=keep):
            qi = meta[i][0]
            sampled[qi] += 1
            if exact_match(generator.decode(tokens), rows[qi]["answer"]):
                sampled_correct[qi] += 1
                settled[qi] = True

    n_total = n_sets * n_samples
    out = []
    for qi, row in enumerate(rows):
        exact = full_p_correct or (greedy_correct[qi] == 0 and sampled_correct[qi] == 0)
        out.append(
            {
                "id": row["id"],
                "relation": row["relation"],
                "n_greedy": n_sets,
                "n_greedy_correct": greedy_correct[qi],
                "n_sampled": sampled[qi],
                "n_sampled_correct": sampled_correct[qi],
                "p_correct_greedy": greedy_correct[qi] / n_sets if n_sets else None,
                # exact only when every sample was drawn (full_p_correct, or all of them wrong)
                "p_correct_sampled": (sampled_correct[qi] / n_total if n_total else 0.0)
                if exact
                else None,
                "category": categorize(greedy_correct[qi], n_sets, sampled_correct[qi]),
                "greedy_answers": greedy_answers[qi],
            }
        )
    return pl.DataFrame(out, schema=LABEL_SCHEMA)
