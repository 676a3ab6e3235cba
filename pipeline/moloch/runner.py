"""The stage framework: fingerprints, skip checks, locks, manifests and notebooks.

A *unit* is one stage for one (task, model[, method]). Its folder is
``<run>/<stage>/<task>/<model>[/<method>]`` and holds its outputs, the executed
notebook and ``manifest.json``. The fingerprint of a unit hashes its inputs
(the manifests of the units it reads), the profile sections it depends on and
the source files it runs; a unit whose manifest carries the current
fingerprint is up to date and is skipped before any notebook starts.

Interrupted units resume: model calls go through the persistent LLM call
cache (every completion is committed as soon as it exists), outputs are
written atomically, and the manifest, written last, is what marks a unit done.

    python -m moloch.cli run --profile smoke          # the usual entry point
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import Profile, load_profile
from .errors import StageError
from .files import write_atomic
from .hashing import file_sha256, text_sha256
from .paths import MATERIALS_FILE, NOTEBOOKS_DIR, PACKAGE_DIR, ROOT
from .paths import run_dir as default_run_dir

MANIFEST = "manifest.json"
LOCK_ENV = "MOLOCH_LOCK_HELD"  # set by a runner for the notebook kernels it starts
# Source files every stage runs, on top of the ones a stage names itself.
COMMON_CODE = ("runner.py", "stages.py", "config.py", "prompts.py", "tasks.py", "anchors.py")
PACKAGES = ("torch", "transformers", "peft", "trl", "numpy", "pandas", "papermill", "pydantic")

LlmFactory = Callable[["StageContext", str], object]


# --- atomic files -----------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
    write_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise StageError(f"{path} is missing: run the stage that writes it first")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise StageError(
                        f"{path}, line {number}: not valid JSON ({err}); rerun the stage that "
                        f"writes it with --force"
                    ) from None
    return rows


# --- stages and their context -------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One step of the study. ``work`` writes the outputs and returns counts."""

    name: str
    notebook: str  # file name under pipeline/
    work: Callable[[StageContext], dict]
    needs: Callable[[StageContext], list[tuple[str, str | None]]]  # (stage, method) it reads
    profile_keys: tuple[str, ...]  # profile sections that decide its outputs
    code: tuple[str, ...] = ()  # package files (or folders) it runs, beyond COMMON_CODE
    methods: tuple[str, ...] = ()  # one unit per method; () = one unit per (task, model)
    roles: tuple[str, ...] = ()  # model roles it calls: player, audience, judge
    extra_inputs: Callable[[StageContext], dict] | None = None  # e.g. input data hashes


@dataclass
class StageContext:
    """Everything a unit needs: profile, shard, folders, and how to get models."""

    stage: Stage
    profile: Profile
    profile_ref: str  # name or path, as passed to notebooks
    task: str
    model: str
    method: str | None
    run_dir: Path
    llm_factory: LlmFactory | None = None
    _llms: dict = field(default_factory=dict, repr=False)

    @property
    def out_dir(self) -> Path:
        return self.unit_dir(self.stage.name, self.method)

    def unit_dir(self, stage: str, method: str | None = None) -> Path:
        folder = self.run_dir / stage / self.task / self.model
        return folder / method if method else folder

    @property
    def player(self):
        return self.profile.player(self.model)

    def spec(self, role: str):
        return {
            "player": self.player,
            "audience": self.profile.audience,
            "judge": self.profile.judge,
        }[role]

    def llm(self, role: str):
        """The model of ``role`` (player, audience, judge), made once per unit."""
        if role not in self._llms:
            factory = self.llm_factory or default_llm_factory
            self._llms[role] = factory(self, role)
        return self._llms[role]

    def llm_stats(self) -> dict:
        return {role: _stats(llm) for role, llm in self._llms.items()}


def _stats(llm) -> dict:
    stats = getattr(llm, "stats", None)
    return stats() if callable(stats) else {}


def llm_cache_path(run_dir: Path) -> Path:
    """The run's persistent call cache: the resume mechanism for model calls."""
    return run_dir / "llm-cache.sqlite"


def default_llm_factory(ctx: StageContext, role: str):
    from .llm import get_llm

    return get_llm(ctx.spec(role), cache=llm_cache_path(ctx.run_dir), role=role)


# --- fingerprints ------------------------------------------------------------------------


def code_files(stage: Stage) -> list[Path]:
    files: list[Path] = []
    for name in (*COMMON_CODE, *stage.code):
        path = PACKAGE_DIR / name
        if path.is_dir():
            files.extend(sorted(path.rglob("*.py")))
        elif path.is_file():
            files.append(path)
    notebook = NOTEBOOKS_DIR / stage.notebook
    if notebook.is_file():
        files.append(notebook)
    files.append(MATERIALS_FILE)
    return files


def code_hash(stage: Stage) -> str:
    digest = hashlib.sha256()
    for path in code_files(stage):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a torn manifest means "not done": the unit runs again


def input_hashes(ctx: StageContext) -> dict:
    """What the unit reads: each upstream unit's output hashes (from its manifest)."""
    inputs = {}
    for stage, method in ctx.stage.needs(ctx):
        folder = ctx.unit_dir(stage, method)
        manifest = read_manifest(folder)
        if manifest is None:
            raise StageError(
                f"stage {ctx.stage.name!r} ({ctx.task}/{ctx.model}) needs the outputs of stage "
                f"{stage!r} in {folder}, which has not finished: run it first "
                f"(moloch run --until {ctx.stage.name})"
            )
        key = f"{stage}/{method}" if method else stage
        inputs[key] = text_sha256(json.dumps(manifest["outputs"], sort_keys=True))
    if ctx.stage.extra_inputs is not None:
        inputs.update(ctx.stage.extra_inputs(ctx))
    return inputs


def stage_params(ctx: StageContext) -> dict:
    settings = ctx.profile.model_dump(mode="json")
    relevant = {key: settings[key] for key in ctx.stage.profile_keys}
    if "players" in ctx.stage.profile_keys:  # only this shard's player matters
        relevant["players"] = [p for p in settings["players"] if p["name"] == ctx.model]
    return {
        "stage": ctx.stage.name,
        "task": ctx.task,
        "model": ctx.model,
        "method": ctx.method,
        "profile": relevant,
    }


def fingerprint(ctx: StageContext) -> dict:
    parts = {
        "inputs": input_hashes(ctx),
        "params": text_sha256(json.dumps(stage_params(ctx), sort_keys=True)),
        "code": code_hash(ctx.stage),
    }
    return {"digest": text_sha256(json.dumps(parts, sort_keys=True)), **parts}


def is_up_to_date(ctx: StageContext) -> bool:
    manifest = read_manifest(ctx.out_dir)
    if (
        manifest is None
        or manifest.get("fingerprint", {}).get("digest") != fingerprint(ctx)["digest"]
    ):
        return False
    # Cheap check that nobody deleted an output since (sizes, not hashes).
    return all(
        (ctx.out_dir / name).is_file() and (ctx.out_dir / name).stat().st_size == info["bytes"]
        for name, info in manifest["outputs"].items()
    )


# --- manifests ----------------------------------------------------------------------------


def output_files(folder: Path) -> dict:
    outputs = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if (
            not path.is_file()
            or name == MANIFEST
            or path.suffix == ".ipynb"
            or path.name.startswith(".")
            or any(part.startswith(".") for part in path.relative_to(folder).parts)
        ):
            continue
        outputs[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return outputs


def git_commit() -> dict:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "pipeline"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(ctx: StageContext, fprint: dict, summary: dict, wall_s: float) -> dict:
    return {
        "stage": ctx.stage.name,
        "task": ctx.task,
        "model": ctx.model,
        "method": ctx.method,
        "profile": ctx.profile.name,
        "profile_digest": ctx.profile.digest(),
        "fingerprint": fprint,
        "params": stage_params(ctx),
        "code": {
            "hash": fprint["code"],
            "files": [str(p.relative_to(ROOT)) for p in code_files(ctx.stage)],
            **git_commit(),
        },
        "models": {role: ctx.spec(role).model_dump(mode="json") for role in ctx.stage.roles},
        "seed": ctx.profile.seed,
        "packages": package_versions(),
        "counts": summary.get("counts", {}),
        "invalid": summary.get("invalid", {}),
        "details": {k: v for k, v in summary.items() if k not in ("counts", "invalid")},
        "llm": ctx.llm_stats(),
        "wall_s": round(wall_s, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outputs": output_files(ctx.out_dir),
    }


def execute(ctx: StageContext) -> dict:
    """Do one unit's work in this process and write its manifest (last)."""
    started = time.monotonic()
    fprint = fingerprint(ctx)  # also checks that every input exists
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    stale = ctx.out_dir / MANIFEST
    if stale.exists():
        stale.unlink()  # the unit is not done until the new manifest lands
    with shard_lock(ctx.run_dir, ctx.task, ctx.model, reentrant=True):
        summary = ctx.stage.work(ctx) or {}
    manifest = build_manifest(ctx, fprint, summary, time.monotonic() - started)
    write_json(ctx.out_dir / MANIFEST, manifest)
    return manifest


# --- locks -----------------------------------------------------------------------------------


@contextlib.contextmanager
def shard_lock(run_dir: Path, task: str, model: str, reentrant: bool = False) -> Iterator[None]:
    """Refuse a second run on the same (run folder, task, model) while one is alive.

    ``fcntl.flock`` is released by the kernel when its holder dies, so a lock
    file left by a killed run is no obstacle. Notebook kernels started by a
    runner inherit ``MOLOCH_LOCK_HELD`` and do not lock again (``reentrant``).
    """
    key = f"{run_dir.resolve()}::{task}::{model}"
    if reentrant and key in os.environ.get(LOCK_ENV, "").split("|"):
        yield
        return
    locks = run_dir / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{task}__{model}.lock"
    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StageError(
                f"run folder {run_dir} ({task}/{model}) is in use by {holder}; wait for that run "
                f"to finish or stop it, or use another folder (MOLOCH_RUNS)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        held = [k for k in os.environ.get(LOCK_ENV, "").split("|") if k]
        os.environ[LOCK_ENV] = "|".join([*held, key])
        try:
            yield
        finally:
            os.environ[LOCK_ENV] = "|".join(held)
            if not held:
                os.environ.pop(LOCK_ENV, None)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


# --- notebooks ----------------------------------------------------------------------------------


def ensure_kernel(run_dir: Path) -> str:
    """A kernelspec that runs this very interpreter, visible to papermill only."""
    name = "moloch-" + text_sha256(sys.executable)[:10]
    folder = run_dir / ".jupyter" / "kernels" / name
    spec = {
        # ERROR: the kernel's startup warnings (plain-TCP transport) are noise on every stage.
        "argv": [
            sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            "--IPKernelApp.log_level=ERROR",
        ],
        "display_name": f"moloch ({sys.executable})",
        "language": "python",
    }
    current = folder / "kernel.json"
    if not current.is_file() or json.loads(current.read_text(encoding="utf-8")) != spec:
        write_json(current, spec)
    extra = str(run_dir / ".jupyter")
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    if extra not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([extra, *paths])
    return name


def run_notebook(ctx: StageContext) -> None:
    import papermill

    source = NOTEBOOKS_DIR / ctx.stage.notebook
    if not source.is_file():
        raise StageError(f"notebook {source} of stage {ctx.stage.name!r} is missing: restore it")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    executed = ctx.out_dir / ctx.stage.notebook
    params = {
        "profile": ctx.profile_ref,
        "task": ctx.task,
        "model": ctx.model,
        "method": ctx.method,
        "run_dir": str(ctx.run_dir),
    }
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters=params,
            kernel_name=ensure_kernel(ctx.run_dir),
            cwd=str(ROOT),
            progress_bar=False,
        )
    except papermill.PapermillExecutionError as err:
        # The unit is not done until its notebook ran through: it runs again next time
        # (its model calls come from the cache).
        (ctx.out_dir / MANIFEST).unlink(missing_ok=True)
        raise StageError(
            f"stage {ctx.stage.name!r} ({ctx.task}/{ctx.model}"
            f"{'/' + ctx.method if ctx.method else ''}) failed: {err.ename}: {err.evalue}\n"
            f"See the executed notebook {executed}. Finished model calls are cached: "
            f"fix the cause and run again to resume."
        ) from None


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitReport:
    stage: str
    task: str
    model: str
    method: str | None
    status: str  # "ran" | "skipped"
    wall_s: float


def select_stages(stages: list[Stage], only=None, until=None) -> list[Stage]:
    names = [s.name for s in stages]
    for name in [*(only or []), *([until] if until else [])]:
        if name not in names:
            raise StageError(f"unknown stage {name!r}: choose from {', '.join(names)}")
    if only:
        return [s for s in stages if s.name in only]
    if until:
        return stages[: names.index(until) + 1]
    return list(stages)


def run_pipeline(
    profile: str | Path,
    stages: list[Stage] | None = None,
    *,
    only: list[str] | None = None,
    until: str | None = None,
    force: Iterable[str] = (),
    tasks: list[str] | None = None,
    models: list[str] | None = None,
    run_dir: Path | None = None,
    notebooks: bool = True,
    llm_factory: LlmFactory | None = None,
    log: Callable[[str], None] = print,
) -> list[UnitReport]:
    """Run (or skip) every unit of the selected stages, in order."""
    if stages is None:
        from .stages import STAGES

        stages = STAGES
    prof = load_profile(profile)
    folder = (Path(run_dir) if run_dir else default_run_dir(prof.name)).resolve()
    if str(profile).endswith((".yaml", ".yml")):
        profile = Path(profile).resolve()  # notebook kernels run from the repository root
    selected = select_stages(stages, only, until)
    force = set(force)
    select_stages(stages, only=list(force))  # validates the names
    task_list = _choose(tasks, prof.tasks, "task")
    model_list = _choose(models, tuple(p.name for p in prof.players), "model")
    reports: list[UnitReport] = []
    with contextlib.ExitStack() as locks:
        for task in task_list:
            for model in model_list:
                locks.enter_context(shard_lock(folder, task, model))
        for stage in selected:
            for task in task_list:
                for model in model_list:
                    for method in stage.methods or (None,):
                        ctx = StageContext(
                            stage, prof, str(profile), task, model, method, folder, llm_factory
                        )
                        reports.append(_run_unit(ctx, stage.name in force, notebooks, log))
    return reports


def _choose(wanted, available, what: str) -> list[str]:
    if not wanted:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise StageError(f"unknown {what}(s) {unknown}: this profile has {list(available)}")
    return list(wanted)


def _run_unit(ctx: StageContext, force: bool, notebooks: bool, log) -> UnitReport:
    where = "/".join(p for p in (ctx.stage.name, ctx.task, ctx.model, ctx.method) if p)
    started = time.monotonic()
    if not force and is_up_to_date(ctx):
        log(f"[skip] {where}: up to date")
        return UnitReport(ctx.stage.name, ctx.task, ctx.model, ctx.method, "skipped", 0.0)
    log(f"[run ] {where}")
    if notebooks:
        fingerprint(ctx)  # fail fast, before a kernel starts, when an input is missing
        run_notebook(ctx)
        manifest = read_manifest(ctx.out_dir)
        if manifest is None:
            raise StageError(
                f"notebook of {where} finished without writing {ctx.out_dir / MANIFEST}: "
                f"does it call moloch.stages.execute(...)?"
            )
        if manifest["fingerprint"]["digest"] != fingerprint(ctx)["digest"]:
            log(f"[warn] {where}: its code or inputs changed while it ran; it will run again")
    else:
        execute(ctx)
    wall = time.monotonic() - started
    log(f"[done] {where} in {wall:.1f}s")
    return UnitReport(ctx.stage.name, ctx.task, ctx.model, ctx.method, "ran", wall)
