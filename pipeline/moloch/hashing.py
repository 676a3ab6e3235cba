"""SHA-256 fingerprints of files, texts and JSON-able objects (manifests, caches, adapters)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (model weights are large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """Hex SHA-256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def object_sha256(obj) -> str:
    """Hex SHA-256 of a JSON-serialisable object (keys sorted; other objects by ``str``)."""
    return text_sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str))
