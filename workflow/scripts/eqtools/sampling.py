"""Seeded draws that depend only on (seed, salt, item id): stable across library versions and
unaffected by which other items are present."""

import hashlib
from collections.abc import Iterable


def stable_keys(ids: Iterable[str], seed: int, salt: str = "") -> list[str]:
    """A pseudo-random sort key per id; sorting by it is a seeded shuffle."""
    prefix = f"{seed}:{salt}:".encode()
    return [hashlib.sha256(prefix + str(i).encode()).hexdigest() for i in ids]
