"""The one generation engine: batched greedy and sampled decoding that stops at the first newline,
for SliCK labelling (few-shot) and evaluation (zero-shot). Backend: transformers (CPU or CUDA).

Two exact paths behind one entry point, `Generator`:

- "levels", the fast path, for models whose every layer is attention that goes through
  transformers' AttentionInterface and writes its cache with `update`:
  - a prompt prefix (the 4-shot exemplars) is encoded once; its KV cache is shared by every row
    that uses it, so only the question is prefilled;
  - requests with the same (prefix, prompt) share one prefill: the 16 samples of a question draw
    their first token from the same logits, and their rows start from the same KV cache;
  - a wave runs many rows at once (across questions and exemplar sets) in one preallocated KV
    buffer: no reallocation per step, and finished or cancelled rows are dropped from the batch.
  KV caches are kept at the level where they are shared, never copied per row: one per prefix,
  one per (prefix, prompt) group, and one per row for its generated tokens. A custom attention
  function (registered with transformers' AttentionInterface) attends over the levels with one
  softmax across them, as a single concatenated cache would, and does what the model's own
  attention does: its scaling, per-layer sliding windows, logit softcapping and attention sinks.
  An attention argument it does not implement makes it refuse, never ignore.
- "reference", for everything else (latent-attention caches, recurrent or convolutional layers,
  ALiBi, custom caches, a model spread over several devices): transformers' own `generate` with
  the model's own cache, in batches of prompts of equal length, so no row is ever padded.

`Generator` picks the path by inspecting the model and checking the fast path on a probe
against the model's own forward (one log line names the path and the reason); `backend` forces
one. The attention implementation is switched only for the duration of the engine's own forward
calls, so training, `generate` and P(True) always see the model's own attention.

Decoding stops at the first newline; the caller can cancel requests whose outcome is settled.
Sampling is reproducible independently of batching and of the path: the noise for a sampled
token comes from a counter-based hash of (request key, step, rank among the top-k tokens), and
the token is the Gumbel-max choice among the top-k logits at the temperature. So a sample's
outcome does not depend on which other rows share its batch, on the wave size, on which
requests were skipped, or on the path.
"""

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, GenerationConfig, PreTrainedModel

log = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF


def pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """PCG-RXS-M-XS 32-bit hash (Jarzynski & Olano 2020) of int64 tensors holding uint32 values."""
    state = (x * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return ((word >> 22) ^ word) & _M32


def gumbel_noise(keys: torch.Tensor, step: int, k: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [rows, k], a pure function of (key, step, rank)."""
    base = pcg_hash((keys ^ int(pcg_hash(torch.tensor(step + 1)))) & _M32)
    ranks = torch.arange(k, device=keys.device)
    bits = pcg_hash((base[:, None] + ranks[None, :] * 0x9E3779B9) & _M32)
    u = (bits.double() + 0.5) / 4294967296.0
    return -torch.log(-torch.log(u))


def choose_tokens(
    logits: torch.Tensor,
    keys: torch.Tensor,
    sample: torch.Tensor,
    step: int,
    temperature: float,
    top_k: int,
) -> torch.Tensor:
    """Greedy (argmax) for rows with sample=False; top-k sampling at `temperature` for the rest."""
    greedy = logits.argmax(dim=-1)
    if not bool(sample.any()):
        return greedy
    k = min(top_k, logits.shape[-1])
    values, indices = logits[sample].float().topk(k, dim=-1)
    scores = values.double() / temperature + gumbel_noise(keys[sample], step, k)
    sampled = indices.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)
    out = greedy.clone()
    out[sample] = sampled
    return out


class EngineError(RuntimeError):
    pass


class LevelsUnsupported(EngineError):
    """The fast path cannot reproduce this model's attention."""


BACKENDS = ("auto", "levels", "reference")
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class Request:
    """One generation. `prompt`: token ids after the prefix. `key`: None = greedy, else the
    sample's random stream (a uint32)."""

    prefix: int
    prompt: tuple[int, ...]
    key: int | None = None


@dataclass
class Stats:
    forward_calls: int = 0
    tokens: int = 0  # real (non-padding) tokens processed by the model
    padded_tokens: int = 0  # positions computed, padding included
    forward_rows: int = 0  # real rows whose next-token logits were computed
    seconds: float = 0.0
    waves: int = 0
    rows: int = 0


class _Level:
    """KV states shared by several rows: per layer [entries, kv_heads, length, head_dim], the entry
    of every attention row, which of the entry's positions each row sees, and the model position
    of each entry's first column (for sliding windows)."""

    MAX_RUNS = 48

    def __init__(self, keys, values, valid, entry, base, row_valid=None):
        self.keys, self.values, self.valid, self.base = keys, values, valid, base
        self.length: int | None = None  # attend to the first `length` positions only (all valid)
        self.set_rows(entry, row_valid)

    def set_rows(self, entry: torch.Tensor, row_valid: torch.Tensor | None = None) -> None:
        self.entry = entry
        n = self.valid.shape[0]
        self.identity = entry.numel() == n and bool(
            (entry == torch.arange(n, device=entry.device)).all()
        )
        self.runs = None
        counts = None if self.identity else torch.bincount(entry, minlength=n)
        sorted_ = counts is not None and entry.numel() > 0 and bool((entry[1:] >= entry[:-1]).all())
        if sorted_ and int((counts > 0).sum()) <= self.MAX_RUNS:
            # rows sorted by entry: each entry's rows are one slice; with few entries, one matmul
            # per slice beats building padded blocks
            ends = torch.cumsum(counts, 0).tolist()
            self.runs = [
                (e, end - c, end)
                for e, (c, end) in enumerate(zip(counts.tolist(), ends, strict=True))
                if c
            ]
        elif counts is not None:
            # rank of each row among the rows of its entry: the rows of one entry form a block
            # that attends to the entry's keys in one matmul, without copying the keys
            order = torch.argsort(entry, stable=True)
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.empty_like(entry)
            pos[order] = torch.arange(entry.numel(), device=entry.device) - starts[entry[order]]
            self.pos, self.max_rows = pos, int(counts.max())
        if row_valid is None:
            row_valid = self.valid if self.identity else self.valid.index_select(0, entry)
        self.row_valid = row_valid

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, kv, m, d] -> [entries, kv, max_rows * m, d], zeros where an entry has fewer
        rows."""
        rows, kv, m, d = x.shape
        blocks = x.new_zeros(self.valid.shape[0], kv, self.max_rows, m, d)
        blocks[self.entry, :, self.pos] = x
        return blocks.view(self.valid.shape[0], kv, self.max_rows * m, d)

    def _unblocks(self, x: torch.Tensor, m: int) -> torch.Tensor:
        n, kv, _, d = x.shape
        return x.view(n, kv, self.max_rows, m, d)[self.entry, :, self.pos]

    def _per_run(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x [rows, kv, m, a] @ kv[entry] [kv, a, b] -> [rows, kv, m, b], one matmul per run."""
        out = []
        for e, start, end in self.runs:
            r, heads, m, a = x[start:end].shape
            y = x[start:end].transpose(0, 1).reshape(heads, r * m, a) @ kv[e]
            out.append(y.view(heads, r, m, -1).transpose(0, 1))
        return torch.cat(out)

    def scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Raw (unmasked) scores [rows, kv, group, columns]."""
        keys = self.keys[layer]
        if self.length is not None:
            keys = keys[:, :, : self.length]
        keys = keys.transpose(-1, -2)
        if self.identity:
            return q @ keys
        if self.runs is not None:
            return self._per_run(q, keys)
        return self._unblocks(self._blocks(q) @ keys, q.shape[2])

    def hidden(self, q_pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
        """[rows, columns] True where a row must not attend: positions its entry does not hold or
        it does not see, and keys outside its sliding window (a query at position p sees keys in
        (p - window, p]). None when every row sees every column."""
        columns = self.length if self.length is not None else self.valid.shape[1]
        mask = None if self.length is not None else ~self.row_valid
        if window is not None:
            base = self.base if self.identity else self.base.index_select(0, self.entry)
            first = q_pos - base - window + 1  # each row's first visible column
            if bool((first > 0).any()):
                outside = torch.arange(columns, device=first.device)[None, :] < first[:, None]
                mask = outside if mask is None else mask | outside
        return mask

    def output(self, layer: int, weights: torch.Tensor) -> torch.Tensor:
        values = self.values[layer]
        if self.length is not None:
            values = values[:, :, : self.length]
        if self.identity:
            return weights @ values
        if self.runs is not None:
            return self._per_run(weights, values)
        return self._unblocks(self._blocks(weights) @ values, weights.shape[2])


class _LevelCache:
    """The cache object handed to the model. Every attention row is one query token: in a packed
    prefill the tokens of one sequence (batch 1), in decoding one token per batch row; `q_pos`
    holds each row's model position. `update` scatters the new keys/values to (entry, column) of
    the `target` level; `attend` attends over all levels with one softmax."""

    def __init__(
        self,
        levels: list[_Level],
        target: _Level,
        write_entry,
        write_col,
        q_pos,
        packed: bool,
        windows,
    ):
        self.levels, self.target, self.packed = levels, target, packed
        self.write_entry, self.write_col = write_entry, write_col
        self.q_pos, self.windows = q_pos, windows
        self.attended: set[int] = set()
        self._masks: dict[int | None, list] = {}  # per window size: each level's mask, built once

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # packed: [1, kv, tokens, d]; decoding: [rows, kv, 1, d] -> [n, kv, d]
        if not self.packed:  # decoding: row i of the batch writes column `write_col` of entry i
            self.target.keys[layer_idx][:, :, self.write_col] = key_states[:, :, 0]
            self.target.values[layer_idx][:, :, self.write_col] = value_states[:, :, 0]
            return key_states, value_states
        k, v = key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)
        self.target.keys[layer_idx][self.write_entry, :, self.write_col] = k
        self.target.values[layer_idx][self.write_entry, :, self.write_col] = v
        return key_states, value_states

    def attend(
        self, layer: int, query: torch.Tensor, scaling: float, window=None, softcap=None, sinks=None
    ):
        self.attended.add(layer)
        q = query.transpose(0, 2) if self.packed else query  # -> [rows, heads, 1, d]
        rows, heads, _, dim = q.shape
        kv = self.target.keys[layer].shape[1]
        q = (q * scaling).reshape(
            rows, kv, heads // kv, dim
        )  # head h uses kv head h // (heads // kv)
        if window not in self._masks:
            self._masks[window] = [level.hidden(self.q_pos, window) for level in self.levels]
        scores = []
        for level, hidden in zip(self.levels, self._masks[window], strict=True):
            s = level.scores(layer, q)
            if softcap is not None:  # as the model's eager attention: cap, then mask
                s = torch.tanh(s / softcap) * softcap
            scores.append(
                s if hidden is None else s.masked_fill(hidden[:, None, None, :], float("-inf"))
            )
        lengths = [s.shape[-1] for s in scores]
        logits = torch.cat(scores, dim=-1).float()
        if sinks is not None:  # one extra logit per head in the softmax's denominator
            sink = sinks.float().reshape(1, kv, heads // kv, 1).expand(rows, -1, -1, 1)
            logits = torch.cat([logits, sink], dim=-1)
        weights = logits.softmax(dim=-1)[..., : sum(lengths)].to(query.dtype)
        out = sum(
            level.output(layer, w)
            for level, w in zip(self.levels, weights.split(lengths, dim=-1), strict=True)
        )
        out = out.reshape(rows, heads, dim)
        return out[None] if self.packed else out[:, None]  # [batch, tokens, heads, d]


_ACTIVE: contextvars.ContextVar[_LevelCache | None] = contextvars.ContextVar(
    "slick_cache", default=None
)

# Attention arguments that do not change the attention's result here: positions and
# bookkeeping (the levels know the positions), and flash-attention's packing metadata.
_NEUTRAL_ARGUMENTS = {
    "position_ids", "cache_position", "output_attentions", "use_cache", "position_embeddings",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "cache", "past_key_values",
    "token_type_ids", "head_mask", "output_router_logits", "output_hidden_states", "return_dict",
}  # fmt: skip


def _level_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """Attention over the engine's levels, used only inside the engine's own forward calls."""
    cache = _ACTIVE.get()
    if cache is None:
        raise EngineError("the engine's attention was called outside an engine forward")
    layer = module.layer_idx
    window, softcap, sinks = (
        kwargs.pop("sliding_window", None),
        kwargs.pop("softcap", None),
        kwargs.pop("s_aux", None),
    )
    if kwargs.pop("is_causal", None) is False:
        raise LevelsUnsupported(f"layer {layer} attends bidirectionally (is_causal=False)")
    if dropout:
        raise LevelsUnsupported(
            f"layer {layer} applies attention dropout {dropout} (the model is in training mode)"
        )
    for name, value_ in kwargs.items():
        if value_ is not None and name not in _NEUTRAL_ARGUMENTS:
            raise LevelsUnsupported(
                f"layer {layer} passes attention argument {name!r}, "
                "which the levels do not implement"
            )
    if layer in cache.windows:  # layer_types decide the mask the model builds for the layer
        window = cache.windows[layer]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(layer, query, scaling, window, softcap, sinks), None


AttentionInterface.register("slick_levels", _level_attention)


def _pretrained(model) -> PreTrainedModel:
    """The transformers model inside `model` (itself, or the base model of a peft wrapper)."""
    return next(m for m in model.modules() if isinstance(m, PreTrainedModel))


def _configs(model) -> list:
    """Every config whose `_attn_implementation` the model's modules read, each once."""
    found, todo = {}, [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while todo:
        config = todo.pop()
        if id(config) not in found:
            found[id(config)] = config
            todo += [
                getattr(config, k)
                for k in getattr(config, "sub_configs", {})
                if getattr(config, k, None) is not None
            ]
    return list(found.values())


@contextlib.contextmanager
def _attention(configs: list, implementation: str):
    """Switch the attention implementation for the duration of a call, then restore it."""
    saved = [c._attn_implementation_internal for c in configs]
    for c in configs:
        c._attn_implementation_internal = implementation
    try:
        yield
    finally:
        for c, before in zip(configs, saved, strict=True):
            c._attn_implementation_internal = before


@contextlib.contextmanager
def _as_found(model, device: torch.device):
    """Run probes in eval mode (no dropout) without drawing from the global random streams, then
    restore every module's training flag: building a Generator, e.g. before a fine-tune, changes
    neither the model nor the dropout masks of the training that follows."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for m, training in flags:
            m.training = training


def _setting(config, name: str):
    """A config value, or None where the config has none or none that holds for every layer."""
    try:
        return getattr(config, name, None)
    except Exception:  # e.g. transformers' AmbiguousGlobalPerLayerAttributeError
        return None


def _layer_windows(config) -> dict[int, int | None]:
    """Sliding window per layer from `config.layer_types`, as transformers builds the masks; empty
    when the config has no layer types (the attention modules then pass their own window)."""
    types = getattr(config, "layer_types", None)
    if not types:
        return {}
    window = getattr(config, "sliding_window", None)
    return {i: window if t == "sliding_attention" else None for i, t in enumerate(types)}


# Generation settings that change the logits before the choice of a token, at their neutral values
_NEUTRAL_GENERATION = {
    "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "force_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "remove_invalid_values": False, "guidance_scale": None,
    "watermarking_config": None, "eos_token_id": None, "max_length": None, "stop_strings": None,
    "temperature": 1.0, "top_k": None, "top_p": None, "min_p": None, "typical_p": None,
    "epsilon_cutoff": None, "eta_cutoff": None, "prompt_lookup_num_tokens": None,
}  # fmt: skip


def _plain_generation_config(
    config: GenerationConfig, max_new_tokens: int, pad: int
) -> GenerationConfig:
    """The model's generation config (its structural settings, e.g. a decoder start token) with
    every setting that changes the logits or the choice of a token neutral: the only logits
    processor is then the engine's."""
    import copy

    plain = copy.deepcopy(config)
    for name, value in _NEUTRAL_GENERATION.items():
        setattr(plain, name, value)
    plain.max_new_tokens, plain.pad_token_id = max_new_tokens, pad
    return plain


class _ChosenToken:
    """A logits processor for `generate`: keeps only the token `choose_tokens` picks for each row
    (greedy, or the row's random stream), so generate's own greedy step takes exactly it."""

    def __init__(self, keys, sample, prompt_length: int, temperature: float, top_k: int):
        self.keys, self.sample, self.prompt_length = keys, sample, prompt_length
        self.temperature, self.top_k = temperature, top_k

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        tokens = choose_tokens(scores, self.keys, self.sample, step, self.temperature, self.top_k)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(tokens), device=scores.device), tokens] = 0.0
        return out


class _RowStop:
    """A stopping criterion for `generate`: a row ends at its first stop token, or when `keep`
    cancels it (remembered in `cancelled`)."""

    def __init__(self, stop_token, keep, index: list[int], prompt_length: int, max_new_tokens: int):
        self.stop_token, self.keep, self.index = stop_token, keep, index
        self.prompt_length, self.max_new_tokens = prompt_length, max_new_tokens
        self.done = torch.zeros(len(index), dtype=torch.bool, device=stop_token.device)
        self.cancelled: set[int] = set()

    def __call__(self, input_ids, scores, **kwargs):
        self.done |= self.stop_token[input_ids[:, -1]]
        if input_ids.shape[1] - self.prompt_length >= self.max_new_tokens:
            return self.done.clone()  # the last step: the rows still running are complete
        for row in (~self.done).nonzero().flatten().tolist():
            if not self.keep(self.index[row]):
                self.cancelled.add(row)
                self.done[row] = True
        return self.done.clone()


@dataclass
class _Prefix:
    text: str
    tokens: list[int]
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [kv_heads, P, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)


class Generator:
    """Batched generation with cached prefixes; see the module docstring. `backend`: "auto" picks
    the path by inspecting the model, "levels" or "reference" forces one ("levels" refuses a
    model it cannot run exactly)."""

    PROBE_TEXT = "Q: In which country is the river that flows through the old town located?\nA:"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.5,
        top_k: int = 40,
        max_batch_rows: int = 2048,
        backend: str = "auto",
    ):
        if backend not in BACKENDS:
            raise EngineError(f"engine backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.max_batch_rows = max_batch_rows
        self.base = _pretrained(model)
        cfg = self.base.config.get_text_config()
        self.architecture = type(self.base).__name__
        self.n_layers = _setting(cfg, "num_hidden_layers")
        heads = _setting(cfg, "num_attention_heads")
        self.kv_heads = _setting(cfg, "num_key_value_heads") or heads
        hidden = _setting(cfg, "hidden_size")
        self.head_dim = _setting(cfg, "head_dim") or (hidden // heads if heads and hidden else None)
        self.one_row = False  # the reference path decodes one row per call (see _check_reference)
        self.windows = _layer_windows(cfg)
        self._configs = _configs(model)
        self.prefixes: list[_Prefix] = []
        self._prefix_ids: dict[str, int] = {}
        self.stop_token = self._stop_tokens()
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self._trace: list[torch.Tensor] | None = None  # the probe's logits
        self.attended_layers: set[int] = set()  # layers that attended in the last levels forward
        self.stats = Stats()
        self.backend, reason = self._choose_backend(backend, cfg)
        log.info("generation engine: %s path for %s (%s)", self.backend, self.architecture, reason)

    # ----- choosing the path -----
    def _choose_backend(self, requested: str, cfg) -> tuple[str, str]:
        with _as_found(self.model, self.device):
            return self._probe_backend(requested, cfg)

    def _probe_backend(self, requested: str, cfg) -> tuple[str, str]:
        if requested == "reference":
            return "reference", "engine.backend: reference" + self._check_reference()
        obstacle = self._levels_obstacle(cfg)
        self.stats = Stats()  # the probe's calls are not the caller's
        if obstacle is None:
            features = [
                name
                for name, present in (
                    ("sliding windows", bool(self._sliding_windows(cfg))),
                    ("logit softcapping", getattr(cfg, "attn_logit_softcapping", None) is not None),
                    (
                        "attention sinks",
                        any(getattr(m, "sinks", None) is not None for m in self.model.modules()),
                    ),
                )
                if present
            ]
            extra = f", with {', '.join(features)}" if features else ""
            return (
                "levels",
                f"its {self.n_layers} layers are attention the levels reproduce{extra}; "
                "probe exact",
            )
        if requested == "levels":
            raise EngineError(
                f"engine.backend is 'levels' but {self.architecture} cannot run on it: {obstacle}"
            )
        return "reference", obstacle + self._check_reference()

    def _check_reference(self) -> str:
        """Probe the reference path: the model's forward must be deterministic (else no label is
        reproducible: refused), and a row's answer must not depend on the rows decoded beside it
        (transformers' batched decoding of some models, e.g. RWKV, differs from one prompt at a
        time: such models are decoded one row per call). Returns what to add to the log line."""
        a, b = self._probe_tokens(24), self._probe_tokens(48)[24:]  # two prompts of one length
        with torch.inference_mode():
            ids = torch.tensor([a], device=self.device)
            first, second = (self.model(input_ids=ids).logits.float() for _ in range(2))
        # beyond the kernels' own run-to-run noise (atomics on a GPU): e.g. random LSH rotations
        if float((first - second).abs().max()) > self._tolerance(second):
            raise EngineError(
                f"{self.architecture}: two forward passes over the same tokens give different "
                "logits, so no answer would be reproducible"
            )
        saved, self.max_new_tokens = self.max_new_tokens, 4
        try:
            together = list(
                self._reference_batch(
                    [Request(0, tuple(x)) for x in (a, a, b)], [0, 1, 2], lambda i: True, probe=True
                )
            )
            alone = [
                next(self._reference_batch([Request(0, tuple(x))], [i], lambda i: True, probe=True))
                for i, x in enumerate((a, a, b))
            ]
        finally:
            self.max_new_tokens = saved
        if sorted(together) == sorted(alone):
            return ""
        self.one_row = True
        return (
            "; its batched decoding differs from one prompt at a time, "
            "so it decodes one row per call"
        )

    def _sliding_windows(self, cfg) -> list[int]:
        """The window sizes the model uses: per layer type where the config has layer types,
        else the config's (which such models pass to every layer) and the attention modules'."""
        if self.windows:
            found = list(self.windows.values())
        else:
            found = [getattr(cfg, "sliding_window", None)] + [
                getattr(m, "sliding_window", None) for m in self.model.modules()
            ]
        return sorted(
            {w for w in found if isinstance(w, int) and not isinstance(w, bool) and w > 0}
        )

    def _levels_obstacle(self, cfg) -> str | None:
        """Why the fast path cannot run this model exactly, or None. Static checks give the
        reasons one can name; a probe against the model's own forward catches the rest."""
        devices = {p.device for p in self.model.parameters()}
        if len(devices) > 1:
            return (
                f"it is spread over {len(devices)} devices, and the levels keep every layer's KV "
                "cache on one"
            )
        if not type(self.base)._can_set_attn_implementation():
            return "its attention does not go through transformers' AttentionInterface"
        types = set(getattr(cfg, "layer_types", None) or []) - ATTENTION_LAYER_TYPES
        if types:
            return f"it has {', '.join(sorted(types))} layers"
        if not all(isinstance(x, int) for x in (self.n_layers, self.kv_heads, self.head_dim)):
            return "its config gives no single number of layers, heads and head size"
        try:
            return self._probe(cfg)
        except Exception as e:  # whatever breaks the fast path on this model makes it step aside
            message = str(e).splitlines()[0][:200] if str(e) else ""
            return f"the probe failed: {type(e).__name__}: {message}"
        finally:
            self.prefixes.clear()
            self._prefix_ids.clear()
            self._trace = None

    def _probe(self, cfg) -> str | None:
        """Run the levels on a probe (a prefix, a prompt, up to three decoded tokens) and compare
        their logits with the model's own forward over the same tokens. Longer than the smallest
        sliding window when that is at most 1024 (Gemma 3, gpt-oss), so the windows are exercised
        too."""
        length = max(48, min(min(self._sliding_windows(cfg), default=0) + 16, 1040))
        tokens = self._probe_tokens(length)
        head = self.tokenizer("", add_special_tokens=True).input_ids
        pid = self._add_levels_prefix("\0probe", head + tokens[: length // 2])
        prompt = tuple(tokens[length // 2 :])
        saved, self.max_new_tokens = self.max_new_tokens, 3
        self._trace = []  # the logits of the prompt's prefill and of each decoding step
        try:
            (_, generated), *_ = list(
                self._levels_wave([Request(pid, prompt)], [0], lambda i: True)
            )
        finally:
            self.max_new_tokens = saved
        if len(self.attended_layers) != self.n_layers:
            return (
                f"only {len(self.attended_layers)} of its {self.n_layers} layers attend through "
                "the levels"
            )
        full = list(self.prefixes[pid].tokens) + list(prompt) + list(generated)
        with torch.inference_mode():
            reference = self.model(
                input_ids=torch.tensor([full], device=self.device), use_cache=False
            ).logits[0]
        first = len(self.prefixes[pid].tokens) + len(prompt) - 1
        got = torch.cat(self._trace).float()
        want = reference[first : first + len(got)].float()
        diff, tolerance = float((got - want).abs().max()), self._tolerance(want)
        if not diff <= tolerance:  # also catches NaN
            return (
                f"the probe's logits differ from the model's own forward by {diff:.3g} "
                f"(tolerance {tolerance:.3g})"
            )
        return None

    def _probe_tokens(self, length: int) -> list[int]:
        """`length` tokens of the probe text, repeated as needed."""
        text = self.tokenizer(self.PROBE_TEXT, add_special_tokens=False).input_ids
        return (text * (length // len(text) + 1))[:length]

    def _tolerance(self, logits: torch.Tensor) -> float:
        """How far two computations of the same logits may differ: rounding, not a different
        function (a missing window or softcap moves them by whole units)."""
        return (1e-3 if self.dtype == torch.float32 else 5e-2) * max(1.0, float(logits.abs().max()))

    # ----- prompts -----
    def _stop_tokens(self) -> torch.Tensor:
        """A mask over the vocabulary: tokens whose text contains a newline, and EOS tokens."""
        head = self.model.get_output_embeddings()
        if not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
            raise EngineError(
                f"{self.architecture} has no single output layer over the vocabulary "
                f"({type(head).__name__}): the engine needs one next-token distribution per step"
            )
        vocab = head.weight.shape[0]
        n = min(vocab, len(self.tokenizer))
        texts = self.tokenizer.batch_decode([[i] for i in range(n)])
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[:n] = torch.tensor(["\n" in t for t in texts])
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        mask[[e for e in eos if e < vocab]] = True
        return mask.to(self.device)

    def _empty_level(
        self, entries: int, length: int, valid: torch.Tensor, entry, base, row_valid=None
    ) -> _Level:
        shape = (entries, self.kv_heads, length, self.head_dim)
        keys = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)
        ]
        values = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)
        ]
        return _Level(keys, values, valid, entry, base, row_valid)

    def _prefill(
        self, sequences: list[tuple[int, ...]], offsets: list[int], prefixes=None, seq_prefix=None
    ):
        """Encode token sequences packed into one row (no padding): each token attends to its
        sequence's prefix (entry `seq_prefix[i]` of the level `prefixes`) and to the earlier
        tokens of its own sequence, which starts at model position `offsets[i]`. Returns the
        level holding the sequences' KV and their last logits."""
        dev = self.device
        lengths = torch.tensor([len(q) for q in sequences], device=dev)
        width = int(lengths.max())
        entry = torch.repeat_interleave(torch.arange(len(sequences), device=dev), lengths)
        col = torch.cat([torch.arange(n, device=dev) for n in lengths.tolist()])
        valid = torch.arange(width, device=dev)[None, :] < lengths[:, None]
        base = torch.tensor(offsets, device=dev)
        causal = torch.arange(width, device=dev)[None, :] <= col[:, None]
        level = self._empty_level(len(sequences), width, valid, entry, base, causal)
        ids = torch.tensor([t for q in sequences for t in q], device=dev)[None]
        positions = base[entry] + col
        last = torch.cumsum(lengths, 0) - 1
        shared = []
        if prefixes is not None:
            prefixes.set_rows(seq_prefix[entry])
            shared.append(prefixes)
        cache = _LevelCache([*shared, level], level, entry, col, positions, True, self.windows)
        logits = self._forward(ids, positions[None], cache, len(col), len(sequences), keep=last)
        return level, logits

    def add_prefix(self, text: str) -> int:
        """Register a prompt prefix (tokenised with the tokenizer's special tokens, e.g. BOS); the
        fast path encodes it once."""
        if text in self._prefix_ids:
            return self._prefix_ids[text]
        tokens = self.tokenizer(text, add_special_tokens=True).input_ids
        if self.backend == "reference":
            self.prefixes.append(_Prefix(text, tokens))
            self._prefix_ids[text] = len(self.prefixes) - 1
            return len(self.prefixes) - 1
        return self._add_levels_prefix(text, tokens)

    def _add_levels_prefix(self, text: str, tokens: list[int]) -> int:
        prefix = _Prefix(text, tokens)
        if tokens:
            level, _ = self._prefill([tuple(tokens)], [0])
            prefix.keys = [k[0] for k in level.keys]
            prefix.values = [v[0] for v in level.values]
        self.prefixes.append(prefix)
        self._prefix_ids[text] = len(self.prefixes) - 1
        return len(self.prefixes) - 1

    def prompt_tokens(self, prefix: int, text: str) -> tuple[int, ...]:
        """Token ids of `text` following `prefix`, exactly as the whole prompt tokenizes."""
        head = self.prefixes[prefix].tokens
        full = self.tokenizer(self.prefixes[prefix].text + text, add_special_tokens=True).input_ids
        if full[: len(head)] != head or len(full) == len(head):
            raise ValueError(
                f"the tokenizer merges tokens across the prefix/prompt boundary of {text[:60]!r}; "
                "prefix caching would change the prompt"
            )
        return tuple(full[len(head) :])

    # ----- model calls -----
    def _forward(
        self, ids, positions, cache: _LevelCache, real_tokens: int, real_rows: int, keep=None
    ):
        t = time.perf_counter()
        token = _ACTIVE.set(cache)
        try:
            with torch.inference_mode(), _attention(self._configs, "slick_levels"):
                out = self.model(
                    input_ids=ids,
                    position_ids=positions,
                    # a 4D mask is passed through; attention masks itself
                    attention_mask=self._no_mask,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1 if keep is None else keep,
                )
        finally:
            _ACTIVE.reset(token)
        self.attended_layers = cache.attended
        self.stats.forward_calls += 1
        self.stats.tokens += real_tokens
        self.stats.forward_rows += real_rows
        self.stats.padded_tokens += ids.numel()
        self.stats.seconds += time.perf_counter() - t
        logits = out.logits[0] if keep is not None else out.logits[:, -1]
        if self._trace is not None:
            self._trace.append(logits[-1:].detach())
        return logits

    # ----- generation -----
    def generate(
        self, requests: Sequence[Request], keep: Callable[[int], bool] | None = None
    ) -> Iterator[tuple[int, list[int]]]:
        """Yield (request index, generated token ids without the stop token) as rows finish.

        Requests run in waves of at most `max_batch_rows` rows, in the given order. `keep(i)` is
        asked before a request starts and after every step; when it turns False the request is
        dropped and nothing is yielded for it."""
        if self.model.training:
            raise EngineError(
                "the model is in training mode (dropout on): call model.eval() before generating"
            )
        keep = keep or (lambda i: True)
        wave_fn = self._levels_wave if self.backend == "levels" else self._reference_wave
        pending = list(range(len(requests)))
        while pending:
            wave, rest = [], []
            for i in pending:
                if len(wave) < self.max_batch_rows and keep(i):
                    wave.append(i)
                elif len(wave) >= self.max_batch_rows:
                    rest.append(i)
            pending = rest
            if wave:
                self.stats.waves += 1
                self.stats.rows += len(wave)
                yield from wave_fn([requests[i] for i in wave], wave, keep)

    def _levels_wave(
        self, reqs: list[Request], index: list[int], keep
    ) -> Iterator[tuple[int, list[int]]]:
        with torch.inference_mode():
            yield from self._wave(reqs, index, keep)

    def _wave(self, reqs: list[Request], index: list[int], keep) -> Iterator[tuple[int, list[int]]]:
        dev = self.device
        # one prefill per distinct (prefix, prompt); rows point at their group
        groups: dict[tuple[int, tuple[int, ...]], int] = {}
        row_group = [groups.setdefault((r.prefix, r.prompt), len(groups)) for r in reqs]
        group_keys = list(groups)

        # the prefixes of this wave, each once; entry `len(used)` is an empty prefix
        used = sorted({p for p, _ in group_keys if self.prefixes[p].tokens})
        slot = {p: i for i, p in enumerate(used)}
        p_max = max([len(self.prefixes[p].tokens) for p in used] or [1])
        prefix_level = self._empty_level(
            len(used) + 1,
            p_max,
            torch.zeros(len(used) + 1, p_max, dtype=torch.bool, device=dev),
            torch.zeros(1, dtype=torch.long, device=dev),
            torch.zeros(len(used) + 1, dtype=torch.long, device=dev),
        )
        for p in used:
            n = len(self.prefixes[p].tokens)
            prefix_level.valid[slot[p], :n] = True
            for layer in range(self.n_layers):
                prefix_level.keys[layer][slot[p], :, :n] = self.prefixes[p].keys[layer]
                prefix_level.values[layer][slot[p], :, :n] = self.prefixes[p].values[layer]
        group_prefix = torch.tensor([slot.get(p, len(used)) for p, _ in group_keys], device=dev)

        # prefill every group's prompt, packed
        group_level, logits = self._prefill(
            [q for _, q in group_keys],
            [len(self.prefixes[p].tokens) for p, _ in group_keys],
            prefix_level,
            group_prefix,
        )

        # decoding: rows see their prefix, their group's prompt and their own tokens
        rg = torch.tensor(row_group, device=dev)
        prefix_level.set_rows(group_prefix.index_select(0, rg))
        group_level.set_rows(rg)
        lengths = torch.tensor(
            [len(q) + len(self.prefixes[p].tokens) for p, q in group_keys], device=dev
        )
        next_pos = lengths.index_select(0, rg)
        rows = self._empty_level(
            len(reqs),
            self.max_new_tokens,
            torch.ones(len(reqs), self.max_new_tokens, dtype=torch.bool, device=dev),
            torch.arange(len(reqs), device=dev),
            next_pos.clone(),
        )
        logits = logits.index_select(0, rg)
        keys = torch.tensor([r.key or 0 for r in reqs], dtype=torch.long, device=dev)
        sample = torch.tensor([r.key is not None for r in reqs], dtype=torch.bool, device=dev)
        slot_req = list(range(len(reqs)))  # batch row -> request position
        generated: list[list[int]] = [[] for _ in reqs]

        for step in range(self.max_new_tokens):
            tokens = choose_tokens(logits, keys, sample, step, self.temperature, self.top_k)
            stop = self.stop_token[tokens].tolist()
            token_list = tokens.tolist()
            last = step + 1 == self.max_new_tokens
            live = []
            for row, r in enumerate(slot_req):
                if stop[row]:
                    yield index[r], generated[r]
                    continue
                generated[r].append(token_list[row])
                if last:
                    yield index[r], generated[r]
                elif keep(index[r]):
                    live.append(row)
            if not live:
                return
            if len(live) < len(slot_req):  # drop finished rows: only their own tokens move
                sel = torch.tensor(live, device=dev)
                rows.keys = [self._compact(k, sel, step) for k in rows.keys]
                rows.values = [self._compact(v, sel, step) for v in rows.values]
                rows.valid = rows.valid.index_select(0, sel)
                rows.base = rows.base.index_select(0, sel)
                for level in (prefix_level, group_level):
                    level.set_rows(level.entry.index_select(0, sel))
                next_pos, keys, sample, tokens = (
                    t.index_select(0, sel) for t in (next_pos, keys, sample, tokens)
                )
                slot_req = [slot_req[row] for row in live]
            n = len(slot_req)
            rows.set_rows(torch.arange(n, device=dev))
            rows.length = step + 1  # the tokens generated so far, this step's included
            cache = _LevelCache(
                [prefix_level, group_level, rows], rows, None, step, next_pos, False, self.windows
            )
            logits = self._forward(tokens[:, None], next_pos[:, None], cache, n, n)
            next_pos = next_pos + 1

    @staticmethod
    def _compact(kv: torch.Tensor, sel: torch.Tensor, step: int) -> torch.Tensor:
        """The rows `sel` of a row level's keys or values, copying only the `step` columns written
        so far (the rest is never read: the level attends to its first `length` columns)."""
        out = kv.new_empty(len(sel), *kv.shape[1:])
        out[:, :, :step] = kv[:, :, :step].index_select(0, sel)
        return out

    def _reference_wave(
        self, reqs: list[Request], index: list[int], keep
    ) -> Iterator[tuple[int, list[int]]]:
        """The exact second path: transformers' `generate` with the model's own cache and
        attention, over batches of prompts of one length (no padding, so no reliance on how a
        model handles it), the tokens chosen by `choose_tokens` as in the fast path."""
        by_length: dict[int, list[int]] = {}
        for pos, r in enumerate(reqs):
            by_length.setdefault(len(self.prefixes[r.prefix].tokens) + len(r.prompt), []).append(
                pos
            )
        for members in by_length.values():
            size = 1 if self.one_row else self.max_batch_rows
            for start in range(0, len(members), size):
                batch = members[start : start + size]
                yield from self._reference_batch(
                    [reqs[p] for p in batch], [index[p] for p in batch], keep
                )

    def _reference_batch(
        self, reqs: list[Request], index: list[int], keep, probe=False
    ) -> Iterator[tuple[int, list[int]]]:
        """`probe`: the requests' prompts are whole token sequences (no registered prefix)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        dev = self.device
        head = (lambda r: []) if probe else (lambda r: list(self.prefixes[r.prefix].tokens))
        ids = torch.tensor([head(r) + list(r.prompt) for r in reqs], device=dev)
        width = ids.shape[1]
        keys = torch.tensor([r.key or 0 for r in reqs], dtype=torch.long, device=dev)
        sample = torch.tensor([r.key is not None for r in reqs], dtype=torch.bool, device=dev)
        stopper = _RowStop(self.stop_token, keep, index, width, self.max_new_tokens)
        pad = int(self.stop_token.nonzero()[0]) if bool(self.stop_token.any()) else 0
        plain = _plain_generation_config(self.base.generation_config, self.max_new_tokens, pad)
        saved = self.base.generation_config
        t = time.perf_counter()
        try:
            self.base.generation_config = plain  # generate fills unset values from the model's
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=plain,
                    logits_processor=LogitsProcessorList(
                        [_ChosenToken(keys, sample, width, self.temperature, self.top_k)]
                    ),
                    stopping_criteria=StoppingCriteriaList([stopper]),
                )
        finally:
            self.base.generation_config = saved
        steps = out.shape[1] - width
        self.stats.forward_calls += steps
        self.stats.tokens += ids.numel() + len(reqs) * max(0, steps - 1)
        self.stats.padded_tokens += ids.numel() + len(reqs) * max(0, steps - 1)
        self.stats.forward_rows += len(reqs) * steps
        self.stats.seconds += time.perf_counter() - t
        for row, new in enumerate(out[:, width:].tolist()):
            if row in stopper.cancelled:
                continue
            stops = [j for j, token in enumerate(new) if self.stop_token[token]]
            yield index[row], new[: stops[0]] if stops else new

    def decode(self, tokens: list[int]) -> str:
        """The answer: generated text up to its first newline, stripped."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).split("\n", 1)[0].strip()


PROBE_PREFIX = "Q: What is the capital of France?\nA: Paris\n"
PROBE_PROMPT = "Q: Which country is Lyon located in?\nA:"


def check_generation(name: str, model, tokenizer, max_new_tokens: int = 8) -> str:
    """Fail early (in prepare_model), naming the registry entry, its architecture and the reason,
    for a model the engine cannot run; where the fast path runs, its greedy answer to a probe
    question must equal that of transformers' generate (the reference path). Returns the path
    that auto picks."""

    def answer(backend: str) -> tuple[str, list[int]]:
        generator = Generator(model, tokenizer, max_new_tokens=max_new_tokens, backend=backend)
        prefix = generator.add_prefix(PROBE_PREFIX)
        ((_, tokens),) = list(
            generator.generate([Request(prefix, generator.prompt_tokens(prefix, PROBE_PROMPT))])
        )
        return generator.backend, tokens

    architecture = type(model).__name__
    try:
        backend, tokens = answer("auto")
        reference = answer("reference")[1] if backend == "levels" else tokens
    except Exception as e:  # a crash inside transformers is reported as what it means here
        raise EngineError(
            f"models.{name}: the generation engine cannot run {architecture}: "
            f"{type(e).__name__}: {e}"
        ) from e
    if tokens != reference:
        raise EngineError(
            f"models.{name}: the engine's fast path answers the probe question with {tokens} for "
            f"{architecture}, transformers' generate with {reference}; set engine.backend: "
            "reference and report the architecture"
        )
    return backend
