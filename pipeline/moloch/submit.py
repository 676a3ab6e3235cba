"""Scale-out: a run's (task, model) shards as job arrays, on SLURM or this machine (submitit).

    moloch submit --profile paper --partition gpu --gpus 1   # SLURM: returns once queued
    moloch submit --profile smoke --executor local           # here: shards in parallel, waits

The stages are cut into *phases* by what they run. A phase whose stages call only
remote models (an audience and judge behind ``openai`` or ``openai-batch``) runs
in jobs without a GPU; every other phase (players, training) in GPU jobs; so a
GPU is never held while votes are cast (``candidates`` and ``episodes`` are
separate stages for this). Each phase is one job array over the shards, and
shard i's job of a phase starts when its job of the phase before succeeded
(SLURM ``aftercorr``; the local executor waits for the whole phase). A last job,
after every shard, merges the shards' call caches into the run's, then writes
the cells and claims and renders the report.

The run's call cache is one SQLite file, which must never be written from two
hosts (SQLite's WAL needs shared memory). So each shard job writes its model
calls to ``<run>/shards/<task>__<model>/llm-cache.sqlite`` and reads the run's
cache read-only for what it lacks (a resumed or extended run pays nothing
twice); the run's cache is checkpointed before the jobs start and written again
only by the last job. Consent to spend and the preflight happen here, once,
before anything is queued; each job runs the preflight again on its own node.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import REMOTE_BACKENDS
from .errors import MolochError, StageError, guarded
from .paths import ENV_SHARD_CACHE
from .runs import JOBS_DIR, SHARDS_DIR, Run, find_run
from .stages import STAGES
from .units import Stage


@dataclass(frozen=True)
class Phase:
    """Consecutive stages that run in one job per shard, with a GPU or without."""

    stages: tuple[str, ...]
    gpu: bool


def _remote(run: Run, stage: Stage, models: list[str]) -> bool | None:
    """True if every model ``stage`` calls is remote, False if one is local, None if it
    calls none (it joins a neighbouring phase)."""
    if not stage.roles:
        return None
    specs = [run.profile.player(m) for m in models] if "player" in stage.roles else []
    specs += [getattr(run.profile, r) for r in stage.roles if r != "player"]
    return all(spec.backend in REMOTE_BACKENDS for spec in specs)


def phases(run: Run, stages: list[Stage], models: list[str]) -> list[Phase]:
    """The stages cut where they switch between local models (GPU) and remote ones; a stage
    that calls no model joins the phase before it (the first one, the phase after it)."""
    kinds = [_remote(run, stage, models) for stage in stages]
    known = [k for k in kinds if k is not None]
    current = known[0] if known else False
    cut: list[tuple[list[str], bool]] = []
    for stage, remote in zip(stages, kinds, strict=True):
        remote = current if remote is None else remote
        if cut and cut[-1][1] == remote:
            cut[-1][0].append(stage.name)
        else:
            cut.append(([stage.name], remote))
        current = remote
    return [Phase(tuple(names), gpu=not remote) for names, remote in cut]


def shard_cache(run: Run, task: str, model: str) -> Path:
    """The call cache a shard job writes (named like the run's, in the shard's folder)."""
    return run.folder / SHARDS_DIR / f"{task}__{model}" / run.cache_path.name


# --- what the jobs run (pickled by submitit: plain arguments only) -----------------------------


def run_shard(profile_ref: str, run_dir: str, task: str, model: str, stages: tuple[str, ...],
              notebooks: bool = True) -> dict:  # fmt: skip
    """One shard's phase, in its job: the stages for (task, model), calls into the shard's
    cache. Returns when it started and ended (wall clock) and what it ran."""
    from .runner import run_pipeline

    started = time.time()
    os.environ[ENV_SHARD_CACHE] = str(shard_cache(find_run(profile_ref, run_dir), task, model))
    reports = run_pipeline(
        profile_ref, only=list(stages), tasks=[task], models=[model], run_dir=Path(run_dir),
        notebooks=notebooks, yes=True,
    )  # fmt: skip
    return {"task": task, "model": model, "stages": list(stages), "started": started,
            "ended": time.time(), "ran": sum(r.status == "ran" for r in reports)}  # fmt: skip


def finish(profile_ref: str, run_dir: str, render: bool = True) -> dict:
    """The last job: every shard cache merged into the run's (then removed), the cells and
    claims written, and the report rendered (``render``)."""
    from .cells import write_cells
    from .claims import write_claims
    from .llm import CallCache
    from .report.__main__ import build

    run = find_run(profile_ref, run_dir)
    cache = CallCache(run.cache_path)
    merged = {}
    for shard in sorted((run.folder / SHARDS_DIR).glob(f"*/{run.cache_path.name}")):
        merged[shard.parent.name] = cache.merge_from(shard)
        for path in shard.parent.glob(shard.name + "*"):  # the file and its -wal, -shm
            path.unlink()
        if not any(shard.parent.iterdir()):
            shard.parent.rmdir()
    if render:
        out = build(run)
        report = str(out["html"])
    else:
        write_cells(run)
        write_claims(run)
        report = None
    return {"merged": merged, "claims": str(run.claims_path), "report": report}


# --- submitting ----------------------------------------------------------------------------


@dataclass
class Resources:
    """What each job asks the cluster for (SLURM; the local executor uses the timeout)."""

    partition: str | None = None
    gpus: int = 1  # per GPU job
    cpus: int = 8
    mem_gb: int = 64
    timeout_min: int = 24 * 60
    account: str | None = None


def submit(
    run: Run,
    executor: str = "auto",
    resources: Resources | None = None,
    tasks: list[str] | None = None,
    models: list[str] | None = None,
    render: bool = True,
    notebooks: bool = True,
    yes: bool = False,
    max_cost: float | None = None,
    wait: bool | None = None,
    log=print,
) -> list:
    """Queue every phase of every shard, then the last job; returns the jobs (submitit's).

    ``executor``: ``slurm``, ``local`` or ``auto`` (SLURM where ``sbatch`` is found).
    ``wait``: block until the last job ends (default: only with the local executor, which
    also waits for each phase before queueing the next).
    """
    import submitit

    from .budget import Budget, paid, pending_costs
    from .llm import CallCache
    from .llm import preflight as check
    from .runner import _choose, _live, _specs

    resources = resources or Resources()
    task_list = _choose(tasks, run.profile.tasks, "task")
    model_list = _choose(models, tuple(p.name for p in run.profile.players), "model")
    specs = _specs(run, STAGES, model_list)
    if _live():  # the APIs' keys and servers here; local models in each job, on its node
        for spec in specs:
            if spec.backend in REMOTE_BACKENDS:
                check(spec)
    if _live() and paid(specs):
        budget = Budget(pending_costs(run, STAGES, task_list, model_list), max_cost, log)
        budget.consent(yes)
        for key, (expected, _) in budget.pending.items():  # the whole run, before queueing
            budget.allow(key, "/".join(k for k in key if k))
            budget.add(expected)
    run.record_profile()
    if run.cache_path.is_file():
        CallCache(run.cache_path).checkpoint()  # the jobs read it without its log

    def pool(gpu: bool, after: str | None, name: str):
        return _executor(run.folder / JOBS_DIR, executor, resources, gpu, after, name)

    local = (submitit.AutoExecutor.which() if executor == "auto" else executor) != "slurm"
    wait = local if wait is None else wait
    shards = [(t, m) for t in task_list for m in model_list]
    log(f"[jobs] {len(shards)} shard(s) x {len(phases(run, STAGES, model_list))} phase(s) "
        f"{'here' if local else 'on SLURM'}, then claims and report")  # fmt: skip
    previous: list = []
    jobs: list[tuple[object, str]] = []  # each job and what it runs, for messages
    for phase in phases(run, STAGES, model_list):
        after = _after(previous, local, "aftercorr")
        previous = pool(phase.gpu, after, "-".join(phase.stages)).map_array(
            run_shard, [run.profile_ref] * len(shards), [str(run.folder)] * len(shards),
            [t for t, _ in shards], [m for _, m in shards], [phase.stages] * len(shards),
            [notebooks] * len(shards),
        )  # fmt: skip
        named = [(job, f"{'+'.join(phase.stages)} {t}/{m}") for job, (t, m) in zip(
            previous, shards, strict=True)]  # fmt: skip
        jobs += named
        needs = "local models: a GPU on SLURM" if phase.gpu else "remote APIs only: no GPU"
        log(f"[jobs] {', '.join(phase.stages)} ({needs}): "
            f"{', '.join(j.job_id for j in previous)}")  # fmt: skip
        if local:
            _results(named)
    last = pool(False, _after(previous, local, "afterok"), "claims-report").submit(
        finish, run.profile_ref, str(run.folder), render
    )
    jobs.append((last, "merge, claims and report"))
    log(f"[jobs] merge, claims and report: {last.job_id} (logs in {run.folder / JOBS_DIR})")
    if wait:
        _results(jobs)
    return [job for job, _ in jobs]


def _after(jobs: list, local: bool, kind: str) -> str | None:
    """The SLURM dependency on ``jobs`` (None locally: the phase was waited for)."""
    if local or not jobs:
        return None
    if kind == "aftercorr":  # the array's own id: task i waits for task i
        return f"aftercorr:{jobs[0].job_id.split('_')[0]}"
    return "afterok:" + ":".join(j.job_id for j in jobs)


def _executor(folder: Path, executor: str, resources: Resources, gpu: bool,
              after: str | None, name: str):  # fmt: skip
    """A submitit executor for one phase: a new one each time, since a parameter once set
    (a GPU, a dependency) cannot be unset."""
    import submitit

    pool = submitit.AutoExecutor(folder=folder, cluster=None if executor == "auto" else executor)
    extra = {"kill-on-invalid-dep": "yes", **({"dependency": after} if after else {})}
    pool.update_parameters(
        name=f"moloch-{name}", timeout_min=resources.timeout_min,
        cpus_per_task=resources.cpus, mem_gb=resources.mem_gb,
        slurm_partition=resources.partition, slurm_account=resources.account,
        slurm_additional_parameters=extra, **({"gpus_per_node": resources.gpus} if gpu else {}),
    )  # fmt: skip
    return pool


def _results(jobs: list[tuple[object, str]]) -> list:
    """Every job's result; a failed job is named with its log files."""
    out = []
    for job, name in jobs:
        try:
            out.append(job.result())
        except Exception as err:  # submitit's FailedJobError carries the job's traceback
            first = str(err).strip().splitlines()
            raise StageError(
                f"job {job.job_id} ({name}) failed: {first[-1] if first else err}; "
                f"its log: {job.paths.stderr}. Finished work is kept: fix the cause and "
                f"submit again"
            ) from None
    return out


def main(argv: list[str] | None = None, prog: str = "python -m moloch.submit") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="profile name or YAML path")
    parser.add_argument("--run-dir", help="run folder (default data/runs/<profile>)")
    parser.add_argument("--task", action="append", help="only this task (repeatable)")
    parser.add_argument("--model", action="append", help="only this player (repeatable)")
    parser.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per GPU job (default 1)")
    parser.add_argument("--cpus", type=int, default=8, help="CPUs per job (default 8)")
    parser.add_argument("--mem-gb", type=int, default=64, help="memory per job (default 64)")
    parser.add_argument("--timeout-min", type=int, default=24 * 60, help="per job (default 1440)")
    parser.add_argument("--no-report", action="store_true", help="last job: claims only")
    parser.add_argument("--wait", action="store_true", help="SLURM: wait for the last job")
    parser.add_argument("--yes", action="store_true", help="paid models: go on, do not ask")
    parser.add_argument(
        "--max-cost", type=float, metavar="DOLLARS",
        help="paid models: queue nothing if the run is expected to cost more",
    )  # fmt: skip
    args = parser.parse_args(argv)
    return guarded(lambda: _main(args))


def _main(args) -> int:
    for name in ("gpus", "cpus", "mem_gb", "timeout_min"):
        if getattr(args, name) < (0 if name == "gpus" else 1):
            raise MolochError(f"--{name.replace('_', '-')} {getattr(args, name)}: too small")
    resources = Resources(args.partition, args.gpus, args.cpus, args.mem_gb, args.timeout_min,
                          args.account)  # fmt: skip
    run = find_run(args.profile, args.run_dir)
    jobs = submit(run, args.executor, resources, args.task, args.model,
                  render=not args.no_report, yes=args.yes, max_cost=args.max_cost,
                  wait=True if args.wait else None)  # fmt: skip
    if jobs[-1].done():
        print(f"moloch: every job finished; claims in {run.claims_path}")
    else:
        print(f"moloch: submitted; `moloch status --run-dir {run.folder}` shows what is done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
