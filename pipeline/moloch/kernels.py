"""Executing notebooks with papermill, in a kernel that runs this very interpreter.

Both the stage notebooks (``pipeline/0*.ipynb``, run by the runner) and the
analysis notebooks of the report go through :func:`execute_notebook`. The
kernelspec lives in the run folder (``.jupyter/``) and is made visible to
papermill only, so nothing is installed into the user's Jupyter.

The kernel is started through this module (``python -m moloch.kernels``), which
asks Linux to kill it when the process that started it dies: jupyter starts
kernels in a session of their own, so without this a runner killed with
SIGKILL would leave its kernel writing on, with no lock held. Its own standard
error (the kernel's log, not a cell's output, which goes into the notebook)
goes to ``logs/kernels/`` in the run folder: on Ctrl-C a kernel whose runner
has gone prints tracebacks of its closed sockets, which are not the user's.

A :class:`WarmKernel` executes notebook after notebook in one kernel (a run's stage units on
a machine without a GPU): importing torch and transformers and loading the model take 5 to 8
seconds, which a fresh kernel would pay again for every unit. Each notebook still starts
from an empty namespace (IPython's ``%reset``); the imported modules stay, with the models
they keep loaded (``moloch.llm.hf.warm_backend``).

    python -m moloch.kernels -f CONNECTION_FILE    # what the kernelspec runs
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

from .files import read_json, write_json
from .hashing import text_sha256
from .paths import ROOT

KERNEL_LOG_ENV = "MOLOCH_KERNEL_LOG"  # the runner names the file, the kernel it starts reads it


def ensure_kernel(folder: Path) -> str:
    """The name of a kernelspec (kept under ``folder/.jupyter``) that runs ``sys.executable``."""
    name = "moloch-" + text_sha256(sys.executable)[:10]
    spec_file = Path(folder) / ".jupyter" / "kernels" / name / "kernel.json"
    spec = {
        # ERROR: the kernel's startup warnings (plain-TCP transport) are noise on every stage.
        "argv": [
            sys.executable,
            "-m",
            "moloch.kernels",
            "-f",
            "{connection_file}",
            "--IPKernelApp.log_level=ERROR",
        ],
        "display_name": f"moloch ({sys.executable})",
        "language": "python",
    }
    if not spec_file.is_file() or read_json(spec_file, "kernelspec") != spec:
        write_json(spec_file, spec)
    extra = str(Path(folder) / ".jupyter")
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    if extra not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([extra, *paths])
    return name


def execute_notebook(
    source: Path, executed: Path, parameters: dict, folder: Path, kernel: WarmKernel | None = None
) -> Path:
    """Run ``source`` with ``parameters`` into ``executed`` (cwd: the repository root), in a
    fresh kernel, or in ``kernel`` when one is given.

    Raises papermill's PapermillExecutionError when a cell fails; the caller
    says what that means for its step.
    """
    import papermill

    executed.parent.mkdir(parents=True, exist_ok=True)
    if kernel is not None:
        return kernel.execute(source, executed, parameters)
    earlier = os.environ.get(KERNEL_LOG_ENV)
    os.environ[KERNEL_LOG_ENV] = str(kernel_log(folder, executed))  # the kernel inherits it
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters=parameters,
            kernel_name=ensure_kernel(folder),
            cwd=str(ROOT),
            progress_bar=False,
        )
    finally:
        if earlier is None:
            os.environ.pop(KERNEL_LOG_ENV, None)
        else:
            os.environ[KERNEL_LOG_ENV] = earlier
    return executed


def kernel_log(folder: Path, executed: Path) -> Path:
    """The file the kernel executing ``executed`` appends its standard error to: under
    ``folder/logs/kernels/``, by the executed notebook's place in ``folder``."""
    executed, folder = Path(executed), Path(folder)
    where = executed.relative_to(folder) if executed.is_relative_to(folder) else executed.name
    return folder / "logs" / "kernels" / Path(where).with_suffix(".log")


class WarmKernel:
    """One kernel for many notebooks, started by the first and shut down on leaving the
    ``with`` block. Its standard error goes to one log, ``log`` (under ``folder/logs/kernels/``,
    named by host and process); ``env`` is added to the environment it starts with."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None):
        import socket

        self.folder, self.env = Path(folder), dict(env or {})
        self.log = (
            self.folder / "logs" / "kernels" / f"warm-{socket.gethostname()}-{os.getpid()}.log"
        )
        self.manager = None

    def __enter__(self) -> WarmKernel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        from jupyter_client import AsyncKernelManager
        from jupyter_core.utils import run_sync

        class Manager(AsyncKernelManager):
            """Remembers the clients papermill makes (one a notebook): they are closed after
            each notebook, since papermill leaves a kernel it did not start running."""

            def client(self, **kwargs):
                made = super().client(**kwargs)
                self.clients.append(made)
                return made

        manager = Manager(kernel_name=ensure_kernel(self.folder))
        manager.clients = []
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, KERNEL_LOG_ENV: str(self.log)}
        run_sync(manager.start_kernel)(env=env, cwd=str(ROOT))
        self.manager = manager

    def execute(self, source: Path, executed: Path, parameters: dict) -> Path:
        """As :func:`execute_notebook`, in this kernel, from an empty namespace."""
        import papermill
        from jupyter_core.utils import run_sync

        if self.manager is None:
            self._start()
        executed.parent.mkdir(parents=True, exist_ok=True)
        run_sync(self._reset)()
        try:
            papermill.execute_notebook(
                str(source),
                str(executed),
                parameters=parameters,
                kernel_name=self.manager.kernel_name,
                km=self.manager,
                progress_bar=False,
            )
        finally:
            for made in self.manager.clients:
                made.stop_channels()
            self.manager.clients.clear()
        return executed

    async def _reset(self) -> None:
        """Empty the namespace the last notebook left (a notebook that needs a variable it
        does not make would fail in a fresh kernel, so it must fail here too)."""
        made = self.manager.client()
        made.start_channels()
        try:
            await made.wait_for_ready(timeout=60)
            await made.execute_interactive(
                "get_ipython().run_line_magic('reset', '-f')", timeout=60
            )
        finally:
            made.stop_channels()
            self.manager.clients.remove(made)

    def close(self) -> None:
        """Shut the kernel down (at once: its work is done or abandoned)."""
        from jupyter_core.utils import run_sync

        manager, self.manager = self.manager, None
        if manager is not None:
            run_sync(self._shutdown)(manager)

    @staticmethod
    async def _shutdown(manager) -> None:
        import asyncio

        # After Ctrl-C, the interrupted notebook's cell tasks are still pending on this thread's
        # loop: cancelled and awaited here, or they print "Task exception was never retrieved".
        left = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        try:
            if await manager.is_alive():
                await manager.shutdown_kernel(now=True)
        finally:
            await manager.cleanup_resources()


def log_stderr_to(path: Path) -> None:
    """This process's standard error (file descriptor 2) appended to ``path`` from now on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have this process sent ``sig`` when its parent dies (Linux; a no-op elsewhere): a
    kernel is killed, a ``vllm serve`` told to stop (moloch.llm.serve)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


if __name__ == "__main__":
    die_with_parent()
    if os.environ.get(KERNEL_LOG_ENV):
        log_stderr_to(Path(os.environ[KERNEL_LOG_ENV]))
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()
