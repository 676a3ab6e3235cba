"""Locks between processes (filelock): one run per shard of a run folder, one model conversion.

The locks are ``flock`` locks, released by the kernel when their holder dies,
so a lock file left by a killed run is no obstacle to the next one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import StageError

LOCKS_DIR = ".locks"


@contextlib.contextmanager
def shard_lock(run_folder: Path, task: str, model: str) -> Iterator[None]:
    """Hold (task, model) of a run folder, or refuse at once if another process holds it."""
    folder = Path(run_folder) / LOCKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}__{model}.lock"
    holder = path.with_name(path.name + ".holder")  # who holds it, for the message below
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        who = holder.read_text(encoding="utf-8").strip() if holder.is_file() else ""
        raise StageError(
            f"run folder {run_folder} ({task}/{model}) is in use by {who or 'another process'}; "
            f"wait for that run to finish or stop it, or use another folder (--run-dir)"
        ) from None
    try:
        holder.write_text(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Wait for, then hold, the lock file ``path`` (e.g. while converting a model once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield
