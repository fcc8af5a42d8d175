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


EVAL = 5  # which clients a sampled evaluation visits

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic): a bijective mixer."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, round_: int, stream: int, clients: np.ndarray) -> np.ndarray:
    """Counter-based U[0, 1) draws, one per client id, for all of them at once.

    The draw of client ``c`` is a pure function of ``(seed, round_, stream, c)``:
    it does not depend on which other clients are in ``clients`` nor on their
    number, so availability at N = 10^6 costs a few numpy passes, not N Python
    calls, and a client's coin is the same whether 1,000 or 1,000,000 are registered.
    """
    key = np.uint64(derive_seed(seed, round_, stream))
    c = np.asarray(clients, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix64(_splitmix64(c * _GOLDEN + key) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
