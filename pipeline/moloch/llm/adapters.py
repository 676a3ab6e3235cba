"""LoRA adapter folders: their content hash (one definition for training, serving and the cache).

An adapter is named by what it holds, never by where it lies: the hash covers
every file's name and bytes except ``NOT_WEIGHTS`` (files that cannot change
an answer), so a retrained, identical adapter keeps its cached answers and a
copied or moved one is the same adapter.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from ..errors import ModelError
from ..hashing import file_sha256, object_sha256

# Written beside the weights; an adapter retrained identically differs only in these.
NOT_WEIGHTS = frozenset({"README.md", "train_summary.json"})


def adapter_files(folder: str | Path) -> dict[str, str]:
    """SHA-256 of each file of an adapter folder that can change an answer, by relative name.

    Memoised on each file's size and modification time, so weights are read
    once per folder, yet an adapter retrained in place is read again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(
            f"adapter folder {folder} does not exist: train it first (the training stage "
            f"writes it) or fix the adapter path"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in NOT_WEIGHTS)
    if not files:
        raise ModelError(f"adapter folder {folder} is empty: train the adapter again")
    signature = tuple(
        (f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files
    )
    return dict(_hash_files(str(folder.resolve()), signature))


@cache
def _hash_files(folder: str, signature: tuple) -> tuple[tuple[str, str], ...]:
    return tuple((name, file_sha256(Path(folder) / name)) for name, _, _ in signature)


def adapter_sha256(folder: str | Path) -> str:
    """The content hash of an adapter folder (names and per-file hashes, in name order)."""
    digest = hashlib.sha256()
    for name, sha in adapter_files(folder).items():
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()


def adapter_name(path: str | Path) -> str:
    """A peft/vLLM adapter name derived from the adapter folder (stable, identifier-safe)."""
    return "a" + object_sha256(str(Path(path).expanduser().resolve()))[:12]
