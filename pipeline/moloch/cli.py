"""Command line: run the study's stages, or list them.

    moloch run --profile smoke                       # every stage, every task and model
    moloch run --profile smoke --until compete       # stop after a stage
    moloch run --only probe --task sales --force probe
    moloch run --force all                           # every stage again (e.g. in replay)
    moloch status --profile smoke                    # each unit: up to date, stale (why), missing
    moloch stages                                    # the stages, in order

(``python -m moloch.cli ...`` is the same without the console script.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import MolochError, guarded


def build_parser() -> argparse.ArgumentParser:
    from .stages import STAGE_NAMES

    parser = argparse.ArgumentParser(prog="moloch", description="Moloch's Bargain, reproduced.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or skip, when up to date) the pipeline's stages")
    run.add_argument(
        "--profile", help="profile name or YAML path (default: the run folder's, else smoke)"
    )
    run.add_argument("--only", action="append", choices=STAGE_NAMES, help="run only this stage")
    run.add_argument("--until", choices=STAGE_NAMES, help="stop after this stage")
    run.add_argument(
        "--force", action="append", default=[], choices=(*STAGE_NAMES, "all"),
        help="rerun this stage (all: every stage)",
    )  # fmt: skip
    run.add_argument("--task", action="append", help="only this task (repeatable)")
    run.add_argument("--model", action="append", help="only this player (repeatable)")
    run.add_argument("--run-dir", help="run folder (default data/runs/<profile>, or $MOLOCH_RUNS)")
    run.add_argument(
        "--no-notebooks",
        action="store_true",
        help="run the stage functions in this process instead of through papermill",
    )
    status = commands.add_parser(
        "status", help="each unit of a run: up to date, stale (and why) or missing; runs nothing"
    )
    for name in ("--profile", "--run-dir", "--task", "--model"):
        action = next(a for a in run._actions if a.option_strings == [name])
        status.add_argument(name, action=type(action), help=action.help)  # as for run
    commands.add_parser("stages", help="list the stages in order")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
        from .runner import _choose
        from .runs import find_run
        from .stages import STAGES
        from .status import render, run_status

        run = find_run(args.profile, args.run_dir)
        tasks = _choose(args.task, run.profile.tasks, "task")
        models = _choose(args.model, [p.name for p in run.profile.players], "model")
        statuses = run_status(run, STAGES, tasks, models)
        print(render(statuses))
        return 0
    if args.only and args.until:
        raise MolochError("give --only or --until, not both")
    from .runner import run_pipeline
    from .stages import STAGE_NAMES

    reports = run_pipeline(
        args.profile,
        only=args.only,
        until=args.until,
        force=STAGE_NAMES if "all" in args.force else args.force,
        tasks=args.task,
        models=args.model,
        run_dir=args.run_dir,
        notebooks=not args.no_notebooks,
    )
    ran = sum(r.status == "ran" for r in reports)
    print(f"moloch: {ran} unit(s) run, {len(reports) - ran} up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
