"""The run loop: each unit of work is decided, locked, fingerprinted and executed once.

The life of one unit (one stage for one task, model and method), from ``moloch run``:

1. ``run_pipeline`` finds the run (``runs.find_run``: profile loaded once, folder) and
   holds the lock of every (task, model) shard it will touch, for the whole run.
2. For each stage in order, each shard and method, it makes the unit (``Unit.of``).
3. ``decide`` computes the unit's fingerprint once (``fingerprints``: inputs, settings, code).
4. If the unit's manifest records that fingerprint and its outputs are there: skip it.
5. Otherwise papermill runs the stage notebook, passing the decision (fingerprint and
   profile digest) as a parameter, in the run's one warm kernel (``kernels.WarmKernel``:
   on a machine without a GPU, where no role uses vLLM) or else in a fresh kernel ...
6. ... and the notebook's one call, ``execute``, rebuilds the same unit, checks the
   profile is the one decided on, runs the stage's ``work`` (model calls go through
   the run's call cache) and writes ``manifest.json`` last (``manifests``).
7. The runner reads that manifest back: the unit is done. A failure leaves no manifest,
   so the next run does the unit again, its finished model calls served from the cache.

A notebook run by hand (no decision given) decides for itself: it takes the lock
and computes the fingerprint. ``--no-notebooks`` runs step 6 in the runner's process.

    moloch run --profile smoke                 # = python -m moloch.cli run
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .budget import Budget, paid, pending_costs, spending
from .config import Profile
from .errors import StageError
from .files import read_jsonl, write_json
from .fingerprints import fingerprint
from .kernels import WarmKernel, execute_notebook, kernel_log
from .locks import shard_lock
from .manifests import (
    MANIFEST,
    build_manifest,
    call_totals,
    changed_outputs,
    read_manifest,
    summary_line,
)
from .paths import ENV_SHARD_CACHE, NOTEBOOKS_DIR
from .progress import ENV_PROGRESS, Watcher
from .runs import Run, find_run
from .stages import STAGES, get_stage
from .units import LlmFactory, Stage, Unit


@dataclass(frozen=True)
class UnitReport:
    """What the runner did with one unit: ``ran`` or ``skipped``, and how long it took."""

    stage: str
    task: str
    model: str
    method: str | None
    status: str
    wall_s: float
    dollars: float = 0.0  # what its new model calls cost (NaN: a paid model without a price)


@dataclass(frozen=True)
class Result:
    """A unit that just ran: its folder and manifest (what a stage notebook shows)."""

    folder: Path
    manifest: dict

    def rows(self, name: str) -> list[dict]:
        """The rows of one of the unit's JSON-lines outputs."""
        return read_jsonl(self.folder / name)

    def counts(self):
        """The unit's counts and wall time as a small table."""
        import pandas as pd

        print(f"{self.folder}: {self.manifest['wall_s']} s")
        return pd.DataFrame({"count": self.manifest["counts"]})


# --- one unit ------------------------------------------------------------------------------


def run_models(unit: Unit, role: str):
    """The real model of ``role`` for a unit: its profile's backend behind the run's call cache
    (in a shard job of ``moloch submit``: the shard's own file over the run's, read-only)."""
    from .llm import CallCache, get_llm

    shard = os.environ.get(ENV_SHARD_CACHE)
    cache = CallCache(shard, lower=unit.run.cache_path) if shard else unit.run.cache_path
    return get_llm(unit.spec(role), cache=cache, role=role)


def decide(unit: Unit, force: bool = False, log=print) -> tuple[dict, bool]:
    """The unit's fingerprint and whether the unit must run (stale, missing, or forced).

    A unit whose outputs no longer match the hashes its manifest recorded is redone, with
    a one-line notice. Raises StageError, before anything starts, when an input unit has
    not finished or its outputs were changed.
    """
    fprint = fingerprint(unit)
    if force:
        return fprint, True
    manifest = read_manifest(unit.out_dir)
    if manifest is None or manifest.get("fingerprint", {}).get("digest") != fprint["digest"]:
        return fprint, True
    changed = changed_outputs(unit.out_dir, manifest)
    if changed:
        log(f"[redo] {unit.where}: {', '.join(changed)}; it is made again")
    return fprint, bool(changed)


def _work(unit: Unit, fprint: dict) -> dict:
    """Do the unit's work here and write its manifest, last."""
    started = time.monotonic()
    unit.out_dir.mkdir(parents=True, exist_ok=True)
    (unit.out_dir / MANIFEST).unlink(missing_ok=True)  # not done until the new one lands
    for leftover in unit.out_dir.glob(".*.tmp"):  # half-written by an interrupted run
        leftover.unlink()
    summary = unit.stage.work(unit) or {}
    manifest = build_manifest(unit, fprint, summary, time.monotonic() - started, spending(unit))
    write_json(unit.out_dir / MANIFEST, manifest)
    return manifest


def execute(
    stage: str,
    profile: str | Path | Profile | None,
    task: str,
    model: str,
    method: str | None = None,
    run_dir: str | Path | None = None,
    decision: dict | None = None,
    llm_factory: LlmFactory | None = None,
) -> Result:
    """Run one unit here and now: what each stage notebook calls (with papermill's parameters).

    With ``decision`` (given by the runner, which holds the shard's lock) the unit
    uses the fingerprint decided on, after checking the profile is the same. Without
    it (a notebook run by hand) it locks the shard and fingerprints the unit itself.
    Reads the unit's inputs; writes its outputs and ``manifest.json``.
    """
    run = find_run(profile, run_dir)
    unit = Unit.of(get_stage(stage), run, task, model, method, llm_factory or run_models)
    if decision is not None:
        if decision.get("profile_digest") != run.profile.digest():
            raise StageError(
                f"{unit.where}: the profile {run.profile_ref} changed after the runner decided "
                f"to run this unit; run again"
            )
        return Result(unit.out_dir, _work(unit, decision["fingerprint"]))
    with shard_lock(run.folder, task, model):
        return Result(unit.out_dir, _work(unit, fingerprint(unit)))


def _run_notebook(unit: Unit, fprint: dict, kernel: WarmKernel | None = None) -> dict:
    """Step 5: the stage notebook, executed into the unit's folder (in ``kernel``, else a
    fresh one); returns its manifest."""
    import papermill
    from nbclient.exceptions import DeadKernelError

    source = NOTEBOOKS_DIR / unit.stage.notebook
    if not source.is_file():
        raise StageError(f"notebook {source} of stage {unit.stage.name!r} is missing: restore it")
    executed = unit.out_dir / unit.stage.notebook
    params = {
        "profile": unit.run.profile_ref,
        "task": unit.task,
        "model": unit.model,
        "method": unit.method,
        "run_dir": str(unit.run.folder),
        "decision": {"fingerprint": fprint, "profile_digest": unit.profile.digest()},
    }
    shown = progress_file(unit.run)
    try:
        with Watcher(shown, unit.where):
            execute_notebook(source, executed, params, unit.run.folder, kernel)
    except papermill.PapermillExecutionError as err:
        (unit.out_dir / MANIFEST).unlink(missing_ok=True)
        raise StageError(
            f"stage {unit.where} failed: {err.ename}: {err.evalue}\n"
            f"See the executed notebook {executed}. Finished model calls are cached: "
            f"fix the cause and run again to resume."
        ) from None
    except DeadKernelError:
        (unit.out_dir / MANIFEST).unlink(missing_ok=True)
        log = kernel.log if kernel is not None else kernel_log(unit.run.folder, executed)
        raise StageError(
            f"the notebook kernel of {unit.where} died (killed, or out of memory; its log: "
            f"{log}): finished model calls are cached; run again to resume"
        ) from None
    manifest = read_manifest(unit.out_dir)
    if manifest is None or manifest["fingerprint"]["digest"] != fprint["digest"]:
        raise StageError(
            f"the notebook of {unit.where} finished without writing the manifest it was asked "
            f"for in {unit.out_dir / MANIFEST}: does it call moloch.runner.execute(...)?"
        )
    return manifest


def progress_file(run: Run) -> Path:
    """Where this runner's kernel writes its bars (shard jobs on several hosts share a run)."""
    shown = run.folder / ".progress" / f"{socket.gethostname()}-{os.getpid()}.json"
    shown.parent.mkdir(parents=True, exist_ok=True)
    return shown


GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd")  # a machine with an NVIDIA or AMD GPU has one


def warm_kernel_fits(run: Run, stages: list[Stage], models: list[str]) -> bool:
    """Whether one kernel may run every unit: not where a GPU is (each unit's process must
    give the GPU's memory back: models of several roles and a training would not fit
    together), nor where a role runs vLLM in the kernel (an engine's memory is not freed)."""
    gpu = any(Path(device).exists() for device in GPU_DEVICES)
    return not gpu and all(spec.backend != "vllm" for spec in _specs(run, stages, models))


# --- the run ---------------------------------------------------------------------------------


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


def _choose(wanted, available, what: str) -> list[str]:
    if not wanted:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise StageError(f"unknown {what}(s) {unknown}: this profile has {list(available)}")
    return list(wanted)


def run_pipeline(
    profile: str | Path | Profile | None = None,
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
    yes: bool = False,
    max_cost: float | None = None,
    fresh_kernels: bool | None = None,
) -> list[UnitReport]:
    """Run (or skip) every unit of the selected stages, in order; see the module docstring.
    With paid models, ``yes`` and ``max_cost`` are the consent and the cap (moloch.budget).
    ``fresh_kernels``: a kernel of its own for every unit's notebook (None: where one warm
    kernel does not fit, ``warm_kernel_fits``)."""
    stages = STAGES if stages is None else stages
    run = find_run(profile, run_dir)
    selected = select_stages(stages, only, until)
    force = set(force)
    select_stages(stages, only=list(force))  # validates the names
    task_list = _choose(tasks, run.profile.tasks, "task")
    model_list = _choose(models, tuple(p.name for p in run.profile.players), "model")
    factory = llm_factory or run_models
    budget = None
    if llm_factory is None:
        preflight(run, selected, model_list)
        if _live() and paid(_specs(run, selected, model_list)):
            budget = Budget(pending_costs(run, selected, task_list, model_list), max_cost, log)
            budget.consent(yes)
    reports: list[UnitReport] = []
    with contextlib.ExitStack() as held:
        for task in task_list:
            for model in model_list:
                held.enter_context(shard_lock(run.folder, task, model))
        run.record_profile()
        if fresh_kernels is None:
            fresh_kernels = not warm_kernel_fits(run, selected, model_list)
        kernel = None
        if notebooks and not fresh_kernels:  # started by the first unit that runs
            kernel = held.enter_context(
                WarmKernel(run.folder, {ENV_PROGRESS: str(progress_file(run))})
            )
        for stage in selected:
            for task in task_list:
                for model in model_list:
                    for method in stage.methods or (None,):
                        unit = Unit.of(stage, run, task, model, method, factory)
                        if budget is not None:
                            budget.allow((stage.name, task, model, method), unit.where)
                        report = _run_unit(unit, stage.name in force, notebooks, log, kernel)
                        if budget is not None:
                            budget.add(report.dollars)
                        reports.append(report)
    return reports


def _live() -> bool:
    from .llm.client import default_mode

    return default_mode() == "live"


def _specs(run: Run, stages: list[Stage], models: list[str]) -> list:
    """The model specs the stages call, for these players."""
    roles = {role for stage in stages for role in stage.roles}
    specs = [run.profile.player(m) for m in models] if "player" in roles else []
    return specs + [getattr(run.profile, r) for r in ("audience", "judge") if r in roles]


MIN_FREE_BYTES = 1 << 30  # a run folder's disk must have this much free (outputs, cache)


def preflight(run: Run, stages: list[Stage], models: list[str]) -> None:
    """Before the first stage: every model the selected stages call can answer (weights
    found, vLLM importable where a role needs it, servers reachable and keyed), and the run
    folder's disk has room. Skipped in replay mode, which calls no model."""
    import shutil

    from .llm import preflight as check

    if not _live():
        return
    for spec in _specs(run, stages, models):
        check(spec)
    existing = next(p for p in (run.folder, *run.folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise StageError(
            f"only {free / 2**30:.2f} GiB free on the disk of {run.folder}: free some space, "
            f"or put the run elsewhere (--run-dir, or MOLOCH_RUNS)"
        )


def _run_unit(
    unit: Unit, force: bool, notebooks: bool, log, kernel: WarmKernel | None = None
) -> UnitReport:
    started = time.monotonic()
    fprint, must_run = decide(unit, force, log)
    if not must_run:
        log(f"[skip] {unit.where}: up to date")
        return UnitReport(unit.stage.name, unit.task, unit.model, unit.method, "skipped", 0.0)
    log(f"[run ] {unit.where}")
    manifest = _run_notebook(unit, fprint, kernel) if notebooks else _work(unit, fprint)
    wall = time.monotonic() - started
    totals = call_totals(manifest)
    log(f"[done] {unit.where} in {wall:.1f}s: {summary_line(totals)}")
    return UnitReport(
        unit.stage.name, unit.task, unit.model, unit.method, "ran", wall, totals["dollars"]
    )
