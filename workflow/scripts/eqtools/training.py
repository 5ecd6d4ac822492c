"""Fine-tuning on a mixture (docs/study.md, "Fine-tuning"): full or LoRA, loss on the answer tokens,
evaluation after every epoch with the shared generation engine, resumable after a kill.

One loop, read top to bottom (nanoGPT style), for one process or several (eqtools.distributed:
DDP or FSDP2 under torchrun; every rank evaluates its share of the questions on the weights as
they are trained, rank 0 writes). The resumable state (trainable
weights and optimizer, sharded with torch.distributed.checkpoint; scheduler, RNG, epoch, best dev
accuracy, the test predictions of the best and the last epoch) is written atomically after every
epoch to a state directory that Snakemake does not own, so a killed or preempted job resumes
from its last completed epoch and ends with the metrics of an uninterrupted run.

The per-question test predictions at both stops come from the per-epoch evaluation itself: the
weights are those the checkpoints hold, so evaluating the checkpoints again would repeat the
work. Only when the test sets are evaluated every k > 1 epochs and the best dev epoch is not one
of them is the early-stop checkpoint evaluated once more at the end.
"""

import contextlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import polars as pl
import torch

from eqtools import distributed
from eqtools.distributed import Ranks
from eqtools.em import exact_match
from eqtools.io import (
    atomic_path,
    finish_swap,
    link_file,
    part_path,
    write_parquet,
    write_text,
)
from eqtools.progress import Progress, duration
from eqtools.settings import Lora, Recipe, Schedule

log = logging.getLogger(__name__)

PROMPT = "Answer the following question. {question}\n"


class TrainingError(RuntimeError):
    pass


def format_prompt(question: str) -> str:
    return PROMPT.format(question=question)


# the part of PROMPT every question shares: the engine encodes it once, as labelling's exemplars
INSTRUCTION = PROMPT.split("{question}")[0].rstrip()


def instructed_request(generator, question: str, instruction: int, whole: int):
    """The engine request of a question's prompt: the shared instruction as a cached prefix
    (`instruction`, registered from INSTRUCTION), the rest as the prompt; the whole prompt after
    the empty prefix `whole` where the tokenizer merges tokens across their boundary (the prompt
    must stay exactly what training saw)."""
    from eqtools.engine import Request

    prompt = format_prompt(question)
    try:
        return Request(
            instruction, generator.prompt_tokens(instruction, prompt[len(INSTRUCTION) :])
        )
    except ValueError:
        return Request(whole, generator.prompt_tokens(whole, prompt))


def encode_examples(
    tokenizer, questions: list[str], answers: list[str]
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example; the loss sees only the answer and its closing newline."""
    out = []
    for q, a in zip(questions, answers, strict=True):
        prompt = tokenizer(format_prompt(q), add_special_tokens=True).input_ids
        full = tokenizer(format_prompt(q) + a + "\n", add_special_tokens=True).input_ids
        if full[: len(prompt)] != prompt:
            raise TrainingError(f"prompt and answer tokenise across their boundary for {q!r}")
        out.append((full, [-100] * len(prompt) + full[len(prompt) :]))
    return out


def collate(chunk, pad_id: int):
    """A right-padded micro-batch: (input ids, labels, attention mask)."""
    width = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, (i, lab) in enumerate(chunk):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(i)] = 1
    return ids, labels, mask


def answer_tokens(example) -> int:
    """The tokens an example's loss is taken on (labels are shifted by one in the model)."""
    return sum(1 for label in example[1][1:] if label != -100)


def token_loss(logits, labels, answer_only: bool = False):
    """The summed cross-entropy of the answer tokens, in float32. `logits` are the model's at
    every position, or with `answer_only` only at the positions whose next token is an answer
    token (`answer_logits`), in row-major order."""
    targets = labels[:, 1:]
    if answer_only:
        logits, targets = logits.reshape(-1, logits.size(-1)), targets[targets != -100]
    else:
        logits = logits[:, :-1]
    logits = logits.float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


@contextlib.contextmanager
def answer_logits(model, labels):
    """Within the block, the model's output layer sees only the hidden states of the positions
    whose next token is an answer token (about a fifth of a training prompt), gathered into one
    row: the logits the loss needs, without computing (and casting to float32) those of every
    other position, which a large vocabulary makes the largest tensor of a step. What the model
    does after its output layer (final-logit softcapping, logit scaling) applies elementwise, so
    it stays the model's own; `check_answer_logits` makes sure of it."""
    head = distributed.unwrapped(model).get_output_embeddings()
    rows, columns = (labels[:, 1:] != -100).nonzero(as_tuple=True)

    def gather(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input")
        return (hidden[rows, columns].unsqueeze(0), *args[1:]), kwargs

    handle = head.register_forward_pre_hook(gather, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def check_answer_logits(model, example_batch, pad_id, device, dtype, ranks) -> bool:
    """Whether `answer_logits` gives the model's own logits at the answer positions (within
    float32 rounding) on one batch, in eval mode (no dropout: no random numbers drawn, so a
    resumed run draws the masks of an uninterrupted one). A model without a separate output
    layer, or whose forward does more than elementwise work after it, keeps full logits; one log
    line says which. Every rank calls it and all take the same decision."""
    from eqtools.engine.lockstep import release_gathered

    head = distributed.unwrapped(model).get_output_embeddings()
    ids, labels, mask = (t.to(device) for t in collate(example_batch, pad_id))
    fits = False
    if isinstance(head, torch.nn.Module):
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            full = model(input_ids=ids, attention_mask=mask).logits.float()
            with answer_logits(model, labels):
                selected = model(input_ids=ids, attention_mask=mask).logits.float()
        model.train()
        release_gathered(model)
        reference = full[:, :-1][labels[:, 1:] != -100]
        fits = selected.shape[1:] == reference.shape and torch.allclose(
            selected[0], reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max())
        )
    fits = distributed.all_sum(ranks, [float(fits)], device)[0] == ranks.world
    log.info(
        "training loss: %s",
        "logits at the answer positions only (checked against the full logits)"
        if fits
        else f"full logits ({type(distributed.unwrapped(model)).__name__}: the output layer "
        "alone does not give its logits)",
    )
    return fits


def autocast(device: str, dtype: str):
    """Mixed precision for a `dtype: bfloat16` recipe: bf16 matmuls, fp32 master weights and
    optimizer state (pure bf16 weights would round away updates of lr 1e-5: bf16 keeps 8 bits
    of mantissa). A no-op for float32.

    Without autocast's cache of weight casts (`cache_enabled=False`): the cache keeps the bf16
    cast of every weight that requires grad (a leaf, not a view: in one process) until the
    forward ends, a bf16 copy of the model that activation checkpointing would otherwise have
    dropped layer by layer (benchmarks/fsdp_memory.py --hidden-copies). The casts are the same
    numbers either way; a weight used twice is cast twice."""
    device_type = torch.device(device).type
    return torch.autocast(
        device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16", cache_enabled=False
    )


def train_epoch(
    model,
    optimizer,
    scheduler,
    examples,
    order,
    batch_size,
    micro,
    pad_id,
    device,
    epoch=0,
    dtype="float32",
    ranks: Ranks = distributed.ONE_PROCESS,
    progress: Progress | None = None,
    answer_only: bool = False,
):
    """One pass over `examples` in `order`, one optimizer step per batch of `batch_size`
    (`progress` counts the steps). With `answer_only` the output layer computes the logits of
    the answer positions only (`answer_logits`).

    Each rank takes every world-th example of a batch, in micro-batches of `micro`; the loss is
    the sum over the answer tokens divided by the answer tokens of the whole batch (times the
    world size, which the gradient averaging over ranks divides out). The objective is therefore
    the same for any micro-batch size and process count. All ranks run the same number of
    micro-batches: one whose share is empty runs a stand-in with weight 0, since every forward
    and backward is a collective under FSDP/DDP.

    Returns (sum of the token losses, answer tokens, input positions without padding), summed
    over the ranks."""
    model.train()
    total, tokens, positions = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        batch_tokens = sum(answer_tokens(examples[i]) for i in batch)
        share = batch[ranks.rank :: ranks.world]
        optimizer.zero_grad(set_to_none=True)
        for step in range(math.ceil(math.ceil(len(batch) / ranks.world) / micro)):
            chunk = share[step * micro : (step + 1) * micro]
            ids, labels, mask = collate([examples[i] for i in chunk or batch[:1]], pad_id)
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            with (
                autocast(device, dtype),
                answer_logits(model, labels) if answer_only else contextlib.nullcontext(),
            ):
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = token_loss(logits, labels, answer_only)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"epoch {epoch}, batch {start // batch_size}: loss is {loss.item()}; lower "
                    "the learning rate"
                )
            weight = ranks.world / max(1, batch_tokens) if chunk else 0.0
            (loss * weight).backward()
            if chunk:
                total += loss.item()
                tokens += sum(answer_tokens(examples[i]) for i in chunk)
                positions += int(mask.sum())
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress.advance()
    optimizer.zero_grad(set_to_none=True)
    total, tokens, positions = distributed.all_sum(ranks, [total, tokens, positions], device)
    return total, int(tokens), int(positions)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of an epoch: a function of (seed, epoch) only, so a resumed run sees
    the same order as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def answer_questions(
    generator,
    questions: list[str],
    ranks: Ranks = distributed.ONE_PROCESS,
    what: str = "evaluation",
) -> list[str]:
    """Zero-shot greedy answers in the training format, through the shared engine. Each rank
    answers its share (every world-th question) and every rank returns all the answers; every
    rank calls it. Rank 0 logs its progress as `what`."""
    from eqtools.engine import gather_answers, share

    # every rank registers the prefixes (a forward: a collective under lockstep)
    instruction, whole = generator.add_prefix(INSTRUCTION), generator.add_prefix("")
    mine = [questions[i] for i in share(len(questions), ranks.rank, ranks.world)]
    requests = [instructed_request(generator, q, instruction, whole) for q in mine]
    # waves of similar prompt lengths: a wave's buffers are as wide as its longest prompt
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
    answers = [""] * len(mine)
    progress = Progress(
        f"{what} evaluation"
        + (f" (rank 0's share of {len(questions)})" if ranks.world > 1 else ""),
        len(mine),
        "questions",
    )
    for i, tokens in generator.generate([requests[j] for j in order]):
        answers[order[i]] = generator.decode(tokens)
        progress.advance()
    progress.finish()
    return gather_answers(answers, len(questions), ranks.world)


def grade_together(
    generator,
    frames: dict[str, pl.DataFrame],
    ranks: Ranks = distributed.ONE_PROCESS,
    what: str = "evaluation",
) -> dict[str, tuple[pl.DataFrame, dict]]:
    """`accuracy_by_category` of each frame (columns question, gold, optional category), from one
    engine call over all their questions: one full batch instead of one per set, which the small
    sets (the training mixture, dev) would leave mostly empty (35% faster per epoch in the
    quickstart). Each question's answer does not depend on its batch."""
    answers = answer_questions(
        generator,
        [q for frame in frames.values() for q in frame["question"].to_list()],
        ranks,
        what,
    )
    graded, start = {}, 0
    for name, frame in frames.items():
        graded[name] = accuracy_by_category(frame, answers[start : start + frame.height])
        start += frame.height
    return graded


def accuracy_by_category(frame: pl.DataFrame, predictions: list[str]) -> tuple[pl.DataFrame, dict]:
    """Per-question correctness, overall accuracy and accuracy per SliCK category."""
    graded = frame.with_columns(
        pl.Series("prediction", predictions, dtype=pl.String),
        pl.Series(
            "correct",
            [exact_match(p, g) for p, g in zip(predictions, frame["gold"], strict=True)],
            dtype=pl.Boolean,
        ),
    )
    summary = {"accuracy": graded["correct"].mean() if graded.height else None, "n": graded.height}
    if "category" in graded.columns:
        for row in (
            graded.group_by("category")
            .agg(pl.col("correct").mean().alias("acc"), pl.len().alias("n"))
            .iter_rows(named=True)
        ):
            summary[f"accuracy_{row['category']}"] = row["acc"]
            summary[f"n_{row['category']}"] = row["n"]
    return graded, summary


def best_epoch(lines: list[dict]) -> int | None:
    """EARLY_STOP: the epoch with the best dev accuracy, the earliest among ties (None without
    dev)."""
    scored = [
        (line["dev_accuracy"], -line["epoch"])
        for line in lines
        if line.get("dev_accuracy") is not None
    ]
    return -max(scored)[1] if scored else None


def _distributed_state(model, optimizer) -> tuple[dict, object]:
    """The trainable weights and optimizer state as torch.distributed.checkpoint saves and
    loads them (sharded under FSDP: each rank writes and reads its own shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    weights, moments = get_state_dict(distributed.unwrapped(model), optimizer, options=options)
    return {"model": weights, "optim": moments}, options


@contextlib.contextmanager
def one_process_is_intended():
    """torch.distributed.checkpoint warns on every save and load without a process group; a
    one-process run is meant to have none."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_state(
    state_dir: Path,
    model,
    optimizer,
    scheduler,
    epoch: int,
    best: dict,
    lines: list[dict],
    predictions: dict[str, dict[str, pl.DataFrame]] | None = None,
    ranks: Ranks = distributed.ONE_PROCESS,
) -> None:
    """Every rank writes its shards and RNG state into the temporary directory that rank 0
    swaps into place once all are done. `predictions` maps "early_stop" and "convergence" (the
    latest epoch) to {split: graded frame}; every rank holds them, the metrics and `best`, and
    rank 0 writes them."""
    import torch.distributed.checkpoint as dcp

    def save(tmp: Path) -> None:
        distributed.barrier(ranks)  # the directory exists, empty
        state, _ = _distributed_state(model, optimizer)
        with one_process_is_intended():
            dcp.save(state, checkpoint_id=tmp / "dcp")
        torch.save(
            {
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "world": ranks.world,
            },
            tmp / f"rng{ranks.rank}.pt",
        )
        if ranks.main:
            write_predictions(tmp, predictions or {})
            torch.save(
                {
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "best": best,
                    "metrics": lines,
                    "world": ranks.world,
                },
                tmp / "trainer.pt",
            )
        distributed.barrier(ranks)  # every rank's files are written

    if ranks.main:
        with atomic_path(state_dir, directory=True) as tmp:
            save(tmp)
    else:
        save(part_path(state_dir))
    distributed.barrier(ranks)  # the state is in place before anyone goes on


def resumable(state_dir: Path) -> bool:
    """Whether `state_dir` holds a complete state of this layout; a state of the layout before
    torch.distributed.checkpoint (model/ and trainer.pt) cannot be resumed and is removed."""
    if not (state_dir / "trainer.pt").exists():
        return False
    if (state_dir / "dcp").is_dir():
        return True
    log.warning("%s holds a state of an older layout: training starts over", state_dir)
    return False


def load_state(
    state_dir: Path, model, optimizer, scheduler, ranks: Ranks = distributed.ONE_PROCESS
) -> tuple[int, dict, list[dict], dict]:
    """Restore a saved state into `model` (in place); returns (last completed epoch, best,
    metrics lines so far, predictions). The lines live in the state too: Snakemake deletes the
    declared outputs of a failed job, metrics.jsonl included. A state saved by another number
    of processes resumes too (the checkpoint is resharded), with fresh dropout streams."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state, options = _distributed_state(model, optimizer)
    with one_process_is_intended():
        dcp.load(state, checkpoint_id=state_dir / "dcp")
    set_state_dict(
        distributed.unwrapped(model),
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=options,
    )
    trainer = torch.load(state_dir / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    rng = state_dir / f"rng{ranks.rank}.pt"
    if trainer["world"] == ranks.world and rng.exists():
        saved = torch.load(rng, weights_only=False)
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])  # dropout on the GPU draws from these
    else:
        log.warning(
            "the state was saved by %d process(es), this run has %d: dropout draws fresh masks",
            trainer["world"],
            ranks.world,
        )
    return trainer["epoch"], trainer["best"], trainer["metrics"], read_predictions(state_dir)


# Config settings that set dropout on the attention probabilities, by family naming
ATTENTION_DROPOUT_KEYS = (
    "attention_dropout",
    "attn_pdrop",
    "attention_probs_dropout_prob",
    "attn_dropout",
)


def set_attention_dropout(config, p: float) -> list[str]:
    """Set the recipe's dropout on every attention-dropout setting that `config` has; returns
    their names (none: the model has no such setting and keeps its own dropouts)."""
    keys = [k for k in ATTENTION_DROPOUT_KEYS if isinstance(getattr(config, k, None), (int, float))]
    for k in keys:
        setattr(config, k, p)
    return keys


def linear_modules(model) -> list[str]:
    """The full names of the model's linear layers (what LoRA can target)."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


class FrozenCast(torch.autograd.Function):
    """`F.linear` of a frozen float32 weight under bf16 autocast, as autocast computes it (input,
    weight and bias cast to bf16, a bf16 product), that keeps for the backward the weight itself
    (no copy) instead of its bf16 cast, and casts it again there. Autocast's own linear keeps
    the cast of every frozen weight of the model from the forward to the backward: a bf16 copy
    of the whole base of a LoRA fine-tune. The weight needs no gradient, so its input is not
    kept either."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(
                x.to(torch.bfloat16),
                weight.to(torch.bfloat16),
                None if bias is None else bias.to(torch.bfloat16),
            )

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad_input = grad.to(torch.bfloat16) @ weight.to(torch.bfloat16)
        return grad_input.to(ctx.input_dtype), None, None


def keep_frozen_weights_uncast(model) -> int:
    """Route every linear layer of `model` whose weight is frozen float32 through `FrozenCast`
    while it trains under bf16 autocast (elsewhere it computes as it did); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad:
            continue
        plain = module.forward

        def forward(x, module=module, plain=plain):
            weight, device = module.weight, x.device.type
            if (
                torch.is_grad_enabled()
                and weight.dtype == torch.float32
                and not weight.requires_grad
                and torch.is_autocast_enabled(device)
                and torch.get_autocast_dtype(device) == torch.bfloat16
            ):
                return FrozenCast.apply(x, weight, module.bias)
            return plain(x)

        module.forward = forward
        count += 1
    return count


def add_lora(model, lora: Lora | dict, dropout: float):
    """Wrap `model` with LoRA adapters on `lora.target_modules` ("all-linear": peft's choice of
    every linear layer but the output layer). A target that matches nothing is an error that
    lists the model's linear modules; the log names the adapted modules and the trainable share."""
    from peft import LoraConfig, get_peft_model

    lora = Lora.coerce(lora)
    targets = lora.target_modules
    names = linear_modules(model)
    linear = sorted({name.rsplit(".", 1)[-1] for name in names})
    # peft matches a name or a dotted suffix of it
    if targets != "all-linear" and (
        unmatched := [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    ):
        raise TrainingError(
            f"lora.target_modules {unmatched} match no module of {type(model).__name__}; its "
            f"linear modules are {linear} (or use 'all-linear')"
        )
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        ),
    )
    adapted = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if hasattr(m, "lora_A") and name
        }
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA (%s) adapts %s of the linear modules %s: %d of %d parameters trainable (%.3f%%)",
        targets if isinstance(targets, str) else ", ".join(targets),
        adapted,
        linear,
        trainable,
        total,
        100 * trainable / total,
    )
    return model


def build_model(model_dir: str, recipe: Recipe | dict, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from eqtools.models import skeleton

    recipe = Recipe.coerce(recipe)
    config = AutoConfig.from_pretrained(model_dir)
    if keys := set_attention_dropout(config, recipe.dropout):
        log.info("attention dropout %s on %s", recipe.dropout, ", ".join(keys))
    else:
        log.info(
            "%s has no attention-dropout setting: "
            "the recipe's dropout applies to LoRA adapters only",
            config.model_type,
        )
    # float32 trained weights for every recipe: `dtype: bfloat16` trains under autocast (see
    # `autocast`). LoRA's frozen base is kept in bf16 (half the memory) only where evaluation
    # computes in bf16 too: the engine computes in the weights' dtype, and a float32 evaluation
    # must not silently become a bf16 one. Its adapters stay float32 (peft upcasts them).
    # Straight onto the device: no host copy. A sharded run's ranks build a skeleton on the
    # meta device (eqtools.distributed.load_sharded).
    frozen_bf16 = (
        recipe.method == "lora" and recipe.dtype == "bfloat16" and recipe.eval_dtype == "bfloat16"
    )
    dtype = torch.bfloat16 if frozen_bf16 else torch.float32
    if device == "meta":
        model = skeleton(model_dir, dtype, config)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, dtype=dtype, device_map=device
        )
    if recipe.method == "lora":
        model = add_lora(model, recipe.lora, recipe.dropout)
        if recipe.dtype == "bfloat16" and not frozen_bf16:
            # a float32 base trained under bf16 autocast: no bf16 copy of it kept for the backward
            keep_frozen_weights_uncast(model)
    return model


def finetune(
    model_dir: str,
    train: pl.DataFrame,
    evals: dict[str, pl.DataFrame],
    recipe: Recipe | dict,
    out: dict[str, Path],
    eval_every: dict[str, int],
    schedule: Schedule | None = None,
    device: str = "cpu",
    max_batch_rows: int = 2048,
    backend: str = "auto",
    on_epoch: Callable[[int], None] | None = None,
    ranks: Ranks = distributed.ONE_PROCESS,
    save_every: int = 1,
    keep_weights: bool = True,
) -> list[dict]:
    """Train for `recipe.epochs` epochs (a Recipe, or its dict); after each, evaluate and append a
    metrics line.

    `train` has columns id, question, answer (the training target), gold (for grading) and
    category; `evals` maps a name (dev, test, ood_test) to frames with question, gold and
    optionally category. `out` holds paths: metrics (jsonl), state (the resumable state's
    directory: the latest saved epoch in epoch/, the best epoch's weights in best-epoch-<k>/),
    early_stop and convergence (checkpoint dirs), and optionally predictions: {stop: {split:
    parquet path}} for the per-question predictions of `evals[split]` at each stop. `schedule`
    sets the micro-batch and the strategy (one process when None); in a distributed run every
    rank calls this with its `ranks` (eqtools.distributed.start). The state is saved every
    `save_every` epochs and after the last; `keep_weights=False` drops the checkpoints' weights
    once the predictions are written. Returns the metrics lines (on rank 0; the other ranks
    return an empty list)."""
    from transformers import AutoTokenizer, get_constant_schedule_with_warmup

    from eqtools.checkpoint import load_checkpoint, save_checkpoint
    from eqtools.engine import Generator, Lockstep

    recipe = Recipe.coerce(recipe)
    schedule = schedule or Schedule()
    checkpoint_dtype = torch.bfloat16 if recipe.written_dtype == "bfloat16" else torch.float32
    prediction_paths: dict[str, dict[str, Path]] = out.get("predictions", {})
    predicted = sorted({split for paths in prediction_paths.values() for split in paths})
    if unknown := [split for split in predicted if split not in evals]:
        raise TrainingError(
            f"predictions asked for {unknown}, which are not evaluation sets ({sorted(evals)})"
        )
    if unknown := sorted(set(prediction_paths) - {"early_stop", "convergence"}):
        raise TrainingError(
            f"predictions asked for stops {unknown}; the stops are early_stop and convergence"
        )

    metrics_path, state_root = Path(out["metrics"]), Path(out["state"])
    state_dir = state_root / "epoch"
    if ranks.main:
        finish_swap(state_dir)
        finish_swap(finished_dir(state_root))
    distributed.barrier(ranks)
    if (finished_dir(state_root) / "record.pt").exists():
        # an earlier attempt trained every epoch and was killed while or after it published its
        # outputs (Snakemake then deleted them): they are published again from the record
        log.info("the run finished in an earlier attempt: its outputs are published again")
        if not ranks.main:
            return []
        lines, best, predictions = load_finished(state_root)
        complete(state_root, out, best, lines, predictions, prediction_paths, keep_weights)
        return lines

    # model, optimizer, data: the same initial weights on every rank (seeded alike)
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model = distributed.wrap(
        lambda where: build_model(model_dir, recipe, where), schedule, recipe, device, ranks
    )
    # every rank evaluates its share of the questions on the weights as they are trained: its own
    # copy (one process, DDP), or under FSDP the sharded model itself, in lockstep
    evaluated = distributed.unwrapped(model)
    generator = Generator(
        evaluated,
        tokenizer,
        max_new_tokens=recipe.max_new_tokens,
        max_batch_rows=max_batch_rows,
        backend=backend,
        compute_dtype=torch.bfloat16 if recipe.eval_dtype == "bfloat16" else None,
        lockstep=Lockstep(evaluated, device) if schedule.strategy == "fsdp" else None,
    )
    if not ranks.main:
        torch.manual_seed(recipe.seed * 1_000_003 + ranks.rank)  # its own dropout masks
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    scheduler = get_constant_schedule_with_warmup(optimizer, recipe.warmup_steps)
    steps_per_epoch = math.ceil(train.height / recipe.batch_size)
    examples = encode_examples(tokenizer, train["question"].to_list(), train["answer"].to_list())
    answer_only = check_answer_logits(
        model, examples[: schedule.micro_batch_size], pad_id, device, recipe.dtype, ranks
    )

    start_epoch, best = 0, {"dev_accuracy": -1.0, "epoch": None}
    lines: list[dict] = []
    # per stop {split: graded frame}; "convergence" holds the latest epoch's until the run ends
    predictions: dict[str, dict[str, pl.DataFrame]] = {"early_stop": {}, "convergence": {}}
    if resumable(state_dir):
        start_epoch, best, lines, saved = load_state(state_dir, model, optimizer, scheduler, ranks)
        predictions.update(saved)
        if best["epoch"] is not None and not best_dir(state_root, best["epoch"]).is_dir():
            raise TrainingError(
                f"{state_dir} says epoch {best['epoch']} was the best, but its weights "
                f"{best_dir(state_root, best['epoch'])} are missing; delete {state_root} to "
                "start over"
            )
        log.info(
            "resuming after epoch %d of %d (best dev %.4f at epoch %s)",
            start_epoch,
            recipe.epochs,
            best["dev_accuracy"],
            best["epoch"],
        )
    if ranks.main:
        drop_other_bests(state_root, best["epoch"])
    log.info(
        "%s: %d process(es) (%s), global batch %d, micro-batch %d per process, %d epochs of "
        "%d optimizer steps; the state is saved every %d epoch(s) to %s",
        device,
        ranks.world,
        schedule.strategy,
        recipe.batch_size,
        schedule.micro_batch_size,
        recipe.epochs,
        steps_per_epoch,
        save_every,
        state_root,
    )
    run_started = time.perf_counter()

    for epoch in range(start_epoch + 1, recipe.epochs + 1):
        # forward, backward, update
        order = epoch_order(len(examples), recipe.seed, epoch)
        started = time.perf_counter()
        total, tokens, positions = train_epoch(
            model,
            optimizer,
            scheduler,
            examples,
            order,
            recipe.batch_size,
            schedule.micro_batch_size,
            pad_id,
            device,
            epoch,
            recipe.dtype,
            ranks,
            progress=Progress(
                f"epoch {epoch}/{recipe.epochs} training", steps_per_epoch, "optimizer steps"
            ),
            answer_only=answer_only,
        )
        train_seconds = time.perf_counter() - started
        # evaluate: every rank its share; every rank gets all the answers and grades them
        evaluated.eval()
        line = {
            "epoch": epoch,
            "train_loss": total / max(1, tokens),
            "optimizer_steps": steps_per_epoch * epoch,
            "world_size": ranks.world,
        }
        due = {"train": train.select("question", "gold", "category")} | {
            name: frame
            for name, frame in evals.items()
            if epoch % eval_every.get(name, 1) == 0 or epoch == recipe.epochs
        }
        graded = grade_together(generator, due, ranks, what=f"epoch {epoch}/{recipe.epochs}")
        for name, (_, summary) in graded.items():
            line.update({f"{name}_{k}": v for k, v in summary.items()})
        lines.append(line)
        predictions["convergence"] = {
            split: graded[split][0] for split in predicted if split in graded
        }
        if best_epoch(lines) == epoch:
            best = {"dev_accuracy": line["dev_accuracy"], "epoch": epoch}
            predictions["early_stop"] = dict(predictions["convergence"])
            # in the state, not in the declared output: Snakemake deletes a job's outputs
            # before it runs it again, and a resumed run must still find the best weights
            save_checkpoint(evaluated, best_dir(state_root, epoch), ranks, checkpoint_dtype)
        if ranks.main:
            log.info(
                "epoch %d: %s",
                epoch,
                {k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()},
            )
            elapsed = time.perf_counter() - run_started
            log.info(
                "epoch %d of %d done: train %.1f s (%.0f tokens/s), evaluation %.1f s; run ETA %s",
                epoch,
                recipe.epochs,
                train_seconds,
                positions / max(train_seconds, 1e-9),
                time.perf_counter() - started - train_seconds,
                duration(elapsed / (epoch - start_epoch) * (recipe.epochs - epoch)),
            )
            # metrics first, then the state that says this epoch is complete
            write_metrics(lines, metrics_path)
        # checkpoint (every `save_every` epochs and the last: what a kill can cost)
        if epoch % save_every == 0 or epoch == recipe.epochs:
            save_state(
                state_dir, model, optimizer, scheduler, epoch, best, lines, predictions, ranks
            )
            if ranks.main:
                drop_other_bests(state_root, best["epoch"])
        if on_epoch is not None:
            on_epoch(epoch)
    # the last weights in the state too, beside the best's: both enter the declared outputs by
    # hard links, and a kill after that (Snakemake then deletes the outputs) loses no training
    save_checkpoint(evaluated, final_dir(state_root), ranks, checkpoint_dtype)
    early_weights = early_stop_weights(state_root, best)
    if best["epoch"] is None:  # no dev set: the last epoch is the early stop too
        predictions["early_stop"] = dict(predictions["convergence"])
    if missing := [
        split
        for split in prediction_paths.get("early_stop", {})
        if split not in predictions["early_stop"]
    ]:
        # eval_every > 1 skipped these at the best epoch: evaluate the early-stop weights once
        log.info("evaluating %s at the early stop (epoch %s)", missing, best["epoch"])
        load_checkpoint(evaluated, early_weights)
        evaluated.eval()
        graded = grade_together(
            generator, {split: evals[split] for split in missing}, ranks, what="early stop"
        )
        predictions["early_stop"].update({split: graded[split][0] for split in missing})
    if not ranks.main:
        return []
    # the run is trained: a record of its results replaces the resumable state, whose optimizer
    # moments (twice the trained weights) go; with keep_weights false the weights go too
    with atomic_path(finished_dir(state_root), directory=True) as tmp:
        write_predictions(tmp, predictions)
        torch.save({"best": best, "metrics": lines}, tmp / "record.pt")
    complete(state_root, out, best, lines, predictions, prediction_paths, keep_weights)
    return lines


def forget_finished(state_root: Path) -> bool:
    """Remove the record and weights of a run that finished (in an earlier invocation of
    Snakemake, which then recorded it, or ran it again with --forcerun); returns whether there
    was one. Only a retry within one invocation (attempt > 1) publishes a finished record again:
    a new invocation trains, so that a forced rerun is a new run."""
    state_root = Path(state_root)
    if not finished_dir(state_root).exists():
        return False
    for folder in (finished_dir(state_root), final_dir(state_root)):
        shutil.rmtree(folder, ignore_errors=True)
    drop_other_bests(state_root, None)
    return True


def early_stop_weights(state_root: Path, best: dict) -> Path:
    """Where the state keeps the early stop's weights: the best epoch's, or without a dev set
    (no best epoch) the last epoch's."""
    if best["epoch"] is None:
        return final_dir(state_root)
    return best_dir(state_root, best["epoch"])


def write_metrics(lines: list[dict], path: str | Path) -> None:
    """metrics.jsonl: one line per epoch."""
    write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines), path)


def finished_dir(state_root: Path) -> Path:
    """The record of a run that trained every epoch: metrics, best epoch, predictions."""
    return Path(state_root) / "finished"


def final_dir(state_root: Path) -> Path:
    """Where the state keeps the weights of the last epoch once the run is trained."""
    return Path(state_root) / "last-epoch"


def write_predictions(folder: Path, predictions: dict[str, dict[str, pl.DataFrame]]) -> None:
    for stop, frames in predictions.items():
        (folder / "predictions" / stop).mkdir(parents=True)
        for split, frame in frames.items():
            frame.write_parquet(folder / "predictions" / stop / f"{split}.parquet")


def read_predictions(folder: Path) -> dict[str, dict[str, pl.DataFrame]]:
    return {
        stop.name: {f.stem: pl.read_parquet(f) for f in sorted(stop.glob("*.parquet"))}
        for stop in sorted((folder / "predictions").glob("*"))
    }


def load_finished(state_root: Path) -> tuple[list[dict], dict, dict[str, dict[str, pl.DataFrame]]]:
    folder = finished_dir(state_root)
    record = torch.load(folder / "record.pt", weights_only=False)
    return record["metrics"], record["best"], read_predictions(folder)


def complete(
    state_root: Path,
    out: dict,
    best: dict,
    lines: list[dict],
    predictions: dict[str, dict[str, pl.DataFrame]],
    prediction_paths: dict[str, dict[str, Path]],
    keep_weights: bool,
) -> None:
    """The declared outputs of a trained run (rank 0), from its finished state: the checkpoints
    by hard links to the state's weights (no copy of the data), the predictions and the metrics.
    The optimizer state goes first (and with `keep_weights` false, the weights). The rest of the
    state stays, its links costing no disk while the outputs exist: Snakemake deletes the
    outputs of a job killed after this, and its next attempt publishes them again instead of
    training."""
    shutil.rmtree(Path(state_root) / "epoch", ignore_errors=True)
    early = early_stop_weights(state_root, best)
    if not keep_weights:
        for weights in {early, final_dir(state_root)}:
            drop_weights(weights)
    link_tree(early, Path(out["early_stop"]))
    link_tree(final_dir(state_root), Path(out["convergence"]))
    for stop, paths in prediction_paths.items():
        for split, path in paths.items():
            write_parquet(predictions[stop][split], path)
    write_metrics(lines, out["metrics"])


def best_dir(state_root: Path, epoch: int) -> Path:
    """Where the state keeps the weights of the best epoch so far."""
    return Path(state_root) / f"best-epoch-{epoch}"


def drop_other_bests(state_root: Path, keep: int | None) -> None:
    """Remove the best-epoch weights other than those of epoch `keep`: earlier bests, and one a
    kill left behind before its epoch's state was saved."""
    for folder in Path(state_root).glob("best-epoch-*"):
        if folder.name != f"best-epoch-{keep}":
            shutil.rmtree(folder)


def link_tree(source: Path, target: Path) -> None:
    """`target` as a copy of the directory `source` made of hard links to its files (a rename's
    cost; a copy where `target` is on another filesystem, one log line says so), atomically."""
    copied = []
    with atomic_path(target, directory=True) as tmp:
        for path in sorted(source.rglob("*")):
            destination = tmp / path.relative_to(source)
            if path.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
            elif not link_file(path, destination):
                copied.append(path.name)
    if copied:
        log.info("copied %s into %s (another filesystem: no hard links)", copied, target)


WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")


def drop_weights(checkpoint: Path) -> None:
    """Remove a checkpoint's weights once its evaluation is written (`finetune.keep_weights:
    false`); its configs stay, with a note of what was dropped."""
    dropped = [name for name in WEIGHT_FILES if (checkpoint / name).exists()]
    if not dropped and (checkpoint / "WEIGHTS_DROPPED.txt").exists():
        return  # dropped by an earlier attempt
    for name in dropped:
        (checkpoint / name).unlink()
    write_text(
        f"{', '.join(dropped)} dropped after the evaluation (finetune.keep_weights: false)\n",
        checkpoint / "WEIGHTS_DROPPED.txt",
    )
