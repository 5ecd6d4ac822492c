"""Fine-tuning throughput: training tokens per second and evaluation questions per second.

    python benchmarks/finetune_throughput.py [--archive resources/entity_questions/dataset.zip]

Training: one epoch of `eqtools.training.train_epoch` (the code the `finetune` rule runs) over
--train-examples questions of P17 and P36 with their gold answers, micro-batch 16, for a LoRA
recipe (rank 8, all linear layers) and for full fine-tuning; after one warm-up epoch.
Tokens per second counts the input positions without padding (prompt + answer + newline).

Evaluation: the per-epoch evaluation path (`answer_questions`: zero-shot greedy, at most 16 new
tokens, stop at the first newline) through the shared generation engine, against a plain
reference on the same questions: one `model.generate` call per question (what a straightforward
implementation does; `generate` on left-padded batches of this model answered 70 of 128
questions differently from unbatched calls, nearly all with an empty answer, so it is no
reference). Both in fp32 on this machine's CPU (--device cuda: on the GPU); the greedy answers of
the two are compared (a rare difference from floating-point near-ties is counted).

--dtype bfloat16 trains as a `dtype: bfloat16` recipe does: bf16 autocast over float32 weights.

Answer-only logits (`--logits-ab`, on by default): the training loss from the logits of the
answer positions only (eqtools.training.answer_logits) against the model's full logits, with the
study's LoRA recipe (config/study.yaml: rank 8 on every linear layer, batch 8) on the study's
training prompts (P17, P36, P495), for the embedded model and a random model of Gemma 3 270M's
shape (its real config: 262,144-token vocabulary, tied output layer: 168M of its 268M
parameters). Each run is a fresh process (its peak resident memory, VmHWM, is its own); the two
of a model alternate, twice, and the medians are reported.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from slick_throughput import parse_common_args, questions_and_exemplars, sync  # noqa: E402

from eqtools.engine import Generator  # noqa: E402
from eqtools.training import (  # noqa: E402
    answer_questions,
    build_model,
    encode_examples,
    epoch_order,
    format_prompt,
    train_epoch,
)

MAX_NEW = 16
# the keys a Recipe needs (eqtools.settings) that the recipes below leave out; build_model reads
# dtype and eval_dtype: float32 gives the fp32 weights a `dtype: bfloat16` recipe (eval_dtype
# float32) trains too, --dtype sets the autocast of train_epoch
RECIPE_REST = {
    "batch_size": 16,
    "epochs": 1,
    "seed": 0,
    "warmup_steps": 0,
    "dtype": "float32",
    "eval_dtype": "float32",
    "max_new_tokens": MAX_NEW,
    "lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear"},
}
RECIPES = {
    "lora": {
        "method": "lora",
        "learning_rate": 1e-4,
        "dropout": 0.05,
        "weight_decay": 0.0,
        "lora": {
            "rank": 8,
            "alpha": 16,
            "target_modules": [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        },
    },
    "full": {"method": "full", "learning_rate": 1e-5, "dropout": 0.05, "weight_decay": 0.0},
}
RECIPES = {name: RECIPE_REST | recipe for name, recipe in RECIPES.items()}


def train_throughput(
    model_dir: str, tokenizer, questions, answers, method: str, micro: int, device: str, dtype: str
) -> dict:
    model = build_model(model_dir, RECIPES[method], device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=RECIPES[method]["learning_rate"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    examples = encode_examples(tokenizer, questions, answers)
    # warm-up: a whole epoch, so that every padded width has been seen once (on a GPU the first
    # micro-batch of each new shape pays for kernel selection)
    train_epoch(
        model,
        optimizer,
        scheduler,
        examples,
        epoch_order(len(examples), 0, 0),
        micro,
        micro,
        pad_id,
        device,
        0,
        dtype,
    )
    order = epoch_order(len(examples), 0, 1)
    sync(device)
    start = time.perf_counter()
    _, answer_tokens, positions = train_epoch(
        model, optimizer, scheduler, examples, order, micro, micro, pad_id, device, 1, dtype
    )
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "dtype": dtype,
        "examples": len(examples),
        "seconds": seconds,
        "tokens_per_s": positions / seconds,
        "answer_tokens_per_s": answer_tokens / seconds,
        "examples_per_s": len(examples) / seconds,
        "trainable_parameters": sum(p.numel() for p in trainable),
    }


# config/study.yaml's LoRA recipe: rank 8, alpha 16, every linear layer, batch 8
STUDY_LORA = RECIPE_REST | {
    "method": "lora",
    "learning_rate": 1e-4,
    "dropout": 0.0,
    "weight_decay": 0.0,
    "batch_size": 8,
    "lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear"},
}
# Gemma 3 270M (google/gemma-3-270m config.json)
GEMMA3_270M = dict(
    vocab_size=262_144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    max_position_embeddings=32_768,
    sliding_window=512,
    rope_theta=1_000_000.0,
    query_pre_attn_scalar=256,
    tie_word_embeddings=True,
)


def build_gemma3_270m_shape(directory: Path, tokenizer_dir: str) -> str:
    """A random-init Gemma 3 with 270M's shape (no download), with the embedded model's
    tokenizer (its ids fit the larger vocabulary; the output layer stays 262,144 wide)."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3_270M)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return str(directory)


def logits_worker(args) -> None:
    """One timed epoch of the study's LoRA recipe (after a warm-up epoch) with answer-only or
    full logits, in this process; prints its figures as JSON."""
    from prepare_memory import high_water_gib
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    frame, _ = questions_and_exemplars(args.archive, args.train_examples, ("P17", "P36", "P495"))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = build_model(args.model_dir, STUDY_LORA, args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=STUDY_LORA["learning_rate"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = encode_examples(tokenizer, frame["question"].to_list(), frame["answer"].to_list())
    answer_only = args.logits_worker == "answers"
    batch = STUDY_LORA["batch_size"]
    common = dict(batch_size=batch, micro=batch, pad_id=pad_id, device=args.device)
    common["answer_only"] = answer_only
    train_epoch(model, optimizer, scheduler, examples, epoch_order(len(examples), 0, 0), **common)
    sync(args.device)
    start = time.perf_counter()
    _, _, positions = train_epoch(
        model, optimizer, scheduler, examples, epoch_order(len(examples), 0, 1), **common
    )
    sync(args.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else high_water_gib()
    print(json.dumps({"tokens_per_s": positions / seconds, "peak_gib": peak}))


def logits_ab(args, model_dir: str, name: str, runs: int = 2) -> dict:
    """The answer-only and full-logits workers of `model_dir`, alternating, `runs` each."""
    figures = {"answers": [], "full": []}
    for _ in range(runs):
        for kind in ("full", "answers"):
            command = [
                sys.executable, __file__, "--logits-worker", kind, "--model-dir", model_dir,
                "--archive", args.archive, "--threads", str(args.threads),
                "--device", args.device, "--train-examples", str(args.logits_examples),
            ]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            figures[kind].append(json.loads(out.strip().splitlines()[-1]))
    median = {
        kind: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for kind, rows in figures.items()
    }
    result = {
        "model": name,
        "runs": figures,
        "speedup": median["answers"]["tokens_per_s"] / median["full"]["tokens_per_s"],
        "peak_ratio": median["answers"]["peak_gib"] / median["full"]["peak_gib"],
    }
    print(
        f"{name}: training {median['full']['tokens_per_s']:.0f} -> "
        f"{median['answers']['tokens_per_s']:.0f} tokens/s, peak "
        f"{median['full']['peak_gib']:.2f} -> {median['answers']['peak_gib']:.2f} GiB "
        "(full -> answer-only logits)",
        flush=True,
    )
    return result


def reference_answers(
    model, tokenizer, questions: list[str], device: str = "cpu", batch: int = 1
) -> list[str]:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    for start in range(0, len(questions), batch):
        prompts = [format_prompt(q) for q in questions[start : start + batch]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tokenizer.pad_token_id
            )
        for row in out[:, enc.input_ids.shape[1] :]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--train-examples", type=int, default=64)
    ap.add_argument("--eval-questions", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="training precision"
    )
    ap.add_argument("--logits-examples", type=int, default=96)
    ap.add_argument("--no-logits-ab", dest="logits_ab", action="store_false")
    ap.add_argument("--logits-worker", choices=["answers", "full"], help=argparse.SUPPRESS)
    args = parse_common_args(ap)
    if args.logits_worker:
        return logits_worker(args)
    from transformers import AutoTokenizer

    n = max(args.train_examples, args.eval_questions)
    frame, _ = questions_and_exemplars(args.archive, n)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    qs, ans = frame["question"].to_list(), frame["answer"].to_list()
    print(
        f"{args.threads} threads, torch {torch.__version__}, {args.device}, training "
        f"{args.dtype}; questions from {sorted(set(frame['relation']))}",
        flush=True,
    )

    results = {"training": [], "evaluation": {}}
    for method in ("lora", "full"):
        r = train_throughput(
            args.model_dir,
            tokenizer,
            qs[: args.train_examples],
            ans[: args.train_examples],
            method,
            args.micro_batch_size,
            args.device,
            args.dtype,
        )
        results["training"].append(r)
        print(
            f"training {method}: {r['tokens_per_s']:.0f} tokens/s "
            f"({r['answer_tokens_per_s']:.0f} answer tokens/s, "
            f"{r['examples_per_s']:.1f} examples/s; {r['examples']} examples in "
            f"{r['seconds']:.1f} s; {r['trainable_parameters']:,} trainable parameters)",
            flush=True,
        )

    from eqtools.models import load

    model, tokenizer, _ = load(args.model_dir, dtype="float32", device=args.device)
    eval_qs = qs[: args.eval_questions]
    gen = Generator(model, tokenizer, max_new_tokens=MAX_NEW)
    start = time.perf_counter()
    engine = answer_questions(gen, eval_qs)
    engine_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = reference_answers(model, tokenizer, eval_qs, args.device)
    ref_s = time.perf_counter() - start
    differ = sum(a != b for a, b in zip(engine, ref, strict=True))
    m = len(eval_qs)
    results["evaluation"] = {
        "questions": m,
        "engine_q_per_s": m / engine_s,
        "reference_q_per_s": m / ref_s,
        "speedup": ref_s / engine_s,
        "answers_differ": differ,
    }
    print(
        f"evaluation engine: {m / engine_s:.1f} questions/s ({engine_s:.1f} s for {m}); reference "
        f"(generate per question): {m / ref_s:.1f} questions/s; {differ}/{m} answers differ",
        flush=True,
    )
    if args.logits_ab:
        results["answer_only_logits"] = [logits_ab(args, args.model_dir, "smollm2-135m")]
        with tempfile.TemporaryDirectory() as tmp:
            gemma = build_gemma3_270m_shape(Path(tmp) / "gemma3-270m", args.model_dir)
            results["answer_only_logits"].append(logits_ab(args, gemma, "gemma-3-270m shape"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    lora, full = results["training"]
    print(
        f"training tokens/s: lora {lora['tokens_per_s']:.0f}, full {full['tokens_per_s']:.0f}; "
        f"evaluation questions/s: {m / engine_s:.1f} (engine) vs {m / ref_s:.1f} (generate): "
        f"{ref_s / engine_s:.1f}x"
    )
    if args.logits_ab:
        gemma = results["answer_only_logits"][-1]
        print(f"training speedup, answer-only logits (gemma-3-270m shape): {gemma['speedup']:.2f}")
        print(
            "training peak memory ratio, answer-only / full logits (gemma-3-270m shape): "
            f"{gemma['peak_ratio']:.2f}"
        )
    if differ > math.ceil(0.02 * m):
        print(f"FAIL: {differ} of {m} greedy answers differ from the reference (> 2%)")
        sys.exit(1)


if __name__ == "__main__":
    main()
