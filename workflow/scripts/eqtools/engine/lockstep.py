"""Generation on a model sharded over ranks (FSDP2), the third way of stepping.

Every forward of a sharded model is a collective: each layer's weights are all-gathered from
all ranks. So every rank must run every forward, also a rank whose rows are done or that had no
questions at all, or the job hangs. As in transformers' `generate(synced_gpus=True)`:

- before each real forward (the levels path) or each `generate` call (the reference path, whose
  steps transformers itself keeps in step with `synced_gpus=True`) a rank all-reduces "busy";
- a rank that has finished its work enters `drain`: it all-reduces "idle" and, while any other
  rank is still busy, runs a placeholder forward (or placeholder `generate`) that matches the
  busy rank's collectives; when every rank reports idle, all leave together.

Every rank's sequence is then (all-reduce, forward)* ended by one all-reduce that sums to 0, so
the collectives always pair up, whatever the work per rank. A rank that raises stops the job
(torchrun ends every rank and prints the failing one's traceback), never leaves it waiting.
"""

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class Lockstep:
    """Keeps the ranks of a sharded `model`'s forwards in step; see the module docstring."""

    def __init__(self, model, device: torch.device | str):
        self.model = model
        self.device = torch.device(device)
        self.world = dist.get_world_size()
        self.placeholders = 0  # placeholder forwards or generate calls this rank ran

    def _any_busy(self, busy: bool) -> bool:
        flag = torch.tensor([1 if busy else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item())

    def step(self) -> None:
        """Before each real forward (or generate call): this rank has work."""
        self._any_busy(True)

    def drain(self, placeholder: Callable[[], None] | None = None) -> None:
        """This rank is done: run `placeholder` (by default one forward of one token) while any
        other rank still has work; return when every rank is done, with the model resharded."""
        while self._any_busy(False):
            (placeholder or self.forward_placeholder)()
            self.placeholders += 1
        self.release()

    def forward_placeholder(self) -> None:
        """One forward of one token, thrown away: the collectives of a real forward."""
        with torch.no_grad():
            self.model(
                input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device),
                use_cache=False,
                logits_to_keep=1,
            )

    def release(self) -> None:
        """Give the model back as training left it (`release_gathered`)."""
        release_gathered(self.model)

    def agree(self, what: str, value) -> None:
        """Every rank must have taken the same decision (e.g. the engine's path): ranks on
        different paths would run different collectives."""
        from eqtools.engine.base import EngineError

        values = [None] * self.world
        dist.all_gather_object(values, value)
        if any(v != value for v in values):
            raise EngineError(f"the ranks differ on {what}: {values}")


def share(n: int, rank: int, world: int) -> list[int]:
    """The items of a rank: every world-th, starting at its rank (balanced, and each item on
    exactly one rank)."""
    return list(range(rank, n, world))


def gather_answers(answers: list, n: int, world: int) -> list:
    """Every rank's answers to its `share`, in the original order of the `n` items, on every
    rank (a collective)."""
    if world == 1:
        return answers
    parts: list = [None] * world
    dist.all_gather_object(parts, answers)
    out = [None] * n
    for rank, part in enumerate(parts):
        for i, answer in zip(share(n, rank, world), part, strict=True):
            out[i] = answer
    return out


def release_gathered(model) -> None:
    """Reshard a model that FSDP2 left gathered: it keeps the root's weights gathered after a
    forward (for the backward that usually follows), and while gathered they are the parameters
    the module lists, which an optimizer or a state dict would then take."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
