"""P(True) (Kadavath et al. 2022), the baseline of the paper's §6 / Fig. 5 (docs/study.md, "SliCK").

The base model is shown a question with a proposed answer (the model's own greedy answer from
the SliCK labelling, one per exemplar set) and asked whether it is true:

    Question: <q>
    Proposed Answer: <greedy answer>
    Is the proposed answer:
    (A) True
    (B) False
    The proposed answer is:

P(True) = P(" (A)") + P(" A"), normalised against P(" (B)") + P(" B"): the probabilities of the
continuations, scored by teacher forcing in batched forward passes that share each prompt's KV
cache. A question's score is the mean over its proposals *(ours: the paper has N_ex greedy answers
per question and does not say which one it scored; `ptrue.proposals: first` scores only the first
exemplar set's)*.
"""

import logging
import math

import polars as pl

log = logging.getLogger(__name__)

PROMPT = (
    "Question: {question}\nProposed Answer: {answer}\nIs the proposed answer:\n"
    "(A) True\n(B) False\nThe proposed answer is:"
)
# One row per question, as `question_scores` returns it and the P(True) file is written.
SCORE_SCHEMA = {"id": pl.String, "p_true": pl.Float64, "n_proposals": pl.Int32}
TRUE = (" (A)", " A")
FALSE = (" (B)", " B")


def format_prompt(question: str, answer: str) -> str:
    return PROMPT.format(question=question, answer=answer)


def proposals(labels: pl.DataFrame, which: str = "all") -> pl.DataFrame:
    """One row per (question, proposed answer): id, question, answer (the greedy answers of the
    SliCK labels; all of them or the first exemplar set's only)."""
    if which not in ("all", "first"):
        raise ValueError(f"ptrue.proposals must be 'all' or 'first', not {which!r}")
    frame = labels.select("id", "question", pl.col("greedy_answers").alias("answer"))
    if which == "first":
        frame = frame.with_columns(pl.col("answer").list.first())
    else:
        frame = frame.explode("answer")
    return frame.with_columns(pl.col("answer").fill_null(""))


def combine(p_true: list[float], p_false: list[float]) -> list[float]:
    """Normalised P(True) from the summed continuation probabilities of each prompt."""
    out = []
    for t, f in zip(p_true, p_false, strict=True):
        out.append(t / (t + f) if t + f > 0 else 0.5)
    return out


def question_scores(rows: pl.DataFrame, scores: list[float]) -> pl.DataFrame:
    """(id, p_true, n_proposals): the mean P(True) over each question's proposals, in the order
    of first appearance."""
    return (
        rows.select("id")
        .with_columns(pl.Series("p", scores, dtype=pl.Float64))
        .group_by("id", maintain_order=True)
        .agg(pl.col("p").mean().alias("p_true"), pl.len().cast(pl.Int32).alias("n_proposals"))
    )


def continuation_logprobs(
    model, tokenizer, prompts: list[str], continuations, device: str, batch_rows: int, lockstep=None
) -> list[list[float]]:
    """log P(continuation | prompt) for every prompt and each of `continuations`, teacher-forced.

    Prompts and continuations are tokenised separately and concatenated. Each batch of prompts
    (left-padded) is encoded once; the first token of every continuation is scored from the
    prompt's last logits, the rest by a short forward pass over a copy of the prompts' KV cache.
    A model sharded over ranks scores in `lockstep` (eqtools.engine.lockstep): every rank calls
    this with its own prompts, possibly none."""
    import copy

    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    conts = [tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
    encoded = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = [[0.0] * len(conts) for _ in encoded]
    for start in range(0, len(order), batch_rows):
        batch = order[start : start + batch_rows]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        with torch.no_grad() if lockstep else torch.inference_mode():
            if lockstep:
                lockstep.step()
            prompt_out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
            first = torch.log_softmax(prompt_out.logits[:, -1].float(), dim=-1)
            for k, cont in enumerate(conts):
                logp = first[:, cont[0]].clone()
                if len(cont) > 1:
                    rest = torch.tensor(cont, device=device)
                    if lockstep:
                        lockstep.step()
                    step = model(
                        input_ids=rest[:-1].expand(len(batch), -1),
                        attention_mask=torch.cat(
                            [mask, mask.new_ones(len(batch), len(cont) - 1)], dim=1
                        ),
                        position_ids=positions[:, -1:] + torch.arange(1, len(cont), device=device),
                        cache=copy.deepcopy(prompt_out.cache),
                        use_cache=True,
                    )
                    later = torch.log_softmax(step.logits.float(), dim=-1)
                    logp += (
                        later.gather(2, rest[1:].expand(len(batch), -1)[:, :, None])
                        .squeeze(2)
                        .sum(1)
                    )
                for row, i in enumerate(batch):
                    out[i][k] = float(logp[row])
        # the job's progress lines count questions (eqtools.progress); batches only when debugging
        log.debug(
            "P(True): %d / %d prompts scored", min(start + batch_rows, len(order)), len(order)
        )
    if lockstep:
        lockstep.drain()
    return out


def score_p_true(
    model, tokenizer, rows: pl.DataFrame, device: str, batch_rows: int, lockstep=None
) -> list[float]:
    """P(True) of each (question, answer) row, one score per row."""
    prompts = [format_prompt(q, a) for q, a in zip(rows["question"], rows["answer"], strict=True)]
    unique = list(dict.fromkeys(prompts))  # equal greedy answers share one score
    logps = continuation_logprobs(
        model, tokenizer, unique, TRUE + FALSE, device, batch_rows, lockstep
    )
    by_prompt = {}
    for prompt, lps in zip(unique, logps, strict=True):
        probs = [math.exp(x) for x in lps]
        by_prompt[prompt] = combine([sum(probs[: len(TRUE)])], [sum(probs[len(TRUE) :])])[0]
    return [by_prompt[p] for p in prompts]
