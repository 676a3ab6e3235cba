"""Execute the analysis notebooks of a run with papermill, and stage them for the book.

Each chapter embeds cells of one analysis notebook (``pipeline/analysis/``),
executed with the run's parameters into ``<run>/report/<chapter>.ipynb``.
Before rendering, the executed notebooks are copied to ``_analysis/`` in the
book's root, the fixed place the chapters' ``embed`` shortcodes point at
(Quarto does not execute them: ``execute: enabled: false``). The notebooks
only read a finished run (its cells and claims tables and stage outputs);
nothing here reruns a pipeline stage.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import StageError
from ..kernels import WarmKernel, execute_notebook
from ..paths import PACKAGE_DIR, PIPELINE_DIR, ROOT
from ..runs import Run

ANALYSIS_DIR = PIPELINE_DIR / "analysis"
STAGED_DIR = ROOT / "_analysis"

# chapter -> (analysis notebook, extra parameters); every notebook also gets profile and run_dir.
CHAPTER_NOTEBOOKS: dict[str, tuple[str, dict]] = {
    "index": ("summary", {}),
    "simulation": ("simulation", {}),
    "sales": ("task", {"task": "sales"}),
    "elections": ("task", {"task": "elections"}),
    "social_media": ("task", {"task": "social_media"}),
    "tradeoff": ("tradeoff", {}),
    "released": ("released", {}),
    "appendix": ("provenance", {}),
}


def chapter_task(chapter: str) -> str | None:
    """The task a chapter is about (for ``--stages``), or None."""
    return CHAPTER_NOTEBOOKS.get(chapter, ("", {}))[1].get("task")


def _lookup(chapter: str) -> tuple[Path, dict]:
    if chapter not in CHAPTER_NOTEBOOKS:
        raise StageError(
            f"no analysis notebook for chapter {chapter!r}; "
            f"chapters: {', '.join(CHAPTER_NOTEBOOKS)}"
        )
    name, extra = CHAPTER_NOTEBOOKS[chapter]
    source = ANALYSIS_DIR / f"{name}.ipynb"
    if not source.is_file():
        raise StageError(
            f"chapter {chapter!r} needs the analysis notebook {source}, which is missing"
        )
    return source, extra


def executed_path(run: Run, chapter: str) -> Path:
    return run.report_dir / f"{chapter}.ipynb"


def _newest_input(run: Run) -> float:
    """The newest of the run's manifests (stage units and cells) and its claims table."""
    times = [p.stat().st_mtime for p in run.folder.glob("*/**/manifest.json")]
    if run.claims_path.is_file():
        times.append(run.claims_path.stat().st_mtime)
    return max(times, default=0.0)


def is_stale(run: Run, chapter: str) -> bool:
    """Not executed yet, or older than its notebook, the package's code or the run's outputs."""
    out = executed_path(run, chapter)
    if not out.is_file():
        return True
    source, _ = _lookup(chapter)
    built = out.stat().st_mtime
    newest_code = max(p.stat().st_mtime for p in PACKAGE_DIR.rglob("*.py"))
    return max(source.stat().st_mtime, newest_code, _newest_input(run)) > built


def execute_chapter(run: Run, chapter: str, kernel: WarmKernel | None = None) -> Path:
    """Execute a chapter's analysis notebook for ``run`` (in ``kernel``, else a fresh one);
    a failed run keeps the old one."""
    import papermill

    if not run.folder.is_dir():
        raise StageError(
            f"no run at {run.folder}: run the study first (`nox -s reproduce -- --profile "
            f"{run.profile_ref}`)"
        )
    source, extra = _lookup(chapter)
    out = executed_path(run, chapter)
    tmp = out.with_name(f".{out.name}.tmp.ipynb")
    offered = {"profile": run.profile_ref, "run_dir": str(run.folder), **extra}
    declared = papermill.inspect_notebook(str(source))  # the released chapter needs no run
    parameters = {k: v for k, v in offered.items() if k in declared}
    try:
        execute_notebook(source, tmp, parameters, run.folder, kernel)
    except papermill.PapermillExecutionError as err:
        raise StageError(
            f"analysis notebook {source.name} failed for chapter {chapter!r} "
            f"(its partial output is in {tmp}): {err.ename}: {err.evalue}"
        ) from err
    os.replace(tmp, out)
    return out


def execute_stale(run: Run, force: bool = False) -> list[str]:
    """Execute every chapter's notebook that is stale (all of them with ``force``), one after
    another in one kernel (each from an empty namespace; pandas and seaborn imported once)."""
    done = []
    with WarmKernel(run.folder) as kernel:
        for chapter in CHAPTER_NOTEBOOKS:
            if force or is_stale(run, chapter):
                execute_chapter(run, chapter, kernel)
                done.append(chapter)
    return done


def stage(run: Run, staged: Path = STAGED_DIR) -> list[Path]:
    """Copy the run's executed notebooks to ``_analysis/``, where the chapters embed from."""
    missing = [c for c in CHAPTER_NOTEBOOKS if not executed_path(run, c).is_file()]
    if missing:
        raise StageError(
            f"the run {run.folder} has no executed notebook for chapter(s) "
            f"{', '.join(missing)}: run `nox -s report -- --run-dir {run.folder}` to execute them"
        )
    staged.mkdir(exist_ok=True)
    copied = []
    for chapter in CHAPTER_NOTEBOOKS:
        target = staged / f"{chapter}.ipynb"
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(executed_path(run, chapter), tmp)
        os.replace(tmp, target)
        copied.append(target)
    return copied
