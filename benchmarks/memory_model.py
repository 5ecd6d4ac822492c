"""The memory model of docs/scaling.md (section 2, as corrected) against measured peaks: each
configuration's predicted memory, from the formula's terms, beside the peak that the project's own
code reaches on the CPU, in one run.

    python benchmarks/memory_model.py [--hidden 1024 --layers 12 --json out.json]

A random-init Llama built from a config (no download; `fsdp_memory.build_random_model`: vocabulary
32,000, SwiGLU MLP, 4 query heads per key-value head, untied output layer), saved once as fp32
safetensors in a temporary directory. Each configuration runs in a fresh process (2 ranks under
torchrun with gloo for FSDP), through the code the rules run:

- full fine-tuning, one process (`distributed.wrap` of `training.build_model`, AdamW as
  `training.finetune` builds it, `training.train_epoch` with answer-only logits), `dtype:
  float32` and `dtype: bfloat16` (autocast over fp32 weights): batch 8, micro-batch 4, 2 steps;
- full fine-tuning under FSDP2, 2 ranks, `dtype: bfloat16` with `eval_dtype: float32` (float32
  gathers) and with `eval_dtype: bfloat16` (bf16 gathers, `distributed.gather_dtype`);
- LoRA (peft, all-linear, rank 8, dropout 0.05), one process, `dtype: bfloat16` with
  `eval_dtype: float32` (an fp32 frozen base under bf16 autocast), micro-batch 32;
- an evaluation (`training.answer_questions` through `engine.Generator`) on a full fine-tune's
  fp32 weights (`eval_dtype: float32`): 2 waves of `--rows` rows, prompts of 4-40 words, waves
  sorted by prompt length as the rule sorts them;
- a labelling wave (`slick.label_questions`, greedy phase: 10 exemplar sets of 4) on the weights
  in bf16, as `label_questions` loads a `dtype: bfloat16` registry entry;
- a P(True) batch (`ptrue.score_p_true`, one batch of `--ptrue-rows` prompts) on the bf16
  weights.

Measured: the peak resident memory (VmHWM) over the resident memory before the model is built
(the baseline: interpreter, libraries, tokenizer, and what the libraries initialise on first use:
each worker first runs the same configuration on a tiny model, 4 M parameters, and frees it,
as a GPU job's CUDA context and kernels are in place before its model's memory counts). The peak
is taken from after the model is built (VmHWM reset there, `echo 5 > /proc/self/clear_refs`):
loading, which section 2 costs apart ("Loading"), is excluded; the memory the loaded model holds
is not. glibc
is asked to map every allocation above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so that memory
freed goes back to the system and the resident set follows the live tensors, as a GPU's
`max_memory_allocated` does; without it the heap keeps freed blocks and the peak depends on the
allocation order. FSDP: the larger of the two ranks. A run uses `--threads` threads (2), one
per rank under FSDP.

Before the table, the activation formula (bytes saved for the backward per token and layer) is
checked against a count of the tensors autograd saves (`torch.autograd.graph.saved_tensors_hooks`,
deduplicated by storage) in a small Llama, for each way of computing the benchmark uses.

The last line is `memory model: worst predicted/measured ratio X over N configurations`, X the
ratio farthest from 1.
"""

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow" / "scripts"), str(ROOT / "benchmarks")]

from fsdp_memory import RECIPE as FSDP_RECIPE  # noqa: E402
from fsdp_memory import build_random_model, examples, run_worker  # noqa: E402
from prepare_memory import high_water_gib  # noqa: E402

from eqtools import distributed  # noqa: E402

MB = 2**20
# fsdp_memory.py's full fine-tune (batch 8, fp32), answering with up to 16 new tokens
RECIPE = FSDP_RECIPE | {"max_new_tokens": 16}
# name: (kind, recipe changes, processes, micro-batch, steps)
CONFIGS = {
    "full, 1 process, float32": ("train", {}, 1, 4, 2),
    "full, 1 process, bfloat16 autocast": ("train", {"dtype": "bfloat16"}, 1, 4, 2),
    "full, FSDP 2 ranks, float32 gathers": ("train", {"dtype": "bfloat16"}, 2, 4, 2),
    "full, FSDP 2 ranks, bf16 gathers": (
        "train",
        {"dtype": "bfloat16", "eval_dtype": "bfloat16"},
        2,
        4,
        2,
    ),  # fmt: skip
    "LoRA r8, 1 process, fp32 base, bf16 autocast": (
        "train",
        {"method": "lora", "dtype": "bfloat16", "dropout": 0.05, "batch_size": 32},
        1,
        32,
        1,
    ),  # fmt: skip
    "evaluation, fp32 weights, 2 waves": ("evaluate", {}, 1, 0, 0),
    "labelling wave, bf16 weights": ("label", {}, 1, 0, 0),
    "P(True) batch, bf16 weights": ("ptrue", {}, 1, 0, 0),
}
LENGTH = 32  # tokens per training example; the loss on the last quarter (`examples`)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


# ----- the model's shape -----


@dataclass
class Shape:
    """A decoder-only model's sizes (parameters counted as Llama has them)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False

    @classmethod
    def of(cls, config) -> "Shape":
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return cls(
            config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.vocab_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
            bool(config.tie_word_embeddings),
        )  # fmt: skip

    @property
    def kv(self) -> int:
        """Key (or value) width per token and layer."""
        return self.kv_heads * self.head_dim

    @property
    def linear_per_layer(self) -> int:
        h, q = self.hidden, self.heads * self.head_dim
        return 2 * h * q + 2 * h * self.kv + 3 * h * self.intermediate

    @property
    def per_layer(self) -> int:
        return self.linear_per_layer + 2 * self.hidden  # two RMSNorm weights

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def root(self) -> int:
        """FSDP's root group: what is not in a decoder layer (embeddings, output layer, norm)."""
        return self.embedding * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.root + self.layers * self.per_layer

    @property
    def linear(self) -> int:
        """Weights used in a matmul: every linear layer and the output layer."""
        return self.layers * self.linear_per_layer + self.embedding

    @property
    def largest(self) -> int:
        return max(self.embedding, self.hidden * self.intermediate)

    def lora(self, rank: int) -> int:
        """Adapter parameters at `rank` on every linear layer but the output layer."""
        h, q, i = self.hidden, self.heads * self.head_dim, self.intermediate
        ins_outs = (h + q) * 2 + (h + self.kv) * 2 + (h + i) * 3
        return self.layers * rank * ins_outs


# ----- the formulas (bytes) -----


def activations_per_token_layer(s: Shape, mode: str, padded: bool, lora_dropout: float = 0.0):
    """Bytes autograd saves for the backward per token and decoder layer of a Llama (SwiGLU MLP,
    grouped-query SDPA attention), without activation checkpointing. `mode`:
    fp32 (no autocast), bf16 (autocast over fp32 weights: fp32 residual stream and norms, bf16
    matmul inputs, each projection casting its input anew), bf16w (bf16 weights, as FSDP's bf16
    gathers: a bf16 residual stream), lora (peft LoRA over a frozen base under bf16 autocast: the
    frozen norms save less; with dropout each adapter keeps its mask and dropped input)."""
    h, i, kv, seq = s.hidden, s.intermediate, s.kv, LENGTH
    small = 4 * s.heads + 8  # attention's log-sum-exp per head, two norms' 1/rms (fp32)
    # keys and values repeated to every query head (transformers' repeat_kv before SDPA): a
    # copy, except with a single key-value head (a stride-0 view)
    repeated = h - kv if 1 < s.kv_heads < s.heads else 0
    if mode == "fp32":
        return 32 * h + 16 * i + 8 * kv + 8 * repeated + small + (4 * seq if padded else 0)
    if mode == "bf16":
        return 32 * h + 8 * i + 2 * kv + 2 * repeated + small + (2 * seq if padded else 0)
    if mode == "bf16w":
        return 20 * h + 8 * i + 4 * kv + 4 * repeated + small + (2 * seq if padded else 0)
    if mode == "lora":
        rank = RECIPE["lora"]["rank"]
        extra = 24 * h + 4 * i if lora_dropout else 0
        base = 26 * h + 8 * i + 2 * kv + 2 * repeated + 14 * rank + extra + small
        return base + (2 * seq if padded else 0)
    raise ValueError(mode)


def training_terms(s: Shape, kind: str, n: int, micro: int, steps: int, cpu: bool = True):
    """Per-rank peak of a fine-tune, as terms {name: bytes} whose sum is the prediction. `kind`:
    full-fp32, full-bf16 (one process), fsdp-fp32 / fsdp-bf16 (gathers), lora. The peak is the
    largest of three moments: the start of a backward (everything the forward saved), the end of
    a backward, and the optimizer step."""
    N, tokens = s.parameters, micro * LENGTH
    answers = micro * (LENGTH - LENGTH * 3 // 4)  # positions whose next token is an answer token
    mode = {"full-fp32": "fp32", "fsdp-bf16": "bf16w", "lora": "lora"}.get(kind, "bf16")
    act = s.layers * tokens * activations_per_token_layer(s, mode, False, 0.05 * (kind == "lora"))
    act += tokens * 8 * s.hidden  # the final norm
    logits = answers * s.vocab * (16 if kind == "full-fp32" else 14)
    # CPU AdamW runs tensor by tensor (two temporaries of the largest tensor: sqrt, denominator);
    # on a GPU it runs foreach: one temporary of every (local) parameter, 4 N / n
    opt_temp = 8 * s.largest / n if cpu else 4 * N / n
    if kind in ("full-fp32", "full-bf16"):
        casts = 2 * s.linear if kind == "full-bf16" else 0
        held = {"weights (4N)": 4 * N, "AdamW moments (8N)": 8 * N}
        # the step's second micro-batch starts its backward with the gradients (4N) present
        grads = 4 * N if micro < RECIPE["batch_size"] else 0
        start = held | {
            "gradients (4N)": grads,
            "bf16 weight casts saved (2N_linear)": casts,
            "activations": act,
            "logits (answer-only)": logits,
            # the output layer's gradient before it is added (a bf16 one, then its fp32 cast)
            "output-layer gradient": (6 if casts else 4) * s.embedding,
        }
        end = held | {"gradients (4N)": 4 * N, "a new gradient": 4 * s.largest}
        step = held | {"gradients (4N)": 4 * N, "AdamW temporaries": opt_temp}
        best = max((start, end, step), key=lambda t: sum(t.values()))
        return {k: v for k, v in best.items() if v}
    if kind.startswith("fsdp"):
        b = 4 if kind == "fsdp-fp32" else 2
        casts = 2 * s.linear if b == 4 else 0
        start = {
            "sharded weights + moments (12N/n)": 12 * N / n,
            f"root group gathered ({b} B x N_root)": b * s.root,
            "bf16 weight casts of every gathered layer (2N_linear)": casts,
            "gathered layers (2 layers)": 2 * b * s.per_layer,
            "activations": act,
            "logits (answer-only)": logits,
            "output-layer gradient": (6 if b == 4 else 2) * s.embedding,
        }
        # the end: sharded gradients, the root group (until its post-backward reshards it), its
        # unsharded gradients and their fp32 reduce-scatter input
        end = {
            "sharded state (16N/n)": 16 * N / n,
            f"root group gathered ({b} B x N_root)": b * s.root,
            "root gradients + fp32 reduce input": (b + 4) * s.root,
        }
        step = {"sharded state (16N/n)": 16 * N / n, "AdamW temporaries": opt_temp}
        best = max((start, end, step), key=lambda t: sum(t.values()))
        return {k: v for k, v in best.items() if v}
    if kind == "lora":
        adapters = s.lora(RECIPE["lora"]["rank"])
        terms = {
            "fp32 base (4N)": 4 * N,
            "adapters + gradients + moments (16 N_lora)": (16 if steps > 1 else 4) * adapters,
            "activations (LoRA count)": act,
            "logits (answer-only)": logits,
        }
        return terms
    raise ValueError(kind)


def inference_terms(s: Shape, weight_bytes: int, compute_bytes: int, geometry: dict):
    """Peak of an engine run (`Generator`): the weights, the prefixes' KV kept by the generator,
    and the largest wave: at its prefill (prefix level, group level as wide as the wave's longest
    prompt, the packed prompts through the MLP or the prompts' last logits) or while decoding (the
    rows' level of max_new_tokens positions allocated at once, two steps' logits)."""
    slot = 2 * s.layers * s.kv * weight_bytes  # K and V of one position, in the weights' dtype
    logit_bytes = compute_bytes
    best = None
    for w in geometry["waves"]:
        prefix = w["prefix_entries"] * w["prefix_width"] * slot
        group = w["groups"] * w["width"] * slot
        t, g, width = w["tokens"], w["groups"], w["width"]
        mlp = t * (3 * s.intermediate + 2 * s.hidden) * compute_bytes
        # the levels' attention over the packed prompts: the residual, normed input, rotated and
        # scaled queries (4 T h) with the keys and values; the scores over the prefix and the
        # group columns (the raw, masked and concatenated ones, and the softmax); the queries,
        # then the weights, padded into one block per prompt, and the block scores
        columns = w["prefix_width"] + width
        attention = compute_bytes * (
            4 * t * s.hidden + 2 * t * s.kv + 4 * t * s.heads * columns
            + g * width * s.hidden + g * s.heads * width * width
        )  # fmt: skip
        last = w["groups"] * s.vocab * logit_bytes + t * s.hidden * compute_bytes
        prefill = prefix + group + max(mlp, attention, last)
        rows = w["rows"] * geometry["max_new_tokens"] * slot
        decode_temp = 2 * w["rows"] * s.vocab * logit_bytes
        decode_temp += w["rows"] * (3 * s.intermediate + 2 * s.hidden) * compute_bytes
        decode = prefix + group + rows + decode_temp
        terms = {
            "prefix level KV": prefix,
            f"group KV ({w['groups']} prompts x longest {w['width']})": group,
        }
        if decode >= prefill:
            terms |= {
                f"rows KV ({w['rows']} x {geometry['max_new_tokens']})": rows,
                "decode logits + MLP": decode_temp,
            }
        else:
            terms["prefill temporaries (" + ("attention" if attention > mlp else "MLP") + ")"] = (
                max(mlp, attention, last)
            )
        if best is None or sum(terms.values()) > sum(best.values()):
            best = terms
    return {
        f"weights ({weight_bytes} B x N)": weight_bytes * s.parameters,
        "stored prefix KV": geometry["stored_prefix_tokens"] * slot,
    } | best


def ptrue_terms(s: Shape, weight_bytes: int, geometry: dict) -> dict:
    """Peak of a P(True) batch (`ptrue.continuation_logprobs`): the prompts' KV cache (left-padded
    to the batch's longest prompt), and for every multi-token continuation a deep copy of it that
    the continuation's forward extends; the copy of the previous continuation is still held (by
    its output) while the next is made: three copies. The prefill's MLP temporaries (the padded
    prompts through the MLP) come on top of the first copy only."""
    slot = 2 * s.layers * s.kv * weight_bytes
    rows, width, longest = geometry["rows"], geometry["width"], geometry["continuation"]
    kv = rows * width * slot
    prefill_mlp = rows * width * (3 * s.intermediate + 2 * s.hidden) * weight_bytes
    # the prompts' last logits and their fp32 log-softmax; two continuations' logits and theirs
    logits = (rows + 2 * rows * (longest - 1)) * s.vocab * (4 + weight_bytes)
    copies = geometry["copies"]
    weights = {f"weights ({weight_bytes} B x N)": weight_bytes * s.parameters}
    if prefill_mlp > (copies - 1) * kv + logits:
        return weights | {"prompt KV": kv, "prefill MLP temporaries": prefill_mlp}
    return weights | {
        f"prompt KV ({rows} x {width}) x {copies} (the cache and two copies)": copies * kv,
        "continuation logits": logits,
    }


def predict(s: Shape, name: str, geometry: dict | None) -> dict:
    kind, changes, n, micro, steps = CONFIGS[name]
    recipe = RECIPE | changes
    if kind == "train":
        if recipe["method"] == "lora":
            key = "lora"
        elif n > 1:
            key = "fsdp-bf16" if distributed_gathers_bf16(recipe) else "fsdp-fp32"
        else:
            key = "full-bf16" if recipe["dtype"] == "bfloat16" else "full-fp32"
        return training_terms(s, key, n, micro, steps)
    if kind == "evaluate":
        return inference_terms(s, 4, 4, geometry)
    if kind == "ptrue":
        return ptrue_terms(s, 2, geometry)
    return inference_terms(s, 2, 2, geometry)


def distributed_gathers_bf16(recipe: dict) -> bool:
    from eqtools.settings import Recipe

    return distributed.gather_dtype(Recipe.from_dict(recipe)) == torch.bfloat16


# ----- the count of saved tensors -----


def count_saved(mode: str, config, padded: bool) -> int:
    """Bytes autograd saves for one forward of a small Llama (weights and their casts left out)."""
    from transformers import LlamaForCausalLM

    from eqtools.training import add_lora, autocast, keep_frozen_weights_uncast

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if mode == "lora":  # as build_model makes it for a float32 base trained in bf16
        model = add_lora(model, RECIPE["lora"], 0.05)
        keep_frozen_weights_uncast(model)
    if mode == "bf16w":
        model.to(torch.bfloat16)
    model.train()
    b = 4
    ids = torch.randint(2, 1000, (b, LENGTH))
    mask = torch.ones(b, LENGTH, dtype=torch.long)
    if padded:
        mask[0, -3:] = 0
    weights = {p.data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {
        tuple(p.shape[::-1]) for p in model.parameters()
    }
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), (tuple(t.shape), storage.nbytes()))
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        autocast("cpu", "float32" if mode == "fp32" else "bfloat16"),
    ):
        model(input_ids=ids, attention_mask=mask)
    return sum(
        size
        for ptr, (shape, size) in seen.items()
        if ptr not in weights
        and not (len(shape) == 2 and shape in shapes and shape[0] != b * LENGTH)
    )


def check_activation_formula() -> list[dict]:
    """The activation formula against the count, for three small shapes (the formula's
    coefficients of the hidden size, the MLP's width and the key-value width apart)."""
    from transformers import LlamaConfig

    out = []
    for hidden, intermediate, heads, kv_heads in (
        (256, 704, 4, 1),
        (384, 1536, 6, 3),
        (512, 1344, 8, 2),
    ):
        configs = [
            LlamaConfig(
                vocab_size=1000, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                tie_word_embeddings=False,
            )
            for layers in (2, 4)
        ]  # fmt: skip
        s = Shape.of(configs[0])
        for mode in ("fp32", "bf16", "bf16w", "lora"):
            # per layer: the difference between 4 and 2 layers, per token
            two, four = (count_saved(mode, c, True) for c in configs)
            counted = (four - two) / 2 / (4 * LENGTH)
            formula = activations_per_token_layer(s, mode, True, 0.05 if mode == "lora" else 0)
            out.append({"shape": asdict(s), "mode": mode, "counted": counted, "formula": formula})
            print(
                f"activations saved per token and layer, {mode:5s} (h {s.hidden}, intermediate "
                f"{s.intermediate}, kv width {s.kv}): counted {counted:.0f} B, formula "
                f"{formula} B = {formula / s.hidden:.1f} h",
                flush=True,
            )
    return out


# ----- one configuration, in its own process -----


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the resident set now


def train_worker(args, name: str, model_dir: str) -> dict:
    from eqtools.settings import Recipe, Schedule
    from eqtools.training import build_model, epoch_order, train_epoch

    kind, changes, _, micro, steps = CONFIGS[name]
    ranks, device = args.ranks, "cpu"
    recipe = Recipe.from_dict(RECIPE | changes)
    schedule = Schedule(
        micro_batch_size=micro,
        strategy="fsdp" if ranks.world > 1 else "none",
        nproc_per_node=ranks.world,
        activation_checkpointing=False,
    )
    data = examples(recipe.batch_size * steps, LENGTH)
    baseline = resident_mb()
    model = distributed.wrap(
        lambda where: build_model(model_dir, recipe, where), schedule, recipe, device, ranks
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )  # as training.finetune builds it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loaded = resident_mb() - baseline
    reset_peak()
    started = time.perf_counter()
    for step in range(steps):
        order = epoch_order(len(data), 0, 1)[
            step * recipe.batch_size : (step + 1) * recipe.batch_size
        ]
        train_epoch(
            model, optimizer, scheduler, data, order, recipe.batch_size, micro, 1, device,
            dtype=recipe.dtype, ranks=ranks, answer_only=True,
        )  # fmt: skip
    peak = high_water_gib() * 1024 - baseline
    seconds = time.perf_counter() - started
    peaks = distributed.all_sum(
        ranks, [peak if r == ranks.rank else 0.0 for r in range(ranks.world)], device
    )
    return {"measured_mb": max(peaks), "rank_peaks_mb": peaks, "loaded_mb": loaded,
            "seconds": seconds, "main": ranks.main}  # fmt: skip


def questions(n: int, lo: int, hi: int, seed: int) -> list[str]:
    g = random.Random(seed)
    return [
        " ".join(f"t{g.randrange(2, 32000)}" for _ in range(g.randint(lo, hi))) for _ in range(n)
    ]


def wave_geometry(generator, requests: list, order: list[int]) -> list[dict]:
    """The waves `Generator.generate` forms from `requests` in `order` (every request kept),
    with its own `next_wave` and `wave_budget`."""
    from eqtools.engine.generator import next_wave

    waves = []
    ordered = [requests[i] for i in order]
    widths = [len(r.prompt) + generator.max_new_tokens for r in ordered]
    budget = generator.wave_budget(widths)
    pending = list(range(len(ordered)))
    while pending:
        picked, pending = next_wave(pending, widths, generator.max_batch_rows, budget)
        wave = [ordered[i] for i in picked]
        groups = {(r.prefix, r.prompt) for r in wave}
        used = {p for p, _ in groups if generator.prefixes[p].tokens}
        waves.append(
            {
                "rows": len(wave),
                "groups": len(groups),
                "width": max(len(q) for _, q in groups),
                "tokens": sum(len(q) for _, q in groups),
                "prefix_entries": len(used) + 1,
                "prefix_width": max([len(generator.prefixes[p].tokens) for p in used] or [1]),
            }
        )
    return waves


def evaluate_worker(args, name: str, model_dir: str) -> dict:
    from transformers import AutoTokenizer

    from eqtools.engine import Generator
    from eqtools.settings import Recipe
    from eqtools.training import INSTRUCTION, answer_questions, build_model, instructed_request

    recipe = Recipe.from_dict(RECIPE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    qs = questions(2 * args.rows, 4, 40, seed=1)
    baseline = resident_mb()
    model = build_model(model_dir, recipe, "cpu").eval()  # a full fine-tune's fp32 weights
    generator = Generator(
        model, tokenizer, max_new_tokens=recipe.max_new_tokens, max_batch_rows=args.rows
    )
    # the waves answer_questions will form (it registers the same prefixes)
    instruction, whole = generator.add_prefix(INSTRUCTION), generator.add_prefix("")
    requests = [instructed_request(generator, q, instruction, whole) for q in qs]
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
    geometry = {
        "waves": wave_geometry(generator, requests, order),
        "max_new_tokens": recipe.max_new_tokens,
        "stored_prefix_tokens": sum(len(p.tokens) for p in generator.prefixes),
    }
    loaded = resident_mb() - baseline
    reset_peak()
    started = time.perf_counter()
    answer_questions(generator, qs)
    peak = high_water_gib() * 1024 - baseline
    return {"measured_mb": peak, "loaded_mb": loaded, "geometry": geometry,
            "seconds": time.perf_counter() - started, "main": True}  # fmt: skip


def label_worker(args, name: str, model_dir: str) -> dict:
    import polars as pl

    from eqtools.engine import Generator, Request
    from eqtools.models import load
    from eqtools.slick import exemplar_set_for, format_exemplars, format_question, label_questions

    n_sets, k = 10, 4
    per_wave = args.label_rows // n_sets
    g = random.Random(2)
    dev = [
        {"id": f"d{i}", "question": questions(1, 6, 14, seed=100 + i)[0],
         "answer": questions(1, 1, 3, seed=1000 + i)[0]}
        for i in range(n_sets * k + 1)
    ]  # fmt: skip
    exemplars = {
        "P1": {"sets": [dev[i * k : (i + 1) * k] for i in range(n_sets)], "spare": dev[-1]}
    }
    frame = pl.DataFrame(
        {
            "id": [f"q{i}" for i in range(per_wave)],
            "relation": ["P1"] * per_wave,
            "question": questions(per_wave, 4, 30, seed=3),
            "answer": [f"t{g.randrange(2, 32000)}" for _ in range(per_wave)],
        }
    )
    baseline = resident_mb()
    model, tokenizer, _ = load(model_dir, dtype="bfloat16", device="cpu")  # the registry dtype
    generator = Generator(model, tokenizer, max_new_tokens=16, max_batch_rows=args.label_rows)
    # the greedy wave label_questions forms (it registers the same prefixes, sorted the same way)
    prompts = []
    for row in frame.to_dicts():
        for e in range(n_sets):
            prefix = generator.add_prefix(
                format_exemplars(exemplar_set_for(exemplars["P1"], e, row["id"]))
            )
            prompts.append(
                (prefix, generator.prompt_tokens(prefix, format_question(row["question"])))
            )
    prompts.sort(key=lambda p: (p[0], len(p[1])))
    requests = [Request(p, t) for p, t in prompts]
    geometry = {
        "waves": wave_geometry(generator, requests, list(range(len(requests)))),
        "max_new_tokens": 16,
        "stored_prefix_tokens": sum(len(p.tokens) for p in generator.prefixes),
    }
    loaded = resident_mb() - baseline
    reset_peak()
    started = time.perf_counter()
    label_questions(generator, frame, exemplars, n_samples=0, seed=0)
    peak = high_water_gib() * 1024 - baseline
    return {"measured_mb": peak, "loaded_mb": loaded, "geometry": geometry,
            "seconds": time.perf_counter() - started, "main": True}  # fmt: skip


def ptrue_worker(args, name: str, model_dir: str) -> dict:
    import polars as pl

    from eqtools.models import load
    from eqtools.ptrue import FALSE, TRUE, format_prompt, score_p_true

    g = random.Random(4)
    rows = pl.DataFrame(
        {
            "question": questions(args.ptrue_rows, 4, 30, seed=5),
            "answer": [f"t{g.randrange(2, 32000)}" for _ in range(args.ptrue_rows)],
        }
    )
    baseline = resident_mb()
    model, tokenizer, _ = load(model_dir, dtype="bfloat16", device="cpu")
    prompts = [format_prompt(q, a) for q, a in zip(rows["question"], rows["answer"], strict=True)]
    widths = [len(tokenizer(p, add_special_tokens=True).input_ids) for p in prompts]
    conts = [len(tokenizer(c, add_special_tokens=False).input_ids) for c in TRUE + FALSE]
    geometry = {
        "rows": len(prompts),
        "width": max(widths),
        "continuation": max(conts),
        # the cache, the copy of the previous multi-token continuation, and the new one
        "copies": 1 + min(2, sum(c > 1 for c in conts)),
    }
    loaded = resident_mb() - baseline
    reset_peak()
    started = time.perf_counter()
    score_p_true(model, tokenizer, rows, "cpu", batch_rows=len(prompts))
    peak = high_water_gib() * 1024 - baseline
    return {"measured_mb": peak, "loaded_mb": loaded, "geometry": geometry,
            "seconds": time.perf_counter() - started, "main": True}  # fmt: skip


def worker(args) -> None:
    kind = CONFIGS[args.config][0]
    run = {
        "train": train_worker, "evaluate": evaluate_worker, "label": label_worker,
        "ptrue": ptrue_worker,
    }[kind]  # fmt: skip
    args.ranks, _ = distributed.start("cpu")
    torch.set_num_threads(args.threads)
    # the same run on a tiny model first: the libraries' lazy initialisation (kernels, thread
    # pools, autograd, gloo buffers) is then done before the baseline, as on a GPU before the
    # model's memory counts; what it leaves is freed
    run(args, args.config, args.tiny)
    gc.collect()
    result = run(args, args.config, args.model)
    distributed.stop(args.ranks)
    if result.pop("main"):
        print("RESULT " + json.dumps(result), flush=True)


def measure(args, model_dir: Path, name: str) -> dict:
    n = CONFIGS[name][2]
    threads = max(1, args.threads // n)  # the machine's cores shared by the ranks
    common = [
        "--worker", "--config", name, "--model", str(model_dir), "--threads", str(threads),
        "--tiny", str(model_dir.parent / "tiny"),
        "--rows", str(args.rows), "--label-rows", str(args.label_rows),
        "--ptrue-rows", str(args.ptrue_rows),
    ]  # fmt: skip
    return run_worker(__file__, common, threads, None if n == 1 else n, MALLOC, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rows", type=int, default=256, help="engine.max_batch_rows, evaluation")
    ap.add_argument("--label-rows", type=int, default=200, help="labelling wave's rows")
    ap.add_argument("--ptrue-rows", type=int, default=64, help="P(True) batch's rows")
    ap.add_argument("--threads", type=int, default=2, help="threads, shared by the ranks")
    ap.add_argument("--only", action="append", help="run only these configurations")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from transformers import AutoConfig

    started = time.perf_counter()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} threads per run")
    checks = check_activation_formula()
    results = {"torch": torch.__version__, "activation_check": checks, "configurations": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        n = build_random_model(model_dir, args.hidden, args.layers)
        build_random_model(Path(tmp) / "tiny", 64, 1)  # each worker's warm-up
        shape = Shape.of(AutoConfig.from_pretrained(model_dir))
        assert shape.parameters == n, (shape.parameters, n)
        results |= {"parameters": n, "shape": asdict(shape)}
        print(
            f"random Llama: {n / 1e6:.1f} M parameters (hidden {shape.hidden}, intermediate "
            f"{shape.intermediate}, {shape.layers} layers, {shape.heads} heads / "
            f"{shape.kv_heads} KV heads, vocabulary {shape.vocab}); MB = 2^20 bytes",
            flush=True,
        )
        print(f"{'configuration':48s} {'predicted MB':>12s} {'measured MB':>12s} {'ratio':>6s}")
        for name in CONFIGS:
            if args.only and name not in args.only:
                continue
            measured = measure(args, model_dir, name)
            terms = predict(shape, name, measured.get("geometry"))
            predicted = sum(terms.values()) / MB
            ratio = predicted / measured["measured_mb"]
            print(f"{name:48s} {predicted:12.0f} {measured['measured_mb']:12.0f} {ratio:6.2f}")
            print(
                "    = " + " + ".join(f"{k} {v / MB:.0f}" for k, v in terms.items())
                + f"   ({measured['seconds']:.0f} s)",
                flush=True,
            )  # fmt: skip
            terms_mb = {k: v / MB for k, v in terms.items()}
            results["configurations"].append(
                {"name": name, "predicted_mb": predicted, "terms_mb": terms_mb}
                | measured
                | {"ratio": ratio}
            )
    ratios = [c["ratio"] for c in results["configurations"]]
    worst = max(ratios, key=lambda r: abs(r - 1))
    results |= {"worst_ratio": worst, "seconds": time.perf_counter() - started}
    print(f"total {results['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    print(
        f"memory model: worst predicted/measured ratio {worst:.2f} over {len(ratios)} "
        "configurations"
    )


if __name__ == "__main__":
    main()
