"""Seeds derived from (experiment seed, round, client, stream): determinism by construction.

Whatever the number of actors or the order they run in, a client's randomness
depends only on these coordinates, never on a global RNG.
"""

from __future__ import annotations

import numpy as np

# streams: distinct purposes drawing at the same (round, client)
SAMPLE, AVAIL, FAIL, TRAIN, TIEBREAK = range(5)


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed that is a pure function of ``(seed, *parts)``."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, *[(p + 1) & 0xFFFFFFFF for p in parts]])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1, 2**32]) % (2**63 - 1))


def rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *parts))
