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

    python benchmarks/fsdp_memory.py --hidden-copies [--hidden 1024 --layers 12]

measures instead the bf16 copies of float32 weights that mixed precision can keep, before (the
code as it was) and now, each over the memory held before the measured step, against the bf16
copy of the weights (2N bytes):
- per rank of an FSDP run over --nproc processes with float32 gathers (a `dtype: bfloat16`
  recipe with `eval_dtype: float32`) and activation checkpointing: the peak of a training step
  and of one evaluation forward in bf16 over the float32 gathers, with autocast's cache of
  weight casts (before) and without it (now);
- one process, LoRA on a float32 base trained under bf16 autocast (`eval_dtype: float32`): the
  peak of a training step with autocast's casts of the frozen weights kept for the backward
  (before) and with eqtools.training.FrozenCast (now);
- one process, full fine-tuning of float32 weights with activation checkpointing: the peak of a
  training forward under bf16 autocast and of an evaluation forward in bf16, with autocast's
  cache (before) and without (now).
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
    """Start a new peak: the following peak_mb is that of what runs from here on. On the CPU
    the heap's free memory goes back to the system first (malloc_trim), so that the resident
    set is what is held, and new allocations show in the peak instead of reusing it."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident set


# glibc: tensors of 128 kB and more in their own mappings, returned to the system when freed (its
# default threshold grows with the first freed ones, after which freed tensors stay resident)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


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
    # a training forward (to the loss), as train_epoch runs it: what it holds at its end
    from eqtools.training import autocast, collate, token_loss

    ids, labels, mask = collate([data[i] for i in order[: args.micro]], 1)
    before = resident_mb(device)
    reset_peak(device)
    with autocast(device, "bfloat16"):
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = token_loss(logits, labels)
    forward = peak_mb(device) - before
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    del logits, loss
    # a whole step
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
        print("RESULT " + json.dumps({
            "forward_mb": forward, "training_mb": training, "evaluation_mb": evaluation,
        }))  # fmt: skip
    distributed.stop(ranks)


def full_worker(args) -> None:
    """One process, full fine-tuning of float32 weights with activation checkpointing: the peak
    of a training forward under bf16 autocast and of an evaluation forward in bf16 (the engine's
    mode); prints one JSON line."""
    from transformers import AutoTokenizer

    from eqtools.engine import Generator
    from eqtools.training import autocast, collate

    if args.cached:
        with_autocast_cache()
    torch.set_num_threads(args.threads)
    recipe = Recipe.from_dict({**RECIPE, "dtype": "bfloat16", "eval_dtype": "bfloat16"})
    schedule = Schedule(micro_batch_size=args.micro, activation_checkpointing=True)
    model = distributed.wrap(
        lambda where: build_model(args.model, recipe, where), schedule, recipe, args.device,
        distributed.ONE_PROCESS,
    )  # fmt: skip
    ids, _, mask = collate(examples(args.micro, args.length), 1)
    model.train()
    before = resident_mb(args.device)
    reset_peak(args.device)
    with autocast(args.device, "bfloat16"):
        logits = model(input_ids=ids, attention_mask=mask).logits
    forward = peak_mb(args.device) - before
    del logits
    generator = Generator(
        model, AutoTokenizer.from_pretrained(args.model), max_new_tokens=1,
        compute_dtype=torch.bfloat16,
    )  # fmt: skip
    model.eval()
    before = resident_mb(args.device)
    reset_peak(args.device)
    with generator._computing():
        model(input_ids=ids)
    evaluation = peak_mb(args.device) - before
    print("RESULT " + json.dumps({"forward_mb": forward, "evaluation_mb": evaluation}))


def lora_worker(args) -> None:
    """One process: a LoRA step on a float32 base under bf16 autocast; prints one JSON line."""
    from eqtools import training

    if args.cached:  # before: autocast's casts of the frozen weights kept for the backward
        training.keep_frozen_weights_uncast = lambda model: 0
    torch.set_num_threads(args.threads)
    recipe = Recipe.from_dict(
        {**RECIPE, "method": "lora", "dtype": "bfloat16", "eval_dtype": "float32"}
    )
    model = build_model(args.model, recipe, args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    data = examples(recipe.batch_size * 2, args.length)
    order = epoch_order(len(data), 0, 1)
    for step in range(2):  # the second step: the optimizer's moments exist
        if step:
            before = resident_mb(args.device)
            reset_peak(args.device)
        train_epoch(
            model, optimizer, scheduler, data, order[step * 8 : (step + 1) * 8], 8, args.micro, 1,
            args.device, dtype="bfloat16",
        )  # fmt: skip
    print("RESULT " + json.dumps({"training_mb": peak_mb(args.device) - before}))


def run_worker(
    script: str,
    worker_args: list[str],
    threads: int,
    nproc: int | None = None,
    env: dict | None = None,
    label: str = "",
) -> dict:
    """Run a benchmark's worker, `script` with `worker_args`, in a fresh process (under torchrun
    with `nproc` processes when given) and return what its `RESULT <json>` line reports; a
    failure raises with the end of its output."""
    command = [sys.executable, script, *worker_args]
    if nproc is not None:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = distributed.rank_environment(threads) | (env or {})
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{label}:\n" + out.stdout[-2000:] + out.stderr[-4000:])
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def hidden_copies(args, model_dir: Path, n: int) -> dict:
    copy = 2 * n / 2**20
    results = {"bf16_copy_of_the_weights_mb": copy}
    for cached in (True, False):
        common = [
            "--model", str(model_dir), "--device", args.device, "--threads", str(args.threads),
            "--micro", str(args.micro), "--length", str(args.length),
        ] + (["--cached"] if cached else [])  # fmt: skip
        when = "before" if cached else "now"
        results[f"fsdp_{when}"] = run_worker(
            __file__, ["--cache-worker", *common], args.threads, args.nproc, MALLOC_ENV, "fsdp"
        )
        for what in ("lora", "full"):
            results[f"{what}_{when}"] = run_worker(
                __file__, [f"--{what}-worker", *common], args.threads, None, MALLOC_ENV, what
            )
    for name, key, what in (
        ("fsdp", "forward_mb", f"FSDP over {args.nproc} ranks, float32 gathers, training forward"),
        ("fsdp", "training_mb", f"FSDP over {args.nproc} ranks, float32 gathers, training step"),
        ("fsdp", "evaluation_mb", f"FSDP over {args.nproc} ranks, evaluation forward in bf16"),
        ("lora", "training_mb", "one process, LoRA on a float32 base, training step"),
        ("full", "forward_mb", "one process, full, activation checkpointing, training forward"),
        ("full", "evaluation_mb", "one process, full, evaluation forward in bf16"),
    ):
        a, b = results[f"{name}_before"][key], results[f"{name}_now"][key]
        print(
            f"{what}: peak over the memory held before (per process) {a:.0f} MB before, "
            f"{b:.0f} MB now: {(a - b) / copy:.2f} of the weights' bf16 copy ({copy:.0f} MB) less"
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
    torchrun = None if nproc == 1 and strategy == "none" else nproc
    return run_worker(__file__, common, args.threads, torchrun, label=strategy)


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
    ap.add_argument("--hidden-copies", action="store_true", help="see the module's docstring")
    # a worker (started by this script)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--cache-worker", action="store_true")
    ap.add_argument("--lora-worker", action="store_true")
    ap.add_argument("--full-worker", action="store_true")
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
    if args.lora_worker:
        lora_worker(args)
        return
    if args.full_worker:
        full_worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        n = build_random_model(Path(tmp), args.hidden, args.layers)
        print(f"random Llama: {n / 1e9:.3f} B parameters, fp32 full fine-tuning state "
              f"{16 * n / 2**30:.1f} GiB", flush=True)  # fmt: skip
        if args.hidden_copies:
            results = hidden_copies(args, Path(tmp), n)
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
