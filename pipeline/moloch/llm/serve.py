"""``vllm serve`` of a local model on a free port of 127.0.0.1, for as long as a block runs.

    with VLLMServer(checkpoint, served_name="embedded", adapters={name: folder}) as url:
        ...  # OPENAI_BASE_URL=url: the openai backend talks to a real vLLM server

The server runs in its own process group, so leaving the block (normally, on an error or
on Ctrl-C) stops it and every process it spawned; its output goes to ``log``. It needs
vLLM in the running interpreter's environment (``nox -s vllm`` builds one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..errors import ModelError

READY_TIMEOUT_S = 600.0  # a CPU engine starts in about a minute; a cold GPU one can take more


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """A ``vllm serve`` process; ``__enter__`` returns its ``/v1`` URL once it answers."""

    def __init__(
        self,
        model: str | Path,
        *,
        served_name: str,
        adapters: dict[str, Path] | None = None,
        log: Path,
        memory: float = 0.1,
        max_model_len: int = 2048,
        seed: int = 0,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = Path(log)
        self.command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", served_name,
            "--host", "127.0.0.1", "--port", str(self.port), "--seed", str(seed),
            "--gpu-memory-utilization", str(memory), "--max-model-len", str(max_model_len),
        ]  # fmt: skip
        if adapters:
            modules = [f"{name}={Path(folder).resolve()}" for name, folder in adapters.items()]
            self.command += ["--enable-lora", "--max-lora-rank", "16", "--lora-modules", *modules]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise
        return self.url

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ModelError(
                    f"vllm serve exited with code {self.process.returncode} before answering; "
                    f"its output is in {self.log}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/models", timeout=2) as reply,
            ):
                if reply.status == 200:
                    return
            time.sleep(1.0)
        raise ModelError(f"vllm serve did not answer in {READY_TIMEOUT_S:.0f} s; see {self.log}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
