"""What the engine's parts share: a request, a registered prefix, the statistics, the errors."""

from dataclasses import dataclass, field

import torch


class EngineError(RuntimeError):
    pass


class LevelsUnsupported(EngineError):
    """The fast path cannot reproduce this model's attention."""


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


@dataclass
class _Prefix:
    text: str
    tokens: list[int]
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [kv_heads, P, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)
