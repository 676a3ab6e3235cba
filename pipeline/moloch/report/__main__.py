"""Build the report of a finished run: cells, claims, analysis notebooks, render, check.

Renders with ``quarto render`` when Quarto is on the PATH, else with the offline
renderer (pandoc + Typst); both give ``_book/<profile>/index.html`` and
``_book/<profile>/moloch-bargain-reproduction.pdf``, so the books of several
profiles sit side by side (figures likewise in ``figures/<profile>/``).

    python -m moloch.report --profile smoke                  # nox -s report -- --profile smoke
    python -m moloch.report --run-dir /scratch/run           # the profile recorded there
    python -m moloch.report --profile smoke --chapter sales  # nox -s chapter -- sales
    python -m moloch.report --chapter sales --stages         # first rerun sales' stale stages
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..cells import write_cells
from ..claims import write_claims
from ..errors import StageError, guarded
from ..paths import ROOT
from ..runs import Run, find_run
from . import notebooks
from .book import Book, load_book
from .checks import check_book, table_first_column
from .render import render_book
from .shortcodes import embeds, find_cell

FIGURES = "figures"


def rerun_stages(run: Run, chapter: str) -> None:
    """Bring the chapter's task up to date with ``moloch run --task`` (reruns stale stages only)."""
    task = notebooks.chapter_task(chapter)
    if task is None:
        raise StageError(
            f"--stages needs a task chapter (sales, elections, social_media), not {chapter!r}"
        )
    command = [sys.executable, "-m", "moloch.cli", "run", "--profile", run.profile_ref]
    command += ["--run-dir", str(run.folder), "--task", task]
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise StageError(f"`{' '.join(command[2:])}` failed; the report was not re-rendered")


def summary_cells(root: Path = ROOT) -> list[str]:
    """The first-column cells of every table the summary page embeds: the PDF must show them."""
    index = load_book(root).chapter("index")
    cells = []
    for path, label in embeds(index.body):
        if label.startswith("tbl-"):
            cell = find_cell((index.source.parent / path).resolve(), label)
            for out in cell.outputs:
                cells += table_first_column(out.get("data", {}).get("text/markdown", ""))
    return cells


def profile_book(run: Run, root: Path = ROOT) -> Book:
    """The book of ``run``: the chapters of ``root`` rendered into ``<output-dir>/<profile>``."""
    book = load_book(root)
    return dataclasses.replace(book, output_dir=book.output_dir / run.name)


def render(run: Run, chapter: str | None, renderer: str, root: Path = ROOT) -> str:
    quarto = shutil.which("quarto")
    if renderer == "quarto" and not quarto:
        raise StageError("--renderer quarto: `quarto` is not on the PATH")
    book = profile_book(run, root)
    if quarto and renderer != "offline":
        target = [str(book.chapter(chapter).source.relative_to(root))] if chapter else []
        command = [quarto, "render", *target, "--output-dir", str(book.output_dir)]
        if subprocess.run(command, cwd=root).returncode != 0:
            raise StageError("`quarto render` failed (its messages are above)")
        return "quarto"
    render_book(root, chapter, book=book, figures_dir=root / FIGURES / run.name)
    return "offline"


def build(
    run: Run,
    chapter: str | None = None,
    stages: bool = False,
    force: bool = False,
    renderer: str = "auto",
    root: Path = ROOT,
) -> dict:
    """Bring the run's cells and claims up to date, execute the stale (or one chapter's)
    notebooks, render the book of ``run`` from ``root`` and check it.

    Returns the renderer used, the notebooks executed, the timings and the outputs.
    """
    start = time.perf_counter()
    if stages and not chapter:
        raise StageError("--stages goes with --chapter NAME")
    if chapter:
        load_book(root).chapter(chapter)  # fail early on a typo
        if stages:
            rerun_stages(run, chapter)
    write_cells(run)
    print(f"claims -> {write_claims(run)}")
    if chapter:
        notebooks.execute_chapter(run, chapter)
        executed = [chapter]
    else:
        executed = notebooks.execute_stale(run, force=force)
    notebooks.stage(run, staged=root / "_analysis")
    computed = time.perf_counter()
    used = render(run, chapter, renderer, root)
    rendered = time.perf_counter()
    book = profile_book(run, root)
    check_book(book.output_dir, book.pdf, summary_cells(root))
    return {
        "renderer": used,
        "executed": executed,
        "notebooks_s": computed - start,
        "render_s": rendered - computed,
        "html": book.output_dir / "index.html",
        "pdf": book.pdf,
    }


def main(argv: list[str] | None = None, prog: str = "python -m moloch.report") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="the run's profile: a name or YAML path")
    parser.add_argument("--run-dir", help="the run folder (default data/runs/<profile>)")
    parser.add_argument("--chapter", help="re-execute and re-render only this chapter")
    parser.add_argument("--stages", action="store_true", help="with --chapter: rerun stale stages")
    parser.add_argument("--force", action="store_true", help="re-execute every notebook")
    parser.add_argument("--renderer", choices=("auto", "quarto", "offline"), default="auto")
    parser.add_argument("--root", type=Path, default=ROOT, help="the book's folder (_quarto.yml)")
    args = parser.parse_args(argv)
    return guarded(lambda: _main(args))


def _main(args) -> int:
    run = find_run(args.profile, args.run_dir)
    out = build(run, args.chapter, args.stages, args.force, args.renderer, args.root)
    print(
        f"executed {len(out['executed'])} analysis notebook(s): "
        f"{', '.join(out['executed']) or 'none stale'}\n"
        f"{out['renderer']} render: {out['render_s']:.1f} s "
        f"(notebooks {out['notebooks_s']:.1f} s); "
        f"checks passed -> {out['html']}, {out['pdf']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
