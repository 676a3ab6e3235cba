"""Progress of model calls on the runner's terminal, also from inside a notebook kernel.

A stage notebook's kernel has no terminal: what it prints goes into the notebook. So the
runner names a file in ``MOLOCH_PROGRESS`` before it starts the kernel; the client's bars
inside the kernel write their state there (one JSON object, at most twice a second), and
the runner's :class:`Watcher` shows it: a tqdm bar with rate and ETA on a terminal, else
(a log file, a SLURM job) one line a minute. Without the variable a bar is plain tqdm,
shown on a terminal only.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

ENV_PROGRESS = "MOLOCH_PROGRESS"
WRITE_EVERY_S = 0.5  # the kernel's writes
LINE_EVERY_S = 60.0  # the watcher's lines where there is no terminal


class FileBar:
    """A tqdm-like counter that writes ``{"desc", "n", "total", "started"}`` to ``path``."""

    def __init__(self, path: Path, total: int, desc: str):
        self.path, self.total, self.desc, self.n = Path(path), total, desc, 0
        self.started, self.written = time.time(), 0.0
        self._write()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.total or time.monotonic() - self.written >= WRITE_EVERY_S:
            self._write()

    def _write(self) -> None:
        state = {"desc": self.desc, "n": self.n, "total": self.total, "started": self.started}
        scratch = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:  # progress is a courtesy: a failed write never stops the work
            scratch.write_text(json.dumps(state))
            os.replace(scratch, self.path)
        except OSError:
            return
        self.written = time.monotonic()

    def close(self) -> None:
        self._write()

    def __enter__(self) -> FileBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total: int, desc: str):
    """The bar the client counts calls on: to the runner's file when it named one."""
    path = os.environ.get(ENV_PROGRESS)
    if path:
        return FileBar(Path(path), total, desc)
    return tqdm(total=total, desc=desc, unit="call", disable=None, leave=False)


class Watcher:
    """Shows what a kernel writes to ``path`` while the runner waits for it, prefixed by
    ``label`` (the unit). A context manager; sets and restores ``MOLOCH_PROGRESS``."""

    def __init__(self, path: Path, label: str, stream=None, poll_s: float = 0.25):
        self.path, self.label, self.poll_s = Path(path), label, poll_s
        self.stream = stream or sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="progress", daemon=True)
        self._bar = None
        self._desc: str | None = None
        self.seen: list[dict] = []  # every distinct state read (tests)

    def __enter__(self) -> Watcher:
        self.path.unlink(missing_ok=True)
        self._old = os.environ.get(ENV_PROGRESS)
        os.environ[ENV_PROGRESS] = str(self.path)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._show(self._read())  # the last state, read once more
        if self._bar is not None:
            self._bar.close()
        if self._old is None:
            os.environ.pop(ENV_PROGRESS, None)
        else:
            os.environ[ENV_PROGRESS] = self._old
        self.path.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _watch(self) -> None:
        last_line = time.monotonic()
        while not self._stop.wait(self.poll_s):
            self._show(self._read())
            if not self.terminal and self.seen and time.monotonic() - last_line >= LINE_EVERY_S:
                print(self.line(self.seen[-1]), file=self.stream, flush=True)
                last_line = time.monotonic()

    def _show(self, state: dict | None) -> None:
        if not state or (self.seen and state == self.seen[-1]):
            return
        self.seen.append(state)
        if not self.terminal:
            return
        if state["desc"] != self._desc:  # a new call list (another role or stage step)
            if self._bar is not None:
                self._bar.close()
            self._desc = state["desc"]
            self._bar = tqdm(total=state["total"], desc=f"{self.label} {state['desc']}",
                             unit="call", file=self.stream, leave=False)  # fmt: skip
        self._bar.update(state["n"] - self._bar.n)  # through update(): rate and ETA follow

    def line(self, state: dict) -> str:
        """One plain line for a log: the unit, the calls done, their rate and the ETA."""
        elapsed = max(time.time() - state["started"], 1e-9)
        meter = tqdm.format_meter(state["n"], state["total"], elapsed, unit="call")
        return f"[....] {self.label} {state['desc']}: {meter}"
