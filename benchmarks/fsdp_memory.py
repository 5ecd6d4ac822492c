"""Peak memory and step time of full fine-tuning in one process against FSDP2 sharding over
several processes, with the code the `finetune` rule runs (eqtools.training.build_model,
eqtools.distributed.wrap, eqtools.training.train_epoch, AdamW).

    python benchmarks/fsdp_memory.py [--hidden 1536 --layers 16 --nproc 2 --steps 3]

A random-init Llama built from a config (no download), saved once as safetensors in a
temporary directory; then, side by side in one run:
- one process, strategy none (as a recipe without `distributed`);
- `--nproc` processes under torchrun, strategy fsdp (gloo on CPU, NCCL with --device cuda).
Each process reports its peak resident memory (CPU: VmHWM; GPU: max_memory_allocated) after
loading, after sharding and after the training steps, and the time of each optimizer step
after the first. Full fine-tuning in fp32 holds 16 bytes per parameter (weights, gradients,
two AdamW moments); sharding over N processes divides them by N, activations are per process.

    python benchmarks/fsdp_memory.py --autocast-cache [--hidden 1024 --layers 12 --length 16]

compares instead, per rank of an FSDP run with float32 gathers (a `dtype: bfloat16` recipe
with `eval_dtype: float32`, activation checkpointing on), autocast with its cache of weight
casts (the code before) and without (the code now): the peak of the training steps, and of one
evaluation forward in bf16 (`eval_dtype: bfloat16` over float32 gathers), each over the memory
held before it, against the bf16 copy of the gathered weights (2N bytes) that the cache holds.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

from prepare_memory import high_water_gib  # noqa: E402

from eqtools import distributed  # noqa: E402
from eqtools.settings import Recipe, Schedule  # noqa: E402
from eqtools.training import build_model, epoch_order, train_epoch  # noqa: E402

RECIPE = {
    "method": "full",
    "learning_rate": 1e-5,
    "batch_size": 8,
    "dropout": 0.0,
    "epochs": 1,
    "seed": 0,
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "dtype": "float32",
    "eval_dtype": "float32",
    "max_new_tokens": 4,
    "lora": {"rank": 8, "alpha": 16, "target_modules": "all-linear"},
}


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return high_water_gib() * 1024


def resident_mb(device: str) -> float:
    """Memory held now (CPU: resident set; GPU: allocated)."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_random_model(directory: Path, hidden: int, layers: int) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64 // 4 or 1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(32000)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t1").save_pretrained(
        directory
    )
    return n


def examples(n: int, length: int, seed: int = 0):
    """Synthetic training examples: `length` tokens, the loss on the last quarter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 32000, (length,), generator=g).tolist()
        cut = length * 3 // 4
        out.append((ids, [-100] * cut + ids[cut:]))
    return out


def reset_peak(device: str) -> None:
    """Start a new peak: the following peak_mb is that of what runs from here on."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident set


def with_autocast_cache() -> None:
    """The code before: every autocast with its default cache of weight casts."""
    real = torch.autocast

    class cached(real):
        def __init__(self, *args, **kwargs):
            kwargs["cache_enabled"] = True
            super().__init__(*args, **kwargs)

    torch.autocast = cached


def cache_worker(args) -> None:
    """One rank of the autocast-cache comparison; rank 0 prints one JSON line."""
    from eqtools.engine import Generator, Lockstep

    if args.cached:
        with_autocast_cache()
    ranks, device = distributed.start(args.device)
    torch.set_num_threads(args.threads)
    recipe = Recipe.from_dict({**RECIPE, "dtype": "bfloat16", "eval_dtype": "float32"})
    schedule = Schedule(
        micro_batch_size=args.micro,
        strategy="fsdp",
        nproc_per_node=ranks.world,
        activation_checkpointing=True,
    )
    model = distributed.wrap(
        lambda where: build_model(args.model, recipe, where), schedule, recipe, device, ranks
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    data = examples(recipe.batch_size * args.steps, args.length)
    order = epoch_order(len(data), 0, 1)
    train_epoch(  # the optimizer's moments exist from here on
        model, optimizer, scheduler, data, order[: recipe.batch_size], recipe.batch_size,
        args.micro, 1, device, dtype="bfloat16", ranks=ranks,
    )  # fmt: skip
    before = resident_mb(device)
    reset_peak(device)
    train_epoch(
        model, optimizer, scheduler, data, order[recipe.batch_size :], recipe.batch_size,
        args.micro, 1, device, dtype="bfloat16", ranks=ranks,
    )  # fmt: skip
    training = peak_mb(device) - before
    # one evaluation forward over the float32 gathers in bf16, as the engine computes it
    from transformers import AutoTokenizer

    generator = Generator(
        model, AutoTokenizer.from_pretrained(args.model), max_new_tokens=1,
        compute_dtype=torch.bfloat16, lockstep=Lockstep(model, device),
    )  # fmt: skip
    ids = torch.tensor([row[0] for row in data[: args.micro]], device=device)
    before = resident_mb(device)
    reset_peak(device)
    model.eval()
    with generator._computing():
        model(input_ids=ids)
    evaluation = peak_mb(device) - before
    if ranks.main:
        print("RESULT " + json.dumps({"training_mb": training, "evaluation_mb": evaluation}))
    distributed.stop(ranks)


def cache_comparison(args, model_dir: Path, n: int) -> dict:
    results = {}
    for cached in (True, False):
        common = [
            "--cache-worker", "--model", str(model_dir), "--device", args.device,
            "--threads", str(args.threads), "--steps", "2", "--micro", str(args.micro),
            "--length", str(args.length),
        ] + (["--cached"] if cached else [])  # fmt: skip
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={args.nproc}", __file__, *common,
        ]  # fmt: skip
        out = subprocess.run(
            command, capture_output=True, text=True, env=distributed.rank_environment(args.threads)
        )
        if out.returncode != 0:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        results["cache" if cached else "no_cache"] = json.loads(line.removeprefix("RESULT "))
    copy = 2 * n / 2**20
    results["bf16_copy_of_the_weights_mb"] = copy
    for what in ("training", "evaluation"):
        a, b = results["cache"][f"{what}_mb"], results["no_cache"][f"{what}_mb"]
        print(
            f"{what}: peak over the memory held before, per rank: {a:.0f} MB with autocast's "
            f"cache, {b:.0f} MB without ({(a - b) / copy:.2f} of the weights' bf16 copy, "
            f"{copy:.0f} MB, less)"
        )
    return results


def worker(args) -> None:
    """One process of a measurement; prints one JSON line (rank 0) with what it saw."""
    ranks, device = distributed.start(args.device)
    torch.set_num_threads(args.threads)
    schedule = Schedule(
        micro_batch_size=args.micro,
        strategy=args.strategy,
        nproc_per_node=ranks.world,
        activation_checkpointing=args.checkpointing,
    )
    recipe = Recipe.from_dict(RECIPE)
    # under fsdp the model is sharded as it loads (rank 0 reads it on the host, every rank
    # holds only its shards on the device): "loaded" is then the peak after sharding
    model = distributed.wrap(
        lambda where: build_model(args.model, recipe, where), schedule, recipe, device, ranks
    )
    loaded = peak_mb(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    data = examples(recipe.batch_size * args.steps, args.length)
    times = []
    for step in range(args.steps):
        order = epoch_order(len(data), 0, 1)[
            step * recipe.batch_size : (step + 1) * recipe.batch_size
        ]
        started = time.perf_counter()
        train_epoch(
            model, optimizer, scheduler, data, order, recipe.batch_size, args.micro, 1, device,
            ranks=ranks,
        )  # fmt: skip
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak, held = distributed.all_sum(ranks, [peak_mb(device), resident_mb(device)], device)
    report = {
        "strategy": args.strategy,
        "world": ranks.world,
        "rank0_peak_after_load_mb": loaded,
        "rank0_peak_mb": peak_mb(device),
        "mean_peak_per_rank_mb": peak / ranks.world,
        "mean_held_after_steps_per_rank_mb": held / ranks.world,
        "step_seconds": times[1:] or times,
    }
    if ranks.main:
        print("RESULT " + json.dumps(report), flush=True)
    distributed.stop(ranks)


def run(args, model_dir: Path, strategy: str, nproc: int) -> dict:
    common = [
        "--worker", "--model", str(model_dir), "--strategy", strategy, "--device", args.device,
        "--threads", str(args.threads), "--steps", str(args.steps), "--micro", str(args.micro),
        "--length", str(args.length),
    ] + (["--checkpointing"] if args.checkpointing else [])  # fmt: skip
    if nproc == 1 and strategy == "none":
        command = [sys.executable, __file__, *common]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", __file__, *common,
        ]  # fmt: skip
    env = distributed.rank_environment(args.threads)
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--autocast-cache", action="store_true", help=__doc__.split("\n\n")[3])
    # a worker (started by this script)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--cache-worker", action="store_true")
    ap.add_argument("--cached", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--strategy", default="none")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.cache_worker:
        cache_worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        n = build_random_model(Path(tmp), args.hidden, args.layers)
        print(f"random Llama: {n / 1e9:.3f} B parameters, fp32 full fine-tuning state "
              f"{16 * n / 2**30:.1f} GiB", flush=True)  # fmt: skip
        if args.autocast_cache:
            results = cache_comparison(args, Path(tmp), n)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
            return
        results = {"parameters": n, "runs": []}
        for strategy, nproc in (("none", 1), ("fsdp", args.nproc)):
            r = run(args, Path(tmp), strategy, nproc)
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    one, sharded = results["runs"]
    results["peak_ratio"] = sharded["mean_peak_per_rank_mb"] / one["mean_peak_per_rank_mb"]
    results["held_ratio"] = (
        sharded["mean_held_after_steps_per_rank_mb"] / one["mean_held_after_steps_per_rank_mb"]
    )
    print(
        f"per process, {args.nproc} processes / 1 process: peak {results['peak_ratio']:.2f}, "
        f"held after the steps {results['held_ratio']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
