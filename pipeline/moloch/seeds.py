"""Every seed of the study, derived from the profile's master seed and a key.

A seed never depends on the order in which things are computed: it is a hash
of the master seed and the key of the thing it seeds (a request, a ballot, a
bootstrap cell), so a resumed or re-sharded run draws exactly what an
uninterrupted one draws, and every seed can be recorded next to what it seeded.

- :func:`keyed_rng` -- a numpy generator for a key (ballot orders, shuffles).
- :func:`request_seed` -- the ``seed`` of a model request (players, voters, judges).
- :func:`sampling_seed` -- the random stream a local backend samples one request from.
- :func:`cell_seed` -- the bootstrap stream of one cell of the statistics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from .hashing import object_sha256


def keyed_rng(seed: int, *key: int | str) -> np.random.Generator:
    """A generator seeded by ``seed`` and a key, independent of call order."""
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed, *words]))


def request_seed(seed: int, *key: int | str) -> int:
    """The seed sent with one model request, from the master seed and the request's key."""
    return int(keyed_rng(seed, "request", *key).integers(0, 2**31 - 1))


def sampling_seed(seed: int, sample_index: int, messages: Sequence) -> int:
    """The seed of a local backend's generator for one request (seed, sample, messages).

    Sampling settings and the adapter are left out: the same request to the
    base model and to a trained adapter draws the same random numbers.
    """
    key = {"seed": seed, "sample": sample_index, "messages": messages}
    return int(object_sha256(key)[:15], 16)


def cell_seed(seed: int, *key: object) -> int:
    """The bootstrap seed of one statistics cell (32 bits: exact in JSON and CSV)."""
    blob = "|".join(str(part) for part in (seed, *key)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big")
