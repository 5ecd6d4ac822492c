"""Generation on a model sharded over two gloo ranks (FSDP2), in lockstep (eqtools.engine.lockstep):
every rank answers its share on the sharded model, ranks with very different work (one with no
requests at all) finish without hanging, and the answers equal those of one process.

The references are computed in this process on an unsharded copy of the same weights: greedy
answers by transformers' own `generate`, one prompt at a time (eager attention); sampled ones by
the engine in one process, whose samples are checked against the reference path elsewhere
(tests/test_generation.py)."""

import json
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch
import torch.distributed as dist
from test_checkpoint import build
from transformers import AutoTokenizer

from eqtools import distributed
from eqtools.engine import Generator, Lockstep, Request
from eqtools.engine.lockstep import gather_answers, share
from eqtools.training import answer_questions

QUESTIONS = [f"Who founded company number {i}?" for i in range(7)] + [
    "What is the capital of France?",
    "Which river flows through the old town of Prague?",
]
CASES = [("full", "levels"), ("full", "reference"), ("lora", "levels"), ("lora", "reference")]
MAX_NEW_TOKENS = 6


def sampled_requests(generator) -> list[Request]:
    """A few-shot prefix, each question sampled with 3 random streams: SliCK's kind of work."""
    prefix = generator.add_prefix("Q: What is the capital of Italy?\nA: Rome\n")
    return [
        Request(prefix, generator.prompt_tokens(prefix, f"Q: {q}\nA:"), key=1000 * i + s)
        for i, q in enumerate(QUESTIONS)
        for s in range(3)
    ]


def run_all(generator, ranks) -> dict:
    """Greedy answers of QUESTIONS shared by the ranks, then sampled requests all on rank 0 (rank 1
    has none), then sampled requests where rank 1 cancels its own after one step."""
    greedy = answer_questions(generator, QUESTIONS, ranks)
    requests = sampled_requests(generator)
    mine = requests if ranks.main else []
    sampled = {i: generator.decode(t) for i, t in generator.generate(mine)}
    requests_1 = share(len(requests), ranks.rank, ranks.world)
    steps = {}

    def keep(i):  # rank 1 drops every request after its first step
        steps[i] = steps.get(i, 0) + 1
        return ranks.main or steps[i] < 2

    cancelled = {
        requests_1[i]: generator.decode(t)
        for i, t in generator.generate([requests[j] for j in requests_1], keep)
    }
    return {
        "greedy": greedy,
        "sampled": {str(k): v for k, v in sorted(sampled.items())},
        "cancelled": {str(k): v for k, v in sorted(cancelled.items())},
        "placeholders": generator.lockstep.placeholders if generator.lockstep else 0,
    }


def rank_answers(rank: int, model_dir: str, out: str, store: str) -> None:
    """One rank of the two-process job: every case on the sharded model, in lockstep."""
    torch.set_num_threads(1)
    # a rank that fails makes the other one time out in its next collective, not hang the test
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    ranks = distributed.Ranks(rank, 2, rank)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        for method, backend in CASES:
            model = distributed.shard(build(Path(model_dir), method)).eval()
            generator = Generator(
                model, tokenizer, max_new_tokens=MAX_NEW_TOKENS, backend=backend,
                lockstep=Lockstep(model, "cpu"),
            )  # fmt: skip
            result = run_all(generator, ranks)
            Path(out, f"{method}-{backend}-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def eager_greedy(model, tokenizer, generator) -> list[str]:
    """transformers' generate, one prompt at a time, eager attention, cut at the first stop."""
    from eqtools.training import format_prompt

    answers = []
    for q in QUESTIONS:
        ids = tokenizer(format_prompt(q), return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0
            )[0, ids.shape[1] :].tolist()
        stops = [j for j, t in enumerate(out) if generator.stop_token[t]]
        answers.append(generator.decode(out[: stops[0]] if stops else out))
    return answers


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("lockstep")
    mp.spawn(rank_answers, args=(str(tiny_model_dir), str(out), str(out / "store")), nprocs=2)
    return out


@pytest.mark.parametrize(("method", "backend"), CASES, ids=["-".join(c) for c in CASES])
def test_two_ranks_in_lockstep_answer_like_one_process(method, backend, two_ranks, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = build(tiny_model_dir, method).eval()  # the same weights, unsharded
    model.config._attn_implementation = "eager"
    one = Generator(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS, backend=backend)
    assert one.backend == backend
    expected = run_all(one, distributed.ONE_PROCESS)
    ranks = [json.loads((two_ranks / f"{method}-{backend}-{r}.json").read_text()) for r in (0, 1)]
    # every rank ends with all the greedy answers: transformers' eager generate's
    assert ranks[0]["greedy"] == ranks[1]["greedy"] == expected["greedy"]
    assert expected["greedy"] == eager_greedy(model, tokenizer, one)
    assert any(expected["greedy"])  # the random model answers something
    # rank 0 alone sampled everything; rank 1 had nothing and stepped with it
    assert ranks[0]["sampled"] == expected["sampled"] and ranks[1]["sampled"] == {}
    assert ranks[1]["placeholders"] > 0 and len(ranks[0]["sampled"]) == 3 * len(QUESTIONS)
    # rank 0's share went on to the end; rank 1 cancelled its requests after one step (only
    # those that stopped at their first token came back), while rank 0 still stepped
    share_0 = {str(i) for i in share(3 * len(QUESTIONS), 0, 2)}
    assert set(ranks[0]["cancelled"]) == share_0
    for result in ranks:
        assert result["cancelled"] == {k: expected["sampled"][k] for k in result["cancelled"]}
    assert len(ranks[1]["cancelled"]) < 3 * len(QUESTIONS) - len(share_0)


def test_each_item_is_on_exactly_one_rank_and_gathered_in_order():
    n, world = 11, 3
    shares = [share(n, r, world) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert gather_answers(["a", "b"], 2, 1) == ["a", "b"]


@pytest.mark.parametrize(
    ("multi_gpu", "strategy"),
    [
        # FSDP's lockstep labelling is also covered by the engine's lockstep tests above; the
        # whole chunk through the script runs in make test-e2e (make test's time budget)
        pytest.param("fsdp", "FSDP, in lockstep", marks=pytest.mark.e2e),
        ("auto", "tensor parallel"),  # the tiny Llama has a TP plan
    ],
)
def test_a_chunk_labelled_by_two_ranks_is_byte_identical_to_one_process(
    multi_gpu, strategy, tiny_model_dir, tmp_path
):
    """label_questions.py's ranks (torchrun; sharded with FSDP2, in lockstep, or tensor
    parallel) against the same script in one process without torch.distributed; then P(True) of
    the labelled questions likewise."""
    import label_questions
    import ptrue

    from eqtools.settings import Labelling, PtrueOptions, Slick, TrackedModel
    from eqtools.settings import Ptrue as PtrueSpec
    from eqtools.slick import draw_exemplars

    dev = pl.DataFrame(
        {
            "id": [f"P1.dev.{i}" for i in range(8)],
            "relation": ["P1"] * 8,
            "question": [f"Who is person {i}?" for i in range(8)],
            "answer": [f"name {i}" for i in range(8)],
        }
    )
    (tmp_path / "exemplars.json").write_text(json.dumps(draw_exemplars(dev, 3, 2, seed=0)))
    # gold answers the random model gives for some questions, so that the chunk mixes categories
    gold = ["Paris", "?", "London", "?", "?", "name 1", "?"]
    questions = pl.DataFrame(
        {
            "id": [f"P1.test.{i}" for i in range(7)],
            "relation": ["P1"] * 7,
            "question": [f"Where is place {i}?" for i in range(7)],
            "answer": gold,
        }
    )
    questions.write_parquet(tmp_path / "questions.parquet")
    entry = TrackedModel(dtype="float32")
    slick = Slick(3, 2, 4, 1.0, 50, 3, 7, False)
    job = {
        "model": str(tiny_model_dir),
        "questions": str(tmp_path / "questions.parquet"),
        "exemplars": str(tmp_path / "exemplars.json"),
        "split": "test",
        "relation": "P1",
        "spec": Labelling(slick, entry).param(),
        "max_batch_rows": 16,
        "backend": "auto",
        "stamp": {"spec": "labelling"},
        "questions_per_save": 3,  # several groups, the last one short
    }

    def run(work, job: dict, name: str, gpus: int) -> Path:
        """The rule script's job as the rule runs it, with `gpus` for the model (a rule-like
        namespace: the model entry's scheduling keys, a thread per rank, log and output)."""
        output = tmp_path / f"{name}{gpus}.parquet"
        smk = SimpleNamespace(
            wildcards=SimpleNamespace(model="tiny"),
            config={"models": {"tiny": {"gpus": gpus, "multi_gpu": multi_gpu, "device": "cpu"}}},
            threads=gpus,
            log=[str(tmp_path / f"{name}{gpus}.log")],
            output=[str(output)],
        )
        script = sys.modules[work.__module__].__file__
        distributed.run_model_job(work, script, job | {"output": str(output)}, smk)
        return output

    outputs = {gpus: run(label_questions.label, job, "labels", gpus) for gpus in (1, 2)}
    log = (tmp_path / "labels2.log").read_text()
    assert "2 process(es)" in log and f"2 ranks: {strategy}" in log
    assert outputs[1].read_bytes() == outputs[2].read_bytes()
    labels = pl.read_parquet(outputs[1])
    assert labels["id"].to_list() == questions["id"].to_list()
    assert labels["category"].n_unique() > 1 and labels["n_sampled"].sum() > 0

    questions.join(labels.drop("relation"), on="id").write_parquet(tmp_path / "labelled.parquet")
    scoring = {
        "model": str(tiny_model_dir),
        "labels": str(tmp_path / "labelled.parquet"),
        "split": "test",
        "spec": PtrueSpec(PtrueOptions("all"), entry).param(),
        "max_batch_rows": 4,
        "stamp": {"spec": "ptrue"},
        "questions_per_save": 3,
    }
    scores = {gpus: pl.read_parquet(run(ptrue.score, scoring, "ptrue", gpus)) for gpus in (1, 2)}
    # the ranks' batches hold other prompts (left-padded to another width): rounding only
    assert scores[1]["id"].to_list() == scores[2]["id"].to_list()
    assert scores[2]["p_true"].to_numpy() == pytest.approx(scores[1]["p_true"].to_numpy(), abs=1e-6)
