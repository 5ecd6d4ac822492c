"""The exact second path ("reference"): transformers' own `generate` with the model's own
cache and attention, over batches of prompts of one length (no row is padded), each token
chosen by `choose_tokens` from the request's random stream, as on the fast path."""

import time
from collections.abc import Iterator

import torch
from transformers import GenerationConfig

from eqtools.engine.base import Request
from eqtools.engine.sampling import choose_tokens

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


class ReferencePath:
    """The reference path of `Generator` (a mixin: it uses the generator's model, prefixes,
    stop tokens and statistics)."""

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

    def _reference_placeholder(self) -> None:
        """A `generate` call over one token that is done at once, thrown away: under lockstep it
        steps with a rank still in its own `generate` (synced_gpus) until that one is done."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        plain = _plain_generation_config(self.base.generation_config, 1, 0)
        saved = self.base.generation_config
        try:
            self.base.generation_config = plain
            with self._computing():
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=plain,
                    synced_gpus=True,
                )
        finally:
            self.base.generation_config = saved

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
        if self.lockstep is not None:
            self.lockstep.step()
        try:
            self.base.generation_config = plain  # generate fills unset values from the model's
            with self._computing():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=plain,
                    logits_processor=LogitsProcessorList(
                        [_ChosenToken(keys, sample, width, self.temperature, self.top_k)]
                    ),
                    stopping_criteria=StoppingCriteriaList([stopper]),
                    # a sharded model: every rank runs every step, its rows done or not
                    synced_gpus=self.lockstep is not None,
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
