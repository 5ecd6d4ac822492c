"""The fast path ("levels"): KV caches kept at the level where they are shared (one per
prefix, one per (prefix, prompt) group, one per row for its generated tokens), an attention
function registered with transformers' AttentionInterface that attends over the levels with
one softmax across them, the switch of the attention implementation for the duration of an
engine forward, the packed prefill of prefixes and prompts, and the decoding wave."""

import contextlib
import contextvars
import time
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel

from eqtools.engine.base import EngineError, LevelsUnsupported, Request, _Prefix
from eqtools.engine.sampling import choose_tokens


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
        # under bf16 autocast the projections come out in bf16: stored in the cache's dtype
        keys = self.target.keys[layer_idx]
        k, v = (x[0].transpose(0, 1).to(keys.dtype) for x in (key_states, value_states))
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


def _layer_windows(config) -> dict[int, int | None]:
    """Sliding window per layer from `config.layer_types`, as transformers builds the masks; empty
    when the config has no layer types (the attention modules then pass their own window)."""
    types = getattr(config, "layer_types", None)
    if not types:
        return {}
    window = getattr(config, "sliding_window", None)
    return {i: window if t == "sliding_attention" else None for i, t in enumerate(types)}


class LevelsPath:
    """The fast path of `Generator` (a mixin: it uses the generator's model, layer shapes,
    prefixes, stop tokens and statistics)."""

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

    def _add_levels_prefix(self, text: str, tokens: list[int]) -> int:
        prefix = _Prefix(text, tokens)
        if tokens:
            level, _ = self._prefill([tuple(tokens)], [0])
            prefix.keys = [k[0] for k in level.keys]
            prefix.values = [v[0] for v in level.values]
        self.prefixes.append(prefix)
        self._prefix_ids[text] = len(self.prefixes) - 1
        return len(self.prefixes) - 1

    def _forward(
        self, ids, positions, cache: _LevelCache, real_tokens: int, real_rows: int, keep=None
    ):
        t = time.perf_counter()
        if self.lockstep is not None:
            self.lockstep.step()
        token = _ACTIVE.set(cache)
        try:
            with self._computing(), _attention(self._configs, "slick_levels"):
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

    def _levels_wave(
        self, reqs: list[Request], index: list[int], keep
    ) -> Iterator[tuple[int, list[int]]]:
        with self._computing():
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
