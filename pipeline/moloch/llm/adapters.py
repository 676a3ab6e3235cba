"""LoRA adapter folders: their content hash (one definition for training, serving and the cache).

An adapter is named by what it holds, never by where it lies: the hash covers
every file's name and bytes except ``NOT_WEIGHTS`` (files that cannot change
an answer), so a retrained, identical adapter keeps its cached answers and a
copied or moved one is the same adapter.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

from ..errors import ModelError
from ..hashing import file_sha256, object_sha256

# Written beside the weights; an adapter retrained identically differs only in these.
NOT_WEIGHTS = frozenset({"README.md", "train_summary.json"})  # (SUMMARY, below)


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


SUMMARY = "train_summary.json"  # written by moloch.training beside the weights
# In a train unit unpacked from a run archive (moloch.archive): the weight files left out,
# with the hashes the unit's manifest recorded, and each adapter folder's content hash.
NOT_ARCHIVED = ".not-archived.json"


def not_archived(unit_folder: str | Path) -> dict:
    """What a unit folder's archive left out: ``{"files": {name: sha256}, "adapters":
    {folder name: content hash}}`` (empty when nothing was)."""
    path = Path(unit_folder) / NOT_ARCHIVED
    try:
        marker = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as err:
        raise ModelError(f"{path} cannot be read ({err}): unpack the run archive again") from err
    return marker if isinstance(marker, dict) else {}


def verified_sha256(folder: str | Path) -> str:
    """The adapter's content hash, after checking it against the one recorded at training.

    A folder whose files no longer hash to what ``train_summary.json`` recorded is refused:
    a garbled adapter would otherwise answer (badly) under a key of its own. Weights a run
    archive left out (``moloch.archive``) are named by the hash the archive recorded, so a
    replay finds their answers; a live call still needs the weights.
    """
    try:
        digest = adapter_sha256(folder)
    except ModelError:
        # Weights left out of a run archive: the content hash it recorded keys the cache.
        recorded = not_archived(Path(folder).parent).get("adapters", {}).get(Path(folder).name)
        if recorded:
            return recorded
        raise
    summary = Path(folder) / SUMMARY
    if summary.is_file():
        try:
            recorded = json.loads(summary.read_text(encoding="utf-8")).get("adapter_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            recorded = "unreadable"
        if recorded not in (None, digest):
            raise ModelError(
                f"LoRA adapter {folder} does not match the hash recorded when it was trained "
                f"({SUMMARY}: {str(recorded)[:12]}, now {digest[:12]}): it is not used. "
                f"Train it again (moloch run --force train)"
            )
    return digest


def adapter_name(path: str | Path) -> str:
    """A peft/vLLM adapter name derived from the adapter folder (stable, identifier-safe)."""
    return "a" + object_sha256(str(Path(path).expanduser().resolve()))[:12]
