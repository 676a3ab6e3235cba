"""Command line: run the study's stages, or list them.

    moloch run --profile smoke                       # every stage, every task and model
    moloch run --profile smoke --until compete       # stop after a stage
    moloch run --only probe --task sales --force probe
    moloch run --force all                           # every stage again (e.g. in replay)
    moloch status --profile smoke                    # each unit: up to date, stale (why), missing
    moloch submit --profile paper --partition gpu    # the shards as SLURM job arrays (submitit)
    moloch archive --profile smoke [--adapters]      # the run as one file, with its SHA-256
    moloch fetch-run URL-or-FILE [--sha256 HEX]      # unpack an archive into data/runs/<profile>
    MOLOCH_LLM_MODE=replay moloch run --run-dir DIR --force all-but-train   # rebuild from it
    moloch cache stats --profile smoke               # a run's call cache: answers by model
    moloch cache merge SHARD.sqlite --run-dir DIR    # another cache's answers into the run's
    moloch cache export answers.jsonl --profile smoke
    moloch stages                                    # the stages, in order

(``python -m moloch.cli ...`` is the same without the console script.)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import MolochError, guarded

# moloch COMMAND ARGS: the command line of the module that does the work (its own --help).
DELEGATED = {
    "estimate": ("moloch.estimate", (), "model calls, tokens and dollars of a profile"),
    "submit": ("moloch.submit", (), "run the shards as job arrays (SLURM, or here) via submitit"),
    "data": ("moloch.data", (), "fetch every input and verify its SHA-256"),
    "cells": ("moloch.cells", (), "a run's table of numbers with their intervals"),
    "claims": ("moloch.claims", (), "the claims registry, or every claim's verdict for a run"),
    "report": ("moloch.report.__main__", (), "render a run's report (HTML and PDF)"),
    "chapter": ("moloch.report.__main__", ("--chapter",), "re-execute and re-render a chapter"),
}


def _which_run(parser: argparse.ArgumentParser, shards: bool = False) -> None:
    """The options that find a run (``moloch.runs``), and with ``shards`` its tasks and players."""
    parser.add_argument(
        "--profile", help="profile name or YAML path (default: the run folder's, else smoke)"
    )
    parser.add_argument(
        "--run-dir", help="run folder (default data/runs/<profile>, or $MOLOCH_RUNS)"
    )
    if shards:
        parser.add_argument("--task", action="append", help="only this task (repeatable)")
        parser.add_argument("--model", action="append", help="only this player (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .stages import STAGE_NAMES

    parser = argparse.ArgumentParser(prog="moloch", description="Moloch's Bargain, reproduced.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or skip, when up to date) the pipeline's stages")
    _which_run(run, shards=True)
    run.add_argument("--only", action="append", choices=STAGE_NAMES, help="run only this stage")
    run.add_argument("--until", choices=STAGE_NAMES, help="stop after this stage")
    run.add_argument(
        "--force", action="append", default=[], choices=(*STAGE_NAMES, "all", "all-but-train"),
        help="rerun this stage (all: every stage; all-but-train: every stage made from model "
        "calls and data, e.g. to replay an archive without its adapter weights)",
    )  # fmt: skip
    run.add_argument("--yes", action="store_true", help="paid models: go on without asking")
    run.add_argument(
        "--max-cost", type=float, metavar="DOLLARS",
        help="paid models: start no unit that would take this run's spend past DOLLARS",
    )  # fmt: skip
    run.add_argument(
        "--no-notebooks",
        action="store_true",
        help="run the stage functions in this process instead of through papermill",
    )
    run.add_argument(
        "--fresh-kernels", action="store_true",
        help="a fresh notebook kernel for every unit (the default only where a GPU is or a role "
        "uses vLLM; elsewhere one warm kernel runs them all, its models kept loaded)",
    )  # fmt: skip
    status = commands.add_parser(
        "status", help="each unit of a run: up to date, stale (and why) or missing; runs nothing"
    )
    _which_run(status, shards=True)
    archive = commands.add_parser("archive", help="pack a finished run into one file")
    _which_run(archive)
    archive.add_argument("--adapters", action="store_true", help="include the LoRA weights")
    archive.add_argument("--out", help="archive file (default <run folder>.tar.gz)")
    fetch = commands.add_parser("fetch-run", help="download (or take) a run archive, unpack it")
    fetch.add_argument("source", help="URL or path of the archive")
    fetch.add_argument("--sha256", help="its SHA-256 (a local file's .sha256 is read)")
    fetch.add_argument("--run-dir", help="where to unpack (default data/runs/<its profile>)")
    cache = commands.add_parser("cache", help="a run's call cache: stats, merge, export")
    cache.add_argument("action", choices=("stats", "merge", "export"))
    cache.add_argument("paths", nargs="*", help="merge: caches to merge in; export: output file")
    _which_run(cache)
    commands.add_parser("stages", help="list the stages in order")
    for name, (_, _, what) in DELEGATED.items():
        commands.add_parser(name, help=f"{what} (moloch {name} --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module, before, _ = DELEGATED[argv[0]]
        rest = argv[1:]
        if rest and not rest[0].startswith("-"):  # moloch chapter sales ...
            rest = [*before, *rest]
        return importlib.import_module(module).main(rest, prog=f"moloch {argv[0]}")
    args = build_parser().parse_args(argv)
    return guarded(lambda: _main(args))


def _main(args) -> int:
    if args.command == "stages":
        from .stages import STAGES

        for stage in STAGES:
            per = f" (per method: {', '.join(stage.methods)})" if stage.methods else ""
            print(f"{stage.name:10s} {stage.notebook}{per}")
        return 0
    if args.command == "status":
        from .budget import Budget, paid, pending_costs
        from .runner import _choose, _specs
        from .runs import find_run
        from .stages import STAGES
        from .status import render, run_status

        run = find_run(args.profile, args.run_dir)
        tasks = _choose(args.task, run.profile.tasks, "task")
        models = _choose(args.model, [p.name for p in run.profile.players], "model")
        statuses = run_status(run, STAGES, tasks, models)
        print(render(statuses))
        if paid(_specs(run, STAGES, models)):  # what the rest will cost
            print(Budget(pending_costs(run, STAGES, tasks, models), None, print).describe())
        return 0
    if args.command == "cache":
        return _cache(args)
    if args.command == "archive":
        from .archive import pack
        from .runs import find_run

        out = pack(find_run(args.profile, args.run_dir), args.out, adapters=args.adapters)
        print(f"moloch: archive {out} (SHA-256 in {out.name}.sha256)")
        return 0
    if args.command == "fetch-run":
        from .archive import fetch, unpack

        folder = unpack(fetch(args.source, args.sha256), args.run_dir)
        print(f"moloch: run unpacked into {folder}; replay it with MOLOCH_LLM_MODE=replay "
              f"moloch run --run-dir {folder} --force all-but-train")  # fmt: skip
        return 0
    if args.command == "run" and args.max_cost is not None and args.max_cost < 0:
        raise MolochError(f"--max-cost {args.max_cost}: give a number of dollars, 0 or more")
    if args.only and args.until:
        raise MolochError("give --only or --until, not both")
    from .runner import run_pipeline
    from .stages import STAGE_NAMES

    reports = run_pipeline(
        args.profile,
        only=args.only,
        until=args.until,
        force=_forced(args.force, STAGE_NAMES),
        tasks=args.task,
        models=args.model,
        run_dir=args.run_dir,
        notebooks=not args.no_notebooks,
        yes=args.yes,
        max_cost=args.max_cost,
        fresh_kernels=True if args.fresh_kernels else None,
    )
    ran = sum(r.status == "ran" for r in reports)
    print(f"moloch: {ran} unit(s) run, {len(reports) - ran} up to date")
    return 0


def _cache(args) -> int:
    import json

    from .llm import CallCache
    from .runs import find_run

    cache = CallCache(find_run(args.profile, args.run_dir).cache_path)
    if args.action == "stats":
        print(json.dumps(cache.summary(), indent=1))
    elif args.action == "merge":
        if not args.paths:
            raise MolochError("moloch cache merge: give the cache file(s) to merge in")
        for path in args.paths:
            print(f"moloch: {path} -> {cache.path}: {json.dumps(cache.merge_from(path))}")
    else:
        if len(args.paths) != 1:
            raise MolochError("moloch cache export: give one output file (JSON lines)")
        print(f"moloch: {cache.export(args.paths[0])} answers -> {args.paths[0]}")
    return 0


def _forced(chosen: list[str], stages: Sequence[str]) -> list[str]:
    if "all" in chosen:
        return list(stages)
    if "all-but-train" in chosen:
        return [s for s in stages if s != "train"]
    return chosen


if __name__ == "__main__":
    sys.exit(main())
