"""Progress from a kernel to the runner: the file protocol and the watcher's output."""

from __future__ import annotations

import io
import os
import re
import time

from moloch import progress


def test_a_bar_in_a_kernel_reaches_the_watcher(tmp_path, monkeypatch):
    """Inside the Watcher the client's bar writes to the file it names; the watcher reads
    every state up to the last, prints plain lines where there is no terminal, and then
    restores the environment and removes the file."""
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    monkeypatch.delenv(progress.ENV_PROGRESS, raising=False)
    out = io.StringIO()
    path = tmp_path / "p.json"
    with progress.Watcher(path, "compete sales/m", stream=out, poll_s=0.01) as watcher:
        with progress.bar(40, "audience") as bar:
            assert isinstance(bar, progress.FileBar)
            for _ in range(40):
                bar.update(1)
                os.sched_yield()
        deadline = time.monotonic() + 5  # the watcher looks every 10 ms
        while "40/40" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert watcher.seen[-1]["n"] == 40 and watcher.seen[-1]["total"] == 40
    assert [s["n"] for s in watcher.seen] == sorted(s["n"] for s in watcher.seen)
    lines = out.getvalue().splitlines()
    assert lines and all(re.match(r"\[\.\.\.\.\] compete sales/m audience: ", x) for x in lines)
    assert "40/40" in lines[-1]
    assert progress.ENV_PROGRESS not in os.environ and not path.exists()


def test_without_a_watcher_the_bar_is_tqdm(monkeypatch):
    monkeypatch.delenv(progress.ENV_PROGRESS, raising=False)
    assert not isinstance(progress.bar(3, "judge"), progress.FileBar)


def test_an_unwritable_progress_file_never_stops_the_work(tmp_path):
    bar = progress.FileBar(tmp_path / "missing-folder" / "p.json", 5, "judge")
    bar.update(5)  # no error: progress is a courtesy
    assert bar.n == 5
