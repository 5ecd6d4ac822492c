"""The entry point, `Generator`: the model's shapes and stop tokens, registered prefixes and
prompts, waves of requests handed to the path the generator picked, the decoded answers; and
`check_generation`, the check `prepare_model` runs."""

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from eqtools.engine.base import EngineError, Request, Stats, _Prefix
from eqtools.engine.levels import LevelsPath, _configs, _layer_windows
from eqtools.engine.lockstep import Lockstep
from eqtools.engine.probe import PathChoice
from eqtools.engine.reference import ReferencePath

log = logging.getLogger(__name__)

BACKENDS = ("auto", "levels", "reference")


def _pretrained(model) -> PreTrainedModel:
    """The transformers model inside `model` (itself, or the base model of a peft wrapper)."""
    return next(m for m in model.modules() if isinstance(m, PreTrainedModel))


def _setting(config, name: str):
    """A config value, or None where the config has none or none that holds for every layer."""
    try:
        return getattr(config, name, None)
    except Exception:  # e.g. transformers' AmbiguousGlobalPerLayerAttributeError
        return None


class Generator(PathChoice, LevelsPath, ReferencePath):
    """Batched generation with cached prefixes; see the package docstring (eqtools.engine).
    `backend`: "auto" picks the path by inspecting the model, "levels" or "reference" forces one
    ("levels" refuses a model it cannot run exactly)."""

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
        compute_dtype: torch.dtype | None = None,
        lockstep: Lockstep | None = None,
    ):
        if backend not in BACKENDS:
            raise EngineError(f"engine backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        weights = next(model.parameters())
        # bf16 compute over fp32 weights: autocast, as training's forward (and as there, the
        # keys and values stay in the weights' dtype, cast for each matmul)
        self.dtype = weights.dtype
        self.compute_dtype = compute_dtype or weights.dtype
        self._autocast = self.compute_dtype != weights.dtype
        self.base = _pretrained(model)
        # tensor parallel (transformers' tp_plan): every rank runs every request, on its share
        # of the attention heads, and the layers' all-reduces keep the ranks in step
        self.tp_size = getattr(self.base, "_tp_size", None) or 1
        # a sharded (FSDP2) model gathers its weights in every forward: inference tensors cannot
        # be gathered into, so its forwards run under no_grad
        self._sharded = isinstance(weights, DTensor) and self.tp_size == 1
        if self._sharded and lockstep is None:
            raise EngineError(
                "the model is sharded (FSDP): its ranks must generate in lockstep (pass a Lockstep)"
            )
        self.lockstep = lockstep
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.max_batch_rows = max_batch_rows
        cfg = self.base.config.get_text_config()
        self.architecture = type(self.base).__name__
        self.n_layers = _setting(cfg, "num_hidden_layers")
        heads = _setting(cfg, "num_attention_heads")
        self.kv_heads = _setting(cfg, "num_key_value_heads") or heads
        if isinstance(self.kv_heads, int):
            self.kv_heads //= self.tp_size  # the heads of this rank's share
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
        if lockstep is not None:  # the probe's forwards left the root gathered
            lockstep.release()
            lockstep.agree("the engine's path", (self.backend, self.one_row))
        log.info(
            "generation engine: %s path for %s (%s)%s",
            self.backend,
            self.architecture,
            reason,
            f"; in lockstep over {lockstep.world} ranks" if lockstep is not None else "",
        )

    @contextlib.contextmanager
    def _computing(self):
        """The mode of every engine forward: no autograd, and bf16 autocast where asked, without
        its cache of weight casts (which can hold a bf16 copy of every weight that requires grad
        until the forward ends; in inference mode and over FSDP's gathered weights, which are
        views, it holds none, measured; off, it never does; the casts are the same numbers)."""
        with (
            torch.no_grad() if self._sharded else torch.inference_mode(),
            torch.autocast(
                self.device.type,
                dtype=self.compute_dtype,
                enabled=self._autocast,
                cache_enabled=False,
            ),
        ):
            yield

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

    # ----- generation -----
    def generate(
        self, requests: Sequence[Request], keep: Callable[[int], bool] | None = None
    ) -> Iterator[tuple[int, list[int]]]:
        """Yield (request index, generated token ids without the stop token) as rows finish.

        Requests run in waves, in the given order, of at most `max_batch_rows` rows and at most
        `wave_budget` positions: rows x (the wave's longest prompt + max_new_tokens), since a
        wave's buffers are as wide as its longest row. A wave of long prompts (an outlier
        question; the last waves of length-sorted requests) takes fewer rows, so that no wave
        holds more than `max_batch_rows` rows of the mean width would. A request's tokens do not
        depend on its wave. `keep(i)` is asked before a request starts and after every step; when
        it turns False the request is dropped and nothing is yielded for it. Under lockstep every
        rank calls this, possibly with no requests, and consumes it to the end."""
        if self.model.training:
            raise EngineError(
                "the model is in training mode (dropout on): call model.eval() before generating"
            )
        keep = keep or (lambda i: True)
        wave_fn = self._levels_wave if self.backend == "levels" else self._reference_wave
        widths = [len(r.prompt) + self.max_new_tokens for r in requests]
        budget = self.wave_budget(widths)
        pending = list(range(len(requests)))
        while pending:
            wave, pending = next_wave(pending, widths, self.max_batch_rows, budget, keep)
            if wave:
                self.stats.waves += 1
                self.stats.rows += len(wave)
                yield from wave_fn([requests[i] for i in wave], wave, keep)
        if self.lockstep is not None:  # done: step with the ranks that are not
            self.lockstep.drain(None if self.backend == "levels" else self._reference_placeholder)

    def wave_budget(self, widths: list[int]) -> float:
        """The positions a wave may hold: `max_batch_rows` rows of the requests' mean width."""
        return self.max_batch_rows * sum(widths) / max(1, len(widths))

    def decode(self, tokens: list[int]) -> str:
        """The answer: generated text up to its first newline, stripped."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).split("\n", 1)[0].strip()


def next_wave(
    pending: list[int],
    widths: list[int],
    max_rows: int,
    budget: float,
    keep: Callable[[int], bool] = lambda i: True,
) -> tuple[list[int], list[int]]:
    """(the next wave, the requests after it) from `pending`, in order: at most `max_rows`
    requests and at most `budget` positions (rows x the widest of `widths`); a request that
    `keep` drops is left out, one that does not fit closes the wave (it and the rest wait)."""
    wave, rest, widest = [], [], 0
    for i in pending:
        if rest:  # the wave is closed: the rest keep their order for the next
            rest.append(i)
        elif keep(i):
            wider = max(widest, widths[i])
            if wave and (len(wave) >= max_rows or (len(wave) + 1) * wider > budget):
                rest.append(i)
            else:
                wave.append(i)
                widest = wider
    return wave, rest


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
