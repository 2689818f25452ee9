"""Seeds that are a fixed function of their parts: every random draw of the data pipeline (shuffles, augmentation,
validation splits) is seeded through :func:`stable_seed`, so it is the same on every machine, process and run."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a fixed function of ``parts``, the same on every machine and Python run."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1
