"""Progress of a long job as plain log lines (tqdm's counts, without carriage returns, so that
the rule's log and the SLURM log stay readable): done/total, rate and ETA, at most one line per
`every` seconds and always the last one.

Bookkeeping like eqtools.io: it changes no result, so it is left out of the code hashes."""

import logging
import time
from collections.abc import Callable

log = logging.getLogger("workflow")


def duration(seconds: float) -> str:
    """`seconds` as "1 h 02 min", "3 min 05 s" or "12 s"."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


class Progress:
    """Counts `total` units of `what` (e.g. "labelling train/P17", unit "questions").

    `done` units may already be finished when it starts (a resumed job): the rate and the ETA
    count only the work of this attempt. `advance(n)` after each unit of work (a wave, a group
    of questions, an optimizer step) logs a line when `every` seconds have passed since the
    last one; `finish()` logs the last line."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        done: int = 0,
        every: float = 30.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.unit = what, total, unit
        self.done = self.resumed = done
        self.every, self.log, self.clock = every, logger or log, clock
        self.started = self.last = clock()

    def line(self) -> str:
        """The progress line as it stands."""
        elapsed = self.clock() - self.started
        work = self.done - self.resumed
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"{self.what}: {self.done}/{self.total} {self.unit}{share}"
        if self.resumed:
            text += f", {self.resumed} before this attempt"
        if work > 0 and elapsed > 0:
            rate = work / elapsed
            left = max(0, self.total - self.done)
            one = self.unit.removesuffix("s")
            shown = f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{one}"
            text += f", {shown}, elapsed {duration(elapsed)}, ETA {duration(left / rate)}"
        return text

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.log.info(self.line())

    def finish(self) -> None:
        self.last = self.clock()
        self.log.info(self.line())
