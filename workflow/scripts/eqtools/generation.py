"""The one generation engine: batched greedy and sampled decoding that stops at the first newline,
for SliCK labelling (few-shot) and evaluation (zero-shot). Backend: transformers (CPU or CUDA).

What makes it fast, all of it exact:
- a prompt prefix (the 4-shot exemplars) is encoded once; its KV cache is copied into every row
  that uses it, so only the question is prefilled;
- requests with the same (prefix, prompt) share one prefill: the 16 samples of a question draw
  their first token from the same logits, and their rows start from the same KV cache;
- a wave runs many rows at once (across questions and exemplar sets) in one preallocated KV
  buffer: no reallocation per step, and finished or cancelled rows are dropped from the batch;
- decoding stops at the first newline; the caller can cancel requests whose outcome is settled.

KV caches are kept at the level where they are shared, never copied per row: one per prefix,
one per (prefix, prompt) group, and one per row for its generated tokens. A custom attention
function (registered with transformers' AttentionInterface and used only inside the engine's
own forward calls) attends over the levels with one softmax across them, as a single
concatenated cache would. Dropping a finished row moves only its generated tokens.

Sampling is reproducible independently of batching: the noise for a sampled token comes from a
counter-based hash of (request key, step, rank among the top-k tokens), and the token is the
Gumbel-max choice among the top-k logits at the temperature. So a sample's outcome does not
depend on which other rows share its batch, on the wave size, or on which requests were skipped.
"""

import contextvars
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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
    logits: torch.Tensor, keys: torch.Tensor, sample: torch.Tensor, step: int, temperature: float, top_k: int
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
    of every attention row and which of the entry's positions each row sees."""

    MAX_RUNS = 48

    def __init__(self, keys, values, valid, entry, row_valid=None):
        self.keys, self.values, self.valid = keys, values, valid
        self.length: int | None = None  # attend to the first `length` positions only (all valid)
        self.set_rows(entry, row_valid)

    def set_rows(self, entry: torch.Tensor, row_valid: torch.Tensor | None = None) -> None:
        self.entry = entry
        n = self.valid.shape[0]
        self.identity = entry.numel() == n and bool((entry == torch.arange(n, device=entry.device)).all())
        self.runs = None
        counts = None if self.identity else torch.bincount(entry, minlength=n)
        sorted_ = counts is not None and entry.numel() > 0 and bool((entry[1:] >= entry[:-1]).all())
        if sorted_ and int((counts > 0).sum()) <= self.MAX_RUNS:
            # rows sorted by entry: each entry's rows are one slice; with few entries, one matmul
            # per slice beats building padded blocks
            ends = torch.cumsum(counts, 0).tolist()
            self.runs = [(e, end - c, end) for e, (c, end) in enumerate(zip(counts.tolist(), ends)) if c]
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
        """[rows, kv, m, d] -> [entries, kv, max_rows * m, d], zeros where an entry has fewer rows."""
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
        keys = self.keys[layer]
        if self.length is not None:
            keys = keys[:, :, : self.length]
        keys = keys.transpose(-1, -2)
        if self.identity:
            s = q @ keys
        elif self.runs is not None:
            s = self._per_run(q, keys)
        else:
            s = self._unblocks(self._blocks(q) @ keys, q.shape[2])
        if self.length is not None:
            return s
        return s.masked_fill(~self.row_valid[:, None, None, :], float("-inf"))

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
    prefill the tokens of one sequence (batch 1), in decoding one token per batch row. `update`
    scatters the new keys/values to (entry, column) of the `target` level; `attend` attends over
    all levels with one softmax."""

    def __init__(self, levels: list[_Level], target: _Level, write_entry, write_col, packed: bool):
        self.levels, self.target, self.packed = levels, target, packed
        self.write_entry, self.write_col = write_entry, write_col

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

    def attend(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        q = query.transpose(0, 2) if self.packed else query  # -> [rows, heads, 1, d]
        rows, heads, _, dim = q.shape
        kv = self.target.keys[layer].shape[1]
        q = (q * scaling).reshape(rows, kv, heads // kv, dim)  # head h uses kv head h // (heads // kv)
        scores = [level.scores(layer, q) for level in self.levels]
        lengths = [s.shape[-1] for s in scores]
        weights = torch.cat(scores, dim=-1).float().softmax(dim=-1).to(query.dtype)
        out = sum(level.output(layer, w) for level, w in zip(self.levels, weights.split(lengths, dim=-1)))
        out = out.reshape(rows, heads, dim)
        return out[None] if self.packed else out[:, None]  # [batch, tokens, heads, d]


_ACTIVE: contextvars.ContextVar[_LevelCache | None] = contextvars.ContextVar("slick_cache", default=None)


def _level_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the engine's levels inside its forwards; plain SDPA everywhere else."""
    cache = _ACTIVE.get()
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return cache.attend(module.layer_idx, query, scaling if scaling is not None else query.shape[-1] ** -0.5), None


AttentionInterface.register("slick_levels", _level_attention)


@dataclass
class _Prefix:
    text: str
    tokens: list[int]
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [kv_heads, P, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)


class Generator:
    """Batched generation with cached prefixes; see the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.5,
        top_k: int = 40,
        max_batch_rows: int = 2048,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.max_batch_rows = max_batch_rows
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        model.set_attn_implementation("slick_levels")
        self.prefixes: list[_Prefix] = []
        self._prefix_ids: dict[str, int] = {}
        self.stop_token = self._stop_tokens()
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self.stats = Stats()

    # ----- prompts -----
    def _stop_tokens(self) -> torch.Tensor:
        """A mask over the vocabulary: tokens whose text contains a newline, and EOS tokens."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
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

    def _empty_level(self, entries: int, length: int, valid: torch.Tensor, entry, row_valid=None) -> _Level:
        shape = (entries, self.kv_heads, length, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        return _Level(keys, values, valid, entry, row_valid)

    def _prefill(self, sequences: list[tuple[int, ...]], offsets: list[int], prefixes=None, seq_prefix=None):
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
        level = self._empty_level(len(sequences), width, valid, entry, torch.arange(width, device=dev)[None, :] <= col[:, None])
        ids = torch.tensor([t for q in sequences for t in q], device=dev)[None]
        positions = (torch.tensor(offsets, device=dev)[entry] + col)[None]
        last = torch.cumsum(lengths, 0) - 1
        shared = []
        if prefixes is not None:
            prefixes.set_rows(seq_prefix[entry])
            shared.append(prefixes)
        cache = _LevelCache([*shared, level], level, entry, col, packed=True)
        logits = self._forward(ids, positions, cache, len(col), len(sequences), keep=last)
        return level, logits

    def add_prefix(self, text: str) -> int:
        """Encode a prompt prefix once (with the tokenizer's special tokens, e.g. BOS)."""
        if text in self._prefix_ids:
            return self._prefix_ids[text]
        tokens = self.tokenizer(text, add_special_tokens=True).input_ids
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
    def _forward(self, ids, positions, cache: _LevelCache, real_tokens: int, real_rows: int, keep=None):
        t = time.perf_counter()
        token = _ACTIVE.set(cache)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids,
                    position_ids=positions,
                    attention_mask=self._no_mask,  # a 4D mask is passed through; attention masks itself
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1 if keep is None else keep,
                )
        finally:
            _ACTIVE.reset(token)
        self.stats.forward_calls += 1
        self.stats.tokens += real_tokens
        self.stats.forward_rows += real_rows
        self.stats.padded_tokens += ids.numel()
        self.stats.seconds += time.perf_counter() - t
        return out.logits[0] if keep is not None else out.logits[:, -1]

    # ----- generation -----
    def generate(
        self, requests: Sequence[Request], keep: Callable[[int], bool] | None = None
    ) -> Iterator[tuple[int, list[int]]]:
        """Yield (request index, generated token ids without the stop token) as rows finish.

        Requests run in waves of at most `max_batch_rows` rows, in the given order. `keep(i)` is
        asked before a request starts and after every step; when it turns False the request is
        dropped and nothing is yielded for it."""
        keep = keep or (lambda i: True)
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
                yield from self._run_wave([requests[i] for i in wave], wave, keep)

    def _run_wave(self, reqs: list[Request], index: list[int], keep) -> Iterator[tuple[int, list[int]]]:
        with torch.inference_mode():
            yield from self._wave(reqs, index, keep)

    def _wave(self, reqs: list[Request], index: list[int], keep) -> Iterator[tuple[int, list[int]]]:
        dev = self.device
        self.stats.waves += 1
        self.stats.rows += len(reqs)
        # one prefill per distinct (prefix, prompt); rows point at their group
        groups: dict[tuple[int, tuple[int, ...]], int] = {}
        row_group = [groups.setdefault((r.prefix, r.prompt), len(groups)) for r in reqs]
        group_keys = list(groups)

        # the prefixes of this wave, each once; entry `len(used)` is an empty prefix
        used = sorted({p for p, _ in group_keys if self.prefixes[p].tokens})
        slot = {p: i for i, p in enumerate(used)}
        p_max = max([len(self.prefixes[p].tokens) for p in used] or [1])
        prefix_level = self._empty_level(
            len(used) + 1, p_max, torch.zeros(len(used) + 1, p_max, dtype=torch.bool, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
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
            [q for _, q in group_keys], [len(self.prefixes[p].tokens) for p, _ in group_keys], prefix_level, group_prefix
        )

        # decoding: rows see their prefix, their group's prompt and their own tokens
        rg = torch.tensor(row_group, device=dev)
        prefix_level.set_rows(group_prefix.index_select(0, rg))
        group_level.set_rows(rg)
        rows = self._empty_level(
            len(reqs), self.max_new_tokens, torch.ones(len(reqs), self.max_new_tokens, dtype=torch.bool, device=dev), torch.arange(len(reqs), device=dev)
        )
        lengths = torch.tensor([len(q) + len(self.prefixes[p].tokens) for p, q in group_keys], device=dev)
        next_pos = lengths.index_select(0, rg)
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
                for level in (prefix_level, group_level):
                    level.set_rows(level.entry.index_select(0, sel))
                next_pos, keys, sample, tokens = (t.index_select(0, sel) for t in (next_pos, keys, sample, tokens))
                slot_req = [slot_req[row] for row in live]
            n = len(slot_req)
            rows.set_rows(torch.arange(n, device=dev))
            rows.length = step + 1  # the tokens generated so far, this step's included
            cache = _LevelCache([prefix_level, group_level, rows], rows, None, step, packed=False)
            logits = self._forward(tokens[:, None], next_pos[:, None], cache, n, n)
            next_pos = next_pos + 1

    @staticmethod
    def _compact(kv: torch.Tensor, sel: torch.Tensor, step: int) -> torch.Tensor:
        """The rows `sel` of a row level's keys or values, copying only the `step` columns written
        so far (the rest is never read: the level attends to its first `length` columns)."""
        out = kv.new_empty(len(sel), *kv.shape[1:])
        out[:, :, :step] = kv[:, :, :step].index_select(0, sel)
        return out

    def decode(self, tokens: list[int]) -> str:
        """The answer: generated text up to its first newline, stripped."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).split("\n", 1)[0].strip()
