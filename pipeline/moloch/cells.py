"""The run's numbers, computed once: every estimate with its interval, in ``<run>/cells/cells.csv``.

One row per cell (``moloch.stats.tidy_cells``): win rates per (task, model,
pair), probe rates per (task, model, method, probe) and trained-vs-base changes,
each with its interval, interval method, seed, n and invalid counts. The claims
table and every chapter of the report read this file and nothing else, so the
verdicts and the chapters always show the same numbers.

The step is skipped when its inputs (the compete and probe outputs recorded in
their manifests), the statistics settings and its code are unchanged.

    python -m moloch.cells --profile smoke      # (re)compute if stale, print the path
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd

from .errors import DataError, guarded
from .files import write_atomic, write_json
from .fingerprints import code_files, code_hash
from .hashing import text_sha256
from .manifests import MANIFEST, changed_outputs, output_files, outputs_hash, read_manifest
from .runs import Run, find_run
from .stats import CELL_COLUMNS, tidy_cells

SOURCES = {"compete": "votes.jsonl", "probe": "labels.jsonl"}  # stage -> table the cells read


def _table(run: Run, stage: str) -> pd.DataFrame | None:
    units = run.finished_units(stage)
    return run.table(stage, SOURCES[stage]) if units else None


def fingerprint(run: Run) -> dict:
    """What decides the cells: the compete and probe outputs, the stats settings, the code."""
    inputs = {
        folder.relative_to(run.folder).as_posix(): outputs_hash(read_manifest(folder))
        for stage in SOURCES
        for folder in run.finished_units(stage)
    }
    settings = {"seed": run.profile.seed, "stats": run.profile.stats.model_dump(mode="json")}
    parts = {
        "inputs": inputs,
        "params": text_sha256(json.dumps(settings, sort_keys=True)),
        "code": code_hash(code_files(__name__)),
    }
    return {"digest": text_sha256(json.dumps(parts, sort_keys=True)), **parts}


def write_cells(run: Run, force: bool = False) -> bool:
    """Compute the cells table if it is stale (or ``force``); True if it was computed.

    Reads the compete votes and probe labels of every finished unit; writes
    ``cells/cells.csv`` and ``cells/manifest.json`` (written last).
    """
    fprint = fingerprint(run)
    manifest = read_manifest(run.cells_dir)
    if (
        not force
        and manifest is not None
        and manifest.get("fingerprint", {}).get("digest") == fprint["digest"]
        and not changed_outputs(run.cells_dir, manifest)
    ):
        return False
    started = time.monotonic()
    (run.cells_dir / MANIFEST).unlink(missing_ok=True)
    stats = run.profile.stats
    cells = tidy_cells(
        _table(run, "compete"), _table(run, "probe"),
        run.profile.seed, stats.resamples, stats.confidence,
    )  # fmt: skip
    write_atomic(run.cells_path, cells.to_csv(index=False))
    write_json(
        run.cells_dir / MANIFEST,
        {
            "step": "cells",
            "profile": run.name,
            "profile_digest": run.profile.digest(),
            "fingerprint": fprint,
            "counts": {"cells": len(cells)},
            "wall_s": round(time.monotonic() - started, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "outputs": output_files(run.cells_dir),
        },
    )
    return True


def read_cells(run: Run, task: str | None = None) -> pd.DataFrame:
    """The run's cells table (of one task, if given), as written by :func:`write_cells`."""
    if not run.cells_path.is_file():
        raise DataError(
            f"{run.cells_path} is missing: compute it with `python -m moloch.cells "
            f"--run-dir {run.folder}` (nox -s report does it)"
        )
    # pandas 3 parses floats exactly: the numbers read back are the ones written (a test checks)
    cells = pd.read_csv(run.cells_path, dtype={"seed": "Int64", "n_parser_disagreements": "Int64"})
    missing = [c for c in CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise DataError(f"{run.cells_path} lacks column(s) {missing}: delete it and rerun")
    return cells if task is None else cells[cells["task"] == task].reset_index(drop=True)


def main(argv: list[str] | None = None, prog: str = "python -m moloch.cells") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="profile name or YAML path")
    parser.add_argument("--run-dir", help="run folder (default data/runs/<profile>)")
    parser.add_argument("--force", action="store_true", help="recompute even if up to date")
    args = parser.parse_args(argv)

    def work() -> int:
        run = find_run(args.profile, args.run_dir)
        computed = write_cells(run, args.force)
        print(f"{'computed' if computed else 'up to date'}: {run.cells_path}")
        return 0

    return guarded(work)


if __name__ == "__main__":
    raise SystemExit(main())
