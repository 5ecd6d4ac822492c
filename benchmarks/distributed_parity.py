"""How much the process count, the strategy and the micro-batch change a fine-tune: the largest
relative difference of a per-epoch train loss against one process, and whether the accuracies
are equal.

    python benchmarks/distributed_parity.py [--json out.json] [--no-embedded]

Every run goes through the code the `finetune` rule runs (`finetune.train` for one process, the
torchrun command of `eqtools.distributed` for two), on the inputs and recipe of
tests/test_distributed.py (11 training examples, batches of 4, dropout 0, 4 epochs; the embedded
model: 6 examples, 2 epochs). The reference is always one process without torch.distributed.
Cases: the tiny random Llama of the tests (LoRA and full; FSDP and DDP over 2 processes, in
float32 and bfloat16; one process with micro-batch 4 against 1), and the embedded
SmolLM2-135M (LoRA and full, FSDP, float32).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow" / "scripts"), str(ROOT / "tests")]

import test_distributed as runs  # noqa: E402  (the tests' inputs, jobs and launchers)
from conftest import build_tiny_model, embedded_gguf  # noqa: E402

from eqtools.models import materialise, stage  # noqa: E402
from eqtools.settings import Schedule  # noqa: E402


def compare(one: Path, other: Path) -> dict:
    a, b = runs.metrics(one), runs.metrics(other)
    accuracies = [k for k in a[0] if k.endswith("_accuracy")]
    return {
        "max_relative_train_loss_difference": max(
            abs(y["train_loss"] - x["train_loss"]) / x["train_loss"]
            for x, y in zip(a, b, strict=True)
        ),
        "accuracies_equal": all(
            {k: x.get(k) for k in accuracies} == {k: y.get(k) for k in accuracies}
            for x, y in zip(a, b, strict=True)
        ),
    }


def cases(model: Path, inputs: dict, root: Path, recipes: dict, strategies, micro: int) -> dict:
    """{case: comparison} for each recipe: 2 processes per strategy, and one process with
    micro-batch 4, against one process with micro-batch `micro`."""
    out = {}
    for name, recipe in recipes.items():
        one = root / f"{name}-one"
        runs.run_one_process(runs.make_job(model, inputs, one, recipe, Schedule(micro)))
        for strategy in strategies:
            two = root / f"{name}-{strategy}"
            schedule = Schedule(micro, strategy=strategy, nproc_per_node=2)
            runs.run_ranks(runs.make_job(model, inputs, two, recipe, schedule), 2, root)
            out[f"{name}, {strategy}, 2 processes vs 1"] = compare(one, two)
        if micro == 1:
            four = root / f"{name}-micro4"
            runs.run_one_process(runs.make_job(model, inputs, four, recipe, Schedule(4)))
            out[f"{name}, 1 process, micro-batch 4 vs 1"] = compare(one, four)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-embedded", action="store_true")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = build_tiny_model(root / "tiny")
        inputs = runs.write_inputs(root / "inputs")
        recipes = {
            f"tiny {method} {dtype}": dict(
                runs.RECIPE,
                method=method,
                learning_rate=5e-3 if method == "lora" else 1e-3,
                dtype=dtype,
            )
            for method in ("lora", "full")
            for dtype in ("float32", "bfloat16")
        }
        results |= cases(tiny, inputs, root, recipes, ("fsdp", "ddp"), micro=1)
        if not args.no_embedded:
            model = root / "smollm2-135m"
            package, gguf = embedded_gguf()
            staged = root / "smollm2-135m.source"  # as fetch_model stages it
            stage("smollm2-135m", {"path": package, "gguf_file": gguf}, staged)
            materialise("smollm2-135m", staged, model, "float32", "cpu")
            small = runs.write_inputs(root / "inputs-embedded", n_train=6)
            lora = {"rank": 4, "alpha": 8, "target_modules": "all-linear"}
            recipes = {
                f"embedded {method} float32": dict(
                    runs.RECIPE, method=method, learning_rate=lr, epochs=2, lora=lora
                )
                for method, lr in (("lora", 1e-3), ("full", 1e-5))
            }
            results |= cases(model, small, root, recipes, ("fsdp",), micro=2)
    for case, r in results.items():
        print(
            f"{case}: {r['max_relative_train_loss_difference']:.2g}, accuracies "
            + ("equal" if r["accuracies_equal"] else "DIFFER")
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
