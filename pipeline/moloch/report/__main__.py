"""Build the report of a finished run: execute the analysis notebooks, stage them, render, check.

Renders with ``quarto render`` when Quarto is on the PATH, else with the offline
renderer (pandoc + Typst); both give ``_book/index.html`` and
``_book/moloch-bargain-reproduction.pdf``.

    python -m moloch.report --profile smoke                    # nox -s report -- --profile smoke
    python -m moloch.report --profile smoke --chapter sales    # nox -s chapter -- sales
    python -m moloch.report --chapter sales --stages           # first rerun sales' stale stages
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..claims import write_claims_csv
from ..config import DEFAULT_PROFILE
from ..errors import MolochError, StageError
from ..paths import ROOT
from . import notebooks
from .book import load_book
from .checks import check_book, table_first_column
from .render import render_book
from .shortcodes import embeds, find_cell


def rerun_stages(profile: str, chapter: str) -> None:
    """Bring the chapter's task up to date with ``moloch run --task`` (reruns stale stages only)."""
    task = notebooks.chapter_task(chapter)
    if task is None:
        raise StageError(
            f"--stages needs a task chapter (sales, elections, social_media), not {chapter!r}"
        )
    command = [sys.executable, "-m", "moloch.cli", "run", "--profile", profile, "--task", task]
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


def render(chapter: str | None, renderer: str, root: Path = ROOT) -> str:
    quarto = shutil.which("quarto")
    if renderer == "quarto" and not quarto:
        raise StageError("--renderer quarto: `quarto` is not on the PATH")
    if quarto and renderer != "offline":
        target = [str(load_book(root).chapter(chapter).source.relative_to(root))] if chapter else []
        if subprocess.run([quarto, "render", *target], cwd=root).returncode != 0:
            raise StageError("`quarto render` failed (its messages are above)")
        return "quarto"
    render_book(root, chapter)
    return "offline"


def build(
    profile: str = DEFAULT_PROFILE,
    chapter: str | None = None,
    stages: bool = False,
    force: bool = False,
    renderer: str = "auto",
    root: Path = ROOT,
) -> dict:
    """Execute the stale (or one chapter's) notebooks, render the book in ``root``, check it.

    ``profile`` is a name or a YAML path; returns the renderer used, the timings and the outputs.
    """
    start = time.perf_counter()
    if stages and not chapter:
        raise StageError("--stages goes with --chapter NAME")
    if chapter:
        load_book(root).chapter(chapter)  # fail early on a typo
        if stages:
            rerun_stages(profile, chapter)
        notebooks.execute_chapter(profile, chapter)
        executed = [chapter]
    else:
        print(f"claims -> {write_claims_csv(profile)}")
        executed = notebooks.execute_stale(profile, force=force)
    notebooks.stage(profile, staged=root / "_analysis")
    computed = time.perf_counter()
    used = render(chapter, renderer, root)
    rendered = time.perf_counter()
    book = load_book(root)
    check_book(book.output_dir, book.pdf, summary_cells(root))
    return {
        "renderer": used,
        "executed": executed,
        "notebooks_s": computed - start,
        "render_s": rendered - computed,
        "html": book.output_dir / "index.html",
        "pdf": book.pdf,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="the run: a name or YAML path")
    parser.add_argument("--chapter", help="re-execute and re-render only this chapter")
    parser.add_argument("--stages", action="store_true", help="with --chapter: rerun stale stages")
    parser.add_argument("--force", action="store_true", help="re-execute every notebook")
    parser.add_argument("--renderer", choices=("auto", "quarto", "offline"), default="auto")
    args = parser.parse_args(argv)
    try:
        out = build(args.profile, args.chapter, args.stages, args.force, args.renderer)
    except MolochError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
