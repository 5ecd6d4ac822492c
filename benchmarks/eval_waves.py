"""A fine-tune's per-epoch evaluation (`eqtools.training.answer_questions`) as it runs now
against the code before this change, side by side, on the embedded model:

    python benchmarks/eval_waves.py [--questions 384 --outlier-rows 128]

- before: every question's whole prompt after the empty prefix (the instruction encoded again for
  every question), the requests in the order of the questions, waves of `max_batch_rows` rows
  whatever their width;
- now: the instruction that every prompt shares encoded once as a cached engine prefix, the
  requests sorted by prompt length, and waves of at most `max_batch_rows` rows of the requests'
  mean width (`Generator.wave_budget`).

Two cases, each run in a fresh process (its peak resident memory, VmHWM, is its own), before and
now alternating, --runs times (medians):
1. the quickstart's evaluation: --questions train questions of P17 and P36 (about what the
   quickstart evaluates each epoch), `engine.max_batch_rows` 2048 (one wave): the time;
2. one outlier: the same questions and one question of about 60 tokens, --outlier-rows rows per
   wave: the peak memory over the loaded model and engine, and the time.
The answers of before and now are compared (they must be equal: a question's answer does not
depend on its wave or on how its prompt is split into prefix and rest).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fsdp_memory import reset_peak, resident_mb  # noqa: E402
from prepare_memory import high_water_gib  # noqa: E402
from slick_throughput import parse_common_args, questions_and_exemplars  # noqa: E402

OUTLIER = (
    "Which member of the royal academy of sciences, born in the small village near the old "
    "river crossing in the northern province during the long winter of the famine, later wrote "
    "the long and much admired treatise on the history of the observatory that his grandfather "
    "had founded with the help of the bishop of the neighbouring town?"
)


def before(generator, questions: list[str]) -> list[str]:
    """answer_questions before this change (one process)."""
    from eqtools.engine import Request
    from eqtools.training import format_prompt

    generator.wave_budget = lambda widths: float("inf")
    prefix = generator.add_prefix("")
    requests = [
        Request(prefix, generator.prompt_tokens(prefix, format_prompt(q))) for q in questions
    ]
    answers = [""] * len(questions)
    for i, tokens in generator.generate(requests):
        answers[i] = generator.decode(tokens)
    return answers


def worker(args) -> None:
    from eqtools.engine import Generator
    from eqtools.models import load
    from eqtools.training import answer_questions

    questions = json.loads(Path(args.worker_questions).read_text())
    model, tokenizer, _ = load(args.model_dir, device=args.device)
    generator = Generator(model, tokenizer, max_new_tokens=16, max_batch_rows=args.rows)
    held = resident_mb(args.device)
    reset_peak(args.device)
    started = time.perf_counter()
    if args.worker == "before":
        answers = before(generator, questions)
    else:
        answers = answer_questions(generator, questions)
    seconds = time.perf_counter() - started
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.device == "cuda"
        else high_water_gib() * 1024
    )
    print("RESULT " + json.dumps({
        "seconds": seconds, "peak_over_loaded_mb": peak - held, "waves": generator.stats.waves,
        "answers": answers,
    }))  # fmt: skip


def run(args, mode: str, questions_file: Path, rows: int) -> dict:
    command = [
        sys.executable, __file__, "--worker", mode, "--worker-questions", str(questions_file),
        "--rows", str(rows), "--model-dir", args.model_dir, "--archive", args.archive,
        "--threads", str(args.threads), "--device", args.device,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def compare(args, name: str, questions: list[str], rows: int) -> dict:
    path = Path(args.tmp) / f"{name}.json"
    path.write_text(json.dumps(questions))
    got = {"before": [], "now": []}
    for _ in range(args.runs):
        for mode in ("before", "now"):
            got[mode].append(run(args, mode, path, rows))
    out = {"questions": len(questions), "max_batch_rows": rows}
    for mode, results in got.items():
        out[mode] = {
            "seconds": statistics.median(r["seconds"] for r in results),
            "peak_over_loaded_mb": statistics.median(r["peak_over_loaded_mb"] for r in results),
            "waves": results[0]["waves"],
        }
    answers = [r["answers"] for r in got["before"] + got["now"]]
    out["answers_differing"] = sum(len({a[i] for a in answers}) > 1 for i in range(len(questions)))
    b, n = out["before"], out["now"]
    print(
        f"{name}: {len(questions)} questions, {rows} rows per wave: before {b['seconds']:.1f} s, "
        f"{b['peak_over_loaded_mb']:.0f} MB, {b['waves']} waves; now {n['seconds']:.1f} s, "
        f"{n['peak_over_loaded_mb']:.0f} MB, {n['waves']} waves; speedup "
        f"{b['seconds'] / n['seconds']:.2f}, peak ratio now / before "
        f"{n['peak_over_loaded_mb'] / b['peak_over_loaded_mb']:.2f}; answers differing: "
        f"{out['answers_differing']}",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--questions", type=int, default=384)
    ap.add_argument("--outlier-rows", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2, help="runs of each, alternating (medians)")
    ap.add_argument("--worker", choices=["before", "now"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-questions", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=2048, help=argparse.SUPPRESS)
    args = parse_common_args(ap)
    if args.worker:
        return worker(args)
    import tempfile

    from transformers import AutoTokenizer

    frame, _ = questions_and_exemplars(args.archive, args.questions)
    questions = frame["question"].to_list()[: args.questions]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    lengths = [len(tokenizer(q).input_ids) for q in questions]
    print(
        f"{args.threads} threads, torch {torch.__version__}, {args.device}; question tokens: "
        f"mean {statistics.mean(lengths):.1f}, max {max(lengths)}; the outlier "
        f"{len(tokenizer(OUTLIER).input_ids)}",
        flush=True,
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        results["quickstart"] = compare(args, "quickstart evaluation", questions, 2048)
        middle = len(questions) // 2
        with_outlier = questions[:middle] + [OUTLIER] + questions[middle:]
        results["outlier"] = compare(args, "one outlier", with_outlier, args.outlier_rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
