"""Choosing the path: the obstacles one can name from the model (devices, attention interface,
layer types, config shapes), then a probe of the fast path against the model's own forward;
the reference path is probed for deterministic logits and for rows that do not depend on
their batch."""

import contextlib

import torch

from eqtools.engine.base import EngineError, Request, Stats

ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


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


class PathChoice:
    """How `Generator` picks its path (a mixin: it runs the generator's own paths on probes)."""

    PROBE_TEXT = "Q: In which country is the river that flows through the old town located?\nA:"

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
        with self._computing():
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
            if self.lockstep is not None and not isinstance(e, EngineError):
                # ranks in lockstep step aside together only where the fast path refused (the
                # same on every rank); anything else (e.g. one GPU out of memory) may have left
                # the others inside a collective: stop the job rather than let them diverge
                raise
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
        with self._computing():
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
        return (1e-3 if self.compute_dtype == torch.float32 else 5e-2) * max(
            1.0, float(logits.abs().max())
        )
