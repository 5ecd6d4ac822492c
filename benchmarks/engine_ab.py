"""The one-process engine's SliCK labelling speed at two commits, side by side (A/B).

    python benchmarks/engine_ab.py BASE [--rounds 3 --questions 48 --threads 2]

Checks BASE out into a temporary git worktree and times, in alternating fresh processes (BASE,
this tree, this tree, BASE, ...), the engine of `benchmarks/slick_throughput.py` (`run_engine`:
fp32, the paper's SliCK settings) on the same questions, each tree with its own code. Machine
noise (another job, frequency changes) then falls on both sides alike; the ratio of the medians
is the figure to read. Needs what slick_throughput.py needs: the dataset archive and the
materialised embedded model (`make bench` prepares both).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# run in a fresh interpreter inside one tree: that tree's slick_throughput and eqtools
TIMED = """
import json, sys, torch
sys.path.insert(0, {benchmarks!r})
torch.set_num_threads({threads})
from slick_throughput import questions_and_exemplars, run_engine
questions, exemplars = questions_and_exemplars({archive!r}, {questions})
*_, labels, seconds, _, stats = run_engine(
    {model!r}, "float32", "cpu", questions, exemplars, {rows}
)
print(json.dumps({{"seconds": seconds, "questions": questions.height,
                   "categories": labels["category"].cast(str).to_list()}}))
"""


def timed(tree: Path, args) -> dict:
    code = TIMED.format(
        benchmarks=str(tree / "benchmarks"),
        threads=args.threads,
        archive=args.archive,
        questions=args.questions,
        model=args.model_dir,
        rows=args.max_batch_rows,
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("base", help="the commit to compare with (e.g. the parent of a change)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch-rows", type=int, default=2048)
    ap.add_argument("--archive", default=str(ROOT / "resources/entity_questions/dataset.zip"))
    ap.add_argument("--model-dir", default=str(ROOT / "resources/models/smollm2-135m"))
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            seconds = {"base": [], "this": []}
            categories = {}
            for r in range(args.rounds):
                order = [("base", base), ("this", ROOT)]
                for name, tree in order if r % 2 == 0 else order[::-1]:
                    result = timed(tree, args)
                    per_question = result["seconds"] / result["questions"]
                    seconds[name].append(per_question)
                    categories[name] = result["categories"]
                    print(f"round {r + 1}, {name}: {per_question:.3f} s/question", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    if categories["base"] != categories["this"]:
        raise SystemExit("FAIL: the two commits label the questions differently")
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    ratio = medians["this"] / medians["base"]
    print(f"labels equal at both commits ({args.questions} questions)")
    print(f"median s/question: base {medians['base']:.3f}, this tree {medians['this']:.3f}")
    print(f"engine time, this tree / {args.base}: {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"base": args.base, "seconds": seconds, "ratio": ratio}, indent=2)
        )


if __name__ == "__main__":
    main()
