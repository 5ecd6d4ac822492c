"""Evaluation and labelling on every rank: the speed of an epoch's evaluation and of a labelling
chunk at 1 and 2 processes, and the memory of a sharded fine-tune that evaluates, with the code
the `finetune` and `label_questions` rules run.

    python benchmarks/distributed_eval.py [--questions 2048 --max-new-tokens 8 --json out.json]

A random-init Llama of about 0.5 B parameters built from a config (hidden 1536, 16 layers, the
embedded SmolLM2 tokenizer; no download), saved once as fp32 safetensors in a temporary
directory. Every process runs one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)) on the
CPU; 2 processes meet over gloo (torchrun --standalone). Then, one after the other:

1. Evaluation: the zero-shot greedy answers of --questions questions
   (`eqtools.training.answer_questions`, at most --max-new-tokens new tokens), in 1 process and in
   2 processes under DDP (`distributed.wrap`: each rank its own unsharded copy, no lockstep) and
   under FSDP (`distributed.wrap` of a full fp32 recipe: the FSDP2-sharded model itself,
   Generator with `Lockstep`). Each rank answers every second question, every rank gets all the
   answers. The answers of every run must equal those of 1 process (asserted). Timed: the
   evaluation only, from a barrier after the Generator is built to the gathered answers; the
   build (loading, wrapping, the Generator) is reported apart. In the FSDP run, rank 0 runs the
   evaluation under torch.profiler (CPU activity only); the all-gather share is the CPU time of
   FSDP2's own `FSDP::all_gather` and `FSDP::all_gather_copy_out` ranges (the gloo all-gather
   with its copy-in, waiting for the other rank included, and the copy into the unsharded
   parameters) over the evaluation's time.
2. Memory: a whole `eqtools.training.finetune` (full, fp32, --train-examples examples, one batch,
   1 epoch, --eval-questions evaluation questions, checkpoints written) under FSDP in 2
   processes; each rank's peak resident memory (VmHWM), and that of 1 process for context.
3. Labelling: one chunk of --label-questions questions of one relation through
   `label_questions.label` (the rule's code: `distributed.run_model_job`, in this process for 1
   process; under torchrun for 2, once sharded with FSDP2 in lockstep (`multi_gpu: fsdp`), once
   tensor parallel (`multi_gpu: tp`, which `auto` picks for a Llama)), 2 exemplar sets of 2, 2
   samples at T = 0.5, random gold answers (the random model knows none: the questions are
   Unknown and every sample is drawn). The chunk files must be byte-identical to 1 process's
   (asserted). Timed: the labelling the job logs (after the Generator is built, to the gathered
   labels); the whole job's wall time, loading included, is reported apart.

The last four lines are the speedups (1-process time over 2-process time) and rank 0's peak
memory over rank 1's; the last one is labelling's with the strategy `multi_gpu: auto` takes for
this model (tp); FSDP's labelling speedup is printed just before the four.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ["OMP_NUM_THREADS"] = "1"  # before torch starts its thread pool

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow" / "scripts"), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from conftest import embedded_gguf  # noqa: E402
from fsdp_memory import RECIPE as FSDP_MEMORY_RECIPE  # noqa: E402
from prepare_memory import high_water_gib  # noqa: E402

from eqtools import distributed  # noqa: E402
from eqtools.jobstate import job_stamp  # noqa: E402
from eqtools.settings import Recipe, Schedule  # noqa: E402

# the memory benchmark's full fp32 recipe, with a recipe's evaluation length
RECIPE = dict(FSDP_MEMORY_RECIPE, max_new_tokens=8)
ALL_GATHER_RANGES = ("FSDP::all_gather",)  # also matches FSDP::all_gather_copy_out


def build_random_model(directory: Path, hidden: int, layers: int) -> int:
    """A random-init Llama with the embedded model's tokenizer, saved as safetensors; returns its
    parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source, gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64 // 4 or 1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return n


def questions(n: int, start: int = 0) -> list[str]:
    """Entity-question-like prompts (the random model's answers do not depend on their sense)."""
    templates = (
        "Where was {} born?",
        "Which country is {} located in?",
        "Who founded {}?",
        "What is the capital of {}?",
    )
    return [templates[i % 4].format(f"Entity {i}") for i in range(start, start + n)]


def all_gather_seconds(prof) -> float:
    """CPU seconds in FSDP2's all-gather ranges (issue with copy-in, wait, copy-out)."""
    return (
        sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith(ALL_GATHER_RANGES))
        / 1e6
    )


def per_rank(ranks, value) -> list:
    """`value` of every rank, on every rank."""
    if ranks.world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def eval_worker(args, ranks, device) -> None:
    """One process of an evaluation run; rank 0 prints one RESULT line."""
    import contextlib

    from transformers import AutoTokenizer

    from eqtools.engine import Generator, Lockstep
    from eqtools.training import answer_questions, build_model

    recipe = Recipe.from_dict(RECIPE | {"max_new_tokens": args.max_new_tokens})
    schedule = Schedule(strategy=args.strategy, nproc_per_node=ranks.world)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = distributed.wrap(
        lambda where: build_model(args.model, recipe, where), schedule, recipe, device, ranks
    )
    evaluated = distributed.unwrapped(model).eval()
    generator = Generator(
        evaluated,
        tokenizer,
        max_new_tokens=recipe.max_new_tokens,
        lockstep=Lockstep(evaluated, device) if args.strategy == "fsdp" else None,
    )
    build_seconds = time.perf_counter() - started
    profile = args.strategy == "fsdp" and ranks.main
    distributed.barrier(ranks)
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        if profile
        else contextlib.nullcontext()
    ) as p:
        started = time.perf_counter()
        answers = answer_questions(generator, questions(args.questions), ranks)
        seconds = time.perf_counter() - started
    stats = generator.stats
    mine = {
        "build_seconds": build_seconds,
        "seconds": seconds,
        "questions": len(answers[ranks.rank :: ranks.world]),
        "forward_calls": stats.forward_calls,
        "tokens": stats.tokens,
        "waves": stats.waves,
        "placeholder_forwards": generator.lockstep.placeholders if generator.lockstep else 0,
        "all_gather_seconds": all_gather_seconds(p) if profile else None,
    }
    everyone = per_rank(ranks, mine)
    if ranks.main:
        result = {"strategy": args.strategy, "world": ranks.world, "backend": generator.backend}
        print("RESULT " + json.dumps(result | {"answers": answers, "ranks": everyone}), flush=True)


def finetune_worker(args, ranks, device) -> None:
    """One process of a fine-tune with evaluation; rank 0 prints one RESULT line."""
    import polars as pl

    from eqtools.training import finetune

    recipe = Recipe.from_dict(RECIPE | {"max_new_tokens": args.max_new_tokens})
    schedule = Schedule(
        micro_batch_size=recipe.batch_size, strategy=args.strategy, nproc_per_node=ranks.world
    )
    n = args.train_examples
    train = pl.DataFrame(
        {
            "id": [f"train.{i}" for i in range(n)],
            "question": questions(n),
            "answer": [f"Answer {i}" for i in range(n)],
            "gold": [f"Answer {i}" for i in range(n)],
            "category": ["Unknown"] * n,
        }
    )
    dev = pl.DataFrame(
        {
            "question": questions(args.eval_questions, start=n),
            "gold": [f"Answer {i}" for i in range(args.eval_questions)],
        }
    )
    out = Path(args.out)
    started = time.perf_counter()
    finetune(
        args.model,
        train,
        {"dev": dev},
        recipe,
        {
            "metrics": out / "metrics.jsonl",
            "state": out / "state",
            "early_stop": out / "early_stop",
            "convergence": out / "convergence",
        },
        {},
        schedule,
        device,
        ranks=ranks,
    )
    seconds = time.perf_counter() - started
    peaks = per_rank(ranks, high_water_gib())
    if ranks.main:
        result = {"strategy": args.strategy, "world": ranks.world, "seconds": seconds}
        print("RESULT " + json.dumps(result | {"peak_gib": peaks}), flush=True)


def worker(args) -> None:
    """A worker process: joins the process group (under torchrun), runs, leaves. The work's
    model is freed before the group is destroyed: a DDP model freed after it (its reducer then
    holding the last reference to the gloo group) deadlocked at exit."""
    ranks, device = distributed.start("cpu")
    torch.set_num_threads(1)
    try:
        (eval_worker if args.worker == "eval" else finetune_worker)(args, ranks, device)
    finally:
        distributed.stop(ranks)


def run_worker(args, work: str, strategy: str, nproc: int, *extra: str) -> dict:
    """`work` in one process (strategy none) or under torchrun; the RESULT its rank 0 printed."""
    program = [__file__, "--worker", work, "--model", str(args.model), "--strategy", strategy,
               "--max-new-tokens", str(args.max_new_tokens), *extra]  # fmt: skip
    if nproc == 1:
        command = [sys.executable, *program]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", *program]  # fmt: skip
    out = subprocess.run(
        command, capture_output=True, text=True, env=distributed.rank_environment(1)
    )
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-6000:])
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def evaluation(args) -> dict:
    runs = {}
    for name, strategy, nproc in (("one", "none", 1), ("ddp", "ddp", 2), ("fsdp", "fsdp", 2)):
        r = runs[name] = run_worker(
            args, "eval", strategy, nproc, "--questions", str(args.questions)
        )
        ranks = r["ranks"]
        print(
            f"evaluation, {nproc} process(es) ({strategy}, {r['backend']} path): "
            f"{ranks[0]['seconds']:.2f} s for {args.questions} questions (build "
            f"{ranks[0]['build_seconds']:.1f} s); per rank: questions "
            f"{[x['questions'] for x in ranks]}, forward calls "
            f"{[x['forward_calls'] for x in ranks]}, model tokens {[x['tokens'] for x in ranks]}, "
            f"placeholder forwards {[x['placeholder_forwards'] for x in ranks]}",
            flush=True,
        )
    one = runs["one"]
    for name in ("ddp", "fsdp"):
        if runs[name]["answers"] != one["answers"]:
            differ = sum(a != b for a, b in zip(runs[name]["answers"], one["answers"], strict=True))
            raise AssertionError(f"{name}: {differ} answers differ from 1 process")
        runs[name]["speedup"] = one["ranks"][0]["seconds"] / runs[name]["ranks"][0]["seconds"]
    fsdp = runs["fsdp"]["ranks"][0]
    fsdp["all_gather_share"] = fsdp["all_gather_seconds"] / fsdp["seconds"]
    print(
        f"evaluation answers of ddp and fsdp equal 1 process's ({args.questions}/{args.questions}; "
        f"{sum(bool(a) for a in one['answers'])} non-empty); fsdp rank 0: all-gathers "
        f"{fsdp['all_gather_seconds']:.2f} s of {fsdp['seconds']:.2f} s "
        f"({100 * fsdp['all_gather_share']:.1f} %) over {fsdp['forward_calls']} forward calls",
        flush=True,
    )
    return runs


def memory(args, tmp: Path) -> dict:
    runs = {}
    for name, strategy, nproc in (("one", "none", 1), ("fsdp", "fsdp", 2)):
        extra = ["--train-examples", str(args.train_examples), "--eval-questions",
                 str(args.eval_questions), "--out", str(tmp / name)]  # fmt: skip
        r = runs[name] = run_worker(args, "finetune", strategy, nproc, *extra)
        print(
            f"fine-tune with evaluation, {nproc} process(es) ({strategy}): {r['seconds']:.1f} s, "
            f"peak memory per rank (VmHWM) {', '.join(f'{x:.2f}' for x in r['peak_gib'])} GiB",
            flush=True,
        )
    peaks = runs["fsdp"]["peak_gib"]
    runs["fsdp"]["rank_ratio"] = peaks[0] / peaks[1]
    runs["fsdp"]["ratio_to_one_process"] = [x / runs["one"]["peak_gib"][0] for x in peaks]
    return runs


def labelling(args, tmp: Path) -> dict:
    """One chunk labelled by `label_questions.label` in 1 process and in 2, each way the ranks
    can share the model (`models.<name>.multi_gpu`: fsdp, tp)."""
    import logging

    import label_questions
    import polars as pl

    from eqtools.settings import Labelling, ModelEntry, Slick
    from eqtools.slick import draw_exemplars

    n_sets, k = 2, 2
    dev = pl.DataFrame(
        {
            "id": [f"P1.dev.{i}" for i in range(n_sets * k + 1)],
            "relation": ["P1"] * (n_sets * k + 1),
            "question": questions(n_sets * k + 1, start=1000),
            "answer": [f"Answer {i}" for i in range(n_sets * k + 1)],
        }
    )
    (tmp / "exemplars.json").write_text(json.dumps(draw_exemplars(dev, n_sets, k, seed=0)))
    m = args.label_questions
    pl.DataFrame(
        {
            "id": [f"P1.train.{i}" for i in range(m)],
            "relation": ["P1"] * m,
            "question": questions(m),
            "answer": [f"Answer {i}" for i in range(m)],
        }
    ).write_parquet(tmp / "questions.parquet")
    entry = ModelEntry(gguf_file=None, dtype="float32", device="cpu", path=str(args.model))
    slick = Slick(n_sets, k, args.label_samples, 0.5, 40, args.label_max_new_tokens, 0, False)
    job = {
        "model": str(args.model),
        "questions": str(tmp / "questions.parquet"),
        "exemplars": str(tmp / "exemplars.json"),
        "split": "train",
        "relation": "P1",
        "spec": Labelling(slick, entry).param(),
        "stamp": job_stamp(Labelling(slick, entry).param(), "benchmark", {}),
        "questions_per_save": 256,
        "max_batch_rows": 2048,
        "backend": "auto",
    }
    runs = {}
    for nproc, multi_gpu in ((1, "auto"), (2, "fsdp"), (2, "tp")):
        name = "one" if nproc == 1 else multi_gpu
        out, log_path = tmp / f"labels-{name}.parquet", tmp / f"labels-{name}.log"
        handler = logging.FileHandler(log_path)  # the log line of the 1-process job (this process)
        workflow_log = logging.getLogger("workflow")
        workflow_log.addHandler(handler)
        workflow_log.setLevel(logging.INFO)
        started = time.perf_counter()
        try:
            # the rule's job as the rule runs it (a rule-like namespace: the model entry with its
            # scheduling keys, a thread per rank, log and output)
            smk = SimpleNamespace(
                wildcards=SimpleNamespace(model="random-llama"),
                config={"models": {"random-llama": {"gpus": nproc, "multi_gpu": multi_gpu,
                                                    "device": "cpu"}}},
                threads=nproc,
                log=[str(log_path)],
                output=[str(out)],
            )  # fmt: skip
            script = label_questions.__file__
            distributed.run_model_job(
                label_questions.label, script, job | {"output": str(out)}, smk
            )
        finally:
            workflow_log.removeHandler(handler)
            handler.close()
        wall = time.perf_counter() - started
        text = log_path.read_text()
        found = re.search(r"(\d+) questions in ([\d.]+) s .*?; (\{.*?\}); engine (.*)", text)
        if not found:
            raise RuntimeError(f"no labelling time in {log_path}:\n{text[-3000:]}")
        runs[name] = {
            "seconds": float(found.group(2)),
            "job_seconds": wall,
            "categories": found.group(3),
            "engine": found.group(4).strip(),
        }
        print(
            f"labelling, {nproc} process(es) ({name}): {runs[name]['seconds']:.1f} s for {m} "
            f"questions (whole job {wall:.1f} s); {runs[name]['categories']}; rank 0's engine "
            f"{runs[name]['engine']}",
            flush=True,
        )
    one = (tmp / "labels-one.parquet").read_bytes()
    for name in ("fsdp", "tp"):
        identical = (tmp / f"labels-{name}.parquet").read_bytes() == one
        assert identical, f"the chunk labelled by 2 processes ({name}) differs from 1 process's"
        print(
            f"labelling ({name}): the 2-process chunk is byte-identical to 1 process's", flush=True
        )
    speedup = {name: runs["one"]["seconds"] / runs[name]["seconds"] for name in ("fsdp", "tp")}
    return {"runs": runs, "speedup": speedup, "identical": True}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=16)
    # 2048: each of 2 ranks runs a wave of 1024 rows, as an epoch's evaluation does at the
    # default engine.max_batch_rows (with 512 the forwards are too small to outweigh gathering)
    ap.add_argument("--questions", type=int, default=2048, help="evaluation questions")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="the recipe's max_new_tokens")
    ap.add_argument("--train-examples", type=int, default=8, help="fine-tune: one batch of these")
    ap.add_argument("--eval-questions", type=int, default=8, help="fine-tune: dev questions")
    ap.add_argument("--label-questions", type=int, default=12)
    ap.add_argument("--label-samples", type=int, default=2)
    ap.add_argument("--label-max-new-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path)
    # a worker (started by this script)
    ap.add_argument("--worker", choices=["eval", "finetune"])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--strategy", default="none")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args.model = Path(tmp) / "model"
        n = build_random_model(args.model, args.hidden, args.layers)
        print(f"random Llama: {n / 1e9:.3f} B parameters, torch {torch.__version__}, 1 thread "
              "per process", flush=True)  # fmt: skip
        internal = ("json", "worker", "model", "strategy", "out")
        settings = {k: v for k, v in vars(args).items() if k not in internal}
        results = {"parameters": n, "torch": torch.__version__, "settings": settings}
        results["evaluation"] = evaluation(args)
        results["memory"] = memory(args, Path(tmp))
        results["labelling"] = labelling(args, Path(tmp))
    results["seconds"] = time.perf_counter() - started
    print(f"total {results['seconds']:.0f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    evaluation_runs, fsdp = results["evaluation"], results["memory"]["fsdp"]
    # labelling with the strategy `multi_gpu: auto` does not take for this model (it has a
    # tensor-parallel plan), before the four closing lines
    speedup = results["labelling"]["speedup"]
    print(f"labelling speedup, 2 vs 1 processes, fsdp (multi_gpu: fsdp): {speedup['fsdp']:.2f}")
    print(f"evaluation speedup, 2 vs 1 processes (ddp): {evaluation_runs['ddp']['speedup']:.2f}")
    print(f"evaluation speedup, 2 vs 1 processes (fsdp): {evaluation_runs['fsdp']['speedup']:.2f}")
    print(f"rank 0 / rank 1 peak memory (fsdp, 2 processes): {fsdp['rank_ratio']:.2f}")
    # the strategy `multi_gpu: auto` takes for this model
    print(f"labelling speedup, 2 vs 1 processes (tp): {speedup['tp']:.2f}")


if __name__ == "__main__":
    main()
